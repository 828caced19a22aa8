"""The fused LoRA layer (adapters/fused.py): values and hand-derived gradients against the
unfused layer under autograd, alone and through a whole model's training step."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from llamaforge.adapters import lora as lora_mod
from llamaforge.adapters.fused import fused_lora_linear
from llamaforge.adapters.inject import apply_lora
from llamaforge.adapters.lora import LoRALinear
from llamaforge.kernels import Kernels
from tests.helpers import random_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def layer(
    n_in=48,
    n_out=40,
    r=8,
    alpha=16,
    bias=False,
    dropout=0.0,
    nf4=False,
    dtype=torch.float32,
    seed=0,
):
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=bias, device=DEV, dtype=dtype)
    m = LoRALinear(base)
    m.add_adapter("a", r, alpha, dropout=dropout, dtype=torch.float32)
    with torch.no_grad():
        m.lora_B["a"].normal_(0, 0.2)  # a trained adapter, not the zero init
    if nf4:
        m.quantize_(blocksize=16, compute_dtype=dtype)
    return m


def grads(m: LoRALinear, x: torch.Tensor, g: torch.Tensor, fused: bool):
    """Output and gradients of x, A, B for one forward/backward of the layer."""
    m = copy.deepcopy(m)
    m.kernels = Kernels(lora=fused)
    x = x.detach().clone().requires_grad_(True)
    if fused:
        dtype = torch.get_autocast_dtype(DEV) if torch.is_autocast_enabled(DEV) else x.dtype
        y = m._fused_forward(x, dtype)
    else:
        y = m(x)
    y.backward(g)
    return y.detach(), x.grad, m.lora_A["a"].grad, m.lora_B["a"].grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("alpha", [8, 16])  # scaling 1 (no scale pass) and 2
@pytest.mark.parametrize("nf4", [False, True])
def test_fused_layer_equals_the_unfused_one_fp32(bias, alpha, nf4):
    m = layer(bias=bias, alpha=alpha, nf4=nf4)
    x = torch.randn(3, 5, 48, device=DEV)
    g = torch.randn(3, 5, 40, device=DEV)
    want = grads(m, x, g, fused=False)
    got = grads(m, x, g, fused=True)
    for w, h, what in zip(want, got, ("y", "dx", "dA", "dB"), strict=True):
        assert h.dtype == w.dtype, what
        torch.testing.assert_close(h, w, atol=1e-5, rtol=1e-5, msg=what)


def test_fused_layer_with_dropout_routes_the_adapter_gradient_through_the_mask():
    m = layer(dropout=0.3).train()
    x = torch.randn(4, 48, device=DEV)
    g = torch.randn(4, 40, device=DEV)
    torch.manual_seed(7)
    want = grads(m, x, g, fused=False)
    torch.manual_seed(7)  # the same dropout mask
    got = grads(m, x, g, fused=True)
    for w, h in zip(want, got, strict=True):
        torch.testing.assert_close(h, w, atol=1e-5, rtol=1e-5)


def test_fused_layer_under_bf16_autocast_matches_within_one_rounding():
    """bf16 base, fp32 adapters, autocast on (as LoRA training runs): gradients come back
    in the adapters' fp32, the output in bf16."""
    m = layer(n_in=256, n_out=192, r=16, dtype=torch.bfloat16)
    x = torch.randn(64, 256, device=DEV).bfloat16()
    g = torch.randn(64, 192, device=DEV).bfloat16()
    with torch.autocast(DEV, dtype=torch.bfloat16):
        want = grads(m, x, g, fused=False)
        got = grads(m, x, g, fused=True)
    assert [t.dtype for t in got] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    for w, h, what in zip(want, got, ("y", "dx", "dA", "dB"), strict=True):
        scale = w.float().abs().max().item()
        torch.testing.assert_close(h.float(), w.float(), atol=2e-2 * scale, rtol=2e-2, msg=what)


def test_fused_function_needs_no_gradient_it_is_not_asked_for():
    w = torch.randn(40, 48, device=DEV)
    a = torch.randn(8, 48, device=DEV, requires_grad=True)
    b = torch.randn(40, 8, device=DEV)
    x = torch.randn(6, 48, device=DEV)  # neither x nor B requires a gradient
    fused_lora_linear(x, w, None, a, b, 2.0, torch.float32).sum().backward()
    want = (torch.ones(6, 40, device=DEV) @ b * 2.0).t() @ x
    torch.testing.assert_close(a.grad, want)


