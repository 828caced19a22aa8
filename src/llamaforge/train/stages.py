"""The stage table: each training stage is a thin recipe on the one loop.

A stage supplies what differs between stages — how examples become batches, the loss
(and what its units are), what the model gains before training (a reward head, reference
log-probs), and which metrics are per-token language-model ones — and `recipe.run` does
the rest the same way for all of them (load, method, data, loop, outputs, evaluation).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..adapters.lora import disable_adapters
from ..config import RunConfig
from ..io.atomic import write_file_atomic
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
from ..model.llama import compute_device
from .batches import Batch, collate, collate_pairs, collate_shared_pairs
from .loop import LossFn, autocast_context, resolve_precision

REF_KEYS = ("ref_chosen_logp", "ref_rejected_logp")
PAIR_KEYS = ("prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")


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
    rows: int = 1  # sequences per example in a batch (pairs: chosen and rejected)
    # the run's own collation where a config key chooses it (default: `collate`)
    collate_for: Callable[[RunConfig], Callable[[Sequence[dict], int], Batch]] | None = None

    def batches(self, cfg: RunConfig) -> Callable[[Sequence[dict], int], Batch]:
        """How this run's examples become batches."""
        return self.collate if self.collate_for is None else self.collate_for(cfg)


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
def precompute_reference(
    model: nn.Module,
    examples: list[dict],
    pad_id: int,
    batch_size: int,
    collate_fn: Callable[[Sequence[dict], int], Batch] = collate_pairs,
):
    """Store the (starting) model's summed log-probs of both answers in each example
    (batches built by `collate_fn`: two rows a pair, or the run's shared-prompt rows)."""
    from tqdm import tqdm

    was = model.training
    model.eval()
    device = compute_device(model)
    try:
        starts = range(0, len(examples), batch_size)
        for s in tqdm(starts, desc="reference log-probs", leave=False):
            part = examples[s : s + batch_size]
            batch = {k: v.to(device) for k, v in collate_fn(part, pad_id).items()}
            logps, _ = sequence_logps(model, batch)
            chosen, rejected = logps.float().cpu().chunk(2)
            for ex, c, r in zip(part, chosen.tolist(), rejected.tolist(), strict=True):
                ex[REF_KEYS[0]], ex[REF_KEYS[1]] = float(c), float(r)
    finally:
        model.train(was)


def reference_cache_key(cfg: RunConfig, splits: Any, device: torch.device) -> str:
    """Everything the starting model's log-probs depend on: tokens, weights, precision.

    The examples' token ids and labels are hashed; the model's files by path, size and
    modification time (hashing gigabytes of weights would cost more than it saves).
    """
    from ..data.cache import cache_key
    from ..io.load import resolve_model_path

    tokens = hashlib.sha256()
    for examples in (splits.train, splits.validation):
        for ex in examples:
            tokens.update(json.dumps([ex[k] for k in PAIR_KEYS]).encode())
        tokens.update(b"|")
    path = resolve_model_path(cfg.model)
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    stats = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
    return cache_key(
        {
            "kind": "dpo-reference-logps",
            "tokens": tokens.hexdigest(),
            "model": stats,
            "method": cfg.method,
            "precision": resolve_precision(cfg.precision, device),
            "device": device.type,
            "master_dtype": cfg.optim.master_dtype,
            "batch_size": cfg.optim.batch_size,
        }
    )


def reference_cache_file(cfg: RunConfig, key: str) -> Path:
    """`<data cache dir>/../reference/<key>.npz` (beside the token cache)."""
    from ..data.cache import default_cache_dir

    base = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    return base.parent / "reference" / f"{key}.npz"


def _load_reference(path: Path, splits: Any) -> bool:
    """Put cached log-probs into the examples; False if absent, damaged or mismatched."""
    parts = (splits.train, splits.validation)
    try:
        with np.load(path, allow_pickle=False) as z:
            values = [z[f"{i}.{k}"] for i in range(len(parts)) for k in REF_KEYS]
    except (OSError, ValueError, KeyError):
        return False
    if any(len(v) != len(parts[i // 2]) for i, v in enumerate(values)):
        return False
    for i, examples in enumerate(parts):
        for k, column in zip(REF_KEYS, values[2 * i : 2 * i + 2], strict=True):
            for ex, v in zip(examples, column.tolist(), strict=True):
                ex[k] = float(v)
    return True


def _save_reference(path: Path, splits: Any) -> None:
    """Atomically: a temporary file in the same folder, renamed into place."""
    arrays = {
        f"{i}.{k}": np.asarray([ex[k] for ex in examples], dtype=np.float64)
        for i, examples in enumerate((splits.train, splits.validation))
        for k in REF_KEYS
    }
    write_file_atomic(path, lambda f: np.savez(f, **arrays))


def _pair_collate(section: str) -> Callable[[RunConfig], Callable[[Sequence[dict], int], Batch]]:
    """The pair layout a stage's `<section>.shared_prompt` key chooses."""

    def choose(cfg: RunConfig) -> Callable[[Sequence[dict], int], Batch]:
        return collate_shared_pairs if getattr(cfg, section).shared_prompt else collate_pairs

    return choose


_dpo_collate, _rm_collate = _pair_collate("dpo"), _pair_collate("rm")


def _dpo_before_train(model: nn.Module, cfg: RunConfig, splits: Any, pad_id: int) -> None:
    """Reference log-probs in the precision training runs in, with the starting weights.

    Computed once and cached on disk (`reference_cache_key`): a resumed or repeated run
    with the same data, model and precision reads them back instead of a forward pass
    over the whole data set.
    """
    if not uses_precomputed_reference(cfg):
        return
    device = compute_device(model)
    path = reference_cache_file(cfg, reference_cache_key(cfg, splits, device))
    if _load_reference(path, splits):
        print(f"reference log-probs from cache {path}", file=sys.stderr)
        return
    with autocast_context(resolve_precision(cfg.precision, device), device):
        for examples in (splits.train, splits.validation):
            precompute_reference(model, examples, pad_id, cfg.optim.batch_size, _dpo_collate(cfg))
    _save_reference(path, splits)


STAGES: dict[str, Stage] = {
    "pt": Stage("pt", collate, count_label_tokens, _lm_loss),
    "sft": Stage("sft", collate, count_label_tokens, _lm_loss),
    "rm": Stage(
        "rm",
        collate_pairs,
        count_pairs,
        _rm_loss,
        lm=False,
        prepare=_reward_head,
        rows=2,
        collate_for=_rm_collate,
    ),
    "dpo": Stage(
        "dpo",
        collate_pairs,
        count_pairs,
        _dpo_loss,
        lm=False,
        before_train=_dpo_before_train,
        rows=2,
        collate_for=_dpo_collate,
    ),
}
