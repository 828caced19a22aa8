"""NF4 (4-bit NormalFloat) frozen base weights for QLoRA, in bitsandbytes' layout.

A weight is flattened and cut into blocks of `blocksize` (64) values. Each block is scaled
by its absolute maximum and every value is rounded to the nearest of 16 NF4 levels
(quantiles of a standard normal, with an exact zero). Two 4-bit codes share a byte, the
earlier value in the high nibble.

Double quantisation stores the per-block absmax constants in 8 bits as well: their mean
(the offset) is subtracted, then blocks of 256 are scaled by their own float32 absmax and
rounded to the nearest of 256 "dynamic" levels (a sign, a decimal exponent and a
fraction). Both steps multiply by the reciprocal of the absmax and round to nearest, as
bitsandbytes' CUDA kernels and PyTorch fallback do, so codes and constants are bit-for-bit
those of `bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")` (its native CPU
8-bit quantiser rounds a few absmax codes to a farther level; see tests/test_nf4.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import Kernels

# NF4 levels: QLoRA's NormalFloat4 data type (Dettmers et al. 2023, appendix E).
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
ABSMAX_BLOCKSIZE = 256  # block size of the second (8-bit) quantisation of absmax values


def dynamic_levels() -> torch.Tensor:
    """The 256 sorted signed 8-bit "dynamic" levels used for double quantisation (256,)."""
    parts = [torch.tensor([0.0, 1.0])]
    for i in range(7):  # decimal exponent 10^(i-6); 2^i fraction steps between 0.1 and 1
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (10 ** (i - 6)) * ((edges[:-1] + edges[1:]) / 2.0)
        parts += [mids, -mids]
    return torch.cat(parts).sort().values


@lru_cache(maxsize=16)
def _levels(kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels, midpoints between neighbours) of 'nf4' or 'dynamic' on a device."""
    levels = torch.tensor(NF4_LEVELS) if kind == "nf4" else dynamic_levels()
    levels = levels.to(device)
    return levels, (levels[:-1] + levels[1:]) / 2


@lru_cache(maxsize=16)
def _byte_table(device: torch.device) -> torch.Tensor:
    """(256, 2) float32: the two NF4 values (high nibble, low nibble) of every byte."""
    levels, _ = _levels("nf4", device)
    byte = torch.arange(256, device=device)
    return torch.stack([levels[byte >> 4], levels[byte & 15]], dim=1)


def _pad_to(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a flat tensor to a multiple of `multiple` (no copy when it already is one)."""
    pad = -flat.numel() % multiple
    return F.pad(flat, (0, pad)) if pad else flat


def _scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded blocks (nblocks, blocksize) of a flat tensor scaled to [-1, 1], and absmax."""
    blocks = _pad_to(flat.float(), blocksize).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]
    return scaled.clamp(-1, 1), absmax


def _nearest(scaled: torch.Tensor, kind: str) -> torch.Tensor:
    """Index (uint8) of the nearest level; a tie goes to the lower level, like bitsandbytes."""
    _, mids = _levels(kind, scaled.device)
    return torch.bucketize(scaled, mids, out_int32=True).to(torch.uint8)


