"""Generation metrics on held-out data: exact match and ROUGE-L (``rouge-score``, the reference).

``normalize_answer`` is the peer benchmark's (bench/hf_quality.py): lower-case, drop every
character that is not a-z, 0-9 or a space, strip the ends. It does not merge inner runs of
spaces (so the numbers compare with the benchmark's); pass ``collapse_spaces=True`` for that.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

_DROP = re.compile(r"[^a-z0-9 ]")
_SPACES = re.compile(r" +")


def normalize_answer(text: str, *, collapse_spaces: bool = False) -> str:
    """Lower-case, keep only [a-z0-9 ], strip (and optionally merge runs of spaces)."""
    out = _DROP.sub("", text.lower()).strip()
    return _SPACES.sub(" ", out) if collapse_spaces else out


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the normalized prediction equals the normalized reference, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(ref))


@functools.lru_cache(maxsize=2)
def _scorer(use_stemmer: bool) -> Any:
    """A cached ``rouge_score`` ROUGE-L scorer."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(pred: str, ref: str, *, use_stemmer: bool = False) -> float:
    """ROUGE-L F-measure of a prediction against one reference (rouge-score's tokenizer)."""
    return float(_scorer(use_stemmer).score(ref, pred)["rougeL"].fmeasure)


def score_generations(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean exact match and ROUGE-L over pairs of prediction and reference."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if not preds:
        return {"exact_match": 0.0, "rouge_l": 0.0}
    pairs = list(zip(preds, refs, strict=True))
    return {
        "exact_match": sum(exact_match(p, r) for p, r in pairs) / len(pairs),
        "rouge_l": sum(rouge_l(p, r) for p, r in pairs) / len(pairs),
    }
