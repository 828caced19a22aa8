"""The LLaMA decoder: RMSNorm pre-norm, RoPE, grouped-query attention, SwiGLU.

Shapes are noted as B batch, T new tokens, S attended tokens (cache + new),
H query heads, K key/value heads, D head dim, C model width.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..kernels import Kernels, use_kernel
from ..kernels.attention import (
    varlen_attention,
    varlen_attention_flat,
    varlen_available,
    varlen_causal_aligns_end,
)
from ..kernels.rmsnorm import add_rms_norm, rms_norm
from ..kernels.rope import rope
from ..kernels.swiglu import swiglu
from .config import LlamaConfig, RopeScaling
from .offload import offload_saved_tensors

# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5 on.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 like the reference."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernels = Kernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.kernels.rmsnorm)


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


def _half_precision(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a forward in weights of `dtype` computes in 16 bits (flash varlen needs it)."""
    return dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(device.type)


@dataclass(frozen=True)
class Segments:
    """Packed rows as variable-length sequences: cu_seqlens (N+1,) int32 over all B*T tokens.

    Passed instead of a dense mask, so attention runs per document (flash varlen) and
    packed examples never attend to each other without a (B, 1, T, T) mask.
    """

    cu_seqlens: torch.Tensor
    max_len: int

    @staticmethod
    def starts(doc_ids: torch.Tensor) -> torch.Tensor:
        """Flat offsets where a run of equal doc ids begins in each row of (B, T) doc_ids."""
        new = torch.ones_like(doc_ids, dtype=torch.bool)  # (B, T): a segment starts here
        new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        return new.flatten().nonzero().flatten()

    @classmethod
    def from_doc_ids(cls, doc_ids: torch.Tensor) -> Segments:
        """Segments of equal consecutive doc ids within each row of (B, T) doc_ids."""
        b, t = doc_ids.shape
        starts = cls.starts(doc_ids)
        end = torch.tensor([b * t], device=doc_ids.device)
        cu = torch.cat([starts, end]).to(torch.int32)
        return cls(cu, int((cu[1:] - cu[:-1]).max()))


