"""Memory decides the activation plan: which blocks keep their activations, which recompute.

With `memory_budget_gb: N` (or `auto`: the device's free memory plus what this process
already holds) the recipe measures, before training, what the run costs at its real shape
and picks the fastest plan that fits:

- fixed: every parameter and buffer, plus a gradient and two AdamW states per trainable
  parameter (in the parameter's dtype, as `build_optimizer`'s optimizers keep them);
- per block, measured by running block 0 once at the planned (rows, tokens) shape under the
  run's autocast and adding up the bytes of every distinct tensor autograd saves for the
  backward (parameters, buffers and RoPE tables excluded: they are shared, and counted in
  fixed). That is what a block keeps
  without checkpointing; with checkpointing it keeps only its input (rows x tokens x dim);
- the backward's own moment: its temporaries (activation gradients, the MLP's intermediate
  gradients) and, with checkpointing, the block being recomputed, whose saved activations
  are freed as its backward goes: 1.5 blocks' saved activations in both cases, as measured
  on Llama-3.1-8B LoRA/QLoRA at 2 x 2048 (peaks minus the rest: 0.74 GiB with no block
  checkpointed, H200; 0.80 GiB with every block checkpointed, H100; 550 MiB a block);
- past the feed-forward's slice length (`Llama.set_mlp_chunk`, long context) each slice is
  checkpointed, so a block saves only the slices' inputs, not the (tokens x ffn_dim)
  intermediates: the probe runs with slices too, and the backward's moment adds one slice's
  intermediates twice (them and their gradients, `MemoryPlan.transient`). Counted whole,
  they made a 500k-token Llama-3.1-8B block look ~2.7x its size;
- the loss head, between the forward's end and the first backward step, while every saved
  activation is still held (`head_bytes`): one chunk of float32 logits and their copy in
  the compute dtype, and with the fused linear + CE and a trained head (full fine-tuning)
  its float32 (vocab x dim) weight-gradient accumulator: 1 GB for Llama-3.2-1B, which the
  plan missed before (9.1 GB estimated, 10.1 GB measured, H200 2026-12-03). The larger of
  the two moments counts.

Blocks are checkpointed from the first one on (the model's `checkpoint_layers`), as few as
the budget allows: keeping activations is faster (no recompute), so the plan that fits with
the fewest checkpointed blocks is the fastest one of this family. When even checkpointing
every block does not fit, a frozen input embedding table not tied to the output head moves
to host memory first (`embeddings_on_host`: Llama-3.1-8B's 1.05 GB for a gather and a 32 MB
copy a step at 2 x 2048, and the step stays capturable as a CUDA graph), and the plans are
tried again with it there; then the inputs of as few checkpointed blocks as needed go to CPU
memory, the earliest first (`activation_offload`, `activation_offload_layers`: each copy
costs host-link time, and host memory may not hold every input at long context);
when offloading all of them does not fit either, the run stops before it starts with the
numbers. A margin is left for what the estimate misses (`HEADROOM` of a budget given in
GB: the estimate was within 0.1 GiB of the measured 8B LoRA/QLoRA peaks above;
`AUTO_HEADROOM` of the free memory under `auto`, where a miss is an out-of-memory error);
the plan is an estimate, printed and written to `memory_plan.json` so that it can be
checked against the measured peak.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..model.llama import MLP, rope_cos_sin
from .distributed import world_size

GB = 1024**3
# fraction of a budget given in GB kept free for what the estimate misses: it was within
# 0.1 GiB of the measured peak on Llama-3.1-8B LoRA at 2 x 2048 with no block checkpointed
# (33.5 GiB, H200) and with every block checkpointed (16.4 GiB, H100), and QLoRA (6.4 GiB)
HEADROOM = 0.01
# under `auto` (the device's free memory) a miss is an out-of-memory error: a wider margin
AUTO_HEADROOM = 0.05
PROBE_TOKENS = 2048  # the measuring forward's length at most (costs scale per token)
# offloaded inputs may take at most this share of the host's available memory: the rest is
# for what else the run holds there (Llama-3.1-8B QLoRA at 500k tokens, H100 2026-12-07: 99.2
# GB of inputs planned, 113.1 GB peak resident, 9 GB of the host's 125 left)
HOST_SHARE = 0.85


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen plan and the numbers it came from (bytes)."""

    budget: int
    fixed: int
    block_keep: int  # one block's saved activations, not checkpointed
    block_checkpointed: int  # one block's saved input, checkpointed
    n_layers: int
    checkpointed: int  # blocks 0..checkpointed-1 recompute in the backward
    offload: bool  # saved inputs of checkpointed blocks live in CPU memory
    estimate: int  # estimated peak
    fits: bool = True  # False: even the most frugal plan's estimate is over the budget
    head: int = 0  # the loss head at the forward's end (`head_bytes`)
    offloaded: int = 0  # with offload: blocks 0..offloaded-1 keep their input in CPU memory
    host_embeddings: bool = False  # the frozen input embedding table lives in host memory
    transient: int = 0  # the backward's extra for one feed-forward slice (long context)

    @property
    def host_bytes(self) -> int:
        """CPU memory the offloaded block inputs take."""
        return self.offloaded * self.block_checkpointed if self.offload else 0

    def describe(self) -> str:
        """One line for the log."""
        where = ""
        if self.offload:
            some = "" if self.offloaded == self.checkpointed else f" of the first {self.offloaded}"
            where = f", inputs{some} offloaded to CPU ({self.host_bytes / GB:.1f} GB)"
        if self.host_embeddings:
            where += "; input embeddings in host memory"
        if not self.fits:
            where += "; over the budget even so: trying it"
        return (
            f"memory plan: budget {self.budget / GB:.1f} GB; weights+grads+optimizer "
            f"{self.fixed / GB:.2f} GB; per block {self.block_keep / 2**20:.0f} MB kept or "
            f"{self.block_checkpointed / 2**20:.0f} MB checkpointed -> checkpoint "
            f"{self.checkpointed} of {self.n_layers} blocks{where}; loss head "
            f"{self.head / 2**20:.0f} MB (estimated peak "
            f"{self.estimate / GB:.1f} GB)"
        )

    def save(self, path: Path) -> None:
        """memory_plan.json (atomic)."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        tmp.replace(path)


def fixed_bytes(model: nn.Module, grads: bool = True) -> int:
    """Parameters and buffers, plus grad + 2 AdamW states per trainable parameter.

    `grads=False` (`optim.step_in_backward`): gradients are freed one tensor at a time as
    they are applied, so only the largest trainable tensor's gradient is counted.
    """
    seen: set[int] = set()
    total = 0
    largest = 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # tied weights count once
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
        if isinstance(t, nn.Parameter) and t.requires_grad:
            size = t.numel() * t.element_size()
            total += (3 if grads else 2) * size
            largest = max(largest, size)
    return total if grads else total + largest


def block_costs(
    model: nn.Module,
    rows: int,
    tokens: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[int, int]:
    """(kept, checkpointed) bytes of one block at (rows, tokens), measured on block 0.

    The probe runs one row of at most PROBE_TOKENS tokens and scales linearly: what a block
    saves is per token (flash attention keeps its output and log-sum-exp, not the T x T
    weights), and a long-context run could not afford one unchecked block at full length.
    Where the run's feed-forward goes in slices (more than its `chunk_tokens` tokens in the
    batch) the probe does too, so what it counts is what the run saves.
    """
    keep, checkpointed, _ = _probe(model, rows, tokens, autocast, with_slice=False)
    return keep, checkpointed


def slice_bytes(
    model: nn.Module,
    rows: int,
    tokens: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> int:
    """The backward's extra while one feed-forward slice is recomputed and differentiated:
    its (slice x ffn_dim) intermediates and their gradients. 0 where the run does not slice
    (then the intermediates are in the block's saved bytes already)."""
    return _probe(model, rows, tokens, autocast, with_slice=True)[2]


def _probe(
    model: nn.Module,
    rows: int,
    tokens: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
    with_slice: bool,
) -> tuple[int, int, int]:
    """(kept, checkpointed, slice) bytes as `block_costs` and `slice_bytes` define them; the
    unsliced probe that the slice's bytes need runs only `with_slice` (else slice is 0)."""
    probe = min(tokens, PROBE_TOKENS)
    chunk = mlp_chunk(model)
    sliced = chunk is not None and rows * tokens > chunk and probe > 1
    with _mlp_chunk_set(model, max(1, probe // 2) if sliced else None):
        saved = _saved_bytes(model, probe, autocast)
    extra = 0
    if sliced and with_slice:
        with _mlp_chunk_set(model, None):
            whole = _saved_bytes(model, probe, autocast)
        per_token = max(0, whole - saved) / probe  # the intermediates a slice saves, a token
        extra = int(2 * per_token * max(1, chunk // rows) * rows)
    checkpointed = rows * tokens * model.cfg.dim * model.dtype.itemsize
    if getattr(model, "checkpoint_keeps_attention", False):  # + the attention output and LSE
        heads = model.cfg.n_heads
        checkpointed += rows * tokens * heads * (model.cfg.head_dim * model.dtype.itemsize + 4)
    return -(-saved * rows * tokens // probe), checkpointed, extra


def mlp_chunk(model: nn.Module) -> int | None:
    """The feed-forward's slice length (`Llama.set_mlp_chunk`), None when it never slices."""
    return next((m.chunk_tokens for m in model.modules() if isinstance(m, MLP)), None)


@contextlib.contextmanager
def _mlp_chunk_set(model: nn.Module, tokens: int | None):
    """Every feed-forward sliced at `tokens` for the block (None: unsliced), then back."""
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    was = [m.chunk_tokens for m in mlps]
    for m in mlps:
        m.chunk_tokens = tokens
    try:
        yield
    finally:
        for m, w in zip(mlps, was, strict=True):
            m.chunk_tokens = w


def _saved_bytes(
    model: nn.Module, tokens: int, autocast: Callable[[], contextlib.AbstractContextManager]
) -> int:
    """Bytes of the distinct tensors block 0 saves for its backward, one row of `tokens`."""
    block, dev = model.layers[0], model.device
    # weights, buffers (NF4 codes, scales) and the RoPE tables are shared, not per block
    shared = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    held: list[torch.Tensor] = []  # what the backward would hold, alive until the count ends

    def pack(t: torch.Tensor) -> None:
        # the graph keeps nothing: had the hook returned `t`, a tensor a node saves of its own
        # output would reference that node, a cycle through C++ that no garbage collection
        # frees, and the probe's graph (its AccumulateGrad nodes and the stream they were made
        # on included) would outlive it
        s = t.untyped_storage()
        if s.data_ptr() not in shared and s.data_ptr() != 0:
            saved[s.data_ptr()] = s.nbytes()
            held.append(t)  # no address is freed and reused by a later saved tensor

    def unpack(_: None) -> torch.Tensor:
        raise RuntimeError("the memory plan's probe runs no backward")

    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(1, tokens, model.cfg.dim, device=dev, dtype=model.dtype, generator=gen)
    x.requires_grad_(True)
    cos, sin = rope_cos_sin(torch.arange(tokens, device=dev)[None], model.inv_freq, x.dtype)
    shared |= {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    was = block.training
    block.train()
    # On a GPU the probe runs on a stream of its own: autograd remembers the stream a leaf
    # was first used on, and a captured training step (train/graph_step.py) cannot wait on
    # the legacy default stream
    side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(dev))
    try:
        cuda = [dev] if dev.type == "cuda" else []
        with (
            torch.cuda.stream(side) if side is not None else contextlib.nullcontext(),
            torch.random.fork_rng(devices=cuda),  # dropout in the probe leaves the run's RNG
            torch.enable_grad(),
            autocast(),
            torch.autograd.graph.saved_tensors_hooks(pack, unpack),
        ):
            out = block(x, cos, sin, None, None)
            del out
            held.clear()
    finally:
        block.train(was)
        if side is not None:
            torch.cuda.current_stream(dev).wait_stream(side)
    return sum(saved.values())


def head_bytes(model: nn.Module, rows: int, tokens: int) -> int:
    """The loss head's memory at the end of the forward (see the module docstring)."""
    from ..kernels.fused_ce import (
        LOGITS_BUDGET_BYTES,
        TRAINED_HEAD_BUDGET_BYTES,
        auto_chunk_size,
    )

    head = getattr(model, "lm_head", None)
    w = getattr(head, "weight", None)
    if w is None:
        return 0
    vocab, dim = w.shape
    trained = w.requires_grad
    kernels = getattr(model, "kernels", None)
    fused = kernels is not None and kernels.fused_ce and type(head) is nn.Linear
    n = rows * max(tokens - 1, 1)
    if not fused:  # checkpointed 1,024-token chunks, recomputed in the backward
        return min(n, 1024) * vocab * (4 + w.element_size())
    budget = TRAINED_HEAD_BUDGET_BYTES if trained else LOGITS_BUDGET_BYTES
    chunk = min(n, auto_chunk_size(vocab, budget))
    logits = chunk * vocab * (4 + w.element_size())  # float32 and the compute-dtype product
    saved = n * dim * w.element_size() + (vocab * dim * 4 if trained else 0)
    return logits + saved


def choose(
    budget: int,
    fixed: int,
    keep: int,
    checkpointed: int,
    n_layers: int,
    strict: bool = True,
    head: int = 0,
    embed: int = 0,
    headroom: float = HEADROOM,
    transient: int = 0,
) -> MemoryPlan:
    """The plan with the fewest checkpointed blocks whose estimate fits the budget.

    `embed`: the bytes of an input embedding table that may move to host memory (0: none
    may). Plans that keep it on the device come first; when even checkpointing every block
    does not fit, it moves (one gather and copy of the batch's rows a step, ~32 MB for
    Llama-3.1-8B at 2 x 2048), and only then are checkpointed inputs offloaded (a copy out
    and back per block: 6.5% of the 8B LoRA step, H200 2026-12-03).
    When none fits: an error if `strict` (a budget the user gave), else the most frugal plan
    (every block checkpointed and offloaded) marked `fits=False`: under the `auto` default
    the estimate may be pessimistic, so the run is tried rather than refused.
    """
    usable = int(budget * (1 - headroom))

    def estimate(k: int, offloaded: int = 0, host: bool = False) -> int:
        inputs = (k - offloaded) * checkpointed
        # its temporaries and a recomputed block's remains (+ one feed-forward slice's)
        backward = keep * 3 // 2 + transient
        moved = embed if host else 0
        return fixed - moved + (n_layers - k) * keep + inputs + max(backward, head)

    def plan(k: int, offloaded: int = 0, host: bool = False, fits: bool = True) -> MemoryPlan:
        est = estimate(k, offloaded, host)
        return MemoryPlan(
            budget, fixed, keep, checkpointed, n_layers, k, offloaded > 0, est, fits, head,
            offloaded, host, transient,
        )  # fmt: skip

    for host in (False, True) if embed else (False,):
        for k in range(n_layers + 1):
            if estimate(k, 0, host) <= usable:
                return plan(k, 0, host)
    host = embed > 0
    for m in range(1, n_layers + 1):  # every block checkpointed: offload as few as fit
        if estimate(n_layers, m, host) <= usable:
            return plan(n_layers, m, host)
    est = estimate(n_layers, n_layers, host)
    if not strict:
        return plan(n_layers, n_layers, host, fits=False)
    raise UserError(
        f"key 'memory_budget_gb': the run needs about {est / GB:.1f} GB even with every block "
        f"checkpointed and offloaded (weights, grads and optimizer {fixed / GB:.1f} GB), "
        f"over {usable / GB:.1f} GB usable of the {budget / GB:.1f} GB budget: lower "
        "optim.batch_size or data.max_seq_len, or train with LoRA/QLoRA"
    )


def budget_bytes(setting: float | str, device: torch.device) -> int | None:
    """The budget in bytes: a number of GB, or `auto` (free + held by us; None on a CPU)."""
    if setting != "auto":
        return int(float(setting) * GB)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_allocated(device)


def plan_memory(
    model: nn.Module,
    setting: float | str,
    rows: int,
    tokens: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    grads: bool = True,
) -> MemoryPlan | None:
    """Measure and choose (None: `auto` on a device whose free memory is unknown); `grads`
    as in `fixed_bytes`."""
    budget = budget_bytes(setting, model.device)
    if budget is None:
        return None
    keep, ckpt, transient = _probe(model, rows, tokens, autocast, with_slice=True)
    strict = setting != "auto"
    head = head_bytes(model, rows, tokens)
    fixed = fixed_bytes(model, grads)
    embed = movable_embedding_bytes(model)
    margin = AUTO_HEADROOM if setting == "auto" else HEADROOM
    plan = choose(
        budget, fixed, keep, ckpt, len(model.layers), strict, head, embed, margin, transient
    )
    check_host_memory(plan, strict)
    return plan


def allocator_hint(plan: MemoryPlan, environ: Mapping[str, str] = os.environ) -> str | None:
    """A line for the log when the plan offloads (long context) and PyTorch's allocator would
    cut its memory into fixed segments: at 500k tokens it reserved 78.1 GiB for 69.9 allocated
    even with expandable segments (Llama-3.1-8B QLoRA, H100 2026-12-07)."""
    if not plan.offload or "expandable_segments:True" in environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return None
    return (
        "memory plan: inputs offloaded (long context): PYTORCH_CUDA_ALLOC_CONF="
        "expandable_segments:True before the run lets the allocator reuse its memory "
        "without fragments; the plan's estimate counts allocated, not reserved, memory"
    )


def available_host_bytes() -> int | None:
    """The host's available memory (`MemAvailable`), None where /proc/meminfo is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_host_memory(plan: MemoryPlan, strict: bool) -> None:
    """Offloaded inputs the host cannot hold would end the run mid-step by the kernel's OOM
    killer: say so before training (a budget the user gave), or warn (`auto`)."""
    free = available_host_bytes()
    need = plan.host_bytes
    if not need or free is None or need <= HOST_SHARE * free:
        return
    text = (
        f"key 'memory_budget_gb': the plan offloads {plan.offloaded} blocks' inputs, "
        f"{need / GB:.1f} GB of CPU memory, more than {HOST_SHARE:.0%} of the "
        f"{free / GB:.1f} GB the host has available: raise the budget, or lower "
        "optim.batch_size or data.max_seq_len"
    )
    if strict:
        raise UserError(text)
    warnings.warn(text, stacklevel=2)


def movable_embedding_bytes(model: nn.Module) -> int:
    """Bytes of the input embedding table if it may move to host memory: frozen, untied
    from the output head, on an accelerator, in one process (0 otherwise)."""
    table = getattr(getattr(model, "embed_tokens", None), "weight", None)
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    if table is None or not hasattr(model, "keep_embeddings_on_host") or world_size() > 1:
        return 0
    if table.requires_grad or table is head or table.device.type == "cpu":
        return 0
    return table.numel() * table.element_size()
