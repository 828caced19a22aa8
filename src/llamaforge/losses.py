"""Loss functions as pure functions of (model, batch) or of tensors.

Every loss returns `(loss_sum, count)`: the *sum* over trainable units (tokens here) and how
many there were, so the training loop can normalise over a whole accumulation window.
Labels follow Hugging Face's shift convention: logits at position t predict labels[t + 1];
-100 marks positions without loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .kernels.fused_ce import auto_chunk_size, fused_ce_sum, linear_cross_entropy
from .model.llama import CHOSEN_PART, PAD_PART, PROMPT_PART, PairSegments, shared_prompt_mask

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


def model_kernels(model: nn.Module) -> Any:
    """The model's kernel switches (`llamaforge.kernels.Kernels`), or None if it has none."""
    return getattr(model, "kernels", None)


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
    kernels = model_kernels(model)
    if kernels is not None and kernels.fused_ce and type(model.lm_head) is nn.Linear:
        return fused_ce_sum(hidden, model.lm_head, batch["labels"])
    return chunked_ce_sum(hidden, model.lm_head, batch["labels"], chunk_size)


# ---------------------------------------------------------------- preference pairs
#
# Pair batches hold 2B rows: the B chosen sequences first, then the B rejected ones
# (`train.batches.collate_pairs`), so chosen and rejected go through the model in one
# forward pass. Pair losses return (sum over pairs, number of pairs, metric sums).

PairLossOut = tuple[Tensor, Tensor, dict[str, Tensor]]


def count_pairs(batch: dict[str, Tensor]) -> int:
    """Number of preference pairs in a pair batch (the unit pair losses average over)."""
    rows = batch["input_ids"].shape[0]
    return rows if "rejected_targets" in batch else rows // 2  # shared prompt: a row a pair


def _chunk_token_nll(hidden: Tensor, target: Tensor, head: nn.Module) -> Tensor:
    """NLL of each token of one chunk: hidden (N, C), target (N,) -> (N,) float32."""
    return F.cross_entropy(head(hidden).float(), target, reduction="none")