@dataclass
class NF4Tensor:
    """A quantised weight: packed codes plus its block constants (plain or double-quantised)."""

    packed: torch.Tensor  # (ceil(n / 2),) uint8, first value of each pair in the high nibble
    absmax: torch.Tensor  # (nblocks,) float32, or uint8 codes when double-quantised
    shape: torch.Size
    blocksize: int = 64
    absmax_scale: torch.Tensor | None = None  # (ceil(nblocks / 256),) float32
    absmax_offset: torch.Tensor | None = None  # () float32, mean of the absmax values

    @property
    def double_quant(self) -> bool:
        """Whether the absmax constants are themselves 8-bit codes."""
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        """Number of weights represented."""
        return self.shape.numel()

    def nbytes(self) -> int:
        """Bytes held by codes and constants."""
        parts = (self.packed, self.absmax, self.absmax_scale, self.absmax_offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def quantize_blockwise_8bit(
    x: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic-level codes (n,) uint8 and per-block float32 absmax of a flat tensor."""
    scaled, absmax = _scale_blocks(x.reshape(-1), blocksize)
    codes = _nearest(scaled, "dynamic")  # (nblocks, blocksize)
    # bitsandbytes' kernels turn a constant block into 0 * (1 / 0) = NaN and store code 0;
    # with a zero scale every code decodes alike, so store what they store.
    codes = codes.masked_fill((absmax == 0)[:, None], 0)
    return codes.view(-1)[: x.numel()], absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE
) -> torch.Tensor:
    """Float32 values (n,) of 8-bit dynamic-level codes."""
    levels, _ = _levels("dynamic", codes.device)
    n = codes.numel()
    vals = _pad_to(levels[codes.int()], blocksize).view(-1, blocksize)
    return (vals * absmax[:, None]).view(-1)[:n]


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantise a float tensor to NF4 with per-block absmax (optionally double-quantised)."""
    if blocksize <= 0 or blocksize % 2:
        raise ValueError(f"NF4 blocksize must be a positive even number, got {blocksize}")
    n = w.numel()
    scaled, absmax = _scale_blocks(w.detach().reshape(-1), blocksize)  # (nb, bs), (nb,)
    codes = _nearest(scaled, "nf4").view(-1)  # (nb * bs,), zero padding maps to the 0.0 level
    packed = (codes[0::2] << 4) | codes[1::2]  # (nb * bs / 2,)
    packed = packed[: (n + 1) // 2].contiguous()
    if not double_quant:
        return NF4Tensor(packed, absmax, w.shape, blocksize)
    offset = absmax.mean()
    qabsmax, scale = quantize_blockwise_8bit(absmax - offset)
    return NF4Tensor(packed, qabsmax, w.shape, blocksize, scale, offset)


def block_absmax(t: NF4Tensor) -> torch.Tensor:
    """The float32 absmax of every block (nblocks,), undoing double quantisation."""
    if not t.double_quant:
        return t.absmax.float()
    return dequantize_blockwise_8bit(t.absmax, t.absmax_scale) + t.absmax_offset


def dequantize_nf4(t: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight back in `dtype`, shaped like the original (computed in float32)."""
    n, bs = t.numel, t.blocksize
    vals = _byte_table(t.packed.device)[t.packed.int()].view(-1)  # (2 * ceil(n / 2),)
    vals = _pad_to(vals, bs).view(-1, bs)  # (nblocks, bs)
    out = (vals * block_absmax(t)[:, None]).view(-1)[:n]
    return out.view(t.shape).to(dtype)


class NF4Weight(nn.Module):
    """Frozen weight kept as NF4 buffers; `dequantize(dtype)` returns it (out, in).

    `model.to(dtype)` moves the buffers between devices but never changes their dtype:
    the float32 constants must stay float32 for the codes to mean anything.
    """

    def __init__(self, t: NF4Tensor) -> None:
        super().__init__()
        self.shape, self.blocksize = t.shape, t.blocksize
        self.kernels = Kernels()
        self.register_buffer("packed", t.packed)
        self.register_buffer("absmax", t.absmax)
        self.register_buffer("absmax_scale", t.absmax_scale)
        self.register_buffer("absmax_offset", t.absmax_offset)

    @classmethod
    def from_float(
        cls, w: torch.Tensor, blocksize: int = 64, double_quant: bool = True
    ) -> NF4Weight:
        """Quantise a float weight."""
        return cls(quantize_nf4(w, blocksize, double_quant))

    def tensor(self) -> NF4Tensor:
        """The buffers as an NF4Tensor."""
        return NF4Tensor(
            self.packed,
            self.absmax,
            self.shape,
            self.blocksize,
            self.absmax_scale,
            self.absmax_offset,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (out, in), through the Triton kernel on CUDA when enabled."""
        from ..kernels.nf4_dequant import dequantize  # the kernel module imports this one

        return dequantize(self.tensor(), dtype, self.kernels.nf4)

    def nbytes(self) -> int:
        """Bytes of the buffers (4 bits per weight plus block constants)."""
        return self.tensor().nbytes()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> NF4Weight:
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(out.device)

        return super()._apply(keep_dtype, recurse)

    def extra_repr(self) -> str:
        dq = self.absmax_scale is not None
        return f"shape={tuple(self.shape)}, blocksize={self.blocksize}, double_quant={dq}"


def linear_add(x: torch.Tensor, weight: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """x @ W^T + add, (..., in) -> (..., out), the add done in the matmul's epilogue
    (`addmm`, beta = 1) rather than as a separate pass over the output."""
    n_out = weight.shape[0]
    y = torch.addmm(add.reshape(-1, n_out), x.reshape(-1, x.shape[-1]), weight.t())
    return y.view(*x.shape[:-1], n_out)


class _NF4Matmul(torch.autograd.Function):
    """x @ W^T (+ add) with W dequantised in forward and again in backward (never saved);
    `add` (..., out) goes in through the matmul's epilogue (addmm, beta = 1)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: NF4Weight, add: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.weight, ctx.x_dtype = weight, x.dtype
        w = weight.dequantize(x.dtype)  # (out, in)
        if add is None:
            return F.linear(x, w)  # (..., out)
        ctx.add_dtype = add.dtype
        return linear_add(x, w, add.to(x.dtype))

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        dx = dadd = None
        if ctx.needs_input_grad[0]:
            w = ctx.weight.dequantize(grad.dtype)  # (out, in)
            dx = (grad @ w).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            dadd = grad.to(ctx.add_dtype)
        return dx, None, dadd


def nf4_linear(
    x: torch.Tensor,
    weight: NF4Weight,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W^T (+ bias) (+ add) for an NF4 weight, computed in `compute_dtype`, returned
    in x's; `add` (..., out) is added by the matmul itself (no separate pass over y)."""
    dtype = compute_dtype or x.dtype
    y = _NF4Matmul.apply(x.to(dtype), weight, add)  # (..., out)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (QLoRA's base layers)."""

    def __init__(
        self,
        nf4: NF4Weight,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.nf4 = nf4
        self.out_features, self.in_features = nf4.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> NF4Linear:
        """Quantise an nn.Linear's weight."""
        nf4 = NF4Weight.from_float(linear.weight.detach(), blocksize, double_quant)
        return cls(nf4, linear.bias, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        return nf4_linear(x, self.nf4, self.bias, self.compute_dtype)

    def dequantized(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear with the dequantised weight (default dtype: compute dtype or fp32)."""
        dtype = dtype or self.compute_dtype or torch.float32
        return plain_linear(self.nf4.dequantize(dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """An nn.Linear holding exactly these (out, in) weights, on their device and dtype."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone().to(weight.dtype), requires_grad=False)
    return lin
