"""The one-row GEMV + LoRA-epilogue kernel against its reference (Triton's interpreter on CPU)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llamaforge.kernels import gemv, interpreting, triton_available  # noqa: E402

if interpreting():
    importlib.reload(gemv)  # decorated before the variable was set: decorate again

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k", "r"), [(40, 70, 0), (33, 300, 16), (130, 64, 48)])
def test_gemv_lora_equals_the_reference(dtype, n, k, r):
    g = torch.Generator().manual_seed(n + k + r)
    x = torch.randn(1, k, generator=g).to(DEV, dtype)
    w = torch.randn(n, k, generator=g).to(DEV, dtype)
    h = torch.randn(1, r, generator=g).to(DEV, dtype) if r else None
    bt = torch.randn(r, n, generator=g).to(DEV, dtype) if r else None
    got = gemv.gemv_lora_triton(x, w, h, bt)
    want = gemv.gemv_lora_ref(x, w, h, bt)
    assert got.shape == (1, n) and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol * k**0.5, rtol=tol)


def test_gemv_lora_reads_strided_weights_and_slices():
    """A weight with a longer row (a view into a wider buffer) and the first R of more
    adapter columns, as the engine hands them."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(24, 50, generator=g).to(DEV)
    bt_all = torch.randn(32, 24, generator=g).to(DEV)
    x, h = torch.randn(1, 40, generator=g).to(DEV), torch.randn(1, 16, generator=g).to(DEV)
    got = gemv.gemv_lora_triton(x, wide[:, :40], h, bt_all[:16])
    torch.testing.assert_close(got, gemv.gemv_lora_ref(x, wide[:, :40], h, bt_all[:16]))


