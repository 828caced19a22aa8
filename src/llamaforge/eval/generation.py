"""Generation-based evaluation: answer held-out prompts, score exact match and ROUGE-L."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..data.tokenizer import Tokenizer
from ..model.generate import SamplingParams, generate
from .metrics import score_generations


@dataclass
class GenerationReport:
    """Scores over the evaluated items, plus every (reference, prediction) pair."""

    scores: dict[str, float]
    predictions: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "scores": self.scores,
            "samples": [
                {"reference": r, "prediction": p}
                for r, p in zip(self.references, self.predictions, strict=True)
            ],
        }


@torch.no_grad()
def evaluate_generation(
    model: torch.nn.Module,
    tok: Tokenizer,
    items: Sequence[dict],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "generate",
) -> GenerationReport:
    """Greedy answers for items ({"prompt_ids", "reference"}), scored against references."""
    if not items:
        raise ValueError("no held-out items to evaluate (is the test/validation split empty?)")
    was_training = model.training
    model.eval()
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_ids=sorted(tok.stop_ids))
    # Longest prompts first: fewer pad tokens per batch.
    order = sorted(range(len(items)), key=lambda i: -len(items[i]["prompt_ids"]))
    preds: list[str] = [""] * len(items)
    try:
        for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc=desc):
            idx = order[start : start + batch_size]
            outs = generate(model, [items[i]["prompt_ids"] for i in idx], params)
            for i, out in zip(idx, outs, strict=True):
                preds[i] = tok.decode(out).strip()
    finally:
        model.train(was_training)
    refs = [it["reference"] for it in items]
    return GenerationReport(score_generations(preds, refs), preds, refs)
