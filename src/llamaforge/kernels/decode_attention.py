"""One query per row against its cached keys, in two kernels (split-key decode attention).

A decode step's attention reads little (one layer of Llama-3.1-8B at 641 cached tokens is
2.6 MB of keys and values) but the PyTorch form is seven small kernels a layer (scores,
float, scale, mask, softmax, cast, probabilities @ V), ~38 us at one row on an H200 where the
bytes take under 1 us. Here the first kernel gives each (row, kv head, key split) one
program: it loads the query heads that share the kv head (grouped-query attention) as one
padded tile, walks its split of the row's keys in blocks with an online softmax, and writes
the split's running max, sum and weighted values; the second combines the splits per head.
Row b sees keys 0..last[b] (its own position is the last), so no mask tensor is read.
Both dots run in fp32 ("ieee") for fp32 inputs and under Triton's CPU interpreter (whose
bf16 dot is wrong); bf16 inputs on a GPU use bf16 tensor-core dots with fp32 accumulation.

`decode_attention_ref` is the definition (plain PyTorch, fp32 softmax); the serving engine
times the kernel against its other variants per bucket and keeps the fastest
(`serve/graphs.py`).
"""

from __future__ import annotations

import math

import torch

from . import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: only the reference runs
    triton = None

SPLIT_KEYS = 256  # most keys per split (the engine's width buckets are multiples of 256)
BLOCK_N = 32  # keys per inner step
# few rows give few programs: splits shrink (to 2 blocks of keys) until the grid has this many
# (one query row of Llama-3.1-8B at width 1024: 8 kv heads x 4 splits of 256 keys took 9.5 us on
# an H200, for 2.6 MB that its bandwidth reads in under 1 us: too few programs, each too long)
TARGET_PROGRAMS = 256