def project(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
    """Each layer over the same x; LoRA layers that can run as one fused node do
    (`LoRALinear.group_forward`: x read once for all their adapters, one input gradient)."""
    group = getattr(layers[0], "group_forward", None)
    out = group(x, layers) if group is not None else None
    return out if out is not None else tuple(layer(x) for layer in layers)


# which part of a shared-prompt pair row a position holds (`train.batches.collate_shared_pairs`)
PROMPT_PART, CHOSEN_PART, REJECTED_PART, PAD_PART = 0, 1, 2, -1


@dataclass(frozen=True)
class PairSegments:
    """Shared-prompt pair rows (prompt P, chosen C, rejected R; `train.batches.
    collate_shared_pairs`) as flash varlen segments, instead of `shared_prompt_mask`.

    Each row's tokens are laid out as two causal segments, P + C and P + R (the prompt's
    queries, keys and values copied into the second), so attention costs what two rows of
    their own cost and still runs flash kernels; the outputs of the copied prompt are
    dropped, and every position takes its output from its own segment. Slices and
    concatenations only: the backward sums the two prompt copies' gradients without
    atomics, so the layout adds no nondeterminism of its own.

    Where flash lines a shorter query segment up with the end of its keys
    (`varlen_causal_aligns_end`, checked once on the GPU), only the keys and values are laid
    out so: the queries are each row's own tokens (P + C, then R, against the keys of P + C
    and of P + R), so the prompt copy costs no attention and no output, and rows without
    padding need no query copy at all.
    """

    bounds: tuple[tuple[int, int, int], ...]  # per row: (P, P + C, P + C + R)
    width: int  # T, the padded row length
    cu_seqlens: torch.Tensor  # (2B+1,) int32 segment starts over the laid-out tokens
    max_len: int
    cu_seqlens_q: torch.Tensor  # (2B+1,) int32 segment starts over the rows' own tokens
    max_len_q: int

    @classmethod
    def from_parts(cls, parts: torch.Tensor) -> PairSegments:
        """From (B, T) part ids (prompt, chosen, rejected, then padding)."""
        host = parts.cpu()
        n_p = (host == PROMPT_PART).sum(1).tolist()
        n_c = (host == CHOSEN_PART).sum(1).tolist()
        n_all = (host != PAD_PART).sum(1).tolist()
        bounds = tuple((p, p + c, end) for p, c, end in zip(n_p, n_c, n_all, strict=True))
        cu, lens, cu_q, lens_q = [0], [], [0], []
        for p, pc, end in bounds:
            lens += [pc, p + end - pc]
            cu += [cu[-1] + pc, cu[-1] + p + end]
            lens_q += [pc, end - pc]
            cu_q += [cu_q[-1] + pc, cu_q[-1] + end]
        cu_t, cu_q_t = (torch.tensor(c, dtype=torch.int32, device=parts.device) for c in (cu, cu_q))
        return cls(bounds, host.shape[1], cu_t, max(lens), cu_q_t, max(lens_q))

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention=None,
        queries_once: bool | None = None,
    ) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, K, T, D) -> (B*T, H, D). `attention` stands in for flash
        varlen attention over flat tokens (tests on the CPU); `queries_once` lays the queries
        out without the prompt copy (None: where flash's causal mask allows it)."""
        fn = attention or varlen_attention_flat
        if queries_once is None:
            queries_once = attention is None and varlen_causal_aligns_end()
        k, v = (_PairLayout.apply(x.transpose(1, 2), self.bounds) for x in (k, v))
        if not queries_once:
            q = _PairLayout.apply(q.transpose(1, 2), self.bounds)
            out = fn(q, k, v, self.cu_seqlens, self.max_len)  # (G, H, D)
            return _PairGather.apply(out, self.bounds, self.width)
        ends = tuple(end for _, _, end in self.bounds)
        rows = q.transpose(1, 2)  # (B, T, H, D)
        padded = min(ends) < self.width  # without padding the rows are the queries as they are
        q = _Unpad.apply(rows, ends) if padded else rows.reshape(-1, *rows.shape[2:])
        out = fn(q, k, v, self.cu_seqlens_q, self.max_len_q, self.cu_seqlens, self.max_len)
        return _Repad.apply(out, ends, self.width) if padded else out


def _zeros_for(x: torch.Tensor, n: int) -> torch.Tensor:
    """One zero block of n rows shaped like x's rows: sliced for every row's gap."""
    return x.new_zeros(n, *x.shape[1:])


class _PairLayout(torch.autograd.Function):
    """Rows (B, T, ., D) -> `PairSegments`' laid-out tokens (G, ., D): per row P + C, then
    P again + R. Its backward writes each row's gradient in one concatenation, the prompt's
    two copies added in one pass over P; autograd over the slices would zero-fill a whole
    (B, T, ., D) tensor per piece and add them all up."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, bounds: tuple[tuple[int, int, int], ...]):  # noqa: D102
        ctx.bounds, ctx.shape = bounds, rows.shape
        pieces = []
        for r, (p, pc, end) in enumerate(bounds):
            pieces += [rows[r, :pc], rows[r, :p], rows[r, pc:end]]
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # noqa: D102
        width = ctx.shape[1]
        zeros = _zeros_for(g, width - min(end for _, _, end in ctx.bounds))
        pieces, at = [], 0
        for p, pc, end in ctx.bounds:
            first, copy = g[at : at + pc], g[at + pc : at + pc + p]
            pieces += [first[:p] + copy, first[p:], g[at + pc + p : at + p + end]]
            pieces.append(zeros[: width - end])  # padding: no gradient
            at += p + end
        return torch.cat(pieces).view(ctx.shape), None


def _unpad(rows: torch.Tensor, ends: tuple[int, ...]) -> torch.Tensor:
    """Rows (B, T, ...) -> their first ends[r] tokens each, one after another (N, ...)."""
    return torch.cat([rows[r, :end] for r, end in enumerate(ends)])


def _repad(flat: torch.Tensor, ends: tuple[int, ...], width: int) -> torch.Tensor:
    """`_unpad`'s inverse: (N, ...) -> (B*width, ...), zeros after each row's end."""
    zeros = _zeros_for(flat, width - min(ends))
    pieces, at = [], 0
    for end in ends:
        pieces += [flat[at : at + end], zeros[: width - end]]
        at += end
    return torch.cat(pieces)


class _Unpad(torch.autograd.Function):
    """`_unpad` whose backward is one `_repad` (not a zero-filled tensor per row)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, ends: tuple[int, ...]) -> torch.Tensor:  # noqa: D102
        ctx.ends, ctx.shape = ends, rows.shape
        return _unpad(rows, ends)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # noqa: D102
        return _repad(g, ctx.ends, ctx.shape[1]).view(ctx.shape), None


