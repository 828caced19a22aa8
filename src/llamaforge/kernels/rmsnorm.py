"""RMSNorm: a fused Triton kernel (forward and backward) beside its PyTorch reference, and
the residual add before a norm fused into it (`add_rms_norm`).

The kernel normalises one row per program in float32 and keeps only the per-row reciprocal
RMS (4 bytes a row) for the backward pass, which recomputes the normalised row from x.
`add_rms_norm(x, delta)` writes h = x + delta (rounded to x's dtype, as the plain add) and
normalises that row in the same pass; its backward adds the gradient reaching h through the
residual stream to the norm's input gradient in the same pass, and returns that one tensor
as the gradient of both x and delta. One read-add-write pass over the rows saved each way.
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


def add_rms_norm_ref(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, RMSNorm(h)) with h = x + delta: the residual add of a pre-norm block, then its norm."""
    h = x + delta
    return h, rms_norm_ref(h, weight, eps)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, enabled: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta)) for (..., C) inputs: one Triton pass on CUDA, else the
    reference."""
    fits = (
        weight.shape == x.shape[-1:]
        and x.shape == delta.shape
        and x.dtype == delta.dtype
        and 0 < x.numel()
        and x.shape[-1] <= MAX_HIDDEN
    )
    if use_kernel(enabled, x, delta, weight) and fits:
        return _add_rms_norm_triton(x, delta, weight, eps)
    return add_rms_norm_ref(x, delta, weight, eps)


def _add_rms_norm_triton(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of add_rms_norm (callable on CPU under TRITON_INTERPRET=1)."""
    return _AddRMSNormFn.apply(x, delta, weight, eps)


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


def _forward(
    x2: torch.Tensor, weight: torch.Tensor, eps: float, d2: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, rstd, h) for rows x2 (R, C): y = RMSNorm(h) with h = x2 (+ d2, then written)."""
    n_rows, n_cols = x2.shape
    out_dtype = torch.promote_types(x2.dtype, weight.dtype)  # as `weight * x` promotes
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2.device)  # (R, C)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)  # (R,)
    h = x2 if d2 is None else torch.empty_like(x2)  # (R, C)
    block, warps = _launch_config(n_cols)
    _rms_norm_fwd[(n_rows,)](
        x2, x2 if d2 is None else d2, h, weight, y, rstd,
        x2.stride(0), x2.stride(0) if d2 is None else d2.stride(0), h.stride(0), y.stride(0),
        n_cols, eps, ADD=d2 is not None, BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return y, rstd, h


def _backward(
    dy: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    want_dw: bool,
    dres: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx, dweight) of RMSNorm over rows x2 (R, C); dres, the gradient reaching x2 by
    another path (the residual stream), is added into dx in the same pass."""
    n_rows, n_cols = x2.shape
    dy2 = _rows(dy)  # (R, C)
    dres2 = dy2 if dres is None else _rows(dres)  # (R, C)
    dx = torch.empty_like(x2)  # (R, C), x's dtype
    if not want_dw:  # nothing to reduce across rows (a frozen weight): one row a program
        n_progs = n_rows
    elif x2.is_cuda:
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
        dy2, dres2, x2, weight, rstd, dx, dw_part,
        dy2.stride(0), dres2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols,
        ROWS_PER_PROG=rows_per_prog, BLOCK=block, COMPUTE_DW=want_dw, ADD_DRES=dres is not None,
        num_warps=warps,
    )  # fmt: skip
    return dx, dw_part.sum(0).to(weight.dtype) if want_dw else None


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2, weight = _rows(x), weight.contiguous()  # (R, C), (C,)
        y, rstd, _ = _forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape[:-1] + y.shape[-1:])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(dy, x2, weight, rstd, ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, None


class _AddRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
        x2, d2, weight = _rows(x), _rows(delta), weight.contiguous()  # (R, C) x2, (C,)
        y, rstd, h = _forward(x2, weight, eps, d2)
        ctx.save_for_backward(h, weight, rstd)
        ctx.x_shape = x.shape
        return h.view(x.shape), y.view(x.shape[:-1] + y.shape[-1:])

    @staticmethod
    def backward(ctx, dh: torch.Tensor, dy: torch.Tensor):
        h, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(dy, h, weight, rstd, ctx.needs_input_grad[2], dres=dh)
        dx = dx.view(ctx.x_shape)
        return dx, dx, dw, None


if triton is not None:
    # Built-ins only (tl.reduce with our own combine, not the library's tl.sum): Triton's
    # interpreter cannot run library functions decorated before TRITON_INTERPRET was set.

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _rms_norm_fwd(x_ptr, d_ptr, h_ptr, w_ptr, y_ptr, rstd_ptr, x_stride, d_stride,
                      h_stride, y_stride, n_cols, eps, ADD: tl.constexpr,
                      BLOCK: tl.constexpr):  # fmt: skip
        """One row per program: y = w * (x * rstd rounded to x's dtype), rstd saved; with
        ADD the row is first x + d, rounded to x's dtype and written to h."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if ADD:
            d = tl.load(d_ptr + row * d_stride + cols, mask=mask, other=0.0).to(tl.float32)
            hr = (x + d).to(h_ptr.dtype.element_ty)  # the plain add's rounding
            tl.store(h_ptr + row * h_stride + cols, hr, mask=mask)
            x = hr.to(tl.float32)
        rstd = tl.rsqrt(tl.reduce(x * x, 0, _add) / n_cols + eps)
        tl.store(rstd_ptr + row, rstd)
        xhat = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # the reference's cast
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * y_stride + cols, (w * xhat).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd(dy_ptr, dres_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr,
                      dy_stride, dres_stride, x_stride, dx_stride, n_rows, n_cols,
                      ROWS_PER_PROG: tl.constexpr, BLOCK: tl.constexpr,
                      COMPUTE_DW: tl.constexpr, ADD_DRES: tl.constexpr):  # fmt: skip
        """A run of rows per program: dx per row (plus dres with ADD_DRES), and this
        program's partial sum of dweight."""
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
            if ADD_DRES:
                dres = tl.load(dres_ptr + row * dres_stride + cols, mask=rmask, other=0.0)
                dx += dres.to(tl.float32)
            tl.store(dx_ptr + row * dx_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=rmask)
            if COMPUTE_DW:
                dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
        if COMPUTE_DW:
            tl.store(dw_ptr + pid * n_cols + cols, dw, mask=mask)
