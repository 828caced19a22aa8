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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int
) -> torch.Tensor:
    """Causal attention within segments of flat tokens: q (N, H, D), k/v (N, K, D) -> (N, H, D)."""
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
    return fn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **causal, **gqa)