class _Repad(torch.autograd.Function):
    """`_repad` whose backward is one `_unpad`."""

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, ends: tuple[int, ...], width: int):  # noqa: D102
        ctx.ends, ctx.width = ends, width
        return _repad(flat, ends, width)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # noqa: D102
        rows = g.reshape(len(ctx.ends), ctx.width, *g.shape[1:])
        return _unpad(rows, ctx.ends), None, None


class _PairGather(torch.autograd.Function):
    """Laid-out outputs (G, H, D) -> rows (B*T, H, D): prompt and chosen from the first
    segment, rejected from the second (its prompt copy dropped), zeros for padding. The
    backward is one concatenation too (zeros where the dropped copy was)."""

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any, out: torch.Tensor, bounds: tuple[tuple[int, int, int], ...], width: int
    ) -> torch.Tensor:
        ctx.bounds, ctx.width = bounds, width
        zeros = _zeros_for(out, width - min(end for _, _, end in bounds))
        pieces, at = [], 0
        for p, pc, end in bounds:
            pieces += [out[at : at + pc], out[at + pc + p : at + p + end], zeros[: width - end]]
            at += p + end
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # noqa: D102
        width = ctx.width
        zeros = _zeros_for(g, max(p for p, _, _ in ctx.bounds))
        pieces = []
        for r, (p, pc, end) in enumerate(ctx.bounds):
            row = g[r * width : (r + 1) * width]
            pieces += [row[:pc], zeros[:p], row[pc:end]]
        return torch.cat(pieces), None, None


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
        self.kernels = Kernels()
        # x -> (q, k, v) in one matmul over stacked weights, installed by the serving engine
        # (serve/fused_proj.py); it runs the three layers on their own outside its forwards
        self.fused_qkv: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | Segments | PairSegments | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        if self.fused_qkv is not None:
            q, k, v = self.fused_qkv(x)
        else:
            q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if getattr(cache, "rope_in_attend", False):  # the serving engine's decode kernel
            return self.o_proj(cache.attend(self.layer, q, k, v, rope=(cos, sin)))
        q, k = rope(q, k, cos, sin, self.kernels.rope)
        with _attention_scope():  # checkpointed blocks may keep the kernel's outputs
            out = self._attend(q, k, v, mask, cache)
        return self.o_proj(out.reshape(b, t, self.n_heads * self.head_dim))

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | Segments | PairSegments | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """Attention of (B, H, T, D) queries over the keys: (B, T, H, D) or (B*T, H, D)."""
        t = q.shape[2]
        if isinstance(mask, Segments):  # packed rows, no cache: (B*T, H, D) per document
            return varlen_attention(q, k, v, mask.cu_seqlens, mask.max_len)  # (B*T, H, D)
        if isinstance(mask, PairSegments):  # shared-prompt pairs: two segments a row
            return mask.attend(q, k, v)
        if cache is not None and hasattr(cache, "attend"):  # a cache with per-row lengths
            return cache.attend(self.layer, q, k, v)  # stores k/v, (B, T, H*D)
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
        return out.transpose(1, 2)  # (B, T, H, D)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)).

    Its (T, ffn_dim) intermediates are the largest activations of a block (3.5x the width of
    its input, and three of them live for the backward). Past `chunk_tokens` tokens the
    feed-forward, which treats every token on its own, runs over slices of the sequence;
    when gradients are being recorded each slice is checkpointed, so one slice's
    intermediates are alive at a time. That costs one more forward of the MLP and bounds
    its memory at long context (see `Llama.set_mlp_chunk`).
    """

    chunk_tokens: int | None = None

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.kernels = Kernels()
        self.fused_gate_up: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """mlp(x), or residual + mlp(x) (added in the last kernel where the engine can)."""
        b, t = x.shape[0], x.shape[1]
        if residual is not None:
            if t == 1 and self.fused_gate_up is not None:
                y = self._glu_down(x, residual)
                if y is not None:
                    return y
            return residual + self(x)
        if not self.chunk_tokens or b * t <= self.chunk_tokens or t == 1:
            return self._swiglu_mlp(x)
        run = self._swiglu_mlp
        if torch.is_grad_enabled():
            run = functools.partial(torch.utils.checkpoint.checkpoint, run, use_reentrant=False)
        step = max(1, self.chunk_tokens // b)
        return torch.cat([run(c) for c in x.split(step, dim=1)], dim=1)

    def _swiglu_mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up is not None:  # as Attention.fused_qkv
            y = self._glu_down(x)
            if y is not None:
                return y
            gate, up = self.fused_gate_up(x)
        else:
            gate, up = project(x, (self.gate_proj, self.up_proj))
        return self.down_proj(swiglu(gate, up, self.kernels.swiglu))

    def _glu_down(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The serving engine's one-row MLP (serve/fused_proj.py: the SwiGLU in the down
        projection's kernels, the residual in its epilogue), or None where it does not run."""
        glu_down = getattr(self.fused_gate_up, "glu_down", None)
        return None if glu_down is None else glu_down(x, self.down_proj, residual)


