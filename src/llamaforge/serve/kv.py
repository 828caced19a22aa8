"""A slot pool KV cache: one preallocated row of `max_len` positions per concurrent request.

Why a slot pool and not paged blocks: attention here is PyTorch SDPA, which reads keys as one
dense (B, K, S, D) tensor. With a slot pool the running rows are kept in slots 0..n-1
(a finished row's slot is refilled by moving the last row into it), so every decode step
attends a plain view of the pool, with no gather and no custom kernel. Paged blocks would save
the memory a slot reserves past its row's length (max_len per slot is allocated up front), at
the price of a block-table gather per layer and step (or a paged-attention kernel). The pool's
size is set by `max_batch x max_len`; that is the memory knob.

Shapes: B rows in a forward, T new tokens per row, S attended positions, K kv heads, H query
heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.config import LlamaConfig


class SlotPool:
    """Keys/values (slots, K, max_len, D) per layer; zero-initialised so that masked, never
    written positions are finite (SDPA would turn garbage NaNs into NaN rows)."""

    def __init__(
        self,
        cfg: LlamaConfig,
        slots: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (slots, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.slots, self.max_len = slots, max_len
        self.device = torch.device(device)

    def nbytes(self) -> int:
        """Memory the pool holds."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst (every layer)."""
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]


class RowBatch:
    """The cache argument of one model forward over rows of the pool, each at its own length.

    slots: the pool slot of each of the B rows (a contiguous run is read as a view, anything
    else is gathered). starts: (B,) tokens already cached per row; n_new: (B,) real new tokens
    per row (0 for a row that only pads the batch: nothing of it is stored). The model's
    attention calls `attend` (see Attention.forward), which stores the real new keys/values
    and attends each query to its row's cached keys and the new ones up to itself.
    """

    length = 0  # Llama.hidden_states reads and advances this; positions come from `starts`

    def __init__(self, pool: SlotPool, slots: list[int], starts: list[int], n_new: list[int]):
        self.pool = pool
        dev = pool.device
        b, t = len(slots), max(max(n_new), 1)
        self.t = t
        self.width = max(s + n for s, n in zip(starts, n_new, strict=True)) or 1  # S
        lo = slots[0]
        self.span = (lo, lo + b) if slots == list(range(lo, lo + b)) else None
        self.slot_index = torch.tensor(slots, device=dev)
        starts_t = torch.tensor(starts, device=dev)
        n_t = torch.tensor(n_new, device=dev)
        steps = torch.arange(t, device=dev)
        self.positions = starts_t[:, None] + steps[None, :]  # (B, T) RoPE positions
        real = steps[None, :] < n_t[:, None]  # (B, T)
        self.all_real = bool(min(n_new) == t)
        flat = real.flatten().nonzero().flatten()  # which of the B*T new tokens are stored
        self.flat = None if self.all_real else flat
        rows = torch.arange(b, device=dev)[:, None].expand(b, t).flatten()[flat]
        self.write_slot = self.slot_index[rows]  # (N,)
        self.write_pos = self.positions.flatten()[flat]  # (N,)
        keys = torch.arange(self.width, device=dev)
        # (B, 1, T, S): query i of a row sees its keys up to its own position (pads: the same
        # rule, so they always see key 0 and never produce NaN; their output is dropped).
        self.mask = (keys[None, None, :] <= self.positions[:, :, None])[:, None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k/v (B, K, T, D) of real tokens, attend q (B, H, T, D): out (B, T, H*D)."""
        b, h, t, d = q.shape
        n_kv = k.shape[1]
        pk, pv = self.pool.k[layer], self.pool.v[layer]
        new_k = k.transpose(1, 2).reshape(b * t, n_kv, d)  # (B*T, K, D)
        new_v = v.transpose(1, 2).reshape(b * t, n_kv, d)
        if self.flat is not None:
            new_k, new_v = new_k.index_select(0, self.flat), new_v.index_select(0, self.flat)
        pk[self.write_slot, :, self.write_pos] = new_k
        pv[self.write_slot, :, self.write_pos] = new_v
        if self.span is not None:
            lo, hi = self.span
            keys, values = pk[lo:hi, :, : self.width], pv[lo:hi, :, : self.width]
        else:
            keys = pk[:, :, : self.width].index_select(0, self.slot_index)
            values = pv[:, :, : self.width].index_select(0, self.slot_index)
        # Grouped-query attention without repeating keys: the `rep` query heads that share a
        # kv head become rep*T queries of that head, and the mask is repeated to match.
        rep = h // n_kv
        q = q.reshape(b, n_kv, rep * t, d)
        mask = self.mask if rep == 1 else self.mask.repeat(1, 1, rep, 1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B,K,rep*T,D)
        return out.reshape(b, h, t, d).transpose(1, 2).reshape(b, t, h * d)