def test_layer_takes_the_fused_path_only_where_it_applies(monkeypatch):
    m = layer()
    x = torch.randn(2, 48, device=DEV)
    assert m.kernels.lora  # on by default
    assert m._fused_dtype(x) == (torch.float32 if DEV == "cuda" else None)  # CPU: reference
    monkeypatch.setattr(lora_mod, "fusable_device", lambda x: True)
    assert m._fused_dtype(x) == torch.float32
    m.kernels = Kernels(lora=False)
    assert m._fused_dtype(x) is None
    m.kernels = Kernels(lora=True)
    m.disabled = True
    assert m._fused_dtype(x) is None
    m.disabled = False
    m.active = None
    assert m._fused_dtype(x) is None
    m.active = "a"
    m.set_rows(["a", None])
    assert m._fused_dtype(x) is None
    m.clear_rows()
    assert m._fused_dtype(x.double()) is None  # dtypes only the unfused casts reconcile


def test_model_training_step_is_the_same_through_the_fused_layers(monkeypatch):
    """A tiny model's loss and every LoRA gradient, fused path forced on the CPU vs off."""
    model = random_model("tiny-llama3").to(DEV)
    apply_lora(model, r=4, alpha=8, lora_dtype=torch.float32)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.1)
    model.train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12), device=DEV)
    monkeypatch.setattr(lora_mod, "fusable_device", lambda x: True)

    def step(kernels):
        m = copy.deepcopy(model)
        m.set_kernels(kernels)
        logits = m(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    calls = []
    real = lora_mod.fused_lora_linear
    monkeypatch.setattr(lora_mod, "fused_lora_linear", lambda *a: calls.append(1) or real(*a))
    loss_f, grads_f = step(dataclasses.replace(Kernels.none(), lora=True))
    assert calls, "the fused layer did not run"
    n_calls = len(calls)
    loss_u, grads_u = step(Kernels.none())
    assert len(calls) == n_calls  # off: never called
    torch.testing.assert_close(loss_f, loss_u, atol=1e-5, rtol=1e-5)
    assert grads_f.keys() == grads_u.keys() and grads_f
    for n in grads_u:
        torch.testing.assert_close(grads_f[n], grads_u[n], atol=1e-5, rtol=1e-4, msg=n)


# ---- several layers over one input (q/k/v, gate/up) as one node ----


def group(outs=(40, 24, 24), nf4=False, dtype=torch.float32, alpha=16, **kw):
    return [
        layer(n_out=o, nf4=nf4, dtype=dtype, alpha=alpha, seed=i, **kw) for i, o in enumerate(outs)
    ]


def group_grads(layers, x, gs, fused: bool, monkeypatch):
    """Outputs and the gradients of x and every A and B, grouped (fused) or layer by layer."""
    layers = copy.deepcopy(layers)
    for m in layers:
        m.kernels = Kernels(lora=fused)
    monkeypatch.setattr(lora_mod, "fusable_device", lambda x: True)
    x = x.detach().clone().requires_grad_(True)
    if fused:
        ys = LoRALinear.group_forward(x, layers)
        assert ys is not None, "the group did not take the fused path"
    else:
        ys = [m(x) for m in layers]
    torch.autograd.backward([y for y, g in zip(ys, gs, strict=True) if g is not None],
                            [g for g in gs if g is not None])  # fmt: skip
    ab = [t.grad for m in layers for t in (m.lora_A["a"], m.lora_B["a"])]
    return [y.detach() for y in ys], [x.grad, *ab]


@pytest.mark.parametrize("alpha", [8, 16])
@pytest.mark.parametrize("nf4", [False, True])
def test_fused_group_equals_the_layers_one_by_one_fp32(alpha, nf4, monkeypatch):
    layers = group(nf4=nf4, alpha=alpha)
    x = torch.randn(3, 5, 48, device=DEV)
    gs = [torch.randn(3, 5, m.out_features, device=DEV) for m in layers]
    want_y, want_g = group_grads(layers, x, gs, False, monkeypatch)
    got_y, got_g = group_grads(layers, x, gs, True, monkeypatch)
    for w, h in zip(want_y + want_g, got_y + got_g, strict=True):
        assert h.dtype == w.dtype and h.shape == w.shape
        torch.testing.assert_close(h, w, atol=1e-5, rtol=1e-5)


def test_fused_group_with_an_output_outside_the_loss(monkeypatch):
    layers = group()
    x = torch.randn(6, 48, device=DEV)
    gs = [torch.randn(6, 40, device=DEV), None, torch.randn(6, 24, device=DEV)]
    want_y, want_g = group_grads(layers, x, gs, False, monkeypatch)
    got_y, got_g = group_grads(layers, x, gs, True, monkeypatch)
    assert want_g[3] is None and want_g[4] is None  # the second layer's A, B: no gradient
    torch.testing.assert_close(got_g[3], torch.zeros_like(got_g[3]))  # fused: zeros
    for i, (w, h) in enumerate(zip(want_y + want_g, got_y + got_g, strict=True)):
        if w is not None:
            torch.testing.assert_close(h, w, atol=1e-5, rtol=1e-5, msg=str(i))


def test_fused_group_under_bf16_autocast_matches_within_one_rounding(monkeypatch):
    layers = group(outs=(192, 64, 64), dtype=torch.bfloat16, n_in=256, r=16)
    x = torch.randn(64, 256, device=DEV).bfloat16()
    gs = [torch.randn(64, m.out_features, device=DEV).bfloat16() for m in layers]
    with torch.autocast(DEV, dtype=torch.bfloat16):
        want_y, want_g = group_grads(layers, x, gs, False, monkeypatch)
        got_y, got_g = group_grads(layers, x, gs, True, monkeypatch)
    assert [t.dtype for t in got_g] == [torch.bfloat16] + [torch.float32] * 6
    for w, h in zip(want_y + want_g, got_y + got_g, strict=True):
        scale = w.float().abs().max().item()
        torch.testing.assert_close(h.float(), w.float(), atol=2e-2 * scale, rtol=2e-2)


def test_group_runs_layer_by_layer_where_fusing_would_change_the_math(monkeypatch):
    monkeypatch.setattr(lora_mod, "fusable_device", lambda x: True)
    x = torch.randn(4, 48, device=DEV)

    def fused(layers):
        for m in layers:
            m.kernels = Kernels(lora=True)
        return LoRALinear.group_forward(x, layers) is not None

    assert fused(group())
    assert not fused(group()[:1])  # one layer: nothing to group
    assert not fused(group(dropout=0.1))  # own dropout masks (in training)
    assert fused([m.eval() for m in group(dropout=0.1)])  # eval: no dropout
    assert not fused(group(bias=True))
    mixed = group()
    mixed[1].scaling["a"] = 3.0
    assert not fused(mixed)
    plain = group()
    plain[2].kernels = Kernels(lora=False)
    assert LoRALinear.group_forward(x, plain) is None  # one layer off: all on their own
    assert not fused(group()[:1] + group(nf4=True)[1:])  # plain and NF4 bases


def test_model_groups_qkv_and_gate_up(monkeypatch):
    """Through a model: q/k/v and gate/up run grouped, the loss and gradients as before."""
    model = random_model("tiny-llama3").to(DEV)
    apply_lora(model, r=4, alpha=8, lora_dtype=torch.float32)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12), device=DEV)
    monkeypatch.setattr(lora_mod, "fusable_device", lambda x: True)
    sizes = []
    real = lora_mod.fused_lora_group
    monkeypatch.setattr(
        lora_mod, "fused_lora_group", lambda x, w, *a: sizes.append(len(w)) or real(x, w, *a)
    )
    m = copy.deepcopy(model)
    m.set_kernels(dataclasses.replace(Kernels.none(), lora=True))
    m(ids)
    assert sorted(set(sizes)) == [2, 3] and len(sizes) == 2 * model.cfg.n_layers


def test_fused_group_over_an_input_without_gradient(monkeypatch):
    """The first block's input (frozen embeddings): no dx is computed, A and B train alike."""
    monkeypatch.setattr(lora_mod, "fusable_device", lambda x: True)
    layers = group()
    x = torch.randn(5, 48, device=DEV)  # requires no gradient
    grads_of = []
    for fused in (False, True):
        ms = copy.deepcopy(layers)
        for m in ms:
            m.kernels = Kernels(lora=fused)
        ys = LoRALinear.group_forward(x, ms) if fused else [m(x) for m in ms]
        sum(y.square().sum() for y in ys).backward()
        grads_of.append([t.grad for m in ms for t in (m.lora_A["a"], m.lora_B["a"])])
    for w, g in zip(*grads_of, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
