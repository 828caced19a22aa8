"""Linear + cross entropy over chunks of tokens: the loss without ever holding all logits.

With a 128k vocabulary the logits of a few thousand tokens take gigabytes in float32, and
their gradient as much again. Checkpointed chunks (`losses.chunked_ce_sum`) bound that but
run the lm_head matmul a second time in backward. Here the forward pass does, one chunk of
tokens at a time: the chunk's logits (matmul in the compute dtype, upcast to float32), their
log-sum-exp and NLL, then turns the logits in place into softmax - onehot, the gradient of
the NLL w.r.t. the logits, and from it at once the gradient w.r.t. the chunk's hidden states
and (only when the weight is trained) adds its share of the weight's gradient to a float32
accumulator. The chunk's logits are then dropped. Backward just scales the saved gradients
by the incoming scalar: no head matmul is recomputed.

Memory: one chunk of float32 logits (`auto_chunk_size` keeps it near 256 MiB, 512 MiB when
the head is trained) plus its copy in the compute dtype; saved for backward: the hidden
gradient (N, C) in hidden's dtype and, if the weight requires grad, the weight gradient
(V, C) in float32. Nothing else (not hidden, not the weight) is kept.

The softmax-minus-onehot step has a Triton kernel (two passes over each row of the chunk,
in place) used on CUDA; elsewhere plain PyTorch in-place ops do the same.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch import Tensor, nn

from . import use_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path only
    triton = tl = None

IGNORE_INDEX = -100  # as in losses (not imported from there: losses imports this module)
LOGITS_BUDGET_BYTES = 256 * 2**20  # one chunk of float32 logits (frozen head)
# With a trained head every chunk also adds into the (V, C) float32 weight gradient:
# larger chunks amortise that (on an H200, V=128256, C=4096, bf16: 1024 tokens a chunk
# ran 15% faster than 512 for 0.4 GiB more).
TRAINED_HEAD_BUDGET_BYTES = 512 * 2**20


def auto_chunk_size(vocab: int, budget: int = LOGITS_BUDGET_BYTES) -> int:
    """Tokens per chunk so one chunk's float32 logits fit `budget` (multiple of 128 if > 128)."""
    n = max(1, budget // (4 * vocab))
    return n // 128 * 128 if n >= 128 else n  # 512 for V = 128256


def softmax_minus_onehot_ref(logits: Tensor, target: Tensor) -> Tensor:
    """In place: float32 logits (n, V) -> softmax - onehot(target). Returns the NLL (n,)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    picked = logits[rows, target]  # (n,) target logits, read before they are overwritten
    m = logits.amax(dim=1, keepdim=True)  # (n, 1)
    logits.sub_(m).exp_()
    s = logits.sum(dim=1, keepdim=True)  # (n, 1)
    logits.div_(s)
    logits[rows, target] -= 1.0
    return (m + s.log()).squeeze(1) - picked


def _softmax_minus_onehot_kernel(
    x_ptr,  # (n, V) float32 logits, overwritten with softmax - onehot
    target_ptr,  # (n,) integer targets in [0, V)
    nll_ptr,  # (n,) float32 out
    V: tl.constexpr,  # vocabulary size (one compile per model)
    stride,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride
    tgt = tl.load(target_ptr + row).to(tl.int32)
    offs = tl.arange(0, BLOCK)
    # Pass 1: running max and rescaled sum of exp (online log-sum-exp), and the target logit
    # (picked by comparison, so a bad target never reads out of bounds).
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    s = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    picked = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        picked += tl.sum(tl.where(cols == tgt, x, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(nll_ptr + row, lse - picked)
    # Pass 2: overwrite with softmax - onehot.
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0)
        p = tl.exp(x - lse)
        p = tl.where(cols == tgt, p - 1.0, p)
        tl.store(x_row + cols, p, mask=mask)


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU, not the current one (a no-op on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def _jitted() -> Any:
    """The kernel, jitted at first use (so TRITON_INTERPRET set by then is honoured)."""
    return triton.jit(_softmax_minus_onehot_kernel)


def softmax_minus_onehot_triton(logits: Tensor, target: Tensor, block: int = 4096) -> Tensor:
    """Triton version of `softmax_minus_onehot_ref`: same contract, one program per row."""
    n, v = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1
    nll = torch.empty(n, dtype=torch.float32, device=logits.device)  # (n,)
    if n == 0:
        return nll
    block = min(block, triton.next_power_of_2(v))
    num_warps = 8 if block >= 4096 else 4
    with _on(logits.device):
        kernel = _jitted()[(n,)]
        kernel(logits, target, nll, v, logits.stride(0), BLOCK=block, num_warps=num_warps)
    return nll


@functools.cache
def _addmm_to_float32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether addmm can add a `dtype` product into float32 in place (CUDA, torch >= 2.8)."""
    try:
        a = torch.ones(2, 2, device=device, dtype=dtype)
        acc = torch.ones(2, 2, device=device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool((acc == 3).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _add_outer(acc: Tensor, d: Tensor, h: Tensor) -> None:
    """acc (V, C) float32 += d^T @ h for d (n, V), h (n, C) in the compute dtype."""
    if d.dtype == torch.float32:
        acc.addmm_(d.T, h)  # in place, no (V, C) temporary
    elif acc.is_cuda and _addmm_to_float32(acc.device, d.dtype):
        torch.addmm(acc, d.T, h, out_dtype=torch.float32, out=acc)  # fp32 out, no temporary
    else:
        acc += d.T @ h  # (V, C) product in the compute dtype, summed in float32


def _scale(x: Tensor, grad: Tensor) -> Tensor:
    """x * grad computed in float32, returned in x's dtype."""
    return (x.float() * grad).to(x.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """NLL of hidden @ weight^T, summed or per token; gradients computed in forward.

    Summed, backward scales the saved gradients by the incoming scalar. Per token (N,),
    it scales each token's hidden gradient by that token's incoming gradient; the head's
    weight gradient would need those before they exist, so per-token NLL requires a
    frozen head.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,  # (N, C)
        weight: Tensor,  # (V, C)
        target: Tensor,  # (N,)
        chunk: int,
        dtype: torch.dtype,  # compute dtype of the matmuls
        need_h: bool,
        need_w: bool,
        triton_softmax: bool,
        per_token: bool,
    ) -> Tensor:
        n, c = hidden.shape
        dev = hidden.device
        step = softmax_minus_onehot_triton if triton_softmax else softmax_minus_onehot_ref
        with torch.autocast(dev.type, enabled=False):
            w = weight.to(dtype)  # (V, C), no copy when already in the compute dtype
            grad_h = torch.empty_like(hidden) if need_h else None  # (N, C)
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=dev) if need_w else None
            nll = torch.empty(n if per_token else 0, dtype=torch.float32, device=dev)
            total = torch.zeros((), dtype=torch.float32, device=dev)
            for start in range(0, n, chunk):
                h = hidden[start : start + chunk].to(dtype)  # (n, C)
                logits = (h @ w.T).float()  # (n, V) float32
                part = step(logits, target[start : start + chunk])  # logits := dL/dz
                if per_token:
                    nll[start : start + chunk] = part
                else:
                    total += part.sum()
                if not (need_h or need_w):
                    continue
                d = logits.to(dtype)  # (n, V); no copy in float32
                if grad_h is not None:
                    grad_h[start : start + chunk] = d @ w  # (n, C)
                if grad_w is not None:
                    _add_outer(grad_w, d, h)
        ctx.grads = (grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return nll if per_token else total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward can only run once per forward")
        grad_h, grad_w = ctx.grads
        ctx.grads = None  # free them as soon as they are handed over
        if grad.ndim == 1:
            grad = grad.unsqueeze(1)  # per token: (N, 1) scales each row of grad_h
        if grad_h is not None:  # scaled in float32: a bf16 copy of `grad` would bias it
            grad_h = grad_h.mul_(grad) if grad_h.dtype == grad.dtype else _scale(grad_h, grad)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    chunk_size: int | None = None,
    enabled: bool = True,
    per_token: bool = False,
) -> Tensor:
    """Summed NLL (float32 scalar) of `hidden @ weight^T` vs target, chunk by chunk.

    hidden (N, C), weight (V, C), target (N,) in [0, V): no ignore index, pass only the
    labelled positions. Matmuls run in hidden's dtype, or in autocast's when it is on;
    `enabled` lets CUDA tensors use the Triton softmax step. `per_token=True` returns the
    (N,) NLLs instead (a frozen weight only: see `_LinearCrossEntropy`).
    """
    dev = hidden.device.type
    autocast = torch.is_autocast_enabled(dev)
    dtype = torch.get_autocast_dtype(dev) if autocast else hidden.dtype
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    if per_token and need_w:
        raise ValueError("linear_cross_entropy(per_token=True) needs a frozen weight")
    budget = TRAINED_HEAD_BUDGET_BYTES if need_w else LOGITS_BUDGET_BYTES
    chunk = chunk_size or auto_chunk_size(weight.shape[0], budget)
    fast = triton is not None and use_kernel(enabled, hidden)
    args = (hidden, weight, target, chunk, dtype, need_h, need_w, fast, per_token)
    return _LinearCrossEntropy.apply(*args)


def fused_ce_sum(
    hidden: Tensor,
    head: nn.Module,
    labels: Tensor,
    chunk_size: int | None = None,
    enabled: bool = True,
) -> tuple[Tensor, Tensor]:
    """Like `losses.chunked_ce_sum` (shifted labels, -100 ignored) via `linear_cross_entropy`.

    hidden (B, T, C), head a bias-free linear (`.weight` (V, C)), labels (B, T).
    Returns (sum_nll scalar float32, n_tokens scalar long).
    """
    if getattr(head, "bias", None) is not None:
        raise ValueError("fused_ce_sum supports a bias-free head only")
    target = labels[:, 1:].flatten()  # (B*(T-1),)
    keep = target != IGNORE_INDEX
    h = hidden[:, :-1].flatten(0, 1)[keep]  # (N, C)
    loss = linear_cross_entropy(h, head.weight, target[keep], chunk_size, enabled)
    return loss, keep.sum()
