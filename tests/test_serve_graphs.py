"""The decode step through bucketed static buffers (and CUDA graphs of them on a GPU)."""

from __future__ import annotations

import pytest
import torch

from llamaforge.model.generate import SamplingParams
from llamaforge.serve import Engine, Request
from llamaforge.serve import graphs as graphs_mod
from llamaforge.serve.graphs import row_bucket
from tests.test_serve_engine import ADAPTERS, prompts, solo_reference, with_adapters

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernel runs where it can


def test_row_buckets():
    assert [row_bucket(n, 64) for n in (1, 3, 5, 13, 33, 64)] == [1, 4, 8, 16, 48, 64]
    assert row_bucket(5, 6) == 6 and row_bucket(70, 70) == 70  # capped by the engine's rows


VARIANTS = [None, *graphs_mod.ATTENTION, graphs_mod.TRITON_ATTENTION]  # None: the rule


@pytest.mark.parametrize("attention", VARIANTS)
def test_static_decode_equals_plain_path_over_adapters_and_widths(monkeypatch, attention):
    """Rows of many lengths (several width buckets), 4 adapters and the base, staggered;
    every bucket through the rule's attention or through one variant (the Triton kernel of
    kernels/decode_attention.py under Triton's interpreter here)."""
    monkeypatch.setattr(graphs_mod, "WIDTH_STEP", 8)
    if attention is not None:
        monkeypatch.setattr(graphs_mod, "default_attention", lambda rows: attention)
    calls = []
    if attention == graphs_mod.TRITON_ATTENTION:
        kernel = decode_attention_kernel(monkeypatch)
        spy = lambda *a: calls.append(1) or kernel(*a)  # noqa: E731
        monkeypatch.setattr(graphs_mod, "decode_attention_triton", spy)
    model = with_adapters()
    if attention == graphs_mod.TRITON_ATTENTION and torch.cuda.is_available():
        model = model.cuda()  # the kernel runs on the device (fp32 dots there too)
    ps = prompts(11, seed=4, lo=2, hi=45)
    names = [(None, *ADAPTERS)[i % 5] for i in range(11)]
    params = SamplingParams(max_new_tokens=14)
    ref = [solo_reference(model, p, params, n) for p, n in zip(ps, names, strict=True)]
    engine = Engine(model, max_batch=6, max_len=80, prefill_chunk=9, graphs="static")
    reqs = []
    for p, n in zip(ps, names, strict=True):  # join while others decode or still prefill
        reqs.append(engine.submit(Request(p, params, n)))
        engine.step()
    engine.wait(reqs)
    assert [r.output for r in reqs] == ref
    widths = {key[1] for key in engine.runner._entries}
    rows = {key[0] for key in engine.runner._entries}
    assert len(widths) > 3 and len(rows) > 2 and engine.runner.captured == 0
    assert bool(calls) == (attention == graphs_mod.TRITON_ATTENTION)


def decode_attention_kernel(monkeypatch):
    """kernels/decode_attention.py's kernel, interpreted where there is no GPU."""
    pytest.importorskip("triton")
    import importlib
    import os

    from llamaforge.kernels import decode_attention

    if not torch.cuda.is_available():
        monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "1")
        importlib.reload(decode_attention)
    return decode_attention.decode_attention_triton


