"""One Triton kernel for a whole AdamW update of a bf16 parameter, stochastically rounded.

The reference (`train/bf16_adamw.py`) runs ~15 PyTorch ops per parameter and chunk: casts
to fp32, the moment updates, the step, and three stochastic roundings. Here one launch per
parameter reads weight, gradient and both moments once (bf16), does the math in fp32
registers and writes the three bf16 results, each rounded up with the probability of its
dropped low 16 bits (random bits from Triton's counter-based Philox, seeded per step).
"""

from __future__ import annotations

import torch

from . import triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _round_bf16(x, rand):
        # bf16 is the top half of fp32: add noise below bit 16, then drop the low bits
        bits = x.to(tl.int32, bitcast=True)
        noise = (rand & 0xFFFF).to(tl.int32)
        return ((bits + noise) & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def _adamw_bf16_kernel(
        w_ptr,
        g_ptr,
        m_ptr,
        v_ptr,
        n,
        seed,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step_size,
        root_bc2,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        denom = tl.sqrt(v) / root_bc2 + eps
        w = w * (1.0 - lr * weight_decay) - step_size * (m / denom)
        r0, r1, r2, _ = tl.randint4x(seed, offs.to(tl.int32))
        tl.store(w_ptr + offs, _round_bf16(w, r0), mask=mask)
        tl.store(m_ptr + offs, _round_bf16(m, r1), mask=mask)
        tl.store(v_ptr + offs, _round_bf16(v, r2), mask=mask)


BLOCK = 1024


def adamw_bf16_step_(
    w: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    step_size: float,
    root_bc2: float,
    seed: int,
) -> None:
    """Update bf16 weight `w` and moments `m`, `v` in place from gradient `g` (all contiguous,
    one shape); the same math as the reference, with fresh rounding noise per `seed`."""
    n = w.numel()
    if n >= 2**31:
        raise ValueError(f"fused AdamW takes parameters below 2^31 elements, got {n}")
    for t in (w, g, m, v):
        if t.shape != w.shape or t.dtype != torch.bfloat16 or not t.is_contiguous():
            raise ValueError("fused AdamW needs contiguous bf16 tensors of the weight's shape")
    grid = (triton.cdiv(n, BLOCK),)
    _adamw_bf16_kernel[grid](
        w,
        g,
        m,
        v,
        n,
        seed,
        lr,
        betas[0],
        betas[1],
        eps,
        weight_decay,
        step_size,
        root_bc2,
        BLOCK=BLOCK,
    )