def token_nll(hidden: Tensor, head: nn.Module, target: Tensor, kernels: Any = None) -> Tensor:
    """Next-token NLL of each labelled position, never holding all logits: (N,) float32.

    hidden (N, C) and target (N,) hold only labelled positions. A frozen bias-free head with
    the fused kernel on goes through `linear_cross_entropy(per_token=True)` (gradients in
    the forward pass, no head recompute); otherwise chunks are checkpointed.
    """
    fused = kernels is not None and kernels.fused_ce and type(head) is nn.Linear
    if fused and not head.weight.requires_grad:
        return linear_cross_entropy(hidden, head.weight, target, per_token=True)
    chunk = auto_chunk_size(head.weight.shape[0])
    parts = [
        torch.utils.checkpoint.checkpoint(
            _chunk_token_nll,
            hidden[s : s + chunk],
            target[s : s + chunk],
            head,
            use_reentrant=False,
        )
        for s in range(0, target.numel(), chunk)
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed log-probability of each row's labelled tokens, and their count: (N,), (N,).

    From hidden states and the head chunk by chunk (`token_nll`), so a 128k vocabulary
    never materialises (rows, T, V) logits. A shared-prompt pair batch
    (`train.batches.collate_shared_pairs`, B rows) gives the 2B values of its chosen then
    rejected answers, as the 2B rows of `collate_pairs` would.
    """
    if "rejected_targets" in batch:
        return _shared_pair_logps(model, batch)
    hidden = model.hidden_states(batch["input_ids"], **model_inputs(batch))  # (N, T, C)
    labels = batch["labels"][:, 1:]  # (N, T-1)
    mask = labels != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)
    nll = token_nll(hidden[:, :-1][mask], model.lm_head, labels[mask], model_kernels(model))
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=nll.device)
    return -sums.index_add(0, rows[mask], nll), mask.sum(1)


def _shared_pair_hidden(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Hidden states (B, T, C) of shared-prompt pair rows: each answer sees the prompt and
    itself (flash varlen segments where they run, the dense mask elsewhere)."""
    parts = batch["pair_parts"]
    use_varlen = getattr(model, "varlen_usable", None)
    if use_varlen is not None and use_varlen(parts):  # flash varlen, two segments a row
        mask: Any = PairSegments.from_parts(parts)
    else:
        mask = shared_prompt_mask(parts)  # (B, 1, T, T)
    return model.hidden_states(batch["input_ids"], positions=batch["positions"], mask=mask)


def _shared_pair_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Both answers of each shared-prompt row in one forward and one head pass: (2B,), (2B,)."""
    hidden = _shared_pair_hidden(model, batch)
    targets = torch.stack([batch["chosen_targets"], batch["rejected_targets"]])  # (2, B, T)
    keep = targets != IGNORE_INDEX
    b = targets.shape[1]
    side, row, pos = keep.nonzero(as_tuple=True)  # every labelled prediction
    nll = token_nll(hidden[row, pos], model.lm_head, targets[keep], model_kernels(model))
    sums = torch.zeros(2 * b, dtype=torch.float32, device=nll.device)
    return -sums.index_add(0, side * b + row, nll), keep.sum(2).flatten()


def reward_scores(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Scalar reward of each row from its last real token: (N,) float32.

    Rows are right-padded (`seq_lens` gives each length), or left-padded with an
    `attention_mask` (positions and a pad mask are built from it), with equal scores. A
    shared-prompt pair batch (B rows) gives the 2B scores of its chosen then rejected
    answers, each from its answer's last token, as the 2B rows of `collate_pairs` would.
    """
    from .model.llama import padded_causal_mask

    ids = batch["input_ids"]  # (N, T)
    if "rejected_targets" in batch:
        hidden = _shared_pair_hidden(model, batch)  # (B, T, C)
        parts = batch["pair_parts"]
        chosen_end = (parts == PROMPT_PART).sum(1) + (parts == CHOSEN_PART).sum(1) - 1
        rows = torch.arange(ids.shape[0], device=ids.device)
        h = torch.cat([hidden[rows, chosen_end], hidden[rows, (parts != PAD_PART).sum(1) - 1]])
        return model.score(h).squeeze(-1).float()
    if "attention_mask" in batch:
        am = batch["attention_mask"]
        positions = (am.cumsum(1) - 1).clamp(min=0)
        mask = padded_causal_mask(am, ids.shape[1], 0)
        hidden = model.hidden_states(ids, positions=positions, mask=mask)
        last = torch.full((ids.shape[0],), ids.shape[1] - 1, device=ids.device)
    else:
        hidden = model.hidden_states(ids, **model_inputs(batch))  # (N, T, C)
        last = batch["seq_lens"].to(ids.device) - 1
    h = hidden[torch.arange(ids.shape[0], device=ids.device), last]  # (N, C)
    return model.score(h).squeeze(-1).float()


def reward_pair_loss(
    chosen: Tensor, rejected: Tensor, margin: float = 0.0, center_coef: float = 0.0
) -> Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected - margin) + coef * (r_c + r_r)^2: (B,)."""
    loss = -F.logsigmoid(chosen - rejected - margin)
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss


def reward_loss_fn(margin: float = 0.0, center_coef: float = 0.0):
    """Pairwise reward-model loss on a pair batch: (sum, pairs, {accuracy, margin sums})."""

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> PairLossOut:
        chosen, rejected = reward_scores(model, batch).chunk(2)
        losses = reward_pair_loss(chosen, rejected, margin, center_coef)
        diff = (chosen - rejected).detach()
        extras = {
            "accuracy": (diff > 0).float().sum(),
            "margin": diff.sum(),
            "reward_chosen": chosen.detach().sum(),
            "reward_rejected": rejected.detach().sum(),
        }
        return losses.sum(), torch.tensor(len(chosen), device=losses.device), extras

    return loss_fn


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


def dpo_pair_loss(
    loss_type: str,
    logp_c: Tensor,
    logp_r: Tensor,
    n_c: Tensor,
    n_r: Tensor,
    ref_c: Tensor | None = None,
    ref_r: Tensor | None = None,
    *,
    beta: float = 0.1,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-pair loss of the DPO family from summed log-probs (B,) and token counts (B,).

    sigmoid (DPO): -log σ(β Δ), Δ = (logp_c - ref_c) - (logp_r - ref_r), with optional
    label smoothing; hinge: relu(1 - β Δ); ipo: (Δ/len - 1/(2β))² on per-token log-ratios;
    simpo (no reference): -log σ(β (avg_c - avg_r) - γ); orpo (no reference): the chosen
    answer's mean NLL - β log σ(log odds(avg_c) - log odds(avg_r)).
    """
    n_c, n_r = n_c.clamp(min=1).float(), n_r.clamp(min=1).float()
    if loss_type == "simpo":
        return -F.logsigmoid(beta * (logp_c / n_c - logp_r / n_r) - gamma)
    if loss_type == "orpo":
        avg_c, avg_r = logp_c / n_c, logp_r / n_r
        log_odds = (avg_c - avg_r) - (torch.log1p(-avg_c.exp()) - torch.log1p(-avg_r.exp()))
        return -avg_c - beta * F.logsigmoid(log_odds)
    if ref_c is None or ref_r is None:
        raise ValueError(f"dpo loss {loss_type!r} needs reference log-probs")
    chosen_ratio, rejected_ratio = logp_c - ref_c, logp_r - ref_r
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        ls = label_smoothing
        return -(1 - ls) * F.logsigmoid(beta * delta) - ls * F.logsigmoid(-beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        return (chosen_ratio / n_c - rejected_ratio / n_r - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown dpo loss {loss_type!r}; use one of {', '.join(DPO_LOSSES)}")


ReferenceFn = Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, Tensor]]


