"""Frozen int8 linear layers: weight-only, symmetric, one float32 scale per output row.

`llamaforge quantize --bits 8` stores these (see `llamaforge.quantize`); a LoRA adapter
wraps one like a plain or NF4 layer (`LoRALinear`), so adapters apply on top.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .nf4 import plain_linear


def _int8_mm_available(x: torch.Tensor) -> bool:
    """The fused int8 weight matmul: on CUDA for decode-sized batches. On the CPU PyTorch's
    kernel measured 9x slower than fp32 at 1 row and 45x at 1024 (2 cores), so there the
    layer is dequantised per call instead."""
    fused = hasattr(torch, "_weight_int8pack_mm") and x.is_cuda
    return fused and x.dtype in (torch.bfloat16, torch.float32) and x.numel() // x.shape[-1] <= 64


class Int8Linear(nn.Module):
    """Frozen linear layer with int8 weights (out, in) and one float32 scale per output row."""

    def __init__(
        self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantise an nn.Linear's weight, symmetric per output channel."""
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale, linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (out, in)."""
        return (self.qweight.float() * self.scale[:, None]).to(dtype)

    def dequantized(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear with the dequantised weight."""
        return plain_linear(self.dequantize(dtype or torch.float32), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out) in x's dtype."""
        flat = x.reshape(-1, self.in_features)
        if _int8_mm_available(x) and flat.is_contiguous():
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scale.to(x.dtype))
        else:
            y = F.linear(flat, self.dequantize(x.dtype))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse: bool = True):  # keep int8 codes and f32 scales as they are
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(out.device)

        return super()._apply(keep_dtype, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"
