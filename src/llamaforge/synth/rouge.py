"""ROUGE-L near-duplicate filtering that scales to tens of thousands of instructions.

Values equal `rouge-score`'s (`RougeScorer(["rougeL"]).score(a, b)["rougeL"].fmeasure`,
no stemmer): the same tokenizer (lower-case, every run of characters outside [a-z0-9] is a
separator) and the same F-measure arithmetic on the longest common subsequence (LCS).

Why it is fast (`RougeIndex.max_score`, one candidate against the whole pool):
- F = 2·lcs / (m + n) for token counts m, n, and lcs <= min(m, n), so an item can only reach
  a threshold t when min/max >= t / (2 - t); the pool is kept in buckets by length and only
  the buckets in that window are scored (for t = 0.7: lengths within a factor 1.86).
- the LCS of the candidate with every pool item of a bucket is computed at once with the
  bit-parallel LCS recurrence (one machine word holds 64 candidate positions; numpy runs
  the recurrence over all items of the bucket, one pool token position per step), instead of
  one Python dynamic-programming table per pair.
"""

from __future__ import annotations

import math
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


class _Bucket:
    """Pool items of one length class: token ids (items, width), lengths, pool indices."""

    def __init__(self) -> None:
        self.ids = np.zeros((0, 1), dtype=np.int64)
        self.lens = np.zeros(0, dtype=np.int64)
        self.index = np.zeros(0, dtype=np.int64)
        self.min_len, self.max_len = 1 << 62, 0
        self._pending: list[tuple[list[int], int]] = []

    def add(self, ids: list[int], index: int) -> None:
        self._pending.append((ids, index))
        self.min_len, self.max_len = min(self.min_len, len(ids)), max(self.max_len, len(ids))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The bucket as arrays (items added since the last call are appended first)."""
        if self._pending:
            width = max(self.ids.shape[1], *(len(i) for i, _ in self._pending))
            new = np.zeros((len(self._pending), width), dtype=np.int64)  # 0 = padding id
            for r, (ids, _) in enumerate(self._pending):
                new[r, : len(ids)] = ids
            old = np.pad(self.ids, ((0, 0), (0, width - self.ids.shape[1])))
            self.ids = np.concatenate([old, new])
            self.lens = np.concatenate([self.lens, [len(i) for i, _ in self._pending]])
            self.index = np.concatenate([self.index, [k for _, k in self._pending]])
            self._pending = []
        return self.ids, self.lens, self.index

    def may_reach(self, m: int, threshold: float) -> bool:
        """Whether an item of this bucket can have ROUGE-L >= threshold with an m-token text.

        F = 2 lcs / (m + n) <= 2 min(m, n) / (m + n): only lengths near m can reach it.
        """
        n = min(max(m, self.min_len), self.max_len)  # the length nearest m
        return 2 * min(m, n) / (m + n) >= threshold - 1e-12


def _bucket_of(n: int) -> int:
    """Length class of an n-token text (about 12% wide), so a window of lengths is few."""
    return int(math.log(n) / math.log(1.125) + 1e-9) if n > 0 else -1


class RougeIndex:
    """A growing pool of texts; the best ROUGE-L of a new text against all of them."""

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self.vocab: dict[str, int] = {}
        self.buckets: dict[int, _Bucket] = {}
        self.texts: list[str] = []
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self.texts)

    def _ids(self, text: str, grow: bool) -> list[int]:
        out = []
        for t in rouge_tokens(text):
            if t not in self.vocab and grow:
                self.vocab[t] = len(self.vocab) + 1  # 0 stays the padding id
            out.append(self.vocab.get(t, -1))  # -1: a token no pool item has
        return out

    def add(self, text: str) -> None:
        """Put a text into the pool."""
        ids = self._ids(text, grow=True)
        self.buckets.setdefault(_bucket_of(len(ids)), _Bucket()).add(ids, len(self.texts))
        self.texts.append(text)

    def max_score(
        self, text: str, threshold: float = 0.0, *, stop_early: bool = False
    ) -> tuple[float, int | None]:
        """(best ROUGE-L, its pool index) of `text` against the pool.

        Only items whose length lets them reach `threshold` are scored (threshold 0: all,
        and the maximum is exact); a best score below the threshold is then only a bound.
        With `stop_early` the search ends at the first bucket holding an item at or above
        the threshold (nearest lengths first): enough to reject a near-duplicate.
        """
        cand = self._ids(text, grow=False)
        m = len(cand)
        if m == 0 or not self.texts:
            return 0.0, None
        best, where = 0.0, None
        home = _bucket_of(m)
        for key in sorted(self.buckets, key=lambda k: abs(k - home)):
            bucket = self.buckets[key]
            if key < 0 or (threshold > 0 and not bucket.may_reach(m, threshold)):
                continue
            ids, lens, index = bucket.arrays()
            f = _f_many(_lcs_many(cand, ids), m, lens)
            i = int(np.argmax(f))
            if f[i] > best:
                best, where = float(f[i]), int(index[i])
            if stop_early and threshold > 0 and best >= threshold:
                break
        return best, where


def _lcs_many(cand: list[int], items: np.ndarray) -> np.ndarray:
    """LCS length of `cand` with each row of `items` (0-padded token ids): (rows,) int."""
    rows, width = items.shape
    m = len(cand)
    words = (m + _WORD_BITS - 1) // _WORD_BITS
    # match[token] = bitmask of the candidate positions holding it, one row per word
    uniq = {t for t in cand if t > 0}
    lut = {t: np.zeros(words, dtype=np.uint64) for t in uniq}
    for i, t in enumerate(cand):
        if t > 0:
            lut[t][i // _WORD_BITS] |= np.uint64(1) << np.uint64(i % _WORD_BITS)
    vocab_ids = np.array(sorted(uniq), dtype=np.int64)
    table = np.zeros((len(vocab_ids) + 1, words), dtype=np.uint64)  # last row: no match
    for r, t in enumerate(vocab_ids):
        table[r] = lut[int(t)]
    pos = np.searchsorted(vocab_ids, items)
    pos = np.minimum(pos, max(len(vocab_ids) - 1, 0))
    hit = (vocab_ids[pos] == items) if len(vocab_ids) else np.zeros_like(items, dtype=bool)
    rowsel = np.where(hit, pos, len(vocab_ids))  # (rows, width) index into table
    top = m - (words - 1) * _WORD_BITS
    top_mask = _ONES if top == _WORD_BITS else np.uint64((1 << top) - 1)
    v = np.full((words, rows), _ONES, dtype=np.uint64)
    v[-1] &= top_mask
    with np.errstate(over="ignore"):
        for j in range(width):
            match = table[rowsel[:, j]].T  # (words, rows)
            u = v & match
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
