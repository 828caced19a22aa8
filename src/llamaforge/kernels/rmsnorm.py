"""RMSNorm: a fused Triton kernel (forward and backward) beside its PyTorch reference.

The kernel normalises one row per program in float32 and keeps only the per-row reciprocal
RMS (4 bytes a row) for the backward pass, which recomputes the normalised row from x.
"""

import torch

from . import use_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: only the reference runs (use_kernel says no)
    triton = None

MAX_HIDDEN = 65536  # one row must fit one program's registers; wider rows use the reference


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain PyTorch RMSNorm over the last dim, exactly as `RMSNorm.forward` in the model."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, enabled: bool = True
) -> torch.Tensor:
    """RMSNorm of x (..., C) with weight (C,): the Triton kernel on CUDA, else the reference."""
    fits = weight.shape == x.shape[-1:] and 0 < x.numel() and x.shape[-1] <= MAX_HIDDEN
    if use_kernel(enabled, x, weight) and fits:
        return _rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def _rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Triton path (callable on CPU tensors under TRITON_INTERPRET=1, for tests)."""
    return _RMSNormFn.apply(x, weight, eps)


def _launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of n_cols: the whole row in one block."""
    block = triton.next_power_of_2(n_cols)
    return block, min(16, max(4, block // 512))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (R, C) with unit stride along C (a view where possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2, weight = _rows(x), weight.contiguous()  # (R, C), (C,)
        n_rows, n_cols = x2.shape
        out_dtype = torch.promote_types(x.dtype, weight.dtype)  # as `weight * x` promotes
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)  # (R, C)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)  # (R,)
        block, warps = _launch_config(n_cols)
        _rms_norm_fwd[(n_rows,)](
            x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps,
            BLOCK=block, num_warps=warps,
        )  # fmt: skip
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = _rows(dy)  # (R, C)
        dx = torch.empty_like(x2)  # (R, C), x's dtype
        want_dw = ctx.needs_input_grad[1]
        if x2.is_cuda:
            n_progs = 2 * torch.cuda.get_device_properties(x2.device).multi_processor_count
        else:  # Triton's interpreter: a few programs are enough to exercise the reduction
            n_progs = 4
        # A power of two rows per program (compile-time: few variants, and Triton's
        # interpreter cannot loop a runtime count under numpy >= 2.4).
        rows_per_prog = triton.next_power_of_2(triton.cdiv(n_rows, n_progs))
        n_progs = triton.cdiv(n_rows, rows_per_prog)
        # Per-program partial sums of dweight, (P, C) fp32, reduced below in torch.
        dw_part = torch.empty((n_progs if want_dw else 1, n_cols), dtype=torch.float32,
                              device=x2.device)  # fmt: skip
        block, warps = _launch_config(n_cols)
        _rms_norm_bwd[(n_progs,)](
            dy2, x2, weight, rstd, dx, dw_part,
            dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols,
            ROWS_PER_PROG=rows_per_prog, BLOCK=block, COMPUTE_DW=want_dw, num_warps=warps,
        )  # fmt: skip
        dw = dw_part.sum(0).to(weight.dtype) if want_dw else None
        return dx.view(ctx.x_shape), dw, None


if triton is not None:
    # Built-ins only (tl.reduce with our own combine, not the library's tl.sum): Triton's
    # interpreter cannot run library functions decorated before TRITON_INTERPRET was set.

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, x_stride, y_stride, n_cols, eps,
                      BLOCK: tl.constexpr):  # fmt: skip
        """One row per program: y = w * (x * rstd rounded to x's dtype), rstd saved."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.reduce(x * x, 0, _add) / n_cols + eps)
        tl.store(rstd_ptr + row, rstd)
        xhat = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # the reference's cast
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * y_stride + cols, (w * xhat).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr,
                      dy_stride, x_stride, dx_stride, n_rows, n_cols, ROWS_PER_PROG: tl.constexpr,
                      BLOCK: tl.constexpr, COMPUTE_DW: tl.constexpr):  # fmt: skip
        """A run of rows per program: dx per row, and this program's partial sum of dweight."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(ROWS_PER_PROG):
            row = pid.to(tl.int64) * ROWS_PER_PROG + i
            rmask = mask & (row < n_rows)  # the last program may run past the rows
            x = tl.load(x_ptr + row * x_stride + cols, mask=rmask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * dy_stride + cols, mask=rmask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row, mask=row < n_rows, other=0.0)
            xhat = x * rstd
            g = dy * w  # gradient w.r.t. the normalised row
            dx = rstd * (g - xhat * (tl.reduce(g * xhat, 0, _add) / n_cols))
            tl.store(dx_ptr + row * dx_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=rmask)
            if COMPUTE_DW:
                dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
        if COMPUTE_DW:
            tl.store(dw_ptr + pid * n_cols + cols, dw, mask=mask)