class Block(nn.Module):
    """One pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        # the serving engine's whole-block step for one decode row (serve/fused_proj.py);
        # it returns None where it does not apply, and the block runs as below
        self.one_row_step: Callable[..., torch.Tensor | None] | None = None

    def forward(self, x, cos, sin, mask, cache):  # noqa: D102 - shapes as in Attention
        if self.one_row_step is not None:
            y = self.one_row_step(x, cos, sin, mask, cache)
            if y is not None:
                return y
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        norm = self.post_attention_layernorm  # its norm fused with the residual add before it
        h, normed = add_rms_norm(x, attn, norm.weight, norm.eps, norm.kernels.residual_rmsnorm)
        return self.mlp(normed, residual=h)


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
        self.offload_activations = False  # with checkpointing: keep layer inputs in CPU memory
        # with offload: only the first N checkpointed blocks' inputs go there (None: all)
        self.offload_layers: int | None = None
        # with checkpointing: only the first N blocks recompute (None: all); the rest keep
        # their activations, trading memory for the recompute's third of the matmuls
        self.checkpoint_layers: int | None = None
        # with checkpointing: checkpointed blocks keep the fused attention kernel's outputs
        # (through the checkpoint's context hooks), so the recompute skips the attention forward
        self.checkpoint_keeps_attention = False
        self.kernels = Kernels()

    def set_kernels(self, kernels: Kernels) -> None:
        """Choose the fused kernels for this model and every module in it (build time)."""
        for m in self.modules():
            if hasattr(m, "kernels"):
                m.kernels = kernels

    def set_mlp_chunk(self, tokens: int | None) -> None:
        """Run every feed-forward over slices of at most `tokens` tokens when a batch holds
        more (None: never). Long-context training sets this; short batches are unaffected."""
        if tokens is not None and tokens < 1:
            raise ValueError(f"mlp chunk must be a positive number of tokens, got {tokens}")
        for m in self.modules():
            if isinstance(m, MLP):
                m.chunk_tokens = tokens

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
        """The device the model computes on (its final norm's: the input embedding table
        may be kept in host memory, `keep_embeddings_on_host`)."""
        return self.norm.weight.device

    @property
    def embeddings_on_host(self) -> bool:
        """Whether the input embedding table lives in host memory while the model computes
        on an accelerator (lookups gather there and copy the rows over)."""
        return self.embed_tokens.weight.device.type == "cpu" and self.device.type != "cpu"

    def keep_embeddings_on_host(self) -> None:
        """Move a frozen, untied input embedding table to (pinned) host memory.

        Llama-3.1-8B's table is 1.05 GB of bf16 that a LoRA/QLoRA step only reads 4,096 rows
        of (32 MB at 2 x 2048): gathering them on the host and copying them over frees that
        memory for about the cost of the copy. The rows, and so the math, are the same."""
        w = self.embed_tokens.weight
        if self.cfg.tie_embeddings:
            raise ValueError("the input embeddings are tied to the output head: they stay")
        if w.requires_grad:
            raise ValueError("the input embeddings are trained: they stay on the device")
        if w.device.type == "cpu":
            return
        host = w.detach().to("cpu")
        if torch.cuda.is_available():
            host = host.pin_memory()
        self.embed_tokens.weight = nn.Parameter(host, requires_grad=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, T, C) on the compute device, gathered on the host when the
        table lives there (`keep_embeddings_on_host`)."""
        w = self.embed_tokens.weight
        if w.device == input_ids.device:
            return self.embed_tokens(input_ids)
        rows = torch.nn.functional.embedding(input_ids.to(w.device), w)
        return rows.to(self.device, non_blocking=rows.is_pinned())

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the embedding weights."""
        return self.embed_tokens.weight.dtype

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | Segments | PairSegments | None = None,
        cache: KVCache | None = None,
        doc_ids: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, C).

        positions: (B, T) absolute positions (default: cache.length + arange(T)).
        mask: bool (B, 1, T, S), True where a query may attend a key; None means causal;
        or `Segments` of packed rows built by the caller (no cache), or `PairSegments` of
        shared-prompt pair rows.
        doc_ids: (B, T) packed-example ids (instead of a mask): attention stays inside each
        run of equal ids, through flash varlen attention on CUDA or a dense mask elsewhere.
        embeds: (B, T, C) input embeddings already looked up (a captured step gathers them
        on the host when the table lives there); input_ids then only give the shape.
        """
        b, t = input_ids.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        if doc_ids is not None:
            mask = self._packed_mask(doc_ids, cache)
        if mask is None and cache is not None and start > 0 and t > 1:  # one query sees all
            mask = causal_mask(t, start + t, start, input_ids.device)
        x = self.embed(input_ids) if embeds is None else embeds  # (B, T, C)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        ckpt = self.checkpoint_layers if self.checkpoint_layers is not None else len(self.layers)
        # nothing to recompute where no graph is recorded (e.g. DPO's reference pass)
        ckpt = ckpt if torch.is_grad_enabled() else 0
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and i < ckpt:
                x = self._checkpointed(layer, self.offloads(i), x, cos, sin, mask, cache)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += t
        return self.norm(x)

    def varlen_usable(self, doc_ids: torch.Tensor) -> bool:
        """Whether packed rows on doc_ids' device run flash varlen attention (no cache)."""
        return (
            use_kernel(self.kernels.varlen_attention, doc_ids)
            and varlen_available()
            and _half_precision(self.embed_tokens.weight.dtype, doc_ids.device)
        )

    def _packed_mask(self, doc_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor | Segments:
        """Varlen segments where flash varlen attention runs, else the dense document mask."""
        if cache is None and self.varlen_usable(doc_ids):
            return Segments.from_doc_ids(doc_ids)
        return document_causal_mask(doc_ids)

    def offloads(self, i: int) -> bool:
        """Whether checkpointed block i keeps its saved input in CPU memory: with offload on,
        the first `offload_layers` blocks (every block when None). The earliest go first:
        their inputs wait longest for the backward, so their copies back overlap best."""
        n = self.offload_layers
        return self.offload_activations and (n is None or i < n)

    def _checkpointed(
        self, layer: nn.Module, offload: bool, x: torch.Tensor, *args: object
    ) -> torch.Tensor:
        """Run a block under activation checkpointing, its saved input in CPU memory if asked."""
        offload = offload and x.device.type != "cpu"
        # inside a CUDA-graph capture the generator's state cannot be read; a captured step
        # has no random ops to replay (`PackedGraphStep` refuses dropout with checkpointing)
        rng = not (x.is_cuda and torch.cuda.is_current_stream_capturing())
        keep: dict[str, Any] = {}
        if self.checkpoint_keeps_attention:
            keep["context_fn"] = _keep_attention_contexts
        with offload_saved_tensors() if offload else contextlib.nullcontext():
            return torch.utils.checkpoint.checkpoint(
                layer, x, *args, use_reentrant=False, preserve_rng_state=rng, **keep
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) in the weights' dtype."""
        hidden = self.hidden_states(
            input_ids, positions=positions, mask=mask, cache=cache, doc_ids=doc_ids
        )
        return self.lm_head(hidden)


@functools.cache
def _attention_ops() -> frozenset[Any]:
    """The fused attention kernels' forward ops (SDPA's and flash varlen's) whose outputs a
    checkpointed block keeps with `checkpoint_keeps_attention`."""
    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    try:  # importing the module registers torch_attn::_varlen_attn
        importlib.import_module("torch.nn.attention.varlen")
        ops.add(torch.ops.torch_attn._varlen_attn.default)
    except (ImportError, AttributeError):
        pass
    return frozenset(ops)


# (kept outputs, replay) of the checkpointed block running now, for `_attention_scope`
_KEEP_PHASE: contextvars.ContextVar[tuple[list[Any], bool] | None] = contextvars.ContextVar(
    "llamaforge_keep_attention", default=None
)


class _KeepAttention(TorchDispatchMode):
    """Under one block's attention call: in the block's forward, keep each attention
    kernel's outputs (detached: the same storage, no autograd history); in its recompute,
    hand them back instead of running the kernel. It runs below autograd, so the recompute
    still records the kernel's node, with the kept outputs as what it saves."""

    def __init__(self, kept: list[Any], replay: bool) -> None:
        super().__init__()
        self.kept, self.replay = kept, replay

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func not in _attention_ops():
            return func(*args, **kwargs)
        if self.replay and self.kept:
            return self.kept.pop(0)
        out = func(*args, **kwargs)
        if not self.replay:
            self.kept.append(
                tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in out)
                if isinstance(out, tuple)
                else out.detach()
            )
        return out


