"""The fused bf16 AdamW kernel against the reference update (Triton's interpreter on CPU)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llamaforge.config import OptimConfig  # noqa: E402
from llamaforge.kernels import Kernels, adamw, interpreting, triton_available  # noqa: E402
from llamaforge.train.bf16_adamw import StochasticBF16AdamW  # noqa: E402
from llamaforge.train.optim import build_optimizer  # noqa: E402
from tests.helpers import random_model  # noqa: E402

if interpreting():
    importlib.reload(adamw)  # decorate the kernel again as an interpreted function

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
HP = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}


def fp32_update(w, g, m, v, step_size, root_bc2):
    """The update in fp32 before any rounding (the reference's math)."""
    b1, b2 = HP["betas"]
    w, g, m, v = (x.float() for x in (w, g, m, v))
    m = m.lerp(g, 1 - b1)
    v = v * b2 + (1 - b2) * g * g
    w = w * (1 - HP["lr"] * HP["weight_decay"]) - step_size * m / (v.sqrt() / root_bc2 + HP["eps"])
    return w, m, v


def neighbours(x):
    """The bf16 values just toward and just away from zero of fp32 x."""
    down = x.view(torch.int32) & -65536
    return down.view(torch.float32), (down + 65536).view(torch.float32)


def run_kernel(w, g, m, v, seed, step_size=0.02, root_bc2=0.3):
    w, m, v = w.clone(), m.clone(), v.clone()
    adamw.adamw_bf16_step_(w, g, m, v, **HP, step_size=step_size, root_bc2=root_bc2, seed=seed)
    return w, m, v


def test_each_output_is_a_bf16_neighbour_of_the_exact_update_and_seeds_matter():
    torch.manual_seed(0)
    n = 3 * adamw.BLOCK + 17  # a ragged last block
    w, g, m = (torch.randn(n, device=DEV).to(torch.bfloat16) for _ in range(3))
    v = torch.rand(n, device=DEV).to(torch.bfloat16)
    exact = fp32_update(w, g, m, v, 0.02, 0.3)
    out = run_kernel(w, g, m, v, seed=1)
    for got, want in zip(out, exact, strict=True):
        assert got.dtype == torch.bfloat16
        down, up = neighbours(want)
        got = got.float()
        assert ((got == down) | (got == up)).all()
    again, other = run_kernel(w, g, m, v, seed=1), run_kernel(w, g, m, v, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))
    assert not torch.equal(out[0], other[0])


def test_rounding_is_unbiased():
    n = 8 * adamw.BLOCK
    w = torch.full((n,), 1.0, device=DEV, dtype=torch.bfloat16)
    g = torch.ones(n, device=DEV, dtype=torch.bfloat16)
    m = torch.ones(n, device=DEV, dtype=torch.bfloat16)
    v = torch.ones(n, device=DEV, dtype=torch.bfloat16)
    # w * (1 - 1e-3) - 0.02 * m/denom with denom = 1/0.3 + eps: a fraction of an ulp below 1
    out_w = run_kernel(w, g, m, v, seed=3)[0].float()
    want = fp32_update(w[:1], g[:1], m[:1], v[:1], 0.02, 0.3)[0].item()
    assert abs(out_w.mean().item() - want) < 0.03 * 2**-8  # ulp just below 1.0 is 2^-8


def test_optimizer_uses_the_kernel_by_default_only_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(
        "llamaforge.train.bf16_adamw.adamw_bf16_step_", lambda *a, **k: calls.append(1)
    )
    model = random_model("tiny-llama3").to(torch.bfloat16)
    model.set_kernels(Kernels(adamw=False))  # opted out
    assert build_optimizer(model, OptimConfig()).fused is False
    model.set_kernels(Kernels())  # the default
    opt = build_optimizer(model, OptimConfig())
    assert isinstance(opt, StochasticBF16AdamW) and opt.fused
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert calls == []  # CPU parameters: the reference path


def test_fused_optimizer_steps_match_the_reference_within_rounding(monkeypatch):
    monkeypatch.setattr("llamaforge.train.bf16_adamw.use_kernel", lambda on, *t: on)
    monkeypatch.setattr("llamaforge.train.bf16_adamw.adamw_bf16_step_", adamw.adamw_bf16_step_)
    torch.manual_seed(1)
    w = torch.randn(40, 70, device=DEV).to(torch.bfloat16)
    grads = [torch.randn(40, 70, device=DEV).to(torch.bfloat16) for _ in range(3)]
    fused, ref = (torch.nn.Parameter(w.clone()) for _ in range(2))
    opts = [StochasticBF16AdamW([p], **HP, fused=f) for p, f in ((fused, True), (ref, False))]
    for g in grads:
        for p, opt in zip((fused, ref), opts, strict=True):
            p.grad = g.clone()
            opt.step()
    # Both round weights and moments stochastically, from independent random bits: each step
    # leaves them up to an ulp apart at the magnitudes the weight passes through (it moves by
    # up to lr a step), and the moments' rounding moves an update by up to 2^-8 of lr.
    # (Two reference runs with different seeds: at most 0.73 of this bound over 100 seeds.)
    lr, start = HP["lr"], w.float().abs()
    tol = 4 * (start + 3 * lr) * 2**-7 + 3 * lr * 2**-6
    got, want = fused.detach().float(), ref.detach().float()
    assert ((got - want).abs() <= tol).all()
    # and unbiased: truncation toward zero would shrink magnitudes by ~half an ulp (~3e-3)
    assert abs(float((got.abs() - want.abs()).mean())) < 6e-4  # two seeds: sd 1.1e-4
    assert float(opts[0].state[fused]["step"]) == 3.0
