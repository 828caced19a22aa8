"""Collating tokenized examples and a deterministic, resumable stream of micro-batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.preference import pair_sequences
from ..model.llama import CHOSEN_PART, PAD_PART, PROMPT_PART, REJECTED_PART

Example = dict[str, Any]  # {"input_ids": list[int], "labels": list[int], ...}
Batch = dict[str, Tensor]

# Pad value per known key; input_ids use the tokenizer's pad id.
PAD_VALUES: dict[str, int | None] = {
    "input_ids": None,
    "labels": -100,
    "positions": 0,
    "doc_ids": -1,
    # shared-prompt pair rows (`collate_shared_pairs`)
    "pair_parts": PAD_PART,
    "chosen_targets": -100,
    "rejected_targets": -100,
}
MEGABATCH = 64  # length grouping sorts within windows of this many batches


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad examples into LongTensors (B, T): input_ids, labels, [positions, doc_ids].

    Also `seq_lens` (B,): each row's unpadded length, for counting real tokens.
    """
    if not examples:
        raise ValueError("collate: no examples")
    keys = list(examples[0])
    for key in keys:
        if key not in PAD_VALUES:
            raise ValueError(f"collate: unknown key {key!r} (known: {', '.join(PAD_VALUES)})")
    width = max(len(ex["input_ids"]) for ex in examples)
    out = {}
    for key in keys:
        pad = pad_id if PAD_VALUES[key] is None else PAD_VALUES[key]
        t = torch.full((len(examples), width), pad, dtype=torch.long)  # (B, T)
        for row, ex in enumerate(examples):
            values = ex[key]
            if len(values) != len(ex["input_ids"]):
                raise ValueError(
                    f"collate: example {row} has {len(values)} {key} "
                    f"but {len(ex['input_ids'])} input_ids"
                )
            t[row, : len(values)] = torch.as_tensor(values, dtype=torch.long)
        out[key] = t
    out["seq_lens"] = torch.tensor([len(ex["input_ids"]) for ex in examples])  # (B,) real
    return out


def collate_pairs(examples: Sequence[Example], pad_id: int) -> Batch:
    """A batch of 2B right-padded rows for preference pairs: B chosen, then B rejected.

    Float fields of the examples (e.g. precomputed reference log-probs) come along as (B,)
    tensors under their own names.
    """
    seqs = [pair_sequences(e) for e in examples]
    batch = collate([s[0] for s in seqs] + [s[1] for s in seqs], pad_id)
    return _with_float_fields(batch, examples)


def _with_float_fields(batch: Batch, examples: Sequence[Example]) -> Batch:
    """The examples' float fields (e.g. precomputed reference log-probs) as (B,) tensors."""
    for key, value in examples[0].items():
        if isinstance(value, float):
            batch[key] = torch.tensor([float(e[key]) for e in examples])
    return batch


def collate_shared_pairs(examples: Sequence[Example], pad_id: int) -> Batch:
    """A batch of B right-padded rows for preference pairs, one row a pair: the prompt once,
    then the chosen answer, then the rejected one (P + C + R tokens instead of 2P + C + R).

    `positions` restart at P for the rejected answer, and `pair_parts` (B, T) says which
    part each position holds: the model's attention mask (`model.llama.shared_prompt_mask`)
    lets the rejected answer see the prompt and itself, never the chosen answer, so each
    answer's log-probs equal those of prompt + answer as a row of its own (`collate_pairs`).
    `chosen_targets` / `rejected_targets` (B, T) hold, at each position, the label of the
    token the hidden state there predicts for that side (-100 elsewhere): the prompt's last
    position predicts the first token of both answers. Float fields come along as
    `collate_pairs` brings them.
    """
    if not examples:
        raise ValueError("collate_shared_pairs: no examples")
    rows = []
    for ex in examples:
        p, c, r = ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]
        n_p, n_c = len(p), len(c)
        parts = [PROMPT_PART] * n_p + [CHOSEN_PART] * n_c + [REJECTED_PART] * len(r)
        positions = list(range(n_p + n_c)) + list(range(n_p, n_p + len(r)))
        targets = {}
        for side, start in (("chosen", n_p), ("rejected", n_p + n_c)):
            t = [-100] * len(parts)
            for i, label in enumerate(ex[f"{side}_labels"]):
                # the predictor of answer token i: the position before it, or for the first
                # token the prompt's last position (none without a prompt: not predicted)
                at = (n_p - 1) if i == 0 else start + i - 1
                if at >= 0:
                    t[at] = label
            targets[side] = t
        rows.append(
            {
                "input_ids": p + c + r,
                "positions": positions,
                "pair_parts": parts,
                "chosen_targets": targets["chosen"],
                "rejected_targets": targets["rejected"],
            }
        )
    return _with_float_fields(collate(rows, pad_id), examples)


