"""A LoRA training step over packed rows of one fixed shape, replayed as a CUDA graph.

A small model's packed LoRA step is host-bound: SmolLM2-135M at 16 rows x 1,024 tokens
launches ~4,750 kernels a step and the GPU is busy about a quarter of the wall time
(`benchmarks/RESULTS.md`, the profile under "Real chitchat lengths"). Capturing the whole
step once (forward, backward, gradient clipping, the AdamW update) and replaying it takes
the per-kernel host work away. What capture needs, and this step arranges:

- one shape: every batch is padded to `rows x seq_len` (pad tokens get doc id -1 and no
  label); a batch of other rows runs eagerly through the loop's own pieces instead;
- no host syncs inside: the packed segments (`cu_seqlens`, padded to a fixed capacity
  with empty segments), the labelled positions and their loss weights (1 / label count)
  are computed on the host from the CPU batch and copied into static buffers; the head
  and the loss run on the labelled positions gathered into a buffer of fixed capacity
  (spare slots weigh 0), so no boolean indexing changes a shape;
- the head frozen (LoRA / QLoRA), so the fused cross entropy computes per-token gradients
  in its forward;
- AdamW with `capturable=True` and its learning rate a device tensor (the scheduler fills
  it in place); the clip norm stays on the device until the caller reads it;
- warm-up: the step runs a few times on a side stream before capture (autotuning, lazy
  optimizer state); the trainable weights and the optimizer state are restored afterwards,
  so warm-up trains nothing.

The update of a replayed step is applied before its gradient norm is read: a non-finite
norm cannot skip it, so the caller stops the run (`NonFiniteStep`). On the CPU (and with
`capture=False`) the same step runs eagerly on the same buffers: that is the path the
tests compare against the training loop.
"""

from __future__ import annotations

import contextlib
import gc
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import NonFiniteLossError
from ..kernels.fused_ce import linear_cross_entropy
from ..losses import IGNORE_INDEX
from ..model.llama import Segments, compute_device, document_causal_mask
from .batches import PAD_VALUES

# pad values of the static buffers: `train.batches.collate`'s (pad tokens weigh nothing and
# sit in no document, so any token id will do for them)
_PAD = {k: PAD_VALUES[k] or 0 for k in ("input_ids", "labels", "positions", "doc_ids")}


class NonFiniteStep(NonFiniteLossError):
    """A captured step met a non-finite gradient norm (its update was already applied)."""


def most_labels(rows: list[dict[str, Any]], per_batch: int) -> int:
    """The most labelled (predicted) positions any batch of `per_batch` of these packed rows
    can hold: the sum over the rows with the most; the room `PackedGraphStep(labels=...)`
    needs so that it never captures again."""
    counts = [sum(1 for x in r["labels"][1:] if x != IGNORE_INDEX) for r in rows]
    return sum(sorted(counts, reverse=True)[:per_batch])


