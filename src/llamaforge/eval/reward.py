"""Score preference pairs with a reward model: accuracy, margin, and the length baseline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ..losses import reward_scores
from ..model.llama import compute_device
from ..train.batches import collate_pairs


@dataclass
class PairScores:
    """Rewards of each pair's chosen and rejected answer, and what they add up to."""

    chosen: list[float] = field(default_factory=list)
    rejected: list[float] = field(default_factory=list)
    longer_chosen: list[float] = field(default_factory=list)  # 1, 0, or 0.5 for a tie

    def summary(self) -> dict[str, float | int]:
        """{"pairs", "accuracy", "mean_margin", "length_baseline"} (ties count half)."""
        n = len(self.chosen)
        margins = [c - r for c, r in zip(self.chosen, self.rejected, strict=True)]
        wins = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
        return {
            "pairs": n,
            "accuracy": wins / n if n else float("nan"),
            "mean_margin": sum(margins) / n if n else float("nan"),
            # how often "the longer answer wins" is right: the bar any accuracy must clear
            "length_baseline": sum(self.longer_chosen) / n if n else float("nan"),
        }


@torch.no_grad()
def score_pairs(
    model: nn.Module, examples: Sequence[dict], *, pad_id: int, batch_size: int = 8
) -> PairScores:
    """Reward of both answers of every tokenized pair (batches of 2B rows, one forward)."""
    device = compute_device(model)
    out = PairScores()
    for s in tqdm(range(0, len(examples), batch_size), desc="score", leave=False):
        part = examples[s : s + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(part, pad_id).items()}
        chosen, rejected = reward_scores(model, batch).cpu().chunk(2)
        out.chosen += chosen.tolist()
        out.rejected += rejected.tolist()
        for ex in part:
            c, r = len(ex["chosen_ids"]), len(ex["rejected_ids"])
            out.longer_chosen.append(1.0 if c > r else 0.5 if c == r else 0.0)
    return out


def answer_ids(
    tok,
    prompt: Sequence[dict],
    answer: str,
    *,
    template: str = "auto",
    max_seq_len: int = 1024,
    max_prompt_len: int | None = None,
) -> list[int]:
    """prompt + answer as the reward model reads it (the template's rendering, pairs' cuts)."""
    from ..data.templates import render_conversation

    head = render_conversation(tok, list(prompt), template, add_generation_prompt=True)[0]
    full = render_conversation(tok, [*prompt, {"role": "assistant", "content": answer}], template)
    ids = full[0]
    if len(ids) <= max_seq_len:
        return ids
    keep = min(len(head), max_prompt_len or max_seq_len // 2)  # as tokenize_pair cuts a pair
    return (head[-keep:] + ids[len(head) :])[:max_seq_len]


@torch.no_grad()
def score_answers(
    model: nn.Module,
    tok,
    prompts: Sequence[Sequence[dict]],
    answers: Sequence[str],
    *,
    template: str = "auto",
    max_seq_len: int = 1024,
    max_prompt_len: int | None = None,
    batch_size: int = 8,
) -> list[float]:
    """Reward of each (prompt messages, answer text), read at the sequence's last token."""
    from ..train.batches import collate

    seqs = [
        answer_ids(
            tok, p, a, template=template, max_seq_len=max_seq_len, max_prompt_len=max_prompt_len
        )
        for p, a in zip(prompts, answers, strict=True)
    ]
    device = compute_device(model)
    pad = tok.pad_id if tok.pad_id is not None else 0
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # little padding per batch
    out = [0.0] * len(seqs)
    for s in tqdm(range(0, len(order), batch_size), desc="reward", leave=False):
        idx = order[s : s + batch_size]
        batch = collate([{"input_ids": seqs[i]} for i in idx], pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        for i, r in zip(idx, reward_scores(model, batch).tolist(), strict=True):
            out[i] = float(r)
    return out
