"""AdamW over the trainable parameters and warm-up + cosine/linear/constant schedules."""

from __future__ import annotations

import math
from collections.abc import Callable

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
    With `optim.step_in_backward` the same AdamW runs per parameter inside the backward
    (`InBackwardOptimizer`).
    """
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = getattr(getattr(model, "kernels", None), "adamw", False)

    def adamw(param_groups: list[dict]) -> torch.optim.Optimizer:
        if any(p.dtype == torch.bfloat16 for p in params):
            return StochasticBF16AdamW(
                param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused
            )
        on_cuda = all(p.is_cuda and p.dtype.is_floating_point for p in params)
        kind = {"fused": True} if on_cuda else {"foreach": True}
        return torch.optim.AdamW(
            param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kind
        )

    if cfg.step_in_backward:
        return InBackwardOptimizer(groups, adamw, lr=cfg.lr)
    return adamw(groups)


class InBackwardOptimizer(torch.optim.Optimizer):
    """AdamW applied to each parameter during the backward, as soon as its gradient is whole.

    A hook after gradient accumulation (`register_post_accumulate_grad_hook`) runs that
    parameter's own optimizer (the same AdamW `build_optimizer` would build, over one
    tensor) and frees the gradient, so no full set of gradients is ever alive: for full
    fine-tuning that is the memory of one more copy of the trainable weights (2.3 GB for
    Llama-3.2-1B in bf16). The price: no clipping to a global norm (no step sees every
    gradient) and no gradient accumulation. The hooks also add up the squared gradient
    norms on the device; `take_grad_norm` returns the step's total norm (one sync).

    `param_groups` are this wrapper's (the scheduler sets their lr); each hook copies its
    group's lr into the per-parameter optimizer first. `step()` only counts: the updates
    have already happened. State dicts hold every per-parameter optimizer's, in order.
    """

    in_backward = True

    def __init__(
        self,
        groups: list[dict],
        make: Callable[[list[dict]], torch.optim.Optimizer],
        *,
        lr: float,
    ) -> None:
        super().__init__(groups, {"lr": lr})
        self.inner: list[torch.optim.Optimizer] = []
        self._sq: torch.Tensor | None = None
        for group in self.param_groups:
            hyper = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                opt = make([{**hyper, "params": [p]}])
                self.inner.append(opt)
                p.register_post_accumulate_grad_hook(self._hook(opt, group))

    def _hook(self, opt: torch.optim.Optimizer, group: dict) -> Callable[[torch.Tensor], None]:
        def apply(p: torch.Tensor) -> None:
            # squared norm reduced in fp32 without an fp32 copy of the gradient
            sq = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32).square()
            self._sq = sq if self._sq is None else self._sq + sq
            opt.param_groups[0]["lr"] = group["lr"]
            opt.step()
            p.grad = None

        return apply

    def take_grad_norm(self) -> float:
        """Total gradient norm of the updates applied since the last call (0.0 if none)."""
        sq, self._sq = self._sq, None
        return 0.0 if sq is None else float(sq.sqrt())

    def drop_grad_norm(self) -> None:
        """Forget the running norm without reading it (no device sync)."""
        self._sq = None

    def step(self, closure=None):  # noqa: D102 - the hooks did the work
        if closure is not None:
            raise ValueError("InBackwardOptimizer.step takes no closure")

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102 - grads are freed
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def state_dict(self) -> dict:  # noqa: D102
        return {
            "in_backward": [opt.state_dict() for opt in self.inner],
            "lr": [g["lr"] for g in self.param_groups],
        }

    def load_state_dict(self, state: dict) -> None:  # noqa: D102
        if "in_backward" not in state or len(state["in_backward"]) != len(self.inner):
            raise ValueError(
                "optimizer state is not from a run with optim.step_in_backward over the same "
                f"{len(self.inner)} trainable tensors"
            )
        for opt, sd in zip(self.inner, state["in_backward"], strict=True):
            opt.load_state_dict(sd)
        for g, lr in zip(self.param_groups, state["lr"], strict=True):
            g["lr"] = lr


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
