"""Score preference pairs with a reward model: accuracy, margin, and the length baseline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ..losses import reward_scores
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
    device = next(model.parameters()).device
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
