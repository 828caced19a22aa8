"""Next tokens for a batch in which every row has its own sampling parameters.

Per row, in transformers' processor order (as `model.generate.sample_next`): repetition
penalty, then greedy (temperature 0) or temperature, top-k, top-p and a draw. The draw is by
inverse CDF from one uniform number per row, taken from the row's own generator when it has a
seed: a seeded request samples the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowSampling:
    """The sampling settings of one row, as the batch sampler reads them."""

    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    generator: torch.Generator  # CPU generator (its own when seeded)


def penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL repetition penalty per row: logits (B, V), seen bool (B, V), penalty (B, 1)."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def sample_rows(
    logits: torch.Tensor, rows: list[RowSampling], seen: torch.Tensor | None = None
) -> torch.Tensor:
    """Token per row (B,) from float32 logits (B, V); seen (B, V) where a row is penalised."""
    dev = logits.device
    if seen is not None:
        pen = torch.tensor([r.repetition_penalty for r in rows], device=dev)[:, None]
        logits = penalise(logits, seen, pen)
    greedy_tokens = logits.argmax(-1)
    sampled = [i for i, r in enumerate(rows) if r.temperature > 0]
    if not sampled:
        return greedy_tokens
    idx = torch.tensor(sampled, device=dev)
    sub = [rows[i] for i in sampled]
    temps = torch.tensor([r.temperature for r in sub], device=dev)[:, None]
    lg = logits.index_select(0, idx) / temps
    sorted_lg, order = lg.sort(-1, descending=True)  # (S, V)
    ks = torch.tensor([r.top_k for r in sub], device=dev)
    kth_at = (ks.clamp(1, lg.shape[-1]) - 1)[:, None]
    kth = sorted_lg.gather(-1, kth_at)  # (S, 1): ties with the k-th value are kept
    drop_k = (ks[:, None] > 0) & (sorted_lg < kth)
    sorted_lg = sorted_lg.masked_fill(drop_k, float("-inf"))
    probs = sorted_lg.softmax(-1)
    tops = torch.tensor([r.top_p for r in sub], device=dev)[:, None]
    before = probs.cumsum(-1) - probs  # mass strictly ahead of each token
    drop_p = before >= tops
    drop_p[:, 0] = False
    probs = sorted_lg.masked_fill(drop_p, float("-inf")).softmax(-1)
    cdf = probs.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=r.generator) for r in sub]).to(dev)[:, None]
    pick = (cdf < u * cdf[:, -1:]).sum(-1, keepdim=True).clamp_max(lg.shape[-1] - 1)
    tokens = order.gather(-1, pick).squeeze(-1)
    return greedy_tokens.index_copy(0, idx, tokens)


def logprob_info(
    logits: torch.Tensor, tokens: torch.Tensor, top: int
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probability of each chosen token under the model (B,) and the `top` most likely."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1).tolist()
    if top <= 0:
        return chosen, [[] for _ in chosen]
    vals, ids = logp.topk(top, dim=-1)
    return chosen, [
        list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)
    ]
