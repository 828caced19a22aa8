"""Attention over packed rows as variable-length sequences (flash varlen, CUDA only).

Packing several examples into one row needs attention that stays inside each example.
A dense (B, 1, T, T) mask does that but forces SDPA off its flash kernel and costs
O(T^2) memory; PyTorch's `varlen_attn` runs flash attention per segment of a flat token
list instead. Its keyword for causality changed between releases (`is_causal` in 2.10,
`window_size` later), so the call adapts to the signature it finds.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


@functools.cache
def _varlen() -> tuple[Any, dict[str, Any], bool] | None:
    """(varlen_attn, causal kwargs, takes enable_gqa) or None where torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal: dict[str, Any] = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params


def varlen_available() -> bool:
    """Whether this torch has flash varlen attention."""
    return torch.cuda.is_available() and _varlen() is not None


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int
) -> torch.Tensor:
    """Causal attention within segments: q (B, H, T, D), k/v (B, K, T, D) -> (B*T, H, D).

    cu_seqlens (N+1,) int32 are segment starts over the B*T flattened tokens.
    """
    b, _, t, d = q.shape
    flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (q, k, v)]  # (B*T, ., D)
    return varlen_attention_flat(*flat, cu_seqlens, max_len)


def varlen_attention_flat(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    cu_seqlens_k: torch.Tensor | None = None,
    max_len_k: int | None = None,
) -> torch.Tensor:
    """Causal attention within segments of flat tokens: q (N, H, D), k/v (M, K, D) -> (N, H, D).

    `cu_seqlens_k` / `max_len_k` give key segments apart from the query ones (default: the
    same). A query segment shorter than its key segment is its last queries: flash lines the
    causal mask up with the segment's end (see `varlen_causal_aligns_end`).
    """
    found = _varlen()
    if found is None:
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn is not available")
    fn, causal, takes_gqa = found
    # flash kernels take only 16-bit inputs. Under autocast (fp32 master weights) q and k
    # come out of RoPE in fp32 (its cos/sin tables are in the weights' dtype) while v is
    # bf16: autocast does not reach this custom op, so cast to its dtype here, as SDPA would.
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        q, k, v = (x.to(low) for x in (q, k, v))
    h, n_kv = q.shape[1], k.shape[1]
    gqa: dict[str, Any] = {}
    if n_kv != h:
        if takes_gqa:
            gqa = {"enable_gqa": True}
        else:
            k = k.repeat_interleave(h // n_kv, dim=1)
            v = v.repeat_interleave(h // n_kv, dim=1)
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    max_k = max_len if max_len_k is None else max_len_k
    return fn(q, k, v, cu_seqlens, cu_k, max_len, max_k, **causal, **gqa)


@functools.cache
def varlen_causal_aligns_end() -> bool:
    """Whether flash varlen's causal mask, for a query segment shorter than its key segment,
    lets the last query see every key (flash attention 2's bottom-right alignment), checked
    once on the GPU against SDPA with that mask written out. False off CUDA, or if the call
    fails or disagrees; callers then keep query and key segments the same length."""
    if not varlen_available():
        return False
    # first asked inside a model's forward: keep autocast and autograd out of the check
    with torch.no_grad(), torch.autocast("cuda", enabled=False):
        return _check_end_alignment()


def _check_end_alignment(device: str = "cuda", attention: Any = None) -> bool:
    """`varlen_causal_aligns_end`'s check; `attention` stands in for flash (CPU tests)."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(n, 1, 64, device=device, dtype=torch.bfloat16, generator=gen) for n in (2, 5, 5)
    )
    cu_q, cu_k = (torch.tensor([0, n], dtype=torch.int32, device=device) for n in (2, 5))
    try:
        got = (attention or varlen_attention_flat)(q, k, v, cu_q, 2, cu_k, 5)
    except RuntimeError:
        return False
    end_aligned = torch.ones(2, 5, dtype=torch.bool, device=device).tril(3)  # query i: keys <= i+3
    want = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(0, 1).float() for x in (q, k, v)), attn_mask=end_aligned
    ).transpose(0, 1)
    return torch.allclose(got.float(), want, atol=2e-2, rtol=2e-2)
