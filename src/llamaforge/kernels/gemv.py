"""One-row matmul with the LoRA expansion in its epilogue: y = x W^T (+ h Bt), one kernel.

Batch-1 decode reads every weight once per token, so each projection is a GEMV. cuBLAS runs
them as split-K GEMMs (a second kernel reduces the partial sums) and the serving engine's
LoRA delta then adds `h @ Bt` in a third (`serve/lora_stack.py`). Here one program computes
BLOCK_N outputs: it walks the input dimension in BLOCK_K steps (fp32 accumulation of
W[n, k] * x[k]), then adds sum_r h[r] * Bt[r, n] for the gathered adapter columns, and
stores the row once. The tile sizes are chosen per shape on first use on a GPU, by timing
each of CONFIGS (the CPU interpreter takes the first).

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
    x: torch.Tensor, w: torch.Tensor, h: torch.Tensor | None = None, bt: torch.Tensor | None = None
) -> torch.Tensor:
    """x (1, K) @ w (N, K)^T, plus h (1, R) @ bt (R, N) if given: (1, N) in x's dtype."""
    y = F.linear(x.float(), w.float())
    if h is not None:
        y = y + h.float() @ bt.float()
    return y.to(x.dtype)


# (BLOCK_N, BLOCK_K, num_warps): the best tilings of a plain GEMV on the H200 for the 8B
# shapes were (8, 1024, 8), (4, 1024, 4) and (16, 256, 8) (benchmarks/decode_pieces.py)
# (three, to bound the compiles: each shape compiles every config once, cached on disk by Triton)
CONFIGS = ((8, 1024, 8), (4, 1024, 4), (16, 256, 8))
_chosen: dict[tuple, tuple[int, int, int]] = {}  # (N, K, R, dtype, device) -> config

if triton is not None:

    @triton.jit
    def _gemv_lora(
        x_ptr,
        w_ptr,
        h_ptr,
        bt_ptr,
        y_ptr,
        N,
        K: tl.constexpr,  # the input width and the adapter columns: one compile per shape
        R: tl.constexpr,
        stride_w,
        stride_bt,
        HAS_LORA: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            xk = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            wt = tl.load(
                w_ptr + n[:, None].to(tl.int64) * stride_w + k[None, :],
                mask=n_ok[:, None] & k_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(wt * xk[None, :], axis=1)
        if HAS_LORA:
            for r0 in range(0, R, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                r_ok = r < R
                hr = tl.load(h_ptr + r, mask=r_ok, other=0.0).to(tl.float32)
                b = tl.load(
                    bt_ptr + r[:, None] * stride_bt + n[None, :],
                    mask=r_ok[:, None] & n_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc += tl.sum(b * hr[:, None], axis=0)
        tl.store(y_ptr + n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


def gemv_lora_triton(
    x: torch.Tensor, w: torch.Tensor, h: torch.Tensor | None = None, bt: torch.Tensor | None = None
) -> torch.Tensor:
    """The kernel (CUDA, or the CPU under TRITON_INTERPRET=1); same contract as the reference.

    x (1, K) and h (1, R) contiguous; w (N, K) and bt (R, N) with unit stride along their
    last dimension.
    """
    n, k = w.shape
    if x.shape != (1, k) or w.stride(1) != 1 or not x.is_contiguous():
        raise ValueError(f"gemv_lora: x {tuple(x.shape)} against w {tuple(w.shape)}")
    lora = h is not None
    if lora and (h.shape[0] != 1 or bt.shape != (h.shape[1], n) or bt.stride(1) != 1):
        raise ValueError(f"gemv_lora: h {tuple(h.shape)} against bt {tuple(bt.shape)}")
    r = h.shape[1] if lora else 0
    h = h.contiguous() if lora else x  # (unused pointers when there is no adapter)
    bt_arg = bt if lora else w
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)

    def launch(cfg: tuple[int, int, int]) -> None:
        block_n, block_k, warps = cfg
        _gemv_lora[(triton.cdiv(n, block_n),)](
            x, w, h, bt_arg, y, n, k, r, w.stride(0), bt_arg.stride(0),
            HAS_LORA=lora, BLOCK_R=16 if r <= 16 else 32, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps,
        )  # fmt: skip

    key = (n, k, r, x.dtype, x.device)
    if key not in _chosen:
        _chosen[key] = CONFIGS[0] if interpreting() else _fastest(launch)
    launch(_chosen[key])
    return y


def _fastest(launch) -> tuple[int, int, int]:
    """The config of CONFIGS with the lowest time: each one captured as a CUDA graph of 20
    launches (a kernel of a few microseconds is shorter than its launch from Python, so
    eager timing would measure the host), median of 5 replays."""

    def twenty(cfg: tuple[int, int, int]) -> None:
        for _ in range(20):
            launch(cfg)

    times = {cfg: replay_ms(capture_graph(lambda c=cfg: twenty(c))[0]) for cfg in CONFIGS}
    return min(times, key=times.__getitem__)