def test_one_row_fused_gemv_equals_the_plain_path(monkeypatch):
    """One-row buckets through kernels/gemv.py (Triton's interpreter here), over 4 adapters
    and the base; captured buckets choose it by timing on a GPU, here it is forced on."""
    pytest.importorskip("triton")
    import importlib
    import os

    from llamaforge.kernels import gemv
    from llamaforge.serve import lora_stack

    if not torch.cuda.is_available():
        monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "1")
        importlib.reload(gemv)  # interpreted kernels (lora_stack's reference follows)
    calls = []
    real = lora_stack.gemv_lora_triton
    monkeypatch.setattr(
        lora_stack, "gemv_lora_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    force_one_row_gemv(monkeypatch)
    model = with_adapters().to("cuda" if torch.cuda.is_available() else "cpu")
    ps = prompts(3, seed=8, lo=2, hi=20)
    names = [None, *ADAPTERS[:2]]
    params = SamplingParams(max_new_tokens=4)
    engine = Engine(model, max_batch=1, max_len=40, graphs="static")
    got = [engine.generate([p], params, [n])[0] for p, n in zip(ps, names, strict=True)]
    assert got == [solo_reference(model, p, params, n) for p, n in zip(ps, names, strict=True)]
    assert len(calls) >= 3 * 3 * 7  # every projection of every decode step


def force_one_row_gemv(monkeypatch) -> None:
    """One-row buckets run the fused GEMV (a captured bucket would choose it by timing)."""
    init = graphs_mod.StaticDecode.__init__

    def one_row_gemv(self, pool, rows, *args):
        init(self, pool, rows, *args)
        self.gemv = rows == 1

    monkeypatch.setattr(graphs_mod.StaticDecode, "__init__", one_row_gemv)


def test_static_decode_base_only_rows_and_scratch_slot_untouched():
    model = with_adapters()
    engine = Engine(model, max_batch=3, max_len=48, graphs="static")
    ps = prompts(3, seed=5)
    params = SamplingParams(max_new_tokens=6)
    plain = Engine(model, max_batch=3, max_len=48, graphs="off")
    assert engine.generate(ps, params) == plain.generate(ps, params)
    assert engine.pool.slots == 4  # rows + the scratch slot


def test_graph_mode_is_checked():
    model = with_adapters()
    with pytest.raises(ValueError, match="graphs="):
        Engine(model, graphs="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            Engine(model, graphs="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replays_equal_eager_static_runs(dtype, monkeypatch):
    # the same kernels in both: captured buckets take the eager rule's attention here
    rule = lambda static, *a, **k: (graphs_mod.default_attention(static.rows), {})  # noqa: E731
    monkeypatch.setattr(graphs_mod, "fastest_attention", rule)
    model = with_adapters().to("cuda", dtype)
    ps = prompts(9, seed=6, hi=60)
    names = [(None, *ADAPTERS)[i % 5] for i in range(9)]
    params = SamplingParams(max_new_tokens=20)
    out = {}
    for mode in ("static", "cuda", "off"):
        engine = Engine(model, max_batch=8, max_len=96, prefill_chunk=16, graphs=mode)
        out[mode] = engine.generate(ps, params, names)
        if mode == "cuda":
            assert engine.runner.captured > 0
    assert out["cuda"] == out["static"]  # the same kernels, replayed
    if dtype == torch.float32:
        assert out["cuda"] == out["off"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_buckets_time_every_attention_and_keep_the_plain_results():
    model = with_adapters().to("cuda")
    ps = prompts(9, seed=7, hi=60)
    names = [(None, *ADAPTERS)[i % 5] for i in range(9)]
    params = SamplingParams(max_new_tokens=16)
    engine = Engine(model, max_batch=8, max_len=96, prefill_chunk=16, graphs="cuda")
    got = engine.generate(ps, params, names)
    chosen = engine.runner.attention
    variants = (*graphs_mod.ATTENTION, graphs_mod.TRITON_ATTENTION)  # Triton is on every CUDA
    assert chosen and all(
        name in variants and set(times) == set(variants) for name, times in chosen.values()
    )
    plain = Engine(model, max_batch=8, max_len=96, prefill_chunk=16, graphs="off")
    assert got == plain.generate(ps, params, names)  # fp32: whichever variant, same tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_row_bucket_times_the_fused_gemv_unless_switched_off():
    from llamaforge.kernels import Kernels

    model = with_adapters().to("cuda")
    ps, params = prompts(1, seed=9, hi=30), SamplingParams(max_new_tokens=8)
    engine = Engine(model, max_batch=4, max_len=64, graphs="cuda")
    got = engine.generate(ps, params, ["a"])
    assert engine.runner.gemv and all(
        set(t) == {"cublas", "fused"} for t in engine.runner.gemv.values()
    )
    plain = Engine(model, max_batch=4, max_len=64, graphs="off")
    assert got == plain.generate(ps, params, ["a"])
    model.set_kernels(Kernels(gemv=False))
    off = Engine(model, max_batch=4, max_len=64, graphs="cuda")
    assert off.generate(ps, params, ["a"]) == got and not off.runner.gemv


def test_decoding_one_step_ahead_gives_the_same_tokens(monkeypatch):
    """Greedy rows over adapters, with different lengths, a stop token and late joins: the
    next step starts before the host reads this one's tokens (the static path here, the
    Triton attention interpreted); every request equals its solo result, steps run ahead
    were used, and the ones made stale (a row finishing, a join, a sampled row) were not."""
    kernel = decode_attention_kernel(monkeypatch)
    monkeypatch.setattr(graphs_mod, "decode_attention_triton", kernel)
    monkeypatch.setattr(graphs_mod, "default_attention", lambda rows: graphs_mod.TRITON_ATTENTION)
    model = with_adapters().to(DEV)
    ps = prompts(5, seed=12, lo=2, hi=30)
    names = [None, *ADAPTERS[:3], None]
    lengths = [12, 5, 16, 9, 14]
    ref_params = [SamplingParams(max_new_tokens=k) for k in lengths]
    ref = [solo_reference(model, p, q, n) for p, q, n in zip(ps, ref_params, names, strict=True)]
    stop = ref[2][7]  # row 2 stops at its 8th token (a stop token ends it there)
    ref[2] = ref[2][: ref[2].index(stop)]
    ref_params[2] = SamplingParams(max_new_tokens=16, stop_ids=(stop,))
    engine = Engine(model, max_batch=4, max_len=64, prefill_chunk=32, graphs="static")
    engine.runner.run_ahead = True
    reqs = [
        engine.submit(Request(p, q, n))
        for p, q, n in zip(ps[:3], ref_params[:3], names[:3], strict=True)
    ]
    for _ in range(6):
        engine.step()
    reqs += [
        engine.submit(Request(p, q, n))
        for p, q, n in zip(ps[3:], ref_params[3:], names[3:], strict=True)
    ]
    engine.wait(reqs)
    assert [r.output for r in reqs] == ref
    assert engine.runner.ahead_used > 10
    # row 2's stop token was not foreseen: the step run ahead past it was recomputed
    assert engine.runner.ahead_launched > engine.runner.ahead_used
    sampled = SamplingParams(max_new_tokens=6, temperature=0.8, seed=3)
    before = engine.runner.ahead_used
    again = engine.generate([ps[0]], sampled, [None])
    assert engine.runner.ahead_used == before  # a sampled row is never run ahead
    engine.runner.run_ahead = False
    assert engine.generate([ps[0]], sampled, [None]) == again


def test_a_step_run_ahead_is_dropped_when_the_adapter_changes(monkeypatch):
    """An adapter refreshed between two steps (as PPO does after an update): the step run
    ahead with the old weights is not used; the same as decoding without running ahead."""
    kernel = decode_attention_kernel(monkeypatch)
    monkeypatch.setattr(graphs_mod, "decode_attention_triton", kernel)
    monkeypatch.setattr(graphs_mod, "default_attention", lambda rows: graphs_mod.TRITON_ATTENTION)
    from llamaforge.adapters.lora import lora_modules

    def run(ahead: bool) -> tuple[list[int], int]:
        model = with_adapters().to(DEV)
        engine = Engine(model, max_batch=2, max_len=64, graphs="static")
        engine.runner.run_ahead = ahead
        req = engine.submit(Request(prompts(1, seed=5)[0], SamplingParams(max_new_tokens=12),
                                    ADAPTERS[1]))  # fmt: skip
        while len(req.output) < 5:
            engine.step()
        with torch.no_grad():
            for _, m in lora_modules(model):
                if ADAPTERS[1] in m.lora_B:
                    m.lora_B[ADAPTERS[1]].mul_(-4.0)
        engine.refresh_adapter(ADAPTERS[1])
        engine.wait([req])
        return req.output, engine.runner.ahead_used

    (plain, _), (ahead, used) = run(False), run(True)
    assert ahead == plain and used > 0