def dpo_loss_fn(
    loss_type: str,
    *,
    beta: float,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    reference: ReferenceFn | None = None,
):
    """DPO-family loss on a pair batch: (sum, pairs, metric sums).

    `reference(model, batch)` returns the reference model's summed log-probs of every row
    (2B,) — the base with adapters switched off, or precomputed values; reference-free
    losses (simpo, orpo) need none. Metrics: implicit rewards β (logp - ref) of both sides,
    their accuracy and margin, and the policy's chosen/rejected log-probs (a falling chosen
    log-prob is a known DPO failure, so it is logged).
    """

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> PairLossOut:
        logps, counts = sequence_logps(model, batch)
        logp_c, logp_r = logps.chunk(2)
        n_c, n_r = counts.chunk(2)
        ref_c = ref_r = None
        if loss_type not in REFERENCE_FREE:
            with torch.no_grad():
                ref_c, ref_r = reference(model, batch)
        losses = dpo_pair_loss(
            loss_type,
            logp_c,
            logp_r,
            n_c,
            n_r,
            ref_c,
            ref_r,
            beta=beta,
            gamma=gamma,
            label_smoothing=label_smoothing,
        )
        if ref_c is None:  # reference-free: rewards are the scaled mean log-probs
            rc, rr = beta * logp_c / n_c.clamp(min=1), beta * logp_r / n_r.clamp(min=1)
        else:
            rc, rr = beta * (logp_c - ref_c), beta * (logp_r - ref_r)
        rc, rr = rc.detach(), rr.detach()
        extras = {
            "accuracy": (rc > rr).float().sum(),
            "margin": (rc - rr).sum(),
            "reward_chosen": rc.sum(),
            "reward_rejected": rr.sum(),
            "logp_chosen": logp_c.detach().sum(),
            "logp_rejected": logp_r.detach().sum(),
        }
        return losses.sum(), torch.tensor(len(logp_c), device=losses.device), extras

    return loss_fn
