"""Fused GPU kernels (Triton), each beside the plain-PyTorch reference it must equal.

Every op here has two paths with one signature: `<op>_ref`, plain PyTorch (the definition,
used on CPU and wherever a kernel is switched off), and a Triton kernel used on CUDA
tensors when Triton is importable and the op is enabled. `Kernels` says which ops may use
their kernel; the model holds one (set at build time, opt-out by config), so two models in
one process can differ. Tests compare each kernel with its reference forward and backward,
on the GPU, and on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Kernels:
    """Which fused kernels a model may use (each falls back to its reference when off)."""

    rmsnorm: bool = True
    residual_rmsnorm: bool = True  # a block's residual add fused into the norm after it
    rope: bool = True
    swiglu: bool = True
    fused_ce: bool = True  # linear + cross entropy without materialising the logits
    nf4: bool = True  # Triton NF4 dequantise for QLoRA base weights
    varlen_attention: bool = True  # packed rows through flash varlen attention (CUDA)
    adamw: bool = True  # bf16-weight AdamW (stochastic rounding) as one kernel per parameter
    # LoRA layer as one autograd node (CUDA; q/k/v and gate/up as one node each), the
    # delta added by the base matmul: 8-25% faster than the unfused layers on 8B LoRA and
    # QLoRA in the same process (benchmarks/RESULTS.md, 2026-12-08)
    lora: bool = True
    gemv: bool = True  # serving: one-row decode may use kernels/gemv.py where it times faster
    # serving: captured decode buckets may attend through kernels/decode_attention.py
    decode_attention: bool = True

    @classmethod
    def none(cls) -> Kernels:
        """Every op on its plain-PyTorch reference."""
        return cls(**{f.name: False for f in fields(cls)})


@functools.cache  # asked by every op of every layer on each forward: look it up once
def triton_available() -> bool:
    """Whether Triton can be imported (it ships with CUDA builds of torch)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_kernel(enabled: bool, *tensors: torch.Tensor) -> bool:
    """Take the Triton path: the op enabled, Triton present, and every tensor on CUDA.

    CPU tensors always take the reference (tests run kernels on the CPU by calling them
    directly under TRITON_INTERPRET=1, never through the model).
    """
    return enabled and triton_available() and all(t.is_cuda for t in tensors)


def capture_graph(
    fn: Callable[[], T], warmups: int = 1, pool: Any = None
) -> tuple[torch.cuda.CUDAGraph, T]:
    """(graph, output) of `fn` captured as a CUDA graph after `warmups` eager calls on a side
    stream (kernels compiled and autotuned outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int = 5, warmups: int = 0) -> float:
    """Median milliseconds of `replays` timed replays of a captured graph (CUDA events)."""
    for _ in range(warmups):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    spans = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        spans.append(start.elapsed_time(end))
    return sorted(spans)[replays // 2]
