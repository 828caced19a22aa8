"""Pack tokenized examples into rows of ``max_seq_len`` tokens (greedy first-fit).

A packed row concatenates whole examples and adds, for the model and the loss:

- ``positions``: restart at 0 for each example (RoPE sees each example as if alone);
- ``doc_ids``: 0, 1, 2, ... numbering the examples in the row; the model builds the
  attention mask with ``llamaforge.model.llama.document_causal_mask(doc_ids)``;
- ``labels[first token of each example] = -100``: with the shift-by-one loss the last token
  of one example would otherwise be trained to predict the first token of the next.
"""

from __future__ import annotations

from collections.abc import Sequence

Example = dict[str, list[int]]
IGNORE = -100


def pack_examples(examples: Sequence[Example], max_seq_len: int) -> list[Example]:
    """Greedy first-fit: each example goes into the first row with room, in order."""
    bins = first_fit([len(e["input_ids"]) for e in examples], max_seq_len)
    return [pack_row([examples[i] for i in members]) for members in bins]


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of total length <= capacity (first bin with room wins)."""
    tree = _MaxTree(len(lengths))
    bins: list[list[int]] = []
    for i, n in enumerate(lengths):
        if not 0 < n <= capacity:
            raise ValueError(f"example {i} has {n} tokens; packing needs 1..{capacity}")
        b = tree.first_at_least(n)
        if b is None:
            b = len(bins)
            bins.append([])
            tree.set(b, capacity)
        bins[b].append(i)
        tree.set(b, tree.get(b) - n)
    return bins


def pack_row(examples: Sequence[Example]) -> Example:
    """Concatenate examples into one row with positions, doc_ids and boundary labels."""
    row: Example = {"input_ids": [], "labels": [], "positions": [], "doc_ids": []}
    for doc, ex in enumerate(examples):
        n = len(ex["input_ids"])
        row["input_ids"] += ex["input_ids"]
        row["labels"] += [IGNORE, *ex["labels"][1:]]
        row["positions"] += range(n)
        row["doc_ids"] += [doc] * n
    return row


class _MaxTree:
    """Segment tree of bin free space: find the leftmost bin with at least n free tokens."""

    def __init__(self, n: int) -> None:
        self.size = 1
        while self.size < max(n, 1):
            self.size *= 2
        self.free = [-1] * (2 * self.size)  # -1: bin not opened yet

    def get(self, b: int) -> int:
        """Free space of bin b."""
        return self.free[self.size + b]

    def set(self, b: int, value: int) -> None:
        """Set bin b's free space and update the maxima above it."""
        i = self.size + b
        self.free[i] = value
        while i > 1:
            i //= 2
            self.free[i] = max(self.free[2 * i], self.free[2 * i + 1])

    def first_at_least(self, n: int) -> int | None:
        """Leftmost bin whose free space is >= n, or None."""
        if self.free[1] < n:
            return None
        i = 1
        while i < self.size:
            i = 2 * i if self.free[2 * i] >= n else 2 * i + 1
        return i - self.size
