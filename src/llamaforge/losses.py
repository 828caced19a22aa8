"""Loss functions as pure functions of (model, batch) or of tensors.

Every loss returns `(loss_sum, count)`: the *sum* over trainable units (tokens here) and how
many there were, so the training loop can normalise over a whole accumulation window.
Labels follow Hugging Face's shift convention: logits at position t predict labels[t + 1];
-100 marks positions without loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .kernels.fused_ce import fused_ce_sum

IGNORE_INDEX = -100


def count_label_tokens(batch: dict[str, Tensor]) -> int:
    """Number of positions that carry a loss in a causal-LM batch (after the shift)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def token_ce_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token cross entropy in float32 and the token count.

    logits (B, T, V), labels (B, T). Returns (sum_nll scalar float32, n_tokens scalar long).
    """
    pred = logits[:, :-1].flatten(0, 1).float()  # (B*(T-1), V)
    target = labels[:, 1:].flatten()  # (B*(T-1),)
    nll = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, (target != IGNORE_INDEX).sum()


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Any]:
    """Keyword arguments for `Llama.forward`/`hidden_states`: positions and packed-row ids."""
    return {k: batch[k] for k in ("positions", "doc_ids") if k in batch}


def causal_lm_loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Next-token loss of a causal LM on a collated batch: (sum_nll, n_tokens)."""
    logits = model(batch["input_ids"], **model_inputs(batch))  # (B, T, V)
    return token_ce_sum(logits, batch["labels"])


def _chunk_nll(hidden: Tensor, target: Tensor, head: nn.Module) -> Tensor:
    """Summed NLL of one chunk: hidden (N, C), target (N,) -> scalar float32."""
    logits = head(hidden).float()  # (N, V)
    return F.cross_entropy(logits, target, reduction="sum")


def chunked_ce_sum(
    hidden: Tensor, head: nn.Module, labels: Tensor, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """Like `token_ce_sum(head(hidden), labels)` without materialising all logits.

    Only positions with a label are projected; each chunk of `chunk_size` tokens is
    recomputed in the backward pass, so peak memory holds one chunk's (N, V) logits.
    hidden (B, T, C), labels (B, T).
    """
    target = labels[:, 1:].flatten()  # (B*(T-1),)
    keep = target != IGNORE_INDEX
    h = hidden[:, :-1].flatten(0, 1)[keep]  # (N, C)
    target = target[keep]  # (N,)
    total = hidden.new_zeros((), dtype=torch.float32)  # no grad if no token has a label
    for start in range(0, target.numel(), chunk_size):
        end = start + chunk_size
        total = total + torch.utils.checkpoint.checkpoint(
            _chunk_nll, h[start:end], target[start:end], head, use_reentrant=False
        )
    return total, keep.sum()


def chunked_causal_lm_loss_fn(
    model: nn.Module, batch: dict[str, Tensor], chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """`causal_lm_loss_fn` from hidden states + lm_head, never holding all logits at once.

    With the model's `fused_ce` kernel on, each chunk's gradient is computed in the forward
    pass (no recomputation of the head); otherwise chunks are checkpointed and recomputed.
    """
    hidden = model.hidden_states(batch["input_ids"], **model_inputs(batch))  # (B, T, C)
    kernels = getattr(model, "kernels", None)
    if kernels is not None and kernels.fused_ce and type(model.lm_head) is nn.Linear:
        return fused_ce_sum(hidden, model.lm_head, batch["labels"])
    return chunked_ce_sum(hidden, model.lm_head, batch["labels"], chunk_size)
