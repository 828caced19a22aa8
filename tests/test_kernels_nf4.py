"""Triton NF4 dequantisation equals the reference bit for bit (interpreter on the CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from llamaforge.adapters.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402
from llamaforge.kernels import nf4_dequant  # noqa: E402
from llamaforge.kernels.nf4_dequant import dequantize, dequantize_nf4_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (7, 9): odd numel, a partial block; (300, 257): 1203 blocks, so 5 absmax scales; a
# multiple of 64; one spanning several programs with a partial last one.
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
SHAPES = [(7, 9), (300, 257), (32, 64), (3, 1000)]


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, double_quant):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g)
    t = quantize_nf4(w.to(DEVICE), double_quant=double_quant)
    assert t.double_quant == double_quant
    for dtype, bits in BITS.items():
        got, want = dequantize_nf4_triton(t, dtype), dequantize_nf4(t, dtype)
        assert got.dtype == dtype and got.shape == w.shape
        assert torch.equal(got.view(bits), want.view(bits))  # bit for bit, -0.0 included


def test_blocksize_and_zero_blocks():
    w = torch.randn(5, 48)
    w[1] = 0.0  # all-zero blocks (absmax 0) in both formats
    for dq in (False, True):
        t = quantize_nf4(w.to(DEVICE), blocksize=32, double_quant=dq)
        got, want = dequantize_nf4_triton(t), dequantize_nf4(t)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_dispatcher_sends_cpu_tensors_to_reference(monkeypatch):
    t = quantize_nf4(torch.randn(16, 16), double_quant=True)
    calls = []
    monkeypatch.setattr(nf4_dequant, "dequantize_nf4_triton", lambda *a: calls.append(a))
    assert torch.equal(dequantize(t, torch.bfloat16), dequantize_nf4(t, torch.bfloat16))
    assert dequantize(t, enabled=False).dtype == torch.float32
    assert calls == []
