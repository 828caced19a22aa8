"""Split-key decode attention against its reference (Triton's interpreter on CPU)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llamaforge.kernels import decode_attention as da  # noqa: E402
from llamaforge.kernels import interpreting, triton_available  # noqa: E402

if interpreting():
    importlib.reload(da)

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("h", "n_kv", "d", "w"), [(4, 2, 16, 40), (9, 3, 64, 300), (32, 8, 128, 512)]
)
def test_decode_attention_equals_the_reference(dtype, h, n_kv, d, w):
    """Rows of different lengths (1 key, a split boundary, the whole width) in strided pool
    views; GQA groups of 2, 3 and 4 heads; one and several key splits."""
    g = torch.Generator().manual_seed(h + d + w)
    b, slots, max_len = 3, 5, w + 17
    pool_k = torch.randn(slots, n_kv, max_len, d, generator=g).to(DEV, dtype)
    pool_v = torch.randn(slots, n_kv, max_len, d, generator=g).to(DEV, dtype)
    keys, values = pool_k[:b, :, :w], pool_v[:b, :, :w]  # as StaticDecode reads the pool
    q = torch.randn(b, h, d, generator=g).to(DEV, dtype)
    last = torch.tensor([0, min(w, 257) - 1, w - 1], device=DEV)  # 1 key, a split edge, all
    got = da.decode_attention_triton(q, keys, values, last)
    want = da.decode_attention_ref(q, keys, values, last)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # the keys past a row's length matter nowhere
    keys2 = keys.clone()
    keys2[0, :, 1:] = 1e4
    torch.testing.assert_close(da.decode_attention_triton(q, keys2, values, last)[0], got[0])


def test_decode_attention_rejects_shapes_it_does_not_compute():
    q = torch.zeros(1, 4, 24, device=DEV)  # D not a power of 2
    k = torch.zeros(1, 2, 8, 24, device=DEV)
    with pytest.raises(ValueError, match="decode_attention"):
        da.decode_attention_triton(q, k, k, torch.zeros(1, dtype=torch.long, device=DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_kv_write_equals_writing_first(dtype):
    """Rows 0 and 2 live (their new key lands in their own slot and is attended), row 1 a
    padding row writing to the scratch slot: the same output and the same pool as an
    index_put followed by the attention."""
    g = torch.Generator().manual_seed(3)
    b, n_kv, h, d, w, slots, max_len = 3, 2, 6, 32, 300, 5, 320
    pool_k = torch.randn(slots, n_kv, max_len, d, generator=g).to(DEV, dtype)
    pool_v = torch.randn(slots, n_kv, max_len, d, generator=g).to(DEV, dtype)
    q = torch.randn(b, h, d, generator=g).to(DEV, dtype)
    new_k = torch.randn(b, n_kv, d, generator=g).to(DEV, dtype)
    new_v = torch.randn(b, n_kv, d, generator=g).to(DEV, dtype)
    slot = torch.tensor([0, slots - 1, 2], device=DEV)
    pos = torch.tensor([299, 0, 130], device=DEV)
    want_k, want_v = pool_k.clone(), pool_v.clone()
    want_k[slot, :, pos], want_v[slot, :, pos] = new_k, new_v
    want = da.decode_attention_triton(q, want_k[:b, :, :w], want_v[:b, :, :w], pos)
    got = da.decode_attention_triton(q, pool_k[:b, :, :w], pool_v[:b, :, :w], pos,
                                     (new_k, new_v, slot))  # fmt: skip
    torch.testing.assert_close(pool_k, want_k, rtol=0, atol=0)
    torch.testing.assert_close(pool_v, want_v, rtol=0, atol=0)
    torch.testing.assert_close(got[[0, 2]].float(), want[[0, 2]].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_the_kernel_equals_rotating_first(dtype):
    """q and the new key handed over unrotated with each row's cos/sin tables: the same
    output and the same stored key as kernels/rope.py's rotation followed by the kernel."""
    from llamaforge.kernels.rope import rope_ref
    from llamaforge.model.llama import rope_cos_sin, rope_inv_freq

    g = torch.Generator().manual_seed(5)
    b, n_kv, h, d, w, slots, max_len = 3, 2, 6, 32, 300, 4, 320
    pool_k = torch.randn(slots, n_kv, max_len, d, generator=g).to(DEV, dtype)
    pool_v = torch.randn(slots, n_kv, max_len, d, generator=g).to(DEV, dtype)
    q = torch.randn(b, h, 1, d, generator=g).to(DEV, dtype)
    new_k = torch.randn(b, n_kv, 1, d, generator=g).to(DEV, dtype)
    new_v = torch.randn(b, n_kv, d, generator=g).to(DEV, dtype)
    pos = torch.tensor([299, 7, 130], device=DEV)
    slot = torch.arange(b, device=DEV)
    cos, sin = rope_cos_sin(pos[:, None], rope_inv_freq(d, 10000.0, None).to(DEV), dtype)
    q_rot, k_rot = rope_ref(q.float(), new_k.float(), cos.float(), sin.float())
    q_rot, k_rot = q_rot.to(dtype), k_rot.to(dtype)  # rotated in fp32, rounded once
    want_k, want_v = pool_k.clone(), pool_v.clone()
    want = da.decode_attention_triton(q_rot[:, :, 0], want_k[:b, :, :w], want_v[:b, :, :w], pos,
                                      (k_rot[:, :, 0], new_v, slot))  # fmt: skip
    got = da.decode_attention_triton(q[:, :, 0], pool_k[:b, :, :w], pool_v[:b, :, :w], pos,
                                     (new_k[:, :, 0], new_v, slot), (cos, sin))  # fmt: skip
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(pool_k, want_k, atol=tol, rtol=tol)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="rope"):
        da.decode_attention_triton(q[:, :, 0], pool_k[:b, :, :w], pool_v[:b, :, :w], pos,
                                   None, (cos, sin))  # fmt: skip