class PackedGraphStep:
    """forward + backward + clip + AdamW over packed (rows, seq_len) batches, one graph.

    `model` is a LoRA/QLoRA llamaforge `Llama` (frozen lm_head) in train mode, `optimizer`
    a `torch.optim.AdamW` over `params`. `capture=None` captures on CUDA, runs eagerly
    elsewhere. `__call__(batch)` takes a collated packed CPU batch of at most `rows` rows of
    at most `seq_len` tokens and returns (mean loss, grad norm) as device scalars.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        params: list[Tensor],
        *,
        rows: int,
        seq_len: int,
        max_grad_norm: float,
        autocast_dtype: torch.dtype | None = None,
        capture: bool | None = None,
        warmup: int = 3,
        segments: int | None = None,
        labels: int | None = None,
    ) -> None:
        head = getattr(model, "lm_head", None)
        if not isinstance(head, nn.Linear) or head.weight.requires_grad:
            raise ValueError("PackedGraphStep needs a frozen lm_head (LoRA or QLoRA training)")
        if getattr(model, "gradient_checkpointing", False):  # blocks recomputed in the graph
            if getattr(model, "offload_activations", False):
                raise ValueError("PackedGraphStep cannot offload activations (no CPU copies)")
            if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
                raise ValueError(
                    "PackedGraphStep cannot recompute blocks with dropout (a replay draws "
                    "new masks): set the dropout to 0 or turn checkpointing off"
                )
        self.model, self.optimizer, self.params = model, optimizer, params
        self.rows, self.seq_len, self.max_grad_norm = rows, seq_len, max_grad_norm
        self.autocast_dtype = autocast_dtype
        self.device = compute_device(model)
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError("PackedGraphStep(capture=True) needs the model on CUDA")
        self.warmup = warmup
        dev, shape = self.device, (rows, seq_len)
        self.buf = {  # the model's inputs; labels stay on the host (gathered targets below)
            k: torch.full(shape, v, dtype=torch.long, device=dev)
            for k, v in _PAD.items()
            if k != "labels"
        }
        # a frozen input embedding table in host memory (on the CPU: always) is read there:
        # the batch's rows are gathered into a pinned buffer and copied into a static one
        table = model.embed_tokens.weight
        self.embeds: Tensor | None = None
        if table.device.type == "cpu" and not table.requires_grad:  # a trained one: no
            cuda = dev.type == "cuda"
            self.embeds = torch.zeros(*shape, table.shape[1], dtype=table.dtype, device=dev)
            self.staging = torch.empty(rows * seq_len, table.shape[1], dtype=table.dtype,
                                       pin_memory=cuda)  # fmt: skip
            self.copied = torch.cuda.Event() if cuda else None
        # the labelled positions, gathered so the head and its loss skip the others (~60%
        # of a chat row's positions are prompt or padding): static buffers of a capacity
        # that grows, and captures again, when a batch has more labels than room
        self.labels_capacity = 0
        self.label_at = self.target = self.weight = torch.zeros(0, device=dev)
        if labels is not None:  # the most labels a batch can hold (`most_labels`)
            self._grow_labels(labels, spare=1.0)
        # empty segments pad cu_seqlens to a fixed length; a batch with more segments than
        # this capacity grows it (and captures again)
        self.capacity = segments or 8 * rows
        self.cu = torch.full((self.capacity + 1,), rows * seq_len, dtype=torch.int32, device=dev)
        self.loss = torch.zeros((), device=dev)
        self.norm = torch.zeros((), device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.varlen = model.varlen_usable(self.buf["doc_ids"])
        self.fused_ce = bool(getattr(model.kernels, "fused_ce", True))
        if self.capture:
            for g in optimizer.param_groups:  # capture-safe update, lr on the device
                g["capturable"] = True
                lr = g["lr"]
                if not (isinstance(lr, Tensor) and lr.device == dev):  # e.g. loaded on the CPU
                    g["lr"] = torch.tensor(float(lr), device=dev)

    def fits(self, batch: dict[str, Tensor]) -> bool:
        """Whether `batch` can take this step (at most rows x seq_len, packed)."""
        r, t = batch["input_ids"].shape
        return "doc_ids" in batch and r <= self.rows and t <= self.seq_len

    # ------------------------------------------------------------------ host side

    def _load(self, batch: dict[str, Tensor]) -> None:
        """Copy a CPU batch into the static buffers, padded; weights and segments too."""
        r, t = batch["input_ids"].shape
        if not self.fits(batch):
            want = f"{self.rows} x {self.seq_len}"
            raise ValueError(f"a packed batch of {r} x {t} does not fit {want}")
        host = {}
        for key, pad in _PAD.items():
            full = torch.full((self.rows, self.seq_len), pad, dtype=torch.long)
            full[:r, :t] = batch[key].cpu()
            host[key] = full
        # position p of a row predicts label p + 1: flat hidden index row * T + p
        nxt = torch.full((self.rows, self.seq_len), IGNORE_INDEX, dtype=torch.long)
        nxt[:, :-1] = host["labels"][:, 1:]
        label_at = (nxt.flatten() != IGNORE_INDEX).nonzero().flatten()
        n = label_at.numel()
        if n > self.labels_capacity or not self.labels_capacity:  # larger buffers, a new graph
            # the first batch sets the room (a quarter spare); a batch past it, all positions
            self._grow_labels(n if not self.labels_capacity else self.rows * self.seq_len)
        at = torch.zeros(self.labels_capacity, dtype=torch.long)  # spare slots: weight 0
        at[:n] = label_at
        target = torch.zeros(self.labels_capacity, dtype=torch.long)
        target[:n] = nxt.flatten()[label_at]
        weight = torch.zeros(self.labels_capacity)
        weight[:n] = 1.0 / max(n, 1)
        starts = Segments.starts(host["doc_ids"])
        if starts.numel() > self.capacity:  # more documents than room: a larger graph
            self.capacity = 1 << math.ceil(math.log2(starts.numel()))
            self.cu = torch.empty(self.capacity + 1, dtype=torch.int32, device=self.device)
            self.graph = None
        cu = torch.full((self.capacity + 1,), self.rows * self.seq_len, dtype=torch.int32)
        cu[: starts.numel()] = starts.to(torch.int32)
        for key, buf in self.buf.items():
            buf.copy_(host[key])
        if self.embeds is not None:
            if self.copied is not None:
                self.copied.synchronize()  # the last batch's rows have left the staging buffer
            table = self.model.embed_tokens.weight
            torch.index_select(table, 0, host["input_ids"].flatten(), out=self.staging)
            self.embeds.copy_(self.staging.view_as(self.embeds), non_blocking=True)
            if self.copied is not None:
                self.copied.record()
        self.label_at.copy_(at)
        self.target.copy_(target)
        self.weight.copy_(weight)
        self.cu.copy_(cu)

    def _grow_labels(self, n: int, spare: float = 1.25) -> None:
        """Room for n labelled positions times `spare`, in steps of 64 (at most all); a new
        capture follows, so the room grows at most twice."""
        cap = min(self.rows * self.seq_len, max(64, -(-int(n * spare) // 64) * 64))
        dev = self.device
        self.labels_capacity = cap
        self.label_at = torch.zeros(cap, dtype=torch.long, device=dev)
        self.target = torch.zeros(cap, dtype=torch.long, device=dev)
        self.weight = torch.zeros(cap, dtype=torch.float32, device=dev)
        self.graph = None

    # ------------------------------------------------------------------ device side

    def _body(self) -> None:
        """The step on the static buffers: no host syncs, no shape that depends on data."""
        model, buf = self.model, self.buf
        if self.autocast_dtype is not None:
            autocast: Any = torch.autocast(
                self.device.type, dtype=self.autocast_dtype, cache_enabled=False
            )
        else:
            autocast = contextlib.nullcontext()
        with autocast:
            if self.varlen:
                mask: Tensor | Segments = Segments(self.cu, self.seq_len)
            else:
                mask = document_causal_mask(buf["doc_ids"])
            hidden = model.hidden_states(
                buf["input_ids"], positions=buf["positions"], mask=mask, embeds=self.embeds
            )
            h = hidden.flatten(0, 1).index_select(0, self.label_at)  # (capacity, C)
            w = model.lm_head.weight
            nll = linear_cross_entropy(h, w, self.target, None, self.fused_ce, True)
            loss = (nll * self.weight).sum()
        loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.max_grad_norm, norm)
        self.optimizer.step()
        self.loss.copy_(loss.detach())
        self.norm.copy_(norm)

    def _snapshot(self) -> tuple[list[Tensor], dict[int, dict[str, Any]]]:
        weights = [p.detach().clone() for p in self.params]
        state = {
            id(p): {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()}
            for p, s in self.optimizer.state.items()
        }
        return weights, state

    def _restore(self, snap: tuple[list[Tensor], dict[int, dict[str, Any]]]) -> None:
        """Put weights and optimizer state back in place (the graph holds their addresses)."""
        weights, state = snap
        with torch.no_grad():
            for p, w in zip(self.params, weights, strict=True):
                p.copy_(w)
            for p, s in self.optimizer.state.items():
                before = state.get(id(p), {})
                for k, v in s.items():
                    if not isinstance(v, Tensor):
                        continue
                    if k in before:
                        v.copy_(before[k])
                    else:
                        v.zero_()  # state made by the warm-up: a fresh AdamW's is zeros

    def warm_up(self) -> None:
        """Run the step `warmup` times on the loaded buffers, then undo what it trained."""
        snap = self._snapshot()
        side = torch.cuda.Stream() if self.capture else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for _ in range(self.warmup):
                self.optimizer.zero_grad(set_to_none=True)
                self._body()
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        self._restore(snap)
        self.optimizer.zero_grad(set_to_none=True)

    def _capture(self) -> None:
        # an autograd graph of an earlier forward held only by reference cycles would keep
        # its AccumulateGrad nodes (and the stream they were made on) alive into the capture
        gc.collect()
        self.warm_up()
        # the warm-up's freed activations sit in the allocator's ordinary pool; hand them
        # back so that the capture's private pool can take that memory instead of doubling it
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._body()
        self.graph = graph

    def __call__(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """One optimizer step on `batch`: (mean loss, grad norm before clipping), on device."""
        self._load(batch)
        if not self.capture:
            self.optimizer.zero_grad(set_to_none=True)
            self._body()
            return self.loss, self.norm
        if self.graph is None:
            # warm-up and capture run the body on these buffers; the captured graph has
            # not stepped yet, so the replay below is this batch's one update
            self._capture()
        self.graph.replay()
        return self.loss, self.norm

    def check(self, norm: float, step: int) -> None:
        """Stop on a non-finite norm: a replayed update cannot be skipped."""
        if not math.isfinite(norm):
            raise NonFiniteStep(
                f"step {step}: non-finite gradient norm {norm} in a captured step, whose "
                "update is applied before the norm is read; the weights in memory are lost, the "
                "checkpoints on disk are not: resume from the last one with a lower optim.lr, "
                "or turn cuda_graph off to skip such steps instead"
            )