class BatchSource:
    """Micro-batches over `examples`, epoch after epoch, in an order fixed by (seed, epoch).

    The position (epoch, index of the next micro-batch) is the whole state, so a run that
    restores `state_dict()` sees exactly the batches an uninterrupted run would have seen.
    Iterates forever unless `max_epochs` is set.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        *,
        pad_id: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        group_by_length: bool = False,
        max_epochs: int | None = None,
        collate_fn: Callable[[Sequence[Example]], Batch] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples = examples
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.group_by_length = group_by_length
        self.max_epochs = max_epochs
        self.collate_fn = collate_fn or (lambda exs: collate(exs, pad_id))
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"no batches: {len(examples)} examples, batch_size {batch_size}, "
                f"drop_last={drop_last}"
            )
        self.epoch, self.index = 0, 0
        self._cached: tuple[int, list[list[int]]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches in one pass over the examples."""
        n, b = len(self.examples), self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def steps_per_epoch(self, grad_accum: int = 1) -> int:
        """Optimizer steps per epoch (windows may straddle epochs; rounded up)."""
        return math.ceil(self.batches_per_epoch / grad_accum)

    def total_steps(self, epochs: float, grad_accum: int = 1) -> int:
        """Optimizer steps that consume `epochs` passes of micro-batches (at least 1)."""
        return max(1, math.ceil(epochs * self.batches_per_epoch / grad_accum))

    @property
    def progress(self) -> float:
        """Epochs consumed so far, fractional."""
        return self.epoch + self.index / self.batches_per_epoch

    def order(self, epoch: int) -> list[list[int]]:
        """Example indices of every micro-batch of `epoch` (pure function of seed, epoch)."""
        n, b = len(self.examples), self.batch_size
        rng = np.random.default_rng([self.seed, epoch])
        idx = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.group_by_length:
            idx = self._group_by_length(idx)
        batches = [idx[i : i + b].tolist() for i in range(0, n, b)]
        if self.drop_last and len(batches[-1]) < b:
            batches.pop()
        if self.group_by_length and self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _group_by_length(self, idx: np.ndarray) -> np.ndarray:
        """Sort by length (longest first) inside windows of MEGABATCH batches."""
        size = self.batch_size * MEGABATCH
        lengths = np.array([len(self.examples[i]["input_ids"]) for i in idx])
        parts = []
        for s in range(0, len(idx), size):
            part = idx[s : s + size]
            parts.append(part[np.argsort(-lengths[s : s + size], kind="stable")])
        return np.concatenate(parts)

    def _batches_of(self, epoch: int) -> list[list[int]]:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self.order(epoch))
        return self._cached[1]

    def epoch_batches(self, epoch: int = 0) -> Iterator[Batch]:
        """One epoch's micro-batches, without touching the stream position (for evaluation)."""
        for ids in self.order(epoch):
            yield self.batch_of(ids)

    def __iter__(self) -> BatchSource:
        return self

    def next_ids(self) -> list[int]:
        """Example indices of the next micro-batch, advancing the position (no collation)."""
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self.max_epochs is not None and self.epoch >= self.max_epochs:
            raise StopIteration
        ids = self._batches_of(self.epoch)[self.index]
        self.index += 1
        return ids

    def batch_of(self, ids: Sequence[int]) -> Batch:
        """The collated micro-batch of these example indices."""
        return self.collate_fn([self.examples[i] for i in ids])

    def __next__(self) -> Batch:
        return self.batch_of(self.next_ids())

    def state_dict(self) -> dict[str, int]:
        """Position of the next micro-batch: {"epoch", "index"}."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the micro-batch `state_dict()` pointed to."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


FILLER = "filler"  # key of an evaluation batch that only keeps ranks in step (not counted)


class RankShard:
    """One rank's share of a BatchSource: micro-batch i of the global stream goes to rank
    i % world.

    Every rank walks the same global stream (collating only its own micro-batches), so the
    position is the source's (epoch, index), equal on all ranks and meaningful at any world
    size: an epoch is seen once, no example twice, and a checkpoint taken at world size 2
    resumes at 1 or 3 on the next unseen micro-batch. A step at world size W draws
    `grad_accum` micro-batches per rank, W * grad_accum of the stream.
    """

    def __init__(self, source: BatchSource, rank: int, world: int, eval_limit: int | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.source, self.rank, self.world = source, rank, world
        self.eval_limit = eval_limit  # evaluation reads the first N global micro-batches

    def __iter__(self) -> RankShard:
        return self

    def __next__(self) -> Batch:
        mine: list[int] = []
        for r in range(self.world):
            ids = self.source.next_ids()
            mine = ids if r == self.rank else mine
        return self.source.batch_of(mine)

    def state_dict(self) -> dict[str, int]:
        """The global stream position (the same on every rank)."""
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume the global stream; this rank continues with its share of it."""
        self.source.load_state_dict(state)

    def total_steps(self, epochs: float, grad_accum: int = 1) -> int:
        """Optimizer steps for `epochs`: each consumes grad_accum * world micro-batches."""
        return self.source.total_steps(epochs, grad_accum * self.world)

    @property
    def progress(self) -> float:
        """Epochs of the global stream consumed so far."""
        return self.source.progress

    def epoch_batches(self, epoch: int = 0) -> Iterator[Batch]:
        """This rank's evaluation batches; every rank yields the same number of them.

        Where the global count is not a multiple of the world size, the short ranks get a
        copy of another rank's batch marked FILLER: they run the forward pass (so sharded
        weights are gathered in step) and the evaluation leaves it out.
        """
        order = self.source.order(epoch)[: self.eval_limit]
        for start in range(0, len(order), self.world):
            i = start + self.rank
            batch = self.source.batch_of(order[min(i, len(order) - 1)])
            if i >= len(order):
                batch[FILLER] = torch.ones((), dtype=torch.bool)
            yield batch
