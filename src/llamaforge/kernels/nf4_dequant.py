"""NF4 dequantisation in one Triton launch (QLoRA base weights, forward and backward).

`adapters.nf4.dequantize_nf4` is the definition: a byte-table lookup, a padded reshape,
and, for double-quantised constants, three more small ops to rebuild each block's absmax;
each step a separate kernel with float32 intermediates the size of the weight. QLoRA
dequantises every base weight twice per step (forward and backward), so that traffic adds
up. The kernel here reads each packed byte once and writes its two values once: every
program takes a range of bytes, splits each into its high (first) and low (second) nibble,
looks both up in the 16 NF4 levels, rebuilds the block's absmax (from the 8-bit code via
the 256 dynamic levels, times the scale of its group of 256 blocks, plus the offset, when
double-quantised) and stores the two products interleaved.

The result is bit-identical to the reference in float32 (same float32 operations in the
same order: contraction of a * b + c into one FMA is switched off at launch), and so in
bf16 and fp16, rounded to nearest even from that float32 value (bf16 on the bits, since
Triton's CPU interpreter would truncate).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

from ..adapters.nf4 import ABSMAX_BLOCKSIZE, NF4_LEVELS, NF4Tensor, dequantize_nf4, dynamic_levels
from . import use_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path only
    triton = tl = None

BLOCK_BYTES = 1024  # packed bytes per program: 2048 output values


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(NF4 levels (16,), dynamic levels (256,)) float32 on a device, as the reference uses."""
    return torch.tensor(NF4_LEVELS, device=device), dynamic_levels().to(device)


def _nf4_dequant_kernel(
    packed_ptr,  # (nbytes,) uint8, first value of a pair in the high nibble
    absmax_ptr,  # (nblocks,) float32, or uint8 codes when DOUBLE_QUANT
    scale_ptr,  # (ceil(nblocks / 256),) float32 (used when DOUBLE_QUANT)
    offset_ptr,  # () float32 (used when DOUBLE_QUANT)
    nf4_ptr,  # (16,) float32 NF4 levels
    dyn_ptr,  # (256,) float32 dynamic levels
    out_ptr,  # (n,) output dtype; int16 holding bf16 bits when BF16
    n,
    nbytes,
    BLOCKSIZE: tl.constexpr,  # values per absmax block (even)
    GROUP: tl.constexpr,  # absmax blocks per scale entry (256)
    DOUBLE_QUANT: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK: tl.constexpr,  # bytes per program
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)  # (BLOCK,) byte indices
    mask = offs < nbytes
    byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
    hi = tl.load(nf4_ptr + (byte >> 4))  # (BLOCK,) value 2 * offs
    lo = tl.load(nf4_ptr + (byte & 15))  # (BLOCK,) value 2 * offs + 1, same block (even size)
    blk = (2 * offs) // BLOCKSIZE
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(scale_ptr + blk // GROUP, mask=mask, other=0.0)
        absmax = tl.load(dyn_ptr + code) * scale + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    vals = tl.interleave(hi * absmax, lo * absmax)  # (2 * BLOCK,) in output order
    out = 2 * start + tl.arange(0, 2 * BLOCK)
    if BF16:  # round to nearest even on the bits, as torch does (the interpreter truncates)
        bits = vals.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(vals != vals, 0x7FC0, bits)  # NaN stays a quiet NaN
        tl.store(out_ptr + out, bits.to(tl.int16), mask=out < n)
    else:
        tl.store(out_ptr + out, vals.to(out_ptr.dtype.element_ty), mask=out < n)


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU, not the current one (a no-op on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def _jitted() -> Any:
    """The kernel, jitted at first use (so TRITON_INTERPRET set by then is honoured)."""
    return triton.jit(_nf4_dequant_kernel)


def dequantize_nf4_triton(t: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`dequantize_nf4(t, dtype)` in one Triton launch (CUDA, or CPU under the interpreter)."""
    n, dev = t.numel, t.packed.device
    out = torch.empty(n, dtype=dtype, device=dev)  # (n,)
    if n == 0:
        return out.view(t.shape)
    nf4, dyn = _tables(dev)
    dq = t.double_quant
    scale = t.absmax_scale if dq else nf4  # unused placeholders when not double-quantised
    offset = t.absmax_offset if dq else nf4
    packed = t.packed.contiguous()
    bf16 = dtype == torch.bfloat16
    grid = (triton.cdiv(packed.numel(), BLOCK_BYTES),)
    with _on(dev):
        _jitted()[grid](
            packed,
            t.absmax.contiguous(),
            scale,
            offset,
            nf4,
            dyn,
            out.view(torch.int16) if bf16 else out,
            n,
            packed.numel(),
            BLOCKSIZE=t.blocksize,
            GROUP=ABSMAX_BLOCKSIZE,
            DOUBLE_QUANT=dq,
            BF16=bf16,
            BLOCK=BLOCK_BYTES,
            num_warps=4,
            enable_fp_fusion=False,  # a * b + c must round twice, as in the reference
        )
    return out.view(t.shape)


def dequantize(
    t: NF4Tensor, dtype: torch.dtype = torch.float32, enabled: bool = True
) -> torch.Tensor:
    """The weight in `dtype`: Triton for CUDA tensors when enabled, else the reference."""
    if triton is not None and use_kernel(enabled, t.packed):
        return dequantize_nf4_triton(t, dtype)
    return dequantize_nf4(t, dtype)
