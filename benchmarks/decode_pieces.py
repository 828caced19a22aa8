"""The pieces of a Llama-3.1-8B decode step timed alone on a GPU (what bounds batch-1 decode).

Each op is captured 50 times in one CUDA graph and replayed (no launch cost, as in the
engine's graph decode): the projection GEMVs at 1 and 8 rows through cuBLAS, fused q/k/v and
gate/up shapes, a plain Triton GEMV over 24 tilings, the engine's LoRA delta of one
projection, and one-query attention through SDPA backends and as two matmuls (scores as
q @ K^T or as (K @ q^T)^T), on keys sliced from a slot pool as the engine holds them and on
contiguous copies.

    python benchmarks/decode_pieces.py decode_pieces.json      # CUDA + Triton only
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    sys.exit("decode_pieces.py times CUDA kernels: it needs a GPU")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

DEV, DT = "cuda", torch.bfloat16
H, FFN, V, LAYERS = 4096, 14336, 128256, 32
SHAPES = {
    "q/o": (4096, H),
    "k/v": (1024, H),
    "qkv": (6144, H),
    "gate/up": (FFN, H),
    "gate_up": (2 * FFN, H),
    "down": (H, FFN),
    "lm_head": (V, H),
}


def graph_us(fn: Callable[[], object], reps: int = 50) -> float:
    """Microseconds per call of `fn`, replayed from one CUDA graph of `reps` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / (5 * reps) * 1e6