def test_gemv_lora_rejects_shapes_it_does_not_compute():
    x, w = torch.zeros(2, 8, device=DEV), torch.zeros(4, 8, device=DEV)
    with pytest.raises(ValueError, match="gemv_lora"):
        gemv.gemv_lora_triton(x, w)
    with pytest.raises(ValueError, match="gemv_lora"):
        gemv.gemv_lora_triton(x[:1], w, torch.zeros(1, 3, device=DEV), torch.zeros(2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("sizes", "r"), [((48, 16, 16), 32), ((40, 40), 16), ((24, 8, 8), 0)])
def test_grouped_gemv_with_mask_equals_the_reference(dtype, sizes, r):
    """Members stacked along the output (q/k/v, gate/up), each with its own projection h[m]
    read through the strides the engine's shared shrink gives (column-major over members)."""
    g = torch.Generator().manual_seed(sum(sizes) + r)
    n, k, m = sum(sizes), 72, len(sizes)
    bounds = tuple(int(b) for b in torch.tensor(sizes).cumsum(0)[:-1])
    x = torch.randn(1, k, generator=g).to(DEV, dtype)
    w = torch.randn(n, k, generator=g).to(DEV, dtype)
    h = torch.randn(r, m, generator=g).to(DEV, dtype).T if r else None  # (M, R), strides (1, M)
    bt = torch.randn(r, n, generator=g).to(DEV, dtype) if r else None
    mask = (torch.arange(r) < r // 2).to(DEV, dtype) if r else None
    got = gemv.gemv_lora_triton(x, w, h, bt, mask, bounds)
    want = gemv.gemv_lora_ref(x, w, h, bt, mask, bounds)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol * k**0.5, rtol=tol)
    if r:  # the mask matters: without it the result differs
        assert not torch.allclose(
            gemv.gemv_lora_ref(x, w, h, bt, None, bounds).float(), want.float()
        )


def test_grouped_gemv_rejects_bad_bounds():
    x, w = torch.zeros(1, 8, device=DEV), torch.zeros(12, 8, device=DEV)
    with pytest.raises(ValueError, match="bounds"):
        gemv.gemv_lora_triton(x, w, bounds=(8, 4))
    with pytest.raises(ValueError, match="bounds"):
        gemv.gemv_lora_triton(x, w, bounds=(2, 4, 6))
    with pytest.raises(ValueError, match="gemv_lora"):  # h has one member, bounds say two
        gemv.gemv_lora_triton(x, w, torch.zeros(1, 4, device=DEV), torch.zeros(4, 12), None, (6,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("j", "k"), [(16, 300), (48, 4096), (40, 9000)])
def test_shrink_partial_sums_add_up_to_x_a_t(dtype, j, k):
    """One slice (K=300), 16 slices (4096) and fewer, longer slices past 32 x 256 (9000)."""
    g = torch.Generator().manual_seed(j + k)
    x = torch.randn(1, k, generator=g).to(DEV, dtype)
    a = torch.randn(j, k, generator=g).to(DEV, dtype)
    parts = gemv.shrink_triton(x, a)
    assert parts.dtype == torch.float32 and parts.shape[1] == j
    assert parts.shape[0] == -(-k // (256 * -(-k // (256 * 32))))
    want = x.float() @ a.float().T
    torch.testing.assert_close(parts.sum(0, keepdim=True), want, atol=1e-3 * k**0.5, rtol=1e-4)


@pytest.mark.parametrize("sizes", [(40,), (48, 16, 16), (40, 24)])
def test_gemv_adds_up_the_shrinks_partial_sums(sizes):
    """The engine's one-row LoRA layer: the shrink's (S, c*M) partial sums of the members'
    column-major A, read as h (S, M, c) with the row's mask, equal the reference with the
    summed projection."""
    g = torch.Generator().manual_seed(len(sizes))
    n, k, m, c = sum(sizes), 600, len(sizes), 32
    bounds = tuple(int(b) for b in torch.tensor(sizes).cumsum(0)[:-1])
    x = torch.randn(1, k, generator=g).to(DEV)
    w = torch.randn(n, k, generator=g).to(DEV)
    a = torch.randn(c, m, k, generator=g).to(DEV)  # (cols, members, in), as SharedShrink holds it
    bt = torch.randn(c, n, generator=g).to(DEV)
    mask = (torch.arange(c) >= 16).to(DEV, torch.float32)
    parts = gemv.shrink_triton(x, a.reshape(c * m, k))
    assert parts.shape[0] > 1
    h = parts.view(-1, c, m).transpose(1, 2)
    got = gemv.gemv_lora_triton(x, w, h, bt, mask, bounds)
    h_full = torch.einsum("k,cmk->mc", x[0], a)  # (M, c)
    want = gemv.gemv_lora_ref(x, w, h_full, bt, mask, bounds)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(
        gemv.gemv_lora_ref(x, w, h, bt, mask, bounds), want, atol=1e-3, rtol=1e-4
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora", [False, True])
def test_swiglu_folded_into_the_input_loads(dtype, lora):
    """The MLP's down projection at one row reading [gate | up]: the GEMV (and the shrink
    that feeds its LoRA epilogue) equal silu(gate) * up rounded to the input dtype, then the
    plain layer; the input given in the wrong width is refused."""
    g = torch.Generator().manual_seed(11)
    n, k, c = 40, 600, 16
    gate_up = torch.randn(1, 2 * k, generator=g).to(DEV, dtype)
    w = torch.randn(n, k, generator=g).to(DEV, dtype)
    a = torch.randn(c, k, generator=g).to(DEV, dtype)
    bt = torch.randn(c, n, generator=g).to(DEV, dtype)
    gate, up = gate_up.float().chunk(2, dim=-1)
    x = (torch.nn.functional.silu(gate) * up).to(dtype)
    h = gemv.shrink_triton(gate_up, a, glu=True)[:, None] if lora else None
    got = gemv.gemv_lora_triton(gate_up, w, h, bt if lora else None, glu=True)
    want = gemv.gemv_lora_ref(x, w, (x.float() @ a.float().T) if lora else None,
                              bt if lora else None)  # fmt: skip
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol * k**0.5, rtol=tol)
    torch.testing.assert_close(gemv.gemv_lora_ref(gate_up, w, glu=True), gemv.gemv_lora_ref(x, w))
    with pytest.raises(ValueError, match="gemv_lora"):
        gemv.gemv_lora_triton(x, w, glu=True)
    with pytest.raises(ValueError, match="shrink"):
        gemv.shrink_triton(x, a, glu=True)


def test_the_shrink_stores_the_swiglu_input_and_the_gemv_adds_the_residual():
    """The down projection's LoRA path: the shrink writes silu(gate) * up (rounded to the
    input dtype) for the GEMV, which adds the block's residual to its rounded result."""
    g = torch.Generator().manual_seed(12)
    n, k, c, dtype = 24, 700, 16, torch.bfloat16
    gate_up = torch.randn(1, 2 * k, generator=g).to(DEV, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEV, dtype)  # outputs of order 1
    a = (torch.randn(c, k, generator=g) / k**0.5).to(DEV, dtype)
    bt = (torch.randn(c, n, generator=g) / c**0.5).to(DEV, dtype)
    res = torch.randn(1, n, generator=g).to(DEV, dtype)
    x_in = torch.full((1, k), float("nan"), device=DEV, dtype=dtype)
    parts = gemv.shrink_triton(gate_up, a, glu=True, glu_out=x_in)
    gate, up = gate_up.float().chunk(2, dim=-1)
    x = (torch.nn.functional.silu(gate) * up).to(dtype)
    torch.testing.assert_close(x_in.float(), x.float(), atol=1e-2, rtol=1e-2)
    got = gemv.gemv_lora_triton(x_in, w, parts[:, None], bt, residual=res)
    want = gemv.gemv_lora_ref(x, w, x.float() @ a.float().T, bt, residual=res)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)
    plain = gemv.gemv_lora_ref(x, w, x.float() @ a.float().T, bt)
    assert torch.equal(gemv.gemv_lora_ref(x, w, x.float() @ a.float().T, bt, residual=res),
                       plain + res)  # fmt: skip
    with pytest.raises(ValueError, match="residual"):
        gemv.gemv_lora_triton(x_in, w, residual=res[:, :5])
    with pytest.raises(ValueError, match="glu_out"):
        gemv.shrink_triton(gate_up, a, glu=True, glu_out=x_in[:, :5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", [(40,), (48, 16, 16)])
def test_rms_norm_folded_into_the_gemv_and_shrink(dtype, sizes):
    """A block's input norm folded in: the shrink projects x * g, the GEMV reads x and g and
    applies the row's 1 / rms to the base product and to the summed projections; equal to
    the norm computed first (fp32, not rounded in between) and then the plain layer."""
    g = torch.Generator().manual_seed(21 + len(sizes))
    n, k, m, c, eps = sum(sizes), 640, len(sizes), 16, 1e-5
    bounds = tuple(int(b) for b in torch.tensor(sizes).cumsum(0)[:-1])
    x = (3 * torch.randn(1, k, generator=g)).to(DEV, dtype)
    gain = (1 + 0.1 * torch.randn(k, generator=g)).to(DEV, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEV, dtype)
    a = (torch.randn(c, m, k, generator=g) / k**0.5).to(DEV, dtype)
    bt = (torch.randn(c, n, generator=g) / c**0.5).to(DEV, dtype)
    mask = (torch.arange(c) < 8).to(DEV, dtype)
    parts = gemv.shrink_triton(x, a.reshape(c * m, k), norm_weight=gain)
    h = parts.view(-1, c, m).transpose(1, 2)
    got = gemv.gemv_lora_triton(x, w, h, bt, mask, bounds, norm=(gain, eps))
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * gain.float()
    want = gemv.gemv_lora_ref(normed, w, torch.einsum("k,cmk->mc", normed[0], a.float()), bt,
                              mask, bounds)  # fmt: skip
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol * 4, rtol=tol)
    ref = gemv.gemv_lora_ref(x, w, h, bt, mask, bounds, norm=(gain, eps))
    torch.testing.assert_close(ref.float(), want.float(), atol=tol * 4, rtol=tol)
    plain = gemv.gemv_lora_triton(x, w, norm=(gain, eps))  # no adapters
    torch.testing.assert_close(plain.float(), gemv.gemv_lora_ref(normed, w).float(),
                               atol=tol * 4, rtol=tol)  # fmt: skip
    with pytest.raises(ValueError, match="norm"):
        gemv.gemv_lora_triton(x, w, norm=(gain[:5], eps))
    with pytest.raises(ValueError, match="norm"):
        gemv.shrink_triton(x, a.reshape(c * m, k), norm_weight=gain[:5])


@pytest.mark.parametrize("members", [1, 3])
def test_the_rows_own_adapter_slot_chosen_on_the_device(members):
    """One row, 4 adapter slots of rank 8 stacked: the shrink and the GEMV read only the slot
    whose first column a device tensor holds (one captured graph serves every slot), equal
    to slicing that slot out on the host."""
    g = torch.Generator().manual_seed(30 + members)
    n, k, r, slots = 24 * members, 300, 8, 4
    sizes = (n // members,) * members
    bounds = tuple(int(b) for b in torch.tensor(sizes).cumsum(0)[:-1])
    x = torch.randn(1, k, generator=g).to(DEV)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEV)
    a = torch.randn(slots * r, members, k, generator=g).to(DEV)  # (cols, M, in)
    bt = torch.randn(slots * r, n, generator=g).to(DEV)
    for slot in (0, 2, 3):
        col0 = torch.tensor([slot * r], device=DEV)
        parts = gemv.shrink_triton(x, a.reshape(-1, k), rows=(col0, members, r * members))
        want_parts = gemv.shrink_triton(x, a[slot * r : (slot + 1) * r].reshape(-1, k))
        torch.testing.assert_close(parts, want_parts)
        h = parts.view(-1, r, members).transpose(1, 2)
        got = gemv.gemv_lora_triton(x, w, h, bt, None, bounds, bt_start=col0)
        want = gemv.gemv_lora_triton(x, w, h, bt[slot * r : (slot + 1) * r], None, bounds)
        torch.testing.assert_close(got, want)
        ref = gemv.gemv_lora_ref(x, w, h, bt, None, bounds, bt_start=col0)
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-4)
