"""Projections that read the same input as one matmul: q/k/v of an attention, gate/up of an MLP.

At batch-1 decode every projection is a GEMV that reads its weight once; the small ones
(k and v are 1024 x 4096 in Llama-3.1-8B) are too short to reach the GPU's copy bandwidth and
each costs a launch. `fuse_projections` stacks each group's base weights into one
(sum of outputs, in) buffer and points the layers' weights at their rows of it (views: no
second copy, and the layers themselves compute as before). During an engine forward the
group runs as one matmul over the stacked weight, with each member's LoRA delta from the
gathered adapter weights (`lora_stack.SharedShrink`, whose A and B^T blocks are stacked the
same way), and splits the result; at one row it is one fused GEMV with the adapters in its
epilogue (`kernels/gemv.py`). Outside an engine forward, or when the group's layers are not
in one of the two shapes it computes (all without adapters; all stacked in one shared
shrink), each layer runs on its own, so the output never depends on whether it is fused.

At one row the whole block can run this way (`one_row_block`, installed as each block's
`one_row_step`): q/k/v with the input norm folded into its GEMV, the Triton decode attention
with RoPE and the KV write inside, o_proj adding the residual in its epilogue, gate/up with
the second norm folded in, down reading [gate | up] with the SwiGLU in its input loads and
adding the residual: eight kernels a block without adapters, ten with (each shrink one).

Fusing re-points parameters at views of a shared buffer: a caller that later saves the
model's tensors one by one sees shared storage. It is the serving engine's choice
(`Engine(fuse_projections=True)`), off for training callers.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.lora import LoRALinear
from ..kernels import interpreting, triton_available
from ..kernels.gemv import gemv_lora_triton, shrink_triton
from .lora_stack import Selection, SharedShrink, SlotStack, one_row_linear

GROUPS = (("self_attn", "fused_qkv", ("q_proj", "k_proj", "v_proj")),
          ("mlp", "fused_gate_up", ("gate_proj", "up_proj")))  # fmt: skip


class FusedGroup:
    """The members of one group over their stacked weight; called with x, returns one output
    per member (views into one tensor)."""

    def __init__(self, parent: nn.Module, names: tuple[str, ...], weight: torch.Tensor,
                 selection: Selection) -> None:  # fmt: skip
        self.parent, self.names, self.weight, self.selection = parent, names, weight, selection
        self.sizes = [layer.weight.shape[0] for layer in self.layers]
        self.bounds = tuple(sum(self.sizes[: m + 1]) for m in range(len(names) - 1))
        self._ptrs = [layer.weight.data_ptr() for layer in self.layers]

    @property
    def layers(self) -> list[nn.Module]:
        """The members as the parent holds them now (loading an adapter may swap a plain
        layer for a LoRA one)."""
        return [getattr(self.parent, n) for n in self.names]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = self.layers
        shared = self._mode(x, layers)
        if shared is False:
            return tuple(layer(x) for layer in layers)
        sel = self.selection
        if sel.mask is None:
            shared = None  # no row of this forward uses an adapter
        if sel.gemv and x.shape[:-1].numel() == 1 and triton_available():
            if x.is_cuda or interpreting():
                y = self._gemv(x, shared)
                return y.view(*x.shape[:-1], -1).split(self.sizes, dim=-1)
        y = F.linear(x, self.weight)
        if shared is not None:
            c, flat = sel.cols, y.view(-1, y.shape[-1])
            for m in range(len(self.names)):  # member m's columns are the same in both
                lo, hi = shared.offsets[m], shared.offsets[m + 1]
                h = shared.shrink(x, m).reshape(-1, c)  # each row's masked projection
                flat[:, lo:hi].addmm_(h, shared.member_bt(m)[:c])
        return y.split(self.sizes, dim=-1)

    def glu_down(self, x: torch.Tensor, down: nn.Module,
                 residual: torch.Tensor | None = None) -> torch.Tensor | None:  # fmt: skip
        """down(silu(gate) * up) [+ residual] of a gate/up group at one row: the group's
        GEMV, then the down projection's GEMV (and shrink) reading [gate | up] with the SwiGLU
        in their input loads and the residual add in the GEMV's epilogue, so the MLP and its
        residual are two or four kernels. None where that path does not apply (the MLP then
        runs as usual)."""
        shared = self.one_row_mode(x) if len(self.names) == 2 else False
        down_glu = one_row_linear(down, x, glu=True)
        if shared is False or down_glu is None:
            return None
        gate_up = self._gemv(x, shared)  # (1, 2 ffn)
        res = None if residual is None else residual.reshape(1, -1)
        if res is not None and (res.dtype != x.dtype or not res.is_contiguous()):
            return None
        return down_glu(gate_up, res).view(*x.shape[:-1], -1)

    def one_row_mode(self, x: torch.Tensor) -> SharedShrink | None | bool:
        """Whether this forward's one row runs through the group's GEMV (False: not; else
        its adapters as `_gemv` takes them: the shared shrink, or None for none)."""
        sel = self.selection
        if not sel.gemv or x.shape[:-1].numel() != 1 or not triton_available():
            return False
        if not (x.is_cuda or interpreting()):
            return False
        shared = self._mode(x, self.layers)
        return None if shared is not False and sel.mask is None else shared

    def _gemv(self, x: torch.Tensor, shared: SharedShrink | None,
              norm: nn.Module | None = None) -> torch.Tensor:  # fmt: skip
        """One row: the stacked GEMV with every member's delta in its epilogue; `norm` (an
        RMSNorm) folded in: the GEMV and shrink read x and the norm's weight, the GEMV
        applies the row's 1 / rms (so the norm is not a kernel of its own)."""
        x2 = x.reshape(1, -1)
        fold = None if norm is None else (norm.weight, norm.eps)
        if shared is None:
            return gemv_lora_triton(x2, self.weight, norm=fold)
        sel, m = self.selection, len(self.names)
        g = None if norm is None else norm.weight
        # every member's unmasked x A^T as partial sums (S, c*M), A's rows column-major over
        # the members: h[s, m, j] = parts[s, j*M + m]; the kernel sums them
        if sel.col0 is not None:  # the row's own slot: its r columns of every member, no mask
            c, a, bt, mask = sel.max_rank, shared.a.reshape(-1, shared.a.shape[-1]), shared.bt, None
            rows = (sel.col0, m, c * m)
        else:  # every loaded slot; the kernel applies the row's mask
            c, bt, rows = sel.cols, shared.bt[: sel.cols], None
            a, mask = shared.a[:c].reshape(c * m, -1), sel.mask.reshape(-1)[:c]
        parts = shrink_triton(x2, a, norm_weight=g, rows=rows)
        h = parts.view(-1, c, m).transpose(1, 2)
        return gemv_lora_triton(x2, self.weight, h, bt, mask, self.bounds, norm=fold,
                                bt_start=sel.col0)  # fmt: skip

    def _mode(self, x: torch.Tensor, layers: list[nn.Module]) -> SharedShrink | None | bool:
        """False: run the layers one by one. None: plain base weights. Else the shared shrink
        that holds every member's adapters in order."""
        sel = self.selection
        if not sel.running or x.dtype != self.weight.dtype:
            return False
        for layer, ptr in zip(layers, self._ptrs, strict=True):
            w = getattr(layer, "weight", None)
            if w is None or w.data_ptr() != ptr or getattr(layer, "bias", None) is not None:
                return False  # re-pointed (quantised, reloaded) since it was fused
        stacks = [getattr(layer, "gathered", None) for layer in layers]
        if all(s is None for s in stacks):
            plain = all(not isinstance(layer, LoRALinear) or not layer.lora_A for layer in layers)
            return None if plain else False
        if not all(isinstance(s, SlotStack) and s.shared is not None for s in stacks):
            return False
        group = stacks[0].shared[0]
        if (
            group.bt.dtype != self.weight.dtype
            or group.members != len(stacks)
            or any(s.shared != (group, m) or s.selection is not sel for m, s in enumerate(stacks))
        ):
            return False
        return group


