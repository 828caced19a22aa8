"""Fused linear + cross entropy equals the plain loss, forward and backward, chunk by chunk."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llamaforge.kernels import fused_ce  # noqa: E402
from llamaforge.kernels.fused_ce import (  # noqa: E402
    auto_chunk_size,
    fused_ce_sum,
    linear_cross_entropy,
    softmax_minus_onehot_ref,
)
from llamaforge.losses import token_ce_sum  # noqa: E402

B, T, C, V = 3, 11, 8, 50


def _inputs(seed: int, frac_ignored: float = 0.3, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g).to(device).requires_grad_()
    head = nn.Linear(C, V, bias=False).to(device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, C, generator=g))
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < frac_ignored] = -100
    return hidden, head, labels.to(device)


def _reference(hidden, head, labels):
    """token_ce_sum on the full logits, and the gradients it gives."""
    h = hidden.detach().clone().requires_grad_()
    w = head.weight.detach().clone().requires_grad_(head.weight.requires_grad)
    loss, count = token_ce_sum(h @ w.T, labels)
    loss.backward()
    return loss.detach(), count, h.grad, w.grad


def _close(a, b, rtol=1e-5):
    assert torch.allclose(a, b, rtol=rtol, atol=rtol * b.abs().max().item()), (a - b).abs().max()


@pytest.mark.parametrize("chunk_size", [1, 7, 64, None])
@pytest.mark.parametrize("train_weight", [True, False])
def test_matches_token_ce_sum(chunk_size, train_weight):
    hidden, head, labels = _inputs(chunk_size or 0)
    head.weight.requires_grad_(train_weight)
    want, want_count, want_gh, want_gw = _reference(hidden, head, labels)
    loss, count = fused_ce_sum(hidden, head, labels, chunk_size)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert count == want_count and 0 < count < B * (T - 1)  # some labels were -100
    _close(loss.detach(), want)
    (loss * 0.37).backward()  # backward scales the saved gradients by the incoming one
    _close(hidden.grad, 0.37 * want_gh)
    if train_weight:
        _close(head.weight.grad, 0.37 * want_gw)
    else:
        assert head.weight.grad is None


def test_all_ignored_gives_zero_loss_and_zero_grads():
    hidden, head, labels = _inputs(1, frac_ignored=1.0)
    loss, count = fused_ce_sum(hidden, head, labels, chunk_size=4)
    assert loss.item() == 0.0 and count.item() == 0
    if loss.requires_grad:
        loss.backward()
    for g in (hidden.grad, head.weight.grad):
        assert g is None or (torch.isfinite(g).all() and not g.any())


def test_no_grad_and_frozen_inputs_compute_no_gradients():
    hidden, head, labels = _inputs(2)
    want, *_ = _reference(hidden, head, labels)
    with torch.no_grad():
        loss, _ = fused_ce_sum(hidden, head, labels, chunk_size=5)
    assert not loss.requires_grad
    _close(loss, want)


def test_never_materialises_all_logits():
    """No tensor of the forward or backward is as large as the (N, V) logits."""
    hidden, head, labels = _inputs(3, frac_ignored=0.0)
    n = B * (T - 1)
    sizes = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    sizes.append(t.numel())
            return out

    with Sizes():
        loss, _ = fused_ce_sum(hidden, head, labels, chunk_size=4)
        loss.backward()
    assert V * C < n * V and max(sizes) < n * V  # largest: the weight's gradient
    want, _, want_gh, want_gw = _reference(hidden, head, labels)
    _close(loss.detach(), want)
    _close(hidden.grad, want_gh)
    _close(head.weight.grad, want_gw)


def test_bf16_under_autocast_close_to_fp32():
    hidden, head, labels = _inputs(4)
    want, _, want_gh, _ = _reference(hidden, head, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_ce_sum(hidden, head, labels, chunk_size=6)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    assert head.weight.grad.dtype == torch.float32
    _close(loss.detach(), want, rtol=2e-2)
    _close(hidden.grad, want_gh, rtol=5e-2)


def test_empty_input():
    h = torch.zeros(0, C, requires_grad=True)
    w = torch.randn(V, C, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and not w.grad.any() and h.grad.shape == (0, C)


def test_auto_chunk_size_bounds_logits():
    n = auto_chunk_size(128256)
    assert n == 512 and n * 128256 * 4 <= fused_ce.LOGITS_BUDGET_BYTES
    assert auto_chunk_size(128256, fused_ce.TRAINED_HEAD_BUDGET_BYTES) == 1024
    assert auto_chunk_size(10**9) == 1


def test_triton_softmax_step_matches_reference():
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(5, 300, generator=g) * 4).to(device)
    target = torch.tensor([0, 299, 128, 127, 7], device=device)
    want_grad = logits.clone()
    want = softmax_minus_onehot_ref(want_grad, target)
    for block in (128, 4096):  # several blocks with a partial last one; one block
        got_grad = logits.clone()
        got = fused_ce.softmax_minus_onehot_triton(got_grad, target, block=block)
        _close(got, want)
        assert torch.allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_weight", [True, False])
def test_cuda_triton_path_matches_token_ce_sum(train_weight, dtype):
    hidden, head, labels = _inputs(6, device="cuda")
    head.weight.requires_grad_(train_weight)
    want, _, want_gh, want_gw = _reference(hidden, head, labels)
    head.to(dtype)
    h = hidden.detach().to(dtype).requires_grad_()
    loss, _ = fused_ce_sum(h, head, labels, chunk_size=7)
    loss.backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # cuBLAS sums in other orders; bf16 inputs
    _close(loss.detach(), want, rtol=tol)
    _close(h.grad.float(), want_gh, rtol=tol)
    if train_weight:
        assert head.weight.grad.dtype == dtype
        _close(head.weight.grad.float(), want_gw, rtol=tol)


def _per_token_case(device: str, dtype: torch.dtype = torch.float32):
    """Labelled positions of `_inputs`, the per-token NLL reference and its input gradient."""
    hidden, head, labels = _inputs(8, device=device)
    target = labels[:, 1:].flatten()
    keep = target != -100
    h = hidden[:, :-1].flatten(0, 1)[keep].detach()  # (N, C)
    t = target[keep]
    upstream = torch.randn(t.numel(), generator=torch.Generator().manual_seed(9)).to(device)
    ref_h = h.clone().requires_grad_()
    want = torch.nn.functional.cross_entropy(ref_h @ head.weight.T, t, reduction="none")
    (want * upstream).sum().backward()
    head.weight.requires_grad_(False)
    got_h = h.to(dtype).requires_grad_()
    return got_h, head.to(dtype), t, upstream, want.detach(), ref_h.grad


@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_per_token_nll_and_its_gradient(chunk_size):
    h, head, t, upstream, want, want_gh = _per_token_case("cpu")
    got = linear_cross_entropy(h, head.weight, t, chunk_size, per_token=True)
    assert got.shape == t.shape and got.dtype == torch.float32
    _close(got.detach(), want)
    (got * upstream).sum().backward()  # each token's own upstream gradient scales its row
    _close(h.grad, want_gh)


def test_per_token_nll_refuses_a_trained_head():
    h, head, t, *_ = _per_token_case("cpu")
    head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen weight"):
        linear_cross_entropy(h, head.weight, t, per_token=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_per_token_nll_and_its_gradient(dtype):
    h, head, t, upstream, want, want_gh = _per_token_case("cuda", dtype)
    got = linear_cross_entropy(h, head.weight, t, chunk_size=7, per_token=True)
    (got * upstream).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    _close(got.detach(), want, rtol=tol)
    _close(h.grad.float(), want_gh, rtol=tol)
