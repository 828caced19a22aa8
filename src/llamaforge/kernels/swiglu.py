"""SwiGLU activation silu(gate) * up: elementwise Triton kernels beside the PyTorch reference.

The backward kernel recomputes silu from (gate, up), so only the two inputs are saved.
"""

import torch
import torch.nn.functional as F

from . import use_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: only the reference runs (use_kernel says no)
    triton = None

BLOCK = 1024  # elements per program
NUM_WARPS = 4


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch silu(gate) * up, as the model's MLP computes it."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """silu(gate) * up for same-shape tensors: the Triton kernel on CUDA, else the reference."""
    same = gate.shape == up.shape and gate.dtype == up.dtype
    if use_kernel(enabled, gate, up) and same and gate.numel() > 0:
        return _swiglu_triton(gate, up)
    return swiglu_ref(gate, up)


def _swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The Triton path (callable on CPU tensors under TRITON_INTERPRET=1, for tests)."""
    return _SwiGLUFn.apply(gate, up)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()  # (N,) once flattened
        out = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_fwd[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
        ctx.save_for_backward(gate, up)  # not the product: backward recomputes silu
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_bwd[(triton.cdiv(n, BLOCK),)](
            gate, up, dout, dgate, dup, n, BLOCK=BLOCK, num_warps=NUM_WARPS
        )
        return dgate, dup


if triton is not None:
    # Built-ins only (tl.exp, not the library's tl.sigmoid): Triton's interpreter cannot run
    # library functions decorated before TRITON_INTERPRET was set (tests import order).

    @triton.jit
    def _swiglu_fwd(g_ptr, u_ptr, o_ptr, n, BLOCK: tl.constexpr):
        """out = silu(g) * u over one block of the flattened tensors."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = g / (1.0 + tl.exp(-g)) * u
        tl.store(o_ptr + offs, out.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(g_ptr, u_ptr, do_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
        """dg = do * u * silu'(g), du = do * silu(g), with silu' = s (1 + g (1 - s))."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-g))
        tl.store(du_ptr + offs, (do * g * s).to(du_ptr.dtype.element_ty), mask=mask)
        dg = do * u * s * (1.0 + g * (1.0 - s))
        tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
