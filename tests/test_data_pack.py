"""Greedy first-fit packing: row layout, and a packed row computes what each example alone does."""

from __future__ import annotations

import random

import pytest
import torch

from llamaforge.data.pack import IGNORE, first_fit, pack_examples, pack_row
from llamaforge.model.llama import document_causal_mask
from tests.helpers import random_model


def _example(n: int, start: int = 10) -> dict[str, list[int]]:
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [IGNORE] * (n // 2) + ids[n // 2 :]}


def test_first_fit_matches_naive_scan():
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(500)]
    bins, free = [], []
    for i, n in enumerate(lengths):  # the textbook O(n * bins) version
        b = next((k for k, f in enumerate(free) if f >= n), None)
        if b is None:
            bins.append([])
            free.append(64)
            b = len(bins) - 1
        bins[b].append(i)
        free[b] -= n
    assert first_fit(lengths, 64) == bins


def test_first_fit_rejects_too_long():
    with pytest.raises(ValueError, match="example 1 has 9 tokens"):
        first_fit([3, 9], 8)


def test_pack_row_layout():
    a, b = _example(4, 10), _example(3, 20)
    row = pack_row([a, b])
    assert row["input_ids"] == [10, 11, 12, 13, 20, 21, 22]
    assert row["positions"] == [0, 1, 2, 3, 0, 1, 2]
    assert row["doc_ids"] == [0, 0, 0, 0, 1, 1, 1]
    # the first token of every example never gets a loss from the previous example
    assert row["labels"] == [IGNORE, IGNORE, 12, 13, IGNORE, 21, 22]


def test_pack_examples_fills_rows_in_order():
    examples = [_example(n, 10 * k) for k, n in enumerate([5, 6, 3, 2, 7])]
    rows = pack_examples(examples, 8)
    assert [r["doc_ids"] for r in rows] == [
        [0] * 5 + [1] * 3,
        [0] * 6 + [1] * 2,
        [0] * 7,
    ]
    assert all(len(r["input_ids"]) <= 8 for r in rows)
    assert sorted(x for r in rows for x in r["input_ids"]) == sorted(
        x for e in examples for x in e["input_ids"]
    )


@torch.no_grad()
def test_packed_logits_equal_examples_alone():
    model = random_model("tiny-llama3")
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (7, 12, 5, 9, 3):
        ids = torch.randint(3, 256, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    rows = pack_examples(examples, 20)
    assert len(rows) < len(examples)
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda key, v: [r[key] + [v] * (width - len(r[key])) for r in rows]  # noqa: E731
    ids = torch.tensor(pad("input_ids", 0))
    positions = torch.tensor(pad("positions", 0))
    doc_ids = torch.tensor(pad("doc_ids", -1))
    logits = model(ids, positions=positions, mask=document_causal_mask(doc_ids))
    bins = first_fit([len(e["input_ids"]) for e in examples], 20)
    assert sorted(i for b in bins for i in b) == list(range(len(examples)))
    for r, members in enumerate(bins):
        for doc, k in enumerate(members):
            where = (doc_ids[r] == doc).nonzero().flatten()
            alone = model(torch.tensor([examples[k]["input_ids"]]))[0]
            torch.testing.assert_close(logits[r, where], alone, atol=1e-5, rtol=0)
