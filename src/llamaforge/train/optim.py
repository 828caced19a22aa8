"""AdamW over the trainable parameters and warm-up + cosine/linear/constant schedules."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..config import OptimConfig
from .bf16_adamw import StochasticBF16AdamW


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and undecayed (norms, biases, 1-D)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower():
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over `requires_grad` parameters; fused kernels when they all live on CUDA.

    bf16 trainable weights (`optim.master_dtype: bf16`) get the stochastic-rounding AdamW.
    """
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    if any(p.dtype == torch.bfloat16 for p in params):
        fused = getattr(getattr(model, "kernels", None), "adamw", False)
        return StochasticBF16AdamW(
            groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused
        )
    on_cuda = all(p.is_cuda and p.dtype.is_floating_point for p in params)
    kind = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kind)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warm-up length: `warmup_steps` if set, else `ceil(warmup_ratio * total_steps)`."""
    if cfg.warmup_steps > 0:
        return cfg.warmup_steps
    return math.ceil(cfg.warmup_ratio * total_steps)


def lr_factor(
    step: int, *, total: int, warmup: int, schedule: str, min_ratio: float = 0.0
) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based).

    Linear warm-up reaches 1 at step `warmup - 1`; then cosine/linear decay reaches
    `min_ratio` at step `total`; `constant` stays at 1.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r} (cosine, linear, constant)")
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> LambdaLR:
    """Per-step LambdaLR for the configured schedule; its state_dict holds plain numbers."""
    warmup = warmup_steps(cfg, total_steps)

    def factor(step: int) -> float:
        return lr_factor(
            step,
            total=total_steps,
            warmup=warmup,
            schedule=cfg.schedule,
            min_ratio=cfg.min_lr_ratio,
        )

    return LambdaLR(optimizer, factor)