def one_row_block(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  mask, cache) -> torch.Tensor | None:  # fmt: skip
    """A whole block at one decode row in eight to ten kernels, or None where this does not
    apply (then the block runs as usual): q/k/v with the input norm folded into its GEMV and
    shrink, attention with RoPE and the KV write inside (the Triton variant only), o_proj
    with the residual add in its epilogue, gate/up with the second norm folded in, down with
    the SwiGLU in its input and the residual in its epilogue."""
    attn, mlp = block.self_attn, block.mlp
    qkv, gate_up = attn.fused_qkv, mlp.fused_gate_up
    if not isinstance(qkv, FusedGroup) or not isinstance(gate_up, FusedGroup):
        return None
    if len(qkv.names) != 3 or not getattr(cache, "rope_in_attend", False):
        return None
    n1, n2 = block.input_layernorm, block.post_attention_layernorm
    if n1.weight.dtype != x.dtype or n2.weight.dtype != x.dtype or not x.is_contiguous():
        return None
    mode_qkv, mode_gu = qkv.one_row_mode(x), gate_up.one_row_mode(x)
    o_fn, down_fn = one_row_linear(attn.o_proj, x), one_row_linear(mlp.down_proj, x, glu=True)
    if mode_qkv is False or mode_gu is False or o_fn is None or down_fn is None:
        return None
    q, k, v = qkv._gemv(x, mode_qkv, n1).split(qkv.sizes, dim=-1)  # (1, out) each
    q = q.view(1, 1, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = k.view(1, 1, attn.n_kv, attn.head_dim).transpose(1, 2)
    v = v.view(1, 1, attn.n_kv, attn.head_dim).transpose(1, 2)
    out = cache.attend(attn.layer, q, k, v, rope=(cos, sin))  # (1, 1, H*D)
    x2 = x.reshape(1, -1)
    h = o_fn(out.reshape(1, -1), x2)  # x + o_proj(attention)
    y = down_fn(gate_up._gemv(h, mode_gu, n2), h)  # h + down(silu(gate) * up)
    return y.view(x.shape)


def fuse_projections(model: nn.Module, selection: Selection) -> int:
    """Stack q/k/v and gate/up of every block (plain, unbiased weights of one dtype and
    device only) and install the groups on the model; returns how many were fused."""
    fused = 0
    for block in getattr(model, "layers", []):
        for parent_name, attr, names in GROUPS:
            parent = getattr(block, parent_name)
            layers = [getattr(parent, n) for n in names]
            weights = [getattr(layer, "weight", None) for layer in layers]
            if any(w is None or getattr(layer, "bias", None) is not None
                   for w, layer in zip(weights, layers, strict=True)):  # fmt: skip
                continue
            if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
                continue
            with torch.no_grad():
                stacked = torch.cat([w.detach() for w in weights])
                offset = 0
                for w in weights:
                    w.data = stacked[offset : offset + w.shape[0]]
                    offset += w.shape[0]
            setattr(parent, attr, FusedGroup(parent, names, stacked, selection))
            fused += 1
        if block.self_attn.fused_qkv is not None and block.mlp.fused_gate_up is not None:
            block.one_row_step = functools.partial(one_row_block, block)
    return fused
