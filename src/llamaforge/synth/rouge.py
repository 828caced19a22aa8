"""ROUGE-L near-duplicate filtering that scales to tens of thousands of instructions.

Values equal `rouge-score`'s (`RougeScorer(["rougeL"]).score(a, b)["rougeL"].fmeasure`,
no stemmer): the same tokenizer (lower-case, every run of characters outside [a-z0-9] is a
separator) and the same F-measure arithmetic on the longest common subsequence (LCS).

Why it is fast (`RougeIndex.max_score`, one candidate against the whole pool):
- F = 2·lcs / (m + n) for token counts m, n, and lcs <= min(m, n), so an item can only reach
  a threshold t when min/max >= t / (2 - t): for t = 0.7 only items within a factor 1.86 of
  the candidate's length are scored at all.
- the LCS of the candidate with every remaining pool item is computed at once with the
  bit-parallel LCS recurrence (a machine word holds 64 candidate positions; numpy runs the
  recurrence over all items together, one pool token position per step) instead of one
  Python dynamic-programming table per pair; the pool is one growing token-id array.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

_SEPARATORS = re.compile(r"[^a-z0-9]+")
_WORD_BITS = 64
_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokens (no stemmer): lower-cased [a-z0-9]+ runs."""
    return [t for t in _SEPARATORS.split(text.lower()) if t]


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two token sequences (bit-parallel)."""
    if not a or not b:
        return 0
    masks: dict = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def f_measure(lcs: int, m: int, n: int) -> float:
    """rouge-score's F-measure from an LCS length and the two token counts."""
    if not lcs:
        return 0.0
    precision, recall = lcs / n, lcs / m
    return 2 * precision * recall / (precision + recall)


def rouge_l(target: str, prediction: str) -> float:
    """ROUGE-L F-measure of two texts, equal to rouge-score's."""
    a, b = rouge_tokens(target), rouge_tokens(prediction)
    return f_measure(lcs_length(a, b), len(a), len(b))


class RougeIndex:
    """A growing pool of texts; the best ROUGE-L of a new text against all of them."""

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self.vocab: dict[str, int] = {}
        self.texts: list[str] = []
        self._ids = np.zeros((64, 16), dtype=np.int64)  # (capacity, width), 0 = padding
        self._lens = np.zeros(64, dtype=np.int64)
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self.texts)

    def _tokens(self, text: str, grow: bool) -> list[int]:
        out = []
        for t in rouge_tokens(text):
            if t not in self.vocab and grow:
                self.vocab[t] = len(self.vocab) + 1
            out.append(self.vocab.get(t, -1))  # -1: a token no pool item has
        return out

    def add(self, text: str) -> None:
        """Put a text into the pool."""
        ids = self._tokens(text, grow=True)
        n = len(self.texts)
        rows, width = self._ids.shape
        if n == rows or len(ids) > width:  # grow by doubling: amortised O(1) per add
            grown = np.zeros((rows * 2 if n == rows else rows, max(width, len(ids))), np.int64)
            grown[:rows, :width] = self._ids
            self._ids = grown
            self._lens = np.concatenate([self._lens, np.zeros(len(grown) - rows, np.int64)])
        self._ids[n, : len(ids)] = ids
        self._lens[n] = len(ids)
        self.texts.append(text)

    def max_score(self, text: str, threshold: float = 0.0) -> tuple[float, int | None]:
        """(best ROUGE-L, its pool index) of `text` against the pool.

        Only items whose length lets them reach `threshold` are scored (threshold 0: all,
        and the maximum is exact); a best score below the threshold is then only a bound.
        F = 2 lcs / (m + n) <= 2 min(m, n) / (m + n), so only lengths near m can reach it.
        """
        cand = self._tokens(text, grow=False)
        m, n = len(cand), len(self.texts)
        if m == 0 or n == 0:
            return 0.0, None
        lens = self._lens[:n]
        reach = (lens > 0) & (2 * np.minimum(lens, m) >= (threshold - 1e-12) * (lens + m))
        sel = np.flatnonzero(reach)
        if sel.size == 0:
            return 0.0, None
        items = self._ids[sel, : int(lens[sel].max())]
        f = _f_many(_lcs_many(cand, items, len(self.vocab) + 1), m, lens[sel])
        i = int(np.argmax(f))
        return (float(f[i]), int(sel[i])) if f[i] > 0 else (0.0, None)


def _lcs_many(cand: list[int], items: np.ndarray, vocab: int) -> np.ndarray:
    """LCS length of `cand` with each row of `items` (token ids < vocab, 0 = padding)."""
    rows, width = items.shape
    m = len(cand)
    words = (m + _WORD_BITS - 1) // _WORD_BITS
    # masks[token, w]: bits of the candidate positions holding the token (word w)
    masks = np.zeros((vocab, words), dtype=np.uint64)
    for i, t in enumerate(cand):
        if t > 0:
            masks[t, i // _WORD_BITS] |= np.uint64(1) << np.uint64(i % _WORD_BITS)
    match = masks[items.T]  # (width, rows, words); padding and unseen tokens match nothing
    top = m - (words - 1) * _WORD_BITS
    top_mask = _ONES if top == _WORD_BITS else np.uint64((1 << top) - 1)
    v = np.full((words, rows), _ONES, dtype=np.uint64)
    v[-1] &= top_mask
    with np.errstate(over="ignore"):
        if words == 1:  # the common case (<= 64 tokens): plain uint64 arithmetic
            v0, col = v[0], match[:, :, 0]
            for j in range(width):
                u = v0 & col[j]
                v0 = ((v0 + u) | (v0 - u)) & top_mask
            return m - _popcount(v0)
        for j in range(width):
            u = v & match[j].T  # (words, rows)
            carry = np.zeros(rows, dtype=np.uint64)
            for w in range(words):  # (v + u) | (v - u) on a multi-word number
                s = v[w] + u[w]
                c1 = s < v[w]
                s2 = s + carry
                c2 = s2 < s
                v[w] = s2 | (v[w] & ~u[w])
                carry = (c1 | c2).astype(np.uint64)
            v[-1] &= top_mask
    zeros = np.zeros(rows, dtype=np.int64)
    for w in range(words):
        zeros += _popcount(v[w])
    return m - zeros


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 element."""
    return np.bitwise_count(x).astype(np.int64)


def _f_many(lcs: np.ndarray, m: int, lens: np.ndarray) -> np.ndarray:
    """rouge-score's F-measure per item, in the same float64 arithmetic as `f_measure`."""
    lcs_f = lcs.astype(np.float64)
    safe = np.maximum(lens, 1).astype(np.float64)
    precision, recall = lcs_f / safe, lcs_f / m
    denom = precision + recall
    f = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    return np.where(lcs > 0, f, 0.0)
