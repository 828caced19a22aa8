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
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class Kernels:
    """Which fused kernels a model may use (each falls back to its reference when off)."""

    rmsnorm: bool = True
    rope: bool = True
    swiglu: bool = True
    fused_ce: bool = True  # linear + cross entropy without materialising the logits
    nf4: bool = True  # Triton NF4 dequantise for QLoRA base weights
    varlen_attention: bool = True  # packed rows through flash varlen attention (CUDA)
    adamw: bool = True  # bf16-weight AdamW (stochastic rounding) as one kernel per parameter
    gemv: bool = True  # serving: one-row decode may use kernels/gemv.py where it times faster

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