@triton.jit
def _gemv(x_ptr, w_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
        tile = (rn[:, None] < N) & (rk[None, :] < K)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=tile, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(y_ptr + rn, acc.to(tl.bfloat16), mask=rn < N)


def triton_gemv(x, w, y, bn: int, bk: int, warps: int) -> None:
    n, k = w.shape
    _gemv[(triton.cdiv(n, bn),)](x, w, y, n, k, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)


def copy_gb_s() -> float:
    """Read + write bytes per second of a 2 GiB copy."""
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    us = graph_us(functools.partial(b.copy_, a), reps=10)
    return 2 * a.numel() / (us * 1e-6) / 1e9


def linear_row(n: int, k: int, bw: float) -> dict:
    w = torch.randn(n, k, device=DEV, dtype=DT) * 0.02
    row: dict = {}
    for m in (1, 8):
        x = torch.randn(m, k, device=DEV, dtype=DT)
        us = graph_us(functools.partial(F.linear, x, w))
        row[f"torch_m{m}_us"] = round(us, 1)
        row[f"torch_m{m}_pct_of_copy"] = round(100 * w.numel() * 2 / (us * 1e-6) / 1e9 / bw, 1)
    x = torch.randn(k, device=DEV, dtype=DT)
    y = torch.empty(n, device=DEV, dtype=DT)
    ref = F.linear(x[None], w)[0].float()
    best = None
    for bn in (4, 8, 16, 32):
        for bk in (256, 512, 1024):
            for warps in (4, 8):
                run = functools.partial(triton_gemv, x, w, y, bn, bk, warps)
                try:
                    run()
                    torch.cuda.synchronize()
                    us = graph_us(run)
                except Exception:  # a tiling this GPU cannot run
                    continue
                err = (y.float() - ref).abs().max().item()
                if best is None or us < best[0]:
                    best = (us, [bn, bk, warps], err)
    if best is not None:
        row.update(triton_m1_us=round(best[0], 1), triton_cfg=best[1], triton_err=best[2])
    return row


def lora_us(n: int, k: int) -> float:
    """The engine's gathered LoRA delta for one row (lora_stack.SlotStack.add_delta)."""
    x = torch.randn(1, 1, k, device=DEV, dtype=DT)
    a = torch.randn(16, k, device=DEV, dtype=DT)
    bt = torch.randn(16, n, device=DEV, dtype=DT)
    mask = torch.ones(1, 1, 16, device=DEV, dtype=DT)
    y = torch.randn(1, 1, n, device=DEV, dtype=DT)

    def delta():
        h = torch.matmul(x, a.T).mul_(mask)
        return y.add_(torch.matmul(h, bt))

    return graph_us(delta)


def attention_row(rows: int, width: int = 768, seen: int = 640, max_len: int = 4096) -> dict:
    """One query per row as graphs.StaticDecode attends: (B, K, rep, D) against (B, K, W, D).

    Keys and values are slices of a slot pool (rows + 1 slots of `max_len` positions), as in
    the engine: their row stride is the pool's, not the width's (`pool_*`), beside the same
    shapes in contiguous tensors (`contiguous_*`). The matmul variants compute the scores
    as q @ K^T (`matmuls`) or as (K @ q^T)^T (`keys_first`).
    """
    q = torch.randn(rows, 8, 4, 128, device=DEV, dtype=DT)
    pool_k = torch.randn(rows + 1, 8, max_len, 128, device=DEV, dtype=DT)
    pool_v = torch.randn_like(pool_k)
    layouts = {
        "pool": (pool_k[:rows, :, :width], pool_v[:rows, :, :width]),
        "contiguous": (
            pool_k[:rows, :, :width].contiguous(),
            pool_v[:rows, :, :width].contiguous(),
        ),
    }
    allowed = torch.zeros(rows, 1, 4, width, device=DEV, dtype=torch.bool)
    allowed[..., :seen] = True
    bias = torch.zeros(rows, 1, 1, width, device=DEV)
    bias[..., seen:] = float("-inf")
    out: dict = {}
    for layout, (keys, values) in layouts.items():

        def sdpa(backend: SDPBackend, keys=keys, values=values):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)

        for name in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            try:
                out[f"{layout}_sdpa_{name}_us"] = round(
                    graph_us(functools.partial(sdpa, getattr(SDPBackend, name))), 1
                )
            except Exception as e:  # a backend this build or GPU lacks
                out[f"{layout}_sdpa_{name}_us"] = str(e)[:80]

        def two_matmuls(keys_first: bool, keys=keys, values=values):
            if keys_first:
                s = torch.matmul(keys, q.transpose(-1, -2)).transpose(-1, -2).float()
            else:
                s = torch.matmul(q, keys.transpose(-1, -2)).float()
            p = torch.softmax(s.mul_(128**-0.5).add_(bias), -1).to(DT)
            return torch.matmul(p, values)

        ref = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed).float()
        for name, kf in (("matmuls", False), ("keys_first", True)):
            fn = functools.partial(two_matmuls, kf)
            out[f"{layout}_{name}_us"] = round(graph_us(fn), 1)
            out[f"{layout}_{name}_max_err"] = (fn().float() - ref).abs().max().item()
        # the split-key Triton kernel (kernels/decode_attention.py): rows see keys 0..seen-1
        from llamaforge.kernels.decode_attention import decode_attention_triton

        last = torch.full((rows,), seen - 1, device=DEV, dtype=torch.long)
        flat_q = q.reshape(rows, 32, 128)

        def kernel(keys=keys, values=values, flat_q=flat_q, last=last):
            return decode_attention_triton(flat_q, keys, values, last)

        try:
            out[f"{layout}_triton_us"] = round(graph_us(kernel), 1)
            got = kernel().float().view(ref.shape)
            out[f"{layout}_triton_max_err"] = (got - ref).abs().max().item()
        except Exception as e:  # a compile failure is a result too
            out[f"{layout}_triton_us"] = str(e)[:80]
    return out


def main() -> None:
    bw = copy_gb_s()
    res: dict = {"device": torch.cuda.get_device_name(0), "copy_gb_s": round(bw, 1)}
    res["linear"] = {name: linear_row(n, k, bw) for name, (n, k) in SHAPES.items()}
    lin = res["linear"]
    for m in (1, 8):
        us = functools.partial(lambda name, m: lin[name][f"torch_m{m}_us"], m=m)
        separate = LAYERS * (2 * us("q/o") + 2 * us("k/v") + 2 * us("gate/up") + us("down"))
        fused = LAYERS * (us("qkv") + us("q/o") + us("gate_up") + us("down"))
        res[f"per_token_m{m}_ms"] = {
            "separate": (separate + us("lm_head")) / 1000,
            "fused": (fused + us("lm_head")) / 1000,
        }
    res["lora_delta_us"] = {f"{n}x{k}": round(lora_us(n, k), 1) for n, k in ((H, H), (FFN, H))}
    res["attention"] = {f"rows{b}": attention_row(b) for b in (1, 8, 64)}
    print(json.dumps(res, indent=1))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
