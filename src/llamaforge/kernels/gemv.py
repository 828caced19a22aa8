"""One-row matmul with the LoRA expansion in its epilogue: y = x W^T (+ h Bt), one kernel.

Batch-1 decode reads every weight once per token, so each projection is a GEMV. cuBLAS runs
them as split-K GEMMs (a second kernel reduces the partial sums) and the serving engine's
LoRA delta then adds `h @ Bt` in a third (`serve/lora_stack.py`). Here one program computes
BLOCK_N outputs: it walks the input dimension in BLOCK_K steps (fp32 accumulation of
W[n, k] * x[k]), then adds sum_r h[r] * Bt[r, n] for the gathered adapter columns, and
stores the row once. The tile sizes are chosen per shape on first use on a GPU, by timing
each of CONFIGS (the CPU interpreter takes the first).

The same kernel computes a *group* of projections that read the same input (q/k/v, or
gate/up) as one GEMV over their weights stacked along the output (`serve/fused_proj.py`):
`bounds` are the first output column of each member after the first, `h` is (M, R) (one
projection per member, any strides) and `bt` (R, N) the members' B^T side by side, so output
column n adds sum_r h[m(n), r] * mask[r] * bt[r, n] where m(n) is n's member. The optional
`mask` (R,) keeps each row's own adapter columns; folding it in here saves the separate
multiply of the batched path.

The shrink h = x A^T itself is `shrink_triton`: one kernel writing (S, M*R) fp32 partial sums
over S slices of the input, which the GEMV's programs add up as they read h, so the one-row
LoRA layer is two kernels (cuBLAS's shrink alone is a GEMM plus a split-K reduction).

Three more pieces of a decoder block fold into these two kernels at one row: the RMSNorm
before q/k/v and before gate/up (W (x g / rms) = (W (x g)) / rms: both kernels read x and the
norm's weight g, every GEMV program sums x^2 over the row it walks anyway and scales its
outputs and the projections by 1 / rms), the SwiGLU before down (`glu`: the kernels read
[gate | up]), and the residual adds after o_proj and down (`residual`, in the epilogue).
With many adapters loaded, the one row's adapter slot is read from a device tensor
(`bt_start`, the shrink's `rows`): both kernels read that slot's columns only, not every
loaded slot under a mask, and one captured graph serves every slot.

`gemv_lora_ref` is the definition (plain PyTorch, also the CPU path); the engine decides by
timing on the device whether its one-row decode step uses the kernel (`serve/graphs.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import capture_graph, interpreting, replay_ms

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: only the reference runs
    triton = None


def gemv_lora_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    h: torch.Tensor | None = None,
    bt: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    bounds: tuple[int, ...] = (),
    glu: bool = False,
    residual: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
    bt_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (1, K) @ w (N, K)^T, plus member m's (h[m] * mask) @ bt[:, its columns] if given:
    (1, N) in x's dtype. Members split the N outputs at `bounds` (none: one member); h is
    (M, R), or (S, M, R) partial sums of it. glu: x is (1, 2K) [gate | up] and the input is
    silu(gate) * up in x's dtype (the MLP's down projection with its SwiGLU folded in);
    `residual` (1, N) is added to the rounded result (the block's residual add). `norm` =
    (g, eps): the input is RMSNorm(x) * g, in fp32 (not rounded between the norm and the
    matmul), and h is then the projection of x * g, scaled by the row's 1 / rms here."""
    if glu:
        gate, up = x.float().chunk(2, dim=-1)
        x = (F.silu(gate) * up).to(x.dtype)
    x32, rstd = x.float(), 1.0
    if norm is not None:
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm[1])  # (1, 1)
        x32 = x32 * rstd * norm[0].float()
    y = F.linear(x32, w.float())
    if h is not None:
        h = h.float().sum(0) if h.dim() == 3 else h  # partial sums over K splits
        h = h * rstd
        if bt_start is not None:  # the R rows of bt from that one on
            lo = int(bt_start.reshape(-1)[0])
            bt = bt[lo : lo + h.shape[-1]]
        hm = h.float() * (1.0 if mask is None else mask.float().reshape(1, -1))  # (M, R)
        edges = (0, *bounds, w.shape[0])
        for m, (lo, hi) in enumerate(zip(edges, edges[1:], strict=False)):
            y[:, lo:hi] += hm[m : m + 1] @ bt[:, lo:hi].float()
    if residual is not None:
        return y.to(x.dtype) + residual
    return y.to(x.dtype)


