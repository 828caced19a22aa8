"""Triton RMSNorm, RoPE and SwiGLU against their PyTorch references, forward and backward.

On a machine without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1,
set here before the kernel modules are imported or re-imported); on a GPU the same tests
run the compiled kernels. The Triton paths are called directly (`_*_triton`), since the
public entry points only choose Triton for CUDA tensors; the dispatch has its own tests.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llamaforge.kernels import interpreting, rmsnorm, rope, swiglu  # noqa: E402
from llamaforge.model.llama import rope_cos_sin, rope_inv_freq  # noqa: E402

if interpreting():
    # Kernels decorated before the variable was set (another test module imported them
    # first) are compiled ones; decorate them again as interpreted functions.
    for _module in (rmsnorm, rope, swiglu):
        importlib.reload(_module)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _needs_triton(request):
    """Skip the kernel tests (not the dispatch ones) where Triton is missing."""
    if "dispatch" not in request.node.name:
        pytest.importorskip("triton")


def close(actual: torch.Tensor, expected: torch.Tensor, bf16: bool = False) -> None:
    """Same dtype and shape; fp32 to 1e-5, bf16 (or bf16 inputs) to 2e-2 and 1% in norm.

    Triton's interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest even),
    so there the bf16 results may differ from torch's by one unit in the last place.
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if expected.dtype == torch.float32 and not bf16:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        return
    a, e = actual.float(), expected.float()
    torch.testing.assert_close(a, e, atol=2e-2, rtol=2e-2)
    assert ((a - e).norm() / e.norm()).item() < 1e-2


def randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal values on DEV (never exactly zero in practice)."""
    return torch.randn(*shape, device=DEV).to(dtype)


def grads(out, inputs, seed: int = 1):
    """Gradients of <out, fixed random cotangent> w.r.t. inputs (a tuple of outputs too)."""
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    return torch.autograd.grad(outs, inputs, cot, retain_graph=True)


# ---- RMSNorm ----

RMS_SHAPES = {
    "3d": (2, 3, 64),
    "odd_hidden": (5, 100),  # not a power of two: masked columns
    "many_rows": (37, 48),  # several programs, the last one partly past the rows
    "one_row": (1, 1, 16),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", RMS_SHAPES.values(), ids=RMS_SHAPES.keys())
def test_rms_norm_matches_reference(shape, dtype):
    torch.manual_seed(0)
    x = randn(*shape, dtype=dtype).requires_grad_()
    w = torch.empty(shape[-1], device=DEV).uniform_(0.5, 1.5).to(dtype).requires_grad_()
    out = rmsnorm._rms_norm_triton(x, w, 1e-5)
    ref = rmsnorm.rms_norm_ref(x, w, 1e-5)
    close(out, ref)
    for got, want in zip(grads(out, (x, w)), grads(ref, (x, w)), strict=True):
        close(got, want)


def test_rms_norm_strided_input_and_frozen_weight():
    torch.manual_seed(0)
    x = randn(6, 128, dtype=torch.float32).requires_grad_()
    rows = x[::2, :100]  # (3, 100) with a row stride of 256: a view, not copied
    w = torch.empty(100, device=DEV).uniform_(0.5, 1.5)  # frozen: no dweight
    w128 = torch.empty(128, device=DEV).uniform_(0.5, 1.5)
    out = rmsnorm._rms_norm_triton(rows, w, 1e-6)
    ref = rmsnorm.rms_norm_ref(rows, w, 1e-6)
    close(out, ref)
    (got,), (want,) = grads(out, (x,)), grads(ref, (x,))
    close(got, want)
    (got,), (want,) = torch.autograd.grad(out.sum(), x), torch.autograd.grad(ref.sum(), x)
    close(got, want)  # the gradient of a sum arrives expanded (all strides 0)
    t = x.detach().t().contiguous().t()  # (6, 128), hidden dim strided: copied to rows
    close(rmsnorm._rms_norm_triton(t, w128, 1e-6), rmsnorm.rms_norm_ref(t, w128, 1e-6))
    assert w.grad is None


def test_rms_norm_mixed_dtypes_promote_like_reference():
    x = randn(3, 32, dtype=torch.bfloat16)
    w = torch.empty(32, device=DEV).uniform_(0.5, 1.5)  # fp32 weight: fp32 output
    close(rmsnorm._rms_norm_triton(x, w, 1e-5), rmsnorm.rms_norm_ref(x, w, 1e-5), bf16=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", RMS_SHAPES.values(), ids=RMS_SHAPES.keys())
def test_add_rms_norm_matches_reference(shape, dtype):
    """Both outputs (the sum and its norm) and the gradients of x, delta and the weight, with
    cotangents on both outputs (the residual stream carries h on)."""
    torch.manual_seed(1)
    x = randn(*shape, dtype=dtype).requires_grad_()
    d = randn(*shape, dtype=dtype).requires_grad_()
    w = torch.empty(shape[-1], device=DEV).uniform_(0.5, 1.5).to(dtype).requires_grad_()
    out = rmsnorm._add_rms_norm_triton(x, d, w, 1e-5)
    ref = rmsnorm.add_rms_norm_ref(x, d, w, 1e-5)
    for got, want in zip(out, ref, strict=True):
        close(got, want)
    for got, want in zip(grads(out, (x, d, w)), grads(ref, (x, d, w)), strict=True):
        close(got, want)


def test_add_rms_norm_with_only_the_norm_used_and_a_frozen_weight():
    torch.manual_seed(2)
    x = randn(4, 40, dtype=torch.float32).requires_grad_()
    d = randn(4, 40, dtype=torch.float32).requires_grad_()
    w = torch.empty(40, device=DEV).uniform_(0.5, 1.5)  # frozen: no dweight
    _, y = rmsnorm._add_rms_norm_triton(x, d, w, 1e-6)
    _, y_ref = rmsnorm.add_rms_norm_ref(x, d, w, 1e-6)
    got = torch.autograd.grad(y, (x, d), torch.ones_like(y))
    want = torch.autograd.grad(y_ref, (x, d), torch.ones_like(y_ref))
    for g, e in zip(got, want, strict=True):
        close(g, e)
    assert w.grad is None


# ---- RoPE ----

ROPE_SHAPES = {  # (B, H, K, T, D)
    "gqa": (2, 4, 2, 5, 16),
    "mha_odd_half": (1, 3, 3, 7, 12),  # D/2 = 6: masked lanes
    "one_token": (2, 2, 1, 1, 8),
}


def rope_inputs(b, h, kv, t, d, dtype):
    """Projection outputs (B, T, H*D), (B, T, K*D) and their (B, heads, T, D) views."""
    q_proj = randn(b, t, h * d, dtype=dtype).requires_grad_()
    k_proj = randn(b, t, kv * d, dtype=dtype).requires_grad_()
    q = q_proj.view(b, t, h, d).transpose(1, 2)  # non-contiguous, as in the model
    k = k_proj.view(b, t, kv, d).transpose(1, 2)
    positions = torch.randint(0, 500, (b, t), device=DEV)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(d, 10000.0, None).to(DEV), dtype)
    return q_proj, k_proj, q, k, cos, sin


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROPE_SHAPES.values(), ids=ROPE_SHAPES.keys())
def test_rope_matches_reference(shape, dtype):
    torch.manual_seed(0)
    q_proj, k_proj, q, k, cos, sin = rope_inputs(*shape, dtype)
    out = rope._rope_triton(q, k, cos, sin)
    ref = rope.rope_ref(q, k, cos, sin)
    for got, want in zip(out, ref, strict=True):
        close(got, want)
    for got, want in zip(grads(out, (q_proj, k_proj)), grads(ref, (q_proj, k_proj)), strict=True):
        close(got, want)


def test_rope_contiguous_heads_and_broadcast_tables():
    torch.manual_seed(0)
    q = randn(2, 4, 3, 8, dtype=torch.float32).requires_grad_()  # (B, H, T, D) contiguous
    k = randn(2, 1, 3, 8, dtype=torch.float32).requires_grad_()
    inv_freq = rope_inv_freq(8, 1e4, None).to(DEV)
    cos, sin = rope_cos_sin(torch.arange(3, device=DEV)[None], inv_freq, q.dtype)
    out = rope._rope_triton(q, k, cos, sin)  # tables (1, 1, T, D) broadcast over the batch
    ref = rope.rope_ref(q, k, cos, sin)
    for got, want in zip((*out, *grads(out, (q, k))), (*ref, *grads(ref, (q, k))), strict=True):
        close(got, want)
    got = torch.autograd.grad(out[0].sum() + out[1].sum(), (q, k))  # expanded gradients
    want = torch.autograd.grad(ref[0].sum() + ref[1].sum(), (q, k))
    for g, w in zip(got, want, strict=True):
        close(g, w)


# ---- SwiGLU ----

SWIGLU_SHAPES = {"3d": (2, 5, 7), "over_one_block": (3, 1500)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES.values(), ids=SWIGLU_SHAPES.keys())
def test_swiglu_matches_reference(shape, dtype):
    torch.manual_seed(0)
    gate = (randn(*shape, dtype=torch.float32) * 3).to(dtype).requires_grad_()
    up = randn(*shape, dtype=dtype).requires_grad_()
    out = swiglu._swiglu_triton(gate, up)
    ref = swiglu.swiglu_ref(gate, up)
    close(out, ref)
    for got, want in zip(grads(out, (gate, up)), grads(ref, (gate, up)), strict=True):
        close(got, want)


def test_swiglu_non_contiguous_inputs():
    torch.manual_seed(0)
    gate = randn(6, 4, dtype=torch.float32).requires_grad_()
    up = randn(6, 4, dtype=torch.float32).requires_grad_()
    out = swiglu._swiglu_triton(gate.t(), up.t())
    ref = swiglu.swiglu_ref(gate.t(), up.t())
    close(out, ref)
    for got, want in zip(grads(out, (gate, up)), grads(ref, (gate, up)), strict=True):
        close(got, want)


# ---- Dispatch ----


def _forbid(monkeypatch, module, name):
    """Make module.name raise, so taking the Triton path fails the test."""

    def boom(*args, **kwargs):
        raise AssertionError(f"{name} called: the reference was expected")

    monkeypatch.setattr(module, name, boom)


@pytest.mark.parametrize("device", ["cpu", "cuda-disabled"])
def test_dispatch_takes_reference(monkeypatch, device):
    if device == "cuda-disabled" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev, enabled = ("cpu", True) if device == "cpu" else ("cuda", False)
    _forbid(monkeypatch, rmsnorm, "_rms_norm_triton")
    _forbid(monkeypatch, rope, "_rope_triton")
    _forbid(monkeypatch, swiglu, "_swiglu_triton")
    x, w = torch.randn(3, 16, device=dev), torch.rand(16, device=dev) + 0.5
    assert torch.equal(rmsnorm.rms_norm(x, w, 1e-5, enabled), rmsnorm.rms_norm_ref(x, w, 1e-5))
    _forbid(monkeypatch, rmsnorm, "_add_rms_norm_triton")
    pairs = zip(
        rmsnorm.add_rms_norm(x, x, w, 1e-5, enabled),
        rmsnorm.add_rms_norm_ref(x, x, w, 1e-5),
        strict=True,
    )
    assert all(torch.equal(o, r) for o, r in pairs)
    q, k = torch.randn(1, 4, 3, 8, device=dev), torch.randn(1, 2, 3, 8, device=dev)
    inv_freq = rope_inv_freq(8, 1e4, None).to(dev)
    cos, sin = rope_cos_sin(torch.arange(3, device=dev)[None], inv_freq, x.dtype)
    outs, refs = rope.rope(q, k, cos, sin, enabled), rope.rope_ref(q, k, cos, sin)
    assert all(torch.equal(o, r) for o, r in zip(outs, refs, strict=True))
    assert torch.equal(swiglu.swiglu(x, w.expand(3, 16), enabled), swiglu.swiglu_ref(x, w))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dispatch_takes_triton_on_cuda(monkeypatch):
    pytest.importorskip("triton")
    x, w = torch.randn(3, 16, device="cuda"), torch.rand(16, device="cuda") + 0.5
    _forbid(monkeypatch, rmsnorm, "rms_norm_ref")
    _forbid(monkeypatch, swiglu, "swiglu_ref")
    close(rmsnorm.rms_norm(x, w, 1e-5), rmsnorm._rms_norm_triton(x, w, 1e-5))
    _forbid(monkeypatch, rmsnorm, "add_rms_norm_ref")
    h, y = rmsnorm.add_rms_norm(x, x, w, 1e-5)
    close(h, 2 * x)
    close(y, rmsnorm._rms_norm_triton(2 * x, w, 1e-5))
    close(swiglu.swiglu(x, x), swiglu._swiglu_triton(x, x))