@contextlib.contextmanager
def _keep_phase(kept: list[Any], replay: bool):
    token = _KEEP_PHASE.set((kept, replay))
    try:
        yield
    finally:
        _KEEP_PHASE.reset(token)


def _keep_attention_contexts() -> tuple[Any, Any]:
    """A checkpoint's (forward, recompute) contexts for `checkpoint_keeps_attention`: one
    list per checkpointed call, filled in its forward and emptied by its recompute (dropped
    with the call when no backward comes). Only the attention call runs under a dispatch
    mode (`_attention_scope`), not the block's other ops."""
    kept: list[Any] = []
    return _keep_phase(kept, False), _keep_phase(kept, True)


def _attention_scope() -> contextlib.AbstractContextManager:
    phase = _KEEP_PHASE.get()
    return contextlib.nullcontext() if phase is None else _KeepAttention(*phase)


def compute_device(model: nn.Module) -> torch.device:
    """Where `model` computes: the device of its first parameter off the host, else the CPU
    (a Llama's input embedding table may stay in host memory, `keep_embeddings_on_host`)."""
    for p in model.parameters():
        if p.device.type != "cpu":
            return p.device
    return torch.device("cpu")


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


def shared_prompt_mask(parts: torch.Tensor) -> torch.Tensor:
    """bool (B, 1, T, T) for rows of prompt + chosen + rejected (`parts` (B, T) of part ids):
    causal, except that rejected positions never see chosen ones (each answer sees the
    prompt and itself, as in a row of its own)."""
    t = parts.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=parts.device).tril()
    hidden = (parts == REJECTED_PART).unsqueeze(2) & (parts == CHOSEN_PART).unsqueeze(1)
    return (causal & ~hidden).unsqueeze(1)