# (BLOCK_N, BLOCK_K, num_warps): the best tilings of a plain GEMV on the H200 for the 8B
# shapes were (8, 1024, 8), (4, 1024, 4) and (16, 256, 8) (benchmarks/decode_pieces.py), plus
# three more to choose from (six, to bound the compiles: each shape compiles every config once,
# cached on disk by Triton)
CONFIGS = ((8, 1024, 8), (4, 1024, 4), (16, 256, 8), (8, 512, 4), (16, 512, 8), (32, 256, 8))
_chosen: dict[tuple, tuple[int, int, int]] = {}  # (N, K, R, dtype, device) -> config

if triton is not None:

    @triton.jit
    def _input(x_ptr, k, k_ok, K, GLU: tl.constexpr):
        """x[k] in fp32, or silu(x[k]) * x[K + k] rounded to x's dtype as kernels/swiglu.py
        rounds its output (tl.exp, not tl.sigmoid: Triton's interpreter, see there)."""
        if GLU:
            g = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + K + k, mask=k_ok, other=0.0).to(tl.float32)
            return (g / (1.0 + tl.exp(-g)) * u).to(x_ptr.dtype.element_ty).to(tl.float32)
        return tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)

    @triton.jit
    def _gemv_lora(
        x_ptr,
        w_ptr,
        h_ptr,
        mask_ptr,
        bt_ptr,
        res_ptr,
        g_ptr,
        bts_ptr,
        y_ptr,
        eps,
        N,
        B1,  # first output column of the second / third member (N where there is none)
        B2,
        K: tl.constexpr,  # the input width and the adapter columns: one compile per shape
        R: tl.constexpr,
        stride_w,
        stride_bt,
        stride_hs,
        stride_hm,
        stride_hr,
        SPLITS: tl.constexpr,  # h holds this many partial sums (the shrink's K splits)
        SPLITS_P: tl.constexpr,
        MEMBERS: tl.constexpr,
        GLU: tl.constexpr,  # x is (1, 2K) [gate | up] and the input is silu(gate) * up
        HAS_LORA: tl.constexpr,
        HAS_MASK: tl.constexpr,
        HAS_RES: tl.constexpr,
        NORM: tl.constexpr,  # the input is RMSNorm(x) * g: g folded in, the row's 1/rms after
        BT_START: tl.constexpr,  # bt's first row is read from bts_ptr (the row's adapter slot)
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        sq = tl.zeros((BLOCK_K,), dtype=tl.float32)  # the row's sum of squares (NORM)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            xk = _input(x_ptr, k, k_ok, K, GLU)
            if NORM:  # every program walks the whole row: each has its own sum of squares
                sq += xk * xk
                xk = xk * tl.load(g_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            wt = tl.load(
                w_ptr + n[:, None].to(tl.int64) * stride_w + k[None, :],
                mask=n_ok[:, None] & k_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(wt * xk[None, :], axis=1)
        if NORM:  # W (x g / rms) = (W (x g)) / rms, and likewise the shrink's (x g) A^T
            rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
            acc = acc * rstd
        if HAS_LORA:
            if BT_START:
                bt_ptr += tl.load(bts_ptr) * stride_bt
            member = (n >= B1).to(tl.int32) + (n >= B2).to(tl.int32)  # (BLOCK_N,)
            sp = tl.arange(0, SPLITS_P)
            for r0 in range(0, R, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                r_ok = r < R
                hp = h_ptr + sp[:, None] * stride_hs + r[None, :] * stride_hr
                h_ok = (sp < SPLITS)[:, None] & r_ok[None, :]
                # each member's projection summed over the shrink's K splits: (BLOCK_R,)
                hr = tl.sum(tl.load(hp, mask=h_ok, other=0.0).to(tl.float32), axis=0)[:, None]
                if MEMBERS > 1:
                    h1 = tl.sum(tl.load(hp + stride_hm, mask=h_ok, other=0.0).to(tl.float32), 0)
                    hr = tl.where(member[None, :] >= 1, h1[:, None], hr)
                if MEMBERS > 2:
                    h2 = tl.load(hp + 2 * stride_hm, mask=h_ok, other=0.0).to(tl.float32)
                    hr = tl.where(member[None, :] >= 2, tl.sum(h2, 0)[:, None], hr)
                if HAS_MASK:
                    hr = hr * tl.load(mask_ptr + r, mask=r_ok, other=0.0).to(tl.float32)[:, None]
                if NORM:
                    hr = hr * rstd
                b = tl.load(bt_ptr + r[:, None] * stride_bt + n[None, :],
                            mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # fmt: skip
                acc += tl.sum(b.to(tl.float32) * hr, axis=0)
        if HAS_RES:  # the block's residual add, rounded as y + residual would round
            res = tl.load(res_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
            acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32) + res
        tl.store(y_ptr + n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


def gemv_lora_triton(
    x: torch.Tensor,
    w: torch.Tensor,
    h: torch.Tensor | None = None,
    bt: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    bounds: tuple[int, ...] = (),
    glu: bool = False,
    residual: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
    bt_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel (CUDA, or the CPU under TRITON_INTERPRET=1); same contract as the reference.

    x (1, K) contiguous; w (N, K) and bt (R, N) with unit stride along their last dimension;
    h (M, R), or (S, M, R) partial sums that the kernel adds up (`shrink_triton`'s), with
    M = len(bounds) + 1 <= 3, any strides; mask (R,) contiguous. `bt_start` (1,) int64 on the
    device: bt holds more rows, and the R read start at that one (a row's own adapter slot,
    chosen on the device so that one captured graph serves every slot).
    """
    n, k = w.shape
    if x.shape != (1, 2 * k if glu else k) or w.stride(1) != 1 or not x.is_contiguous():
        raise ValueError(f"gemv_lora: x {tuple(x.shape)} against w {tuple(w.shape)}")
    members = len(bounds) + 1
    if members > 3 or list(bounds) != sorted(bounds) or any(not 0 < b < n for b in bounds):
        raise ValueError(f"gemv_lora: member bounds {bounds} for {n} outputs (at most 3 members)")
    lora = h is not None
    if lora and (
        h.dim() not in (2, 3)
        or h.shape[-2] != members
        or bt is None
        or bt.shape[1] != n
        or (bt.shape[0] != h.shape[-1] if bt_start is None else bt.shape[0] < h.shape[-1])
        or bt.stride(1) != 1
        or (mask is not None and (mask.shape != (h.shape[-1],) or not mask.is_contiguous()))
    ):
        raise ValueError(
            f"gemv_lora: h {tuple(h.shape)} against bt {_shape(bt)}, mask {_shape(mask)}"
        )
    r = h.shape[-1] if lora else 0
    h_arg = h if lora else x  # (unused pointers where there is no adapter / mask)
    bt_arg = bt if lora else w
    mask_arg = mask if mask is not None else x
    b1, b2 = (*bounds, n, n)[:2]
    splits = h.shape[0] if lora and h.dim() == 3 else 1
    hs = h.stride(0) if lora and h.dim() == 3 else 0
    hm, hr = (h.stride(-2), h.stride(-1)) if lora else (0, 0)
    if residual is not None and (residual.shape != (1, n) or not residual.is_contiguous()):
        raise ValueError(f"gemv_lora: residual {tuple(residual.shape)} for {n} outputs")
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    res_arg = residual if residual is not None else y
    if norm is not None and (glu or norm[0].shape != (k,) or not norm[0].is_contiguous()):
        raise ValueError(f"gemv_lora: norm weight {tuple(norm[0].shape)} for a {k}-wide input")
    g_arg, eps = (norm[0], float(norm[1])) if norm is not None else (x, 0.0)

    def launch(cfg: tuple[int, int, int]) -> None:
        block_n, block_k, warps = cfg
        _gemv_lora[(triton.cdiv(n, block_n),)](
            x, w, h_arg, mask_arg, bt_arg, res_arg, g_arg,
            bt_start if bt_start is not None else y, y, eps, n, b1, b2, k, r, w.stride(0),
            bt_arg.stride(0),
            hs, hm, hr, SPLITS=splits, SPLITS_P=triton.next_power_of_2(splits), MEMBERS=members,
            GLU=glu, HAS_LORA=lora, HAS_MASK=mask is not None,
            HAS_RES=residual is not None, NORM=norm is not None,
            BT_START=bt_start is not None, BLOCK_R=16 if r <= 16 else 32,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        )  # fmt: skip

    key = (
        n,
        k,
        r,
        x.dtype,
        x.device,
        glu,
        norm is not None,
    )  # (the residual costs the same everywhere)
    if key not in _chosen:
        _chosen[key] = CONFIGS[0] if interpreting() else _fastest(launch)
    launch(_chosen[key])
    return y


# the shrink's input slice per program: 256-wide steps, at most 32 slices (their partial sums
# are what every program of the GEMV that follows adds up)
SHRINK_BLOCK_K, SHRINK_MAX_SPLITS, SHRINK_BLOCK_J = 256, 32, 16

if triton is not None:

    @triton.jit
    def _shrink(x_ptr, a_ptr, p_ptr, xo_ptr, g_ptr, start_ptr, J, K, stride_a,
                K_PER: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                GLU: tl.constexpr, WRITE_X: tl.constexpr, NORM: tl.constexpr,
                START: tl.constexpr, START_MUL: tl.constexpr):  # fmt: skip
        s = tl.program_id(0)
        if START:  # the J rows of a from the row's adapter slot on (read on the device)
            a_ptr += tl.load(start_ptr) * START_MUL * stride_a
        j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        j_ok = j < J
        acc = tl.zeros((BLOCK_J,), dtype=tl.float32)
        for k0 in range(0, K_PER, BLOCK_K):
            k = s * K_PER + k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            xk = _input(x_ptr, k, k_ok, K, GLU)
            if WRITE_X:  # the first column block stores silu(gate) * up for the GEMV after
                first = tl.program_id(1) == 0
                tl.store(xo_ptr + k, xk.to(xo_ptr.dtype.element_ty), mask=k_ok & first)
            if NORM:  # x * g: the GEMV that adds these up applies the row's 1 / rms
                xk = xk * tl.load(g_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            at = tl.load(a_ptr + j[:, None].to(tl.int64) * stride_a + k[None, :],
                         mask=j_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            acc += tl.sum(at.to(tl.float32) * xk[None, :], axis=1)
        tl.store(p_ptr + s * J + j, acc, mask=j_ok)


def shrink_triton(
    x: torch.Tensor,
    a: torch.Tensor,
    glu: bool = False,
    glu_out: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    rows: tuple[torch.Tensor, int, int] | None = None,
) -> torch.Tensor:
    """x (1, K) @ a (J, K)^T as (S, J) fp32 partial sums over S slices of K, one kernel
    (glu: x is (1, 2K) [gate | up] and the input silu(gate) * up, as in `gemv_lora_ref`;
    `glu_out` (1, K), contiguous, then receives that input, so the GEMV after it reads it
    plainly instead of computing the SwiGLU again in each of its programs; `norm_weight` g
    (K,): the partial sums are of (x * g) A^T, for a GEMV with `norm` that scales them by the
    row's 1 / rms; `rows` = (start (1,) int64 on the device, multiplier, count): only a's
    rows start * multiplier .. + count, a row's own adapter slot, J = count).

    A one-row LoRA shrink reads a few hundred kB; cuBLAS runs it as a split-K GEMM plus a
    reduction kernel (~6 us on an H200). This is the split without the reduction: the GEMV
    that expands it (`gemv_lora_triton`, h of shape (S, M, R)) adds the partial sums up.
    """
    j, k = a.shape
    if x.shape != (1, 2 * k if glu else k) or a.stride(1) != 1 or not x.is_contiguous():
        raise ValueError(f"shrink: x {tuple(x.shape)} against a {tuple(a.shape)}")
    start, mul = (rows[0], rows[1]) if rows is not None else (None, 1)
    if rows is not None:
        if not 0 < rows[2] <= j:
            raise ValueError(f"shrink: {rows[2]} rows of a {tuple(a.shape)}")
        j = rows[2]
    steps = max(1, -(-k // (SHRINK_BLOCK_K * SHRINK_MAX_SPLITS)))
    k_per = SHRINK_BLOCK_K * steps
    splits = -(-k // k_per)
    write = glu_out is not None
    if write and (not glu or glu_out.shape != (1, k) or not glu_out.is_contiguous()):
        raise ValueError(f"shrink: glu_out {tuple(glu_out.shape)} for a (1, {k}) input")
    g = norm_weight
    if g is not None and (glu or g.shape != (k,) or not g.is_contiguous()):
        raise ValueError(f"shrink: norm weight {tuple(g.shape)} for a {k}-wide input")
    p = torch.empty(splits, j, dtype=torch.float32, device=x.device)
    _shrink[(splits, triton.cdiv(j, SHRINK_BLOCK_J))](
        x, a, p, glu_out if write else p, g if g is not None else p,
        start if start is not None else p, j, k, a.stride(0),
        K_PER=k_per, BLOCK_J=SHRINK_BLOCK_J, BLOCK_K=SHRINK_BLOCK_K, GLU=glu, WRITE_X=write,
        NORM=g is not None, START=start is not None, START_MUL=mul,
    )  # fmt: skip
    return p


def _fastest(launch) -> tuple[int, int, int]:
    """The config of CONFIGS with the lowest time: each one captured as a CUDA graph of 20
    launches (a kernel of a few microseconds is shorter than its launch from Python, so
    eager timing would measure the host), median of 5 replays."""

    def twenty(cfg: tuple[int, int, int]) -> None:
        for _ in range(20):
            launch(cfg)

    times = {cfg: replay_ms(capture_graph(lambda c=cfg: twenty(c))[0]) for cfg in CONFIGS}
    return min(times, key=times.__getitem__)


def _shape(t: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)
