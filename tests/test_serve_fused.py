"""q/k/v and gate/up as one matmul each in engine forwards (serve/fused_proj.py)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from llamaforge.adapters import add_adapter, lora_modules
from llamaforge.io.peft import save_peft_adapter
from llamaforge.model.generate import SamplingParams
from llamaforge.serve import Engine, Request, fused_proj
from llamaforge.serve import graphs as graphs_mod
from tests.helpers import random_model
from tests.test_serve_engine import ADAPTERS, prompts, solo_reference, with_adapters
from tests.test_serve_graphs import force_one_row_gemv


def counting(monkeypatch) -> list[str]:
    """Record which way each fused group ran: 'fused' (one matmul) or 'split' (layer by layer)."""
    seen: list[str] = []
    real = fused_proj.FusedGroup._mode

    def mode(self, x, layers):
        got = real(self, x, layers)
        if self.selection.running:
            seen.append("split" if got is False else "fused")
        return got

    monkeypatch.setattr(fused_proj.FusedGroup, "_mode", mode)
    return seen


@pytest.mark.parametrize("graphs", ["off", "static"])
def test_fused_engine_equals_solo_generate_over_adapters(monkeypatch, graphs):
    """16 rows over 4 adapters (one with q/v only, one on down_proj only) and the base,
    joining while others run: every greedy output equals generate's with that adapter
    switched on, and the groups ran fused."""
    monkeypatch.setattr(graphs_mod, "WIDTH_STEP", 8)
    seen = counting(monkeypatch)
    model = with_adapters()
    ps = prompts(16, seed=21, lo=2, hi=40)
    names = [(None, *ADAPTERS)[i % 5] for i in range(16)]
    params = SamplingParams(max_new_tokens=10)
    ref = [solo_reference(model, p, params, n) for p, n in zip(ps, names, strict=True)]
    engine = Engine(model, max_batch=6, max_len=64, prefill_chunk=9, graphs=graphs,
                    fuse_projections=True)  # fmt: skip
    assert engine.fused_groups == 2 * model.cfg.n_layers
    reqs = []
    for p, n in zip(ps, names, strict=True):
        reqs.append(engine.submit(Request(p, params, n)))
        engine.step()
    engine.wait(reqs)
    assert [r.output for r in reqs] == ref
    assert seen and set(seen) == {"fused"}


def test_fused_weights_are_views_and_the_model_is_unchanged_outside_the_engine():
    model = with_adapters()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([prompts(1, seed=3)[0]])
    with torch.no_grad():
        logits = model(ids)
    Engine(model, max_len=32, fuse_projections=True)
    attn = model.layers[0].self_attn
    stacked = attn.fused_qkv.weight
    assert attn.q_proj.weight.data_ptr() == stacked.data_ptr()
    assert attn.k_proj.weight.data_ptr() == stacked[attn.q_proj.weight.shape[0] :].data_ptr()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():  # not in an engine forward: each layer on its own, same result
        torch.testing.assert_close(model(ids), logits, rtol=0, atol=0)


def test_partial_groups_fall_back_to_layer_by_layer(monkeypatch):
    """An adapter on q and v only: q/k/v is not one shared shrink, so it runs layer by layer
    (right, if not faster); gate/up carry no adapter and run fused on the base."""
    seen = counting(monkeypatch)
    model = random_model("tiny-llama3")
    add_adapter(model, "qv", r=4, alpha=8, targets=("q_proj", "v_proj"))
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B["qv"].normal_(0, 0.3)
    ps = prompts(4, seed=5)
    names = ["qv", None, "qv", None]
    params = SamplingParams(max_new_tokens=6)
    ref = [solo_reference(model, p, params, n) for p, n in zip(ps, names, strict=True)]
    engine = Engine(model, max_batch=4, max_len=64, fuse_projections=True)
    assert engine.generate(ps, params, names) == ref
    assert "split" in seen and "fused" in seen


def test_adapters_loaded_after_fusing(tmp_path):
    """The serve CLI fuses a bare base, then loads adapters (plain layers become LoRA layers):
    the groups follow the swapped modules."""
    src = with_adapters(names=("a", "b", "c"))
    for n in ("b", "c"):
        save_peft_adapter(src, tmp_path / n, adapter_name=n)
    model = random_model("tiny-llama3")  # the same base weights
    engine = Engine(model, max_batch=4, max_len=64, max_loras=2, fuse_projections=True)
    engine.load_adapter("b", tmp_path / "b")
    engine.load_adapter("c", tmp_path / "c")
    ps = prompts(3, seed=9)
    names = ["b", "c", None]
    params = SamplingParams(max_new_tokens=8)
    want = [solo_reference(src, p, params, n) for p, n in zip(ps, names, strict=True)]
    assert engine.generate(ps, params, names) == want


def test_one_row_fused_group_gemv_equals_the_plain_path(monkeypatch):
    """One-row buckets through the grouped GEMV (Triton's interpreter here), 4 adapters and
    the base: same tokens as generate, the grouped kernel computed q/k/v and gate/up, and
    the down projection read [gate | up] with the SwiGLU folded in."""
    pytest.importorskip("triton")
    from llamaforge.kernels import gemv
    from llamaforge.serve import lora_stack

    if not torch.cuda.is_available():
        monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "1")
        importlib.reload(gemv)
    real = gemv.gemv_lora_triton
    grouped: list[int] = []

    def spy(x, w, h=None, bt=None, mask=None, bounds=(), glu=False, residual=None, **kw):
        if bounds:
            grouped.append(len(bounds) + 1)
        if glu or residual is not None:  # the down projection: the SwiGLU in its input
            grouped.append("glu" if glu else "residual")  # loads or stored by its shrink
        return real(x, w, h, bt, mask, bounds, glu, residual, **kw)

    monkeypatch.setattr(fused_proj, "gemv_lora_triton", spy)
    monkeypatch.setattr(lora_stack, "gemv_lora_triton", spy)
    force_one_row_gemv(monkeypatch)
    model = with_adapters().to("cuda" if torch.cuda.is_available() else "cpu")
    ps = prompts(3, seed=8, lo=2, hi=20)
    names = [None, *ADAPTERS[:2]]
    params = SamplingParams(max_new_tokens=4)
    want = [solo_reference(model, p, params, n) for p, n in zip(ps, names, strict=True)]
    engine = Engine(model, max_batch=1, max_len=40, graphs="static", fuse_projections=True)
    got = [engine.generate([p], params, [n])[0] for p, n in zip(ps, names, strict=True)]
    assert got == want
    assert 3 in grouped and 2 in grouped and {"glu", "residual"} <= set(grouped)


def test_whole_block_one_row_step_equals_the_plain_path(monkeypatch):
    """One-row buckets with the Triton attention: each block is the fused-group GEMVs with
    its norms folded in, attention with RoPE inside, o_proj and down with the residual in
    their epilogue, each reading only the row's own adapter slot (serve/fused_proj.py
    one_row_block; Triton's interpreter here); the same tokens as generate over 2 adapters
    and the base, and the folded path did run."""
    pytest.importorskip("triton")
    from llamaforge.kernels import gemv
    from llamaforge.serve import lora_stack
    from tests.test_serve_graphs import decode_attention_kernel

    if not torch.cuda.is_available():
        monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "1")
        importlib.reload(gemv)
    kernel = decode_attention_kernel(monkeypatch)
    monkeypatch.setattr(graphs_mod, "decode_attention_triton", kernel)
    monkeypatch.setattr(graphs_mod, "default_attention", lambda rows: graphs_mod.TRITON_ATTENTION)
    real = gemv.gemv_lora_triton
    seen: list[str] = []

    def spy(*args, norm=None, residual=None, **kw):
        seen.append("norm" if norm is not None else "residual" if residual is not None else "-")
        if kw.get("bt_start") is not None:
            seen.append("slot")  # only the row's own adapter slot read (chosen on the device)
        return real(*args, norm=norm, residual=residual, **kw)

    monkeypatch.setattr(fused_proj, "gemv_lora_triton", spy)
    monkeypatch.setattr(lora_stack, "gemv_lora_triton", spy)
    force_one_row_gemv(monkeypatch)
    model = with_adapters().to("cuda" if torch.cuda.is_available() else "cpu")
    ps = prompts(3, seed=13, lo=2, hi=20)
    names = [None, *ADAPTERS[1:3]]
    params = SamplingParams(max_new_tokens=5)
    want = [solo_reference(model, p, params, n) for p, n in zip(ps, names, strict=True)]
    engine = Engine(model, max_batch=1, max_len=40, graphs="static", fuse_projections=True)
    got = [engine.generate([p], params, [n])[0] for p, n in zip(ps, names, strict=True)]
    assert got == want
    layers = model.cfg.n_layers
    assert seen.count("norm") >= 2 * layers * 4 and seen.count("residual") >= 2 * layers * 4
    assert seen.count("slot") >= 2 * layers * 4  # the two adapter requests' decode steps