def decode_attention_ref(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, last: torch.Tensor
) -> torch.Tensor:
    """q (B, H, D) against keys/values (B, K, W, D), row b seeing keys 0..last[b]:
    (B, H * D) in q's dtype."""
    b, h, d = q.shape
    n_kv, w = keys.shape[1], keys.shape[2]
    qg = q.float().view(b, n_kv, h // n_kv, d)
    scores = torch.einsum("bgrd,bgnd->bgrn", qg, keys.float()) / math.sqrt(d)
    seen = torch.arange(w, device=q.device)[None, :] <= last[:, None]  # (B, W)
    scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
    out = torch.einsum("bgrn,bgnd->bgrd", torch.softmax(scores, dim=-1), values.float())
    return out.reshape(b, h * d).to(q.dtype)


if triton is not None:

    @triton.jit
    def _split(
        q_ptr, k_ptr, v_ptr, last_ptr, m_ptr, l_ptr, acc_ptr,
        nk_ptr, nv_ptr, slot_ptr, snk_b, snk_h, snv_b, snv_h, cos_ptr, sin_ptr, sc_b, ss_b,
        sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
        scale, H, S,
        REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr,
        CHUNK: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr, WRITE: tl.constexpr,
        ROPE: tl.constexpr,
    ):  # fmt: skip
        b, g, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        d = tl.arange(0, D)
        pos = tl.load(last_ptr + b)
        if ROPE:  # rotate-half RoPE of the row's position: dimension i pairs with i +- D/2
            partner = (d + D // 2) % D
            sign = tl.where(d < D // 2, -1.0, 1.0)
            cos = tl.load(cos_ptr + b * sc_b + d).to(tl.float32)
            sin = tl.load(sin_ptr + b * ss_b + d).to(tl.float32) * sign
        if WRITE:  # this row's new key/value: stored by the split holding its position, and
            # read from registers there (the store need not be visible to this program's loads)
            new_k = tl.load(nk_ptr + b * snk_b + g * snk_h + d)
            if ROPE:  # rotated in fp32 and rounded once, as kernels/rope.py does
                k_pair = tl.load(nk_ptr + b * snk_b + g * snk_h + partner).to(tl.float32)
                new_k = (new_k.to(tl.float32) * cos + k_pair * sin).to(new_k.dtype)
            new_v = tl.load(nv_ptr + b * snv_b + g * snv_h + d)
            slot = tl.load(slot_ptr + b)
            if pos // CHUNK == s:
                tl.store(k_ptr + slot * sk_b + g * sk_h + pos * sk_n + d, new_k)
                tl.store(v_ptr + slot * sv_b + g * sv_h + pos * sv_n + d, new_v)
            mine = slot == b  # a padding row writes to the scratch slot and reads its own
        r = tl.arange(0, REP_P)
        r_ok = r < REP
        heads = g * REP + r
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=r_ok[:, None],
                    other=0.0)  # fmt: skip
        if ROPE:
            q_pair = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + partner[None, :],
                             mask=r_ok[:, None], other=0.0).to(tl.float32)  # fmt: skip
            q = (q.to(tl.float32) * cos[None, :] + q_pair * sin[None, :]).to(q.dtype)
        n_keys = pos + 1
        start = s * CHUNK
        m_i = tl.full((REP_P,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((REP_P,), dtype=tl.float32)
        acc = tl.zeros((REP_P, D), dtype=tl.float32)
        for n0 in range(0, CHUNK, BLOCK):  # masked past its position: those keys are not read
            n = start + n0 + tl.arange(0, BLOCK)
            n_ok = n < n_keys
            k = tl.load(k_ptr + b * sk_b + g * sk_h + n[:, None] * sk_n + d[None, :],
                        mask=n_ok[:, None], other=0.0)  # fmt: skip
            v = tl.load(v_ptr + b * sv_b + g * sv_h + n[:, None] * sv_n + d[None, :],
                        mask=n_ok[:, None], other=0.0)  # fmt: skip
            if WRITE:
                here = ((n == pos) & mine)[:, None]
                k = tl.where(here, new_k[None, :].to(k.dtype), k)
                v = tl.where(here, new_v[None, :].to(v.dtype), v)
            if IEEE:
                sc = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            sc = tl.where(n_ok[None, :], sc * scale, float("-inf"))  # (REP_P, BLOCK)
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no keys
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(sc - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        row = (b * H + heads) * S + s  # (REP_P,) into (B, H, S)
        tl.store(m_ptr + row, m_i, mask=r_ok)
        tl.store(l_ptr + row, l_i, mask=r_ok)
        tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=r_ok[:, None])

    @triton.jit
    def _combine(m_ptr, l_ptr, acc_ptr, o_ptr, S, so_b, H,
                 D: tl.constexpr, S_P: tl.constexpr):  # fmt: skip
        bh = tl.program_id(0)
        b, h = bh // H, bh % H
        s = tl.arange(0, S_P)
        s_ok = s < S
        m = tl.load(m_ptr + bh * S + s, mask=s_ok, other=float("-inf"))
        l_s = tl.load(l_ptr + bh * S + s, mask=s_ok, other=0.0)
        top = tl.max(m, axis=0)  # key 0 is always seen: finite
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
        total = tl.sum(l_s * w, axis=0)
        d = tl.arange(0, D)
        acc = tl.load(acc_ptr + (bh * S + s)[:, None] * D + d[None, :], mask=s_ok[:, None],
                      other=0.0)  # fmt: skip
        out = tl.sum(acc * w[:, None], axis=0) / total
        tl.store(o_ptr + b * so_b + h * D + d, out.to(o_ptr.dtype.element_ty))


def decode_attention_triton(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    last: torch.Tensor,
    new: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The two kernels (CUDA, or the CPU under TRITON_INTERPRET=1); the reference's contract.

    q (B, H, D) with unit stride along D; keys/values (B, K, W, D) views with unit stride
    along D (the slot pool's first B slots); last (B,) int, 0 <= last[b] < W; D a power of
    2. `new` = (k, v, slot), k/v (B, K, D), slot (B,) int: row b's key/value is first stored
    at (slot[b], last[b]) of the pool the views start at (every slot[b] a slot of that
    pool) and, where slot[b] == b, attended at its position: the KV write fused in.

    `rope` = (cos, sin), each (B, ..., D) with unit stride along D and one position per row
    (`rope_cos_sin`'s tables): q and the new key are rotated first (rotate-half RoPE, in
    fp32, rounded to their dtype as `kernels/rope.py` rounds), so the caller skips that
    kernel; it needs `new`.
    """
    b, h, d = q.shape
    n_kv, w = keys.shape[1], keys.shape[2]
    if (
        h % n_kv
        or d & (d - 1)
        or d < 16
        or q.stride(2) != 1
        or keys.stride(3) != 1
        or values.stride(3) != 1
        or values.shape != keys.shape
        or keys.shape[0] != b
        or keys.shape[3] != d
    ):
        raise ValueError(
            f"decode_attention: q {tuple(q.shape)}, keys {tuple(keys.shape)}, "
            f"values {tuple(values.shape)}"
        )
    rep = h // n_kv
    splits = max(
        -(-w // SPLIT_KEYS), min(-(-w // (2 * BLOCK_N)), -(-TARGET_PROGRAMS // (b * n_kv)))
    )
    chunk = -(-w // splits)
    chunk = -(-chunk // BLOCK_N) * BLOCK_N
    dev = q.device
    m = torch.empty(b, h, splits, dtype=torch.float32, device=dev)
    lse = torch.empty_like(m)
    acc = torch.empty(b, h, splits, d, dtype=torch.float32, device=dev)
    out = torch.empty(b, h * d, dtype=q.dtype, device=dev)
    if new is not None:
        nk, nv, slot = new
        if (
            nk.shape != (b, n_kv, d)
            or nv.shape != nk.shape
            or nk.stride(2) != 1
            or nv.stride(2) != 1
        ):
            raise ValueError(f"decode_attention: new k {tuple(nk.shape)}, v {tuple(nv.shape)}")
        new_args = (nk, nv, slot, nk.stride(0), nk.stride(1), nv.stride(0), nv.stride(1))
    else:
        new_args = (q, q, last, 0, 0, 0, 0)  # unused
    if rope is not None:
        cos, sin = (t.reshape(t.shape[0], -1) for t in rope)
        if new is None or any(t.shape != (b, d) or t.stride(1) != 1 for t in (cos, sin)):
            raise ValueError(
                f"decode_attention: rope tables {tuple(rope[0].shape)} for q {tuple(q.shape)}"
                + ("" if new is not None else " (rope needs the new key/value)")
            )
        rope_args = (cos, sin, cos.stride(0), sin.stride(0))
    else:
        rope_args = (q, q, 0, 0)  # unused
    _split[(b, n_kv, splits)](
        q, keys, values, last, m, lse, acc, *new_args, *rope_args,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        1.0 / math.sqrt(d), h, splits,
        REP=rep, REP_P=max(16, triton.next_power_of_2(rep)), D=d, CHUNK=chunk, BLOCK=BLOCK_N,
        IEEE=q.dtype == torch.float32 or interpreting(), WRITE=new is not None,
        ROPE=rope is not None,
    )  # fmt: skip
    _combine[(b * h,)](
        m, lse, acc, out, splits, out.stride(0), h, D=d, S_P=max(2, triton.next_power_of_2(splits))
    )
    return out
