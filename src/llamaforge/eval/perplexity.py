"""Perplexity of a text under a model, in windows of the context length."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..model.llama import Llama


@dataclass
class PerplexityResult:
    """Scored-token count, mean negative log-likelihood (nats) and its exponential."""

    tokens: int
    nll: float
    perplexity: float


@torch.no_grad()
def perplexity(
    model: Llama,
    ids: Sequence[int],
    *,
    window: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> PerplexityResult:
    """Score every token after the first once, in windows of `window` tokens.

    Consecutive windows overlap by one token, so each scored token is predicted from
    the tokens before it inside its window (at most window - 1 of them).
    """
    window = min(window or model.cfg.max_seq_len, model.cfg.max_seq_len)
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to measure perplexity, got {len(ids)}")
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    starts = list(range(0, len(ids) - 1, window - 1))
    total, count = 0.0, 0
    device = model.device
    for i in tqdm(range(0, len(starts), batch_size), disable=not progress, desc="perplexity"):
        chunk = [list(ids[s : s + window]) for s in starts[i : i + batch_size]]
        longest = max(len(c) for c in chunk)
        x = torch.zeros(len(chunk), longest, dtype=torch.long, device=device)
        y = torch.full_like(x, -100)
        for r, c in enumerate(chunk):
            x[r, : len(c)] = torch.tensor(c)
            y[r, : len(c) - 1] = torch.tensor(c[1:])
        logits = model(x).float()  # (B, T, V); pads sit after real tokens, causal keeps them out
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        total += nll.item()
        count += int((y != -100).sum())
    mean = total / count
    return PerplexityResult(tokens=count, nll=mean, perplexity=math.exp(mean))
