"""The LLaMA decoder: RMSNorm pre-norm, RoPE, grouped-query attention, SwiGLU.

Shapes are noted as B batch, T new tokens, S attended tokens (cache + new),
H query heads, K key/value heads, D head dim, C model width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import LlamaConfig, RopeScaling

# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5 on.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 like the reference."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies (D/2,), with Llama 3.1's piecewise "llama3" scaling if given."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv.float()
    if scaling.rope_type != "llama3":
        raise ValueError(f"unsupported rope_scaling type {scaling.rope_type!r} (only 'llama3')")
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor  # longer waves than this: fully scaled
    high_wavelen = old_ctx / scaling.high_freq_factor  # shorter waves than this: unchanged
    wavelen = 2 * math.pi / inv
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    mid = (1 - smooth) * inv / scaling.factor + smooth * inv
    out = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    out = torch.where((wavelen <= low_wavelen) & (wavelen >= high_wavelen), mid, out)
    return out.float()


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, 1, T, D) for integer positions (B, T), rotate-half layout."""
    freqs = positions.float()[..., None] * inv_freq.float()  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, D) by the tables; halves pair dimension i with i + D/2."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys/values for every layer; `length` tokens are filled."""

    def __init__(
        self,
        cfg: LlamaConfig,
        batch: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)  # (B, K, S_max, D)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new (B, K, T, D) keys/values after the filled part; return (B, K, S, D) views."""
        t = k.shape[2]
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads (GQA) through PyTorch SDPA."""

    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B,H,T,D)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B,K,T,D)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, K, S, D)
        gqa = {}
        if self.n_kv != self.n_heads:
            # SDPA reads grouped heads in place where it can (no mask, or CPU); with a mask on
            # GPU that would force its slow math kernel, so expand groups to H heads there.
            if _SDPA_GQA and (mask is None or q.device.type == "cpu"):
                gqa = {"enable_gqa": True}
            else:
                rep = self.n_heads // self.n_kv
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, **gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):  # noqa: D102 - shapes as in Attention
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Decoder-only LLaMA model returning next-token logits.

    Module names follow Hugging Face's (`model.layers.N.self_attn.q_proj`, ...) minus the
    `model.` prefix, so the checkpoint key map stays a short table.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.reset_rope()
        self.gradient_checkpointing = False

    def reset_rope(self) -> None:
        """(Re)compute the RoPE inverse frequencies, e.g. after building on the meta device."""
        inv = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        self.inv_freq = inv.to(self.inv_freq.device)

    def tie_weights(self) -> None:
        """Share the output projection with the input embedding when the config says so."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        """Device of the embedding weights."""
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the embedding weights."""
        return self.embed_tokens.weight.dtype

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, C).

        positions: (B, T) absolute positions (default: cache.length + arange(T)).
        mask: bool (B, 1, T, S), True where a query may attend a key; None means causal.
        """
        b, t = input_ids.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        if mask is None and cache is not None and start > 0 and t > 1:  # one query sees all
            mask = causal_mask(t, start + t, start, input_ids.device)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, cos, sin, mask, cache, use_reentrant=False
                )
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += t
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) in the weights' dtype."""
        return self.lm_head(
            self.hidden_states(input_ids, positions=positions, mask=mask, cache=cache)
        )


def causal_mask(t: int, s: int, offset: int, device: torch.device | str) -> torch.Tensor:
    """Bool (1, 1, T, S) mask: query i (absolute offset + i) sees keys 0..offset + i."""
    q = torch.arange(offset, offset + t, device=device)[:, None]
    k = torch.arange(s, device=device)[None, :]
    return (k <= q)[None, None]


def padded_causal_mask(attention_mask: torch.Tensor, t: int, offset: int) -> torch.Tensor:
    """Causal mask (B, 1, T, S) that also hides pad keys; attention_mask is (B, S), 1 = real."""
    s = attention_mask.shape[1]
    causal = causal_mask(t, s, offset, attention_mask.device)
    mask = causal & attention_mask.bool()[:, None, None, :]
    # A row of only padding attends nothing and SDPA would return NaN: let it see itself.
    eye = torch.zeros_like(mask)
    idx = torch.arange(t, device=mask.device)
    eye[:, :, idx, offset + idx] = True
    return mask | (eye & ~mask.any(-1, keepdim=True))


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Mask (B, 1, T, T) for packed rows: causal and only within the same document.

    doc_ids (B, T) numbers each packed example; padding gets its own id (e.g. -1), so a
    pad token only sees earlier pads and never a real token sees a pad.
    """
    t = doc_ids.shape[1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal)[:, None]
