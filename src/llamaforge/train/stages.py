"""The stage table: each training stage is a thin recipe on the one loop.

A stage supplies what differs between stages — how examples become batches, the loss
(and what its units are), what the model gains before training (a reward head, reference
log-probs), and which metrics are per-token language-model ones — and `recipe.run` does
the rest the same way for all of them (load, method, data, loop, outputs, evaluation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.lora import disable_adapters
from ..config import RunConfig
from ..io.hf import add_score_head
from ..losses import (
    REFERENCE_FREE,
    chunked_causal_lm_loss_fn,
    count_label_tokens,
    count_pairs,
    dpo_loss_fn,
    reward_loss_fn,
    sequence_logps,
)
from .batches import Batch, collate, collate_pairs
from .loop import LossFn, autocast_context, resolve_precision

REF_KEYS = ("ref_chosen_logp", "ref_rejected_logp")


@dataclass(frozen=True)
class Stage:
    """What one stage adds to the shared recipe."""

    name: str
    collate: Callable[[Sequence[dict], int], Batch]
    count: Callable[[Batch], int]
    loss: Callable[[RunConfig], LossFn]
    lm: bool = True  # per-token LM loss: perplexity and generation metrics make sense
    prepare: Callable[[nn.Module, RunConfig], None] | None = None  # before the method
    before_train: Callable[[nn.Module, RunConfig, Any, int], None] | None = None


def _lm_loss(_cfg: RunConfig) -> LossFn:
    return chunked_causal_lm_loss_fn


def _reward_head(model: nn.Module, _cfg: RunConfig) -> None:
    add_score_head(model)
    model.score.float()  # trained in fp32 like LoRA weights; autocast runs its matmul


def _rm_loss(cfg: RunConfig) -> LossFn:
    return reward_loss_fn(cfg.rm.margin, cfg.rm.center_coef)


def uses_precomputed_reference(cfg: RunConfig) -> bool:
    """Whether DPO reads reference log-probs computed once before training."""
    if cfg.dpo.loss in REFERENCE_FREE:
        return False
    return cfg.dpo.reference == "precompute" or (
        cfg.dpo.reference == "auto" and cfg.method not in ("lora", "qlora")
    )


def _adapters_off_reference(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    with disable_adapters(model):
        logps, _ = sequence_logps(model, batch)
    return logps.chunk(2)


def _precomputed_reference(_model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[REF_KEYS[0]], batch[REF_KEYS[1]]


def _dpo_loss(cfg: RunConfig) -> LossFn:
    d = cfg.dpo
    ref = _precomputed_reference if uses_precomputed_reference(cfg) else _adapters_off_reference
    return dpo_loss_fn(
        d.loss, beta=d.beta, gamma=d.gamma, label_smoothing=d.label_smoothing, reference=ref
    )


@torch.no_grad()
def precompute_reference(model: nn.Module, examples: list[dict], pad_id: int, batch_size: int):
    """Store the (starting) model's summed log-probs of both answers in each example."""
    from tqdm import tqdm

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        starts = range(0, len(examples), batch_size)
        for s in tqdm(starts, desc="reference log-probs", leave=False):
            part = examples[s : s + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(part, pad_id).items()}
            logps, _ = sequence_logps(model, batch)
            chosen, rejected = logps.float().cpu().chunk(2)
            for ex, c, r in zip(part, chosen.tolist(), rejected.tolist(), strict=True):
                ex[REF_KEYS[0]], ex[REF_KEYS[1]] = float(c), float(r)
    finally:
        model.train(was)


def _dpo_before_train(model: nn.Module, cfg: RunConfig, splits: Any, pad_id: int) -> None:
    """Reference log-probs in the precision training runs in, with the starting weights."""
    if not uses_precomputed_reference(cfg):
        return
    device = next(model.parameters()).device
    with autocast_context(resolve_precision(cfg.precision, device), device):
        for examples in (splits.train, splits.validation):
            precompute_reference(model, examples, pad_id, cfg.optim.batch_size)


STAGES: dict[str, Stage] = {
    "pt": Stage("pt", collate, count_label_tokens, _lm_loss),
    "sft": Stage("sft", collate, count_label_tokens, _lm_loss),
    "rm": Stage("rm", collate_pairs, count_pairs, _rm_loss, lm=False, prepare=_reward_head),
    "dpo": Stage(
        "dpo", collate_pairs, count_pairs, _dpo_loss, lm=False, before_train=_dpo_before_train
    ),
}
