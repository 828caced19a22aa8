"""Weight-only quantisation for serving: int8 per channel and NF4, saved and loaded as stored."""

from __future__ import annotations

import json

import pytest
import torch

from llamaforge.adapters.nf4 import NF4Linear
from llamaforge.io.load import load_model
from llamaforge.quantize import (
    QUANT_FILE,
    Int8Linear,
    QuantError,
    quantize_model,
    save_quantized,
    weight_bytes,
)

from .export_helpers import TEXTS, byte_level_bpe
from .helpers import random_model


@pytest.fixture(scope="module")
def tok():
    return byte_level_bpe("smollm")


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).float()[0]


def test_int8_layer_matches_its_dequantised_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(3, 5, 64)
    want = torch.nn.functional.linear(x, q.dequantize(), lin.bias)
    torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)
    # per-row absmax scaling: error at most half a step of each row
    step = lin.weight.abs().amax(1, keepdim=True) / 127
    assert ((q.dequantize() - lin.weight).abs() <= step / 2 + 1e-7).all()
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (48,)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_folder_loads_as_stored(bits, tok, tmp_path):
    model = random_model("tiny-llama3", vocab_size=tok.vocab_size)
    ids = tok.encode(TEXTS[3], bos=True)
    ref = _logits(model, ids)
    before = weight_bytes(model)
    q = quantize_model(model, bits)
    qlogits = _logits(q, ids)
    kind = Int8Linear if bits == 8 else NF4Linear
    assert isinstance(q.layers[0].self_attn.q_proj, kind)
    save_quantized(q, tok, tmp_path / "q", bits)
    assert json.loads((tmp_path / "q" / QUANT_FILE).read_text())["bits"] == bits
    back, btok = load_model(tmp_path / "q", device="cpu", dtype="float32")
    assert isinstance(back.layers[1].mlp.down_proj, kind)
    assert (_logits(back, ids) - qlogits).abs().max() == 0  # the stored codes, not requantised
    scale = ref.abs().max()
    assert (qlogits - ref).abs().max() <= (0.05 if bits == 8 else 0.5) * scale
    after = weight_bytes(back)
    linears = sum(p.numel() for n, p in model.named_parameters() if "layers" in n and p.ndim == 2)
    assert before - after >= linears * (4 - (1.05 if bits == 8 else 0.6))  # bytes saved
    assert btok.encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_cli_quantize_then_generate(tok, tmp_path, capsys):
    from llamaforge.cli import main
    from llamaforge.data.tokenizer import save_tokenizer
    from llamaforge.io.hf import save_hf

    model = random_model("tiny-smollm2", vocab_size=tok.vocab_size)
    save_hf(model, tmp_path / "hf")
    save_tokenizer(tok, tmp_path / "hf")
    assert main(["quantize", str(tmp_path / "hf"), str(tmp_path / "q8"), "--bits", "8"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["bytes_after"] < info["bytes_before"]
    args = ["--prompt", "Hello", "--prompt", "world", "--max-new-tokens", "4"]
    assert main(["generate", str(tmp_path / "q8"), *args]) == 0
    stored = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "hf"), "--quantize", "8", *args]) == 0
    assert capsys.readouterr().out == stored  # load-time quantising = the stored folder


def test_quantize_refuses_bad_bits(tok):
    with pytest.raises(QuantError, match="8 or 4"):
        quantize_model(random_model("tiny-smollm2", vocab_size=tok.vocab_size), 3)


@pytest.mark.real
def test_smollm2_int8_keeps_perplexity(smol):
    import copy

    from llamaforge.eval.perplexity import perplexity

    from .export_helpers import english_text

    model, tok = smol
    ids = tok.encode(english_text())[:1025]
    base = perplexity(model, ids, window=1024).perplexity
    q = quantize_model(copy.deepcopy(model), 8)
    assert abs(perplexity(q, ids, window=1024).perplexity / base - 1) < 0.01


def test_benchmark_runs_tiny(tmp_path):
    """benchmarks/export_quant.py's quant part (the GPU benchmark) in its tiny CPU mode."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "export_quant.py"
    spec = importlib.util.spec_from_file_location("bench_export_quant", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = random_model("tiny-llama3")
    res = bench.part_quant(model, list(range(1, 40)), 32, 4)
    assert set(res) == {"fp32", "bf16", "int8", "nf4"}
    assert res["int8"]["weight_bytes"] < res["bf16"]["weight_bytes"] < res["fp32"]["weight_bytes"]
    assert res["nf4"]["weight_bytes"] < res["int8"]["weight_bytes"]
    assert all(r["decode_tok_s"] > 0 and r["ppl"] > 1 for r in res.values())


# ------------------------------------------------------- adapters over quantised folders


@pytest.fixture(scope="module")
def quantised(tmp_path_factory):
    """A tiny HF base, a PEFT adapter for it, and the base quantised to int8 and NF4."""
    from llamaforge.cli import main

    from .serve_helpers import make_adapter, make_base

    d = tmp_path_factory.mktemp("qa")
    base = make_base(d / "base")
    make_adapter(d / "adapter", seed=1)
    for bits in (8, 4):
        assert main(["quantize", str(base), str(d / f"q{bits}"), "--bits", str(bits)]) == 0
    return d


def _dequantised_with_adapter(folder, adapter):
    """Reference: the quantised folder's weights dequantised to plain layers, adapter on top."""
    from llamaforge.adapters.inject import merge_lora
    from llamaforge.io.peft import load_peft_adapter

    model, tok = load_model(folder, device="cpu", dtype="float32")
    model = merge_lora(model)  # no adapter yet: every int8 / NF4 layer becomes nn.Linear
    assert not any(isinstance(m, Int8Linear | NF4Linear) for m in model.modules())
    load_peft_adapter(model, adapter)
    return model, tok


@pytest.mark.parametrize("bits", [8, 4])
def test_adapter_over_quantised_folder_equals_dequantised(bits, quantised):
    from llamaforge.adapters.lora import LoRALinear
    from llamaforge.io.peft import load_peft_adapter

    folder, adapter = quantised / f"q{bits}", quantised / "adapter"
    model, tok = load_model(folder, device="cpu", dtype="float32")
    ids = tok.encode("Hello there, how are you today?")
    plain = _logits(model, ids)
    load_peft_adapter(model, adapter)
    layer = model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and (layer.int8 if bits == 8 else layer.nf4) is not None
    got = _logits(model, ids)
    ref, _ = _dequantised_with_adapter(folder, adapter)
    want = _logits(ref, ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (got - plain).abs().max() > 1e-2 * want.abs().max()  # the adapter does act
    # bf16 compute over the same codes: within bf16 rounding of the fp32 answer
    model16, _ = load_model(folder, device="cpu", dtype="bfloat16")
    load_peft_adapter(model16, adapter)
    assert (_logits(model16, ids) - want).abs().max() <= 0.05 * want.abs().max()


@pytest.mark.parametrize("bits", [8, 4])
def test_generate_chat_serve_take_an_adapter_over_quantised(bits, quantised, capsys, monkeypatch):
    """`generate` / `chat` / `serve` over a quantised folder with --adapter: the answers of
    the adapter on the dequantised weights."""
    from llamaforge.cli import main
    from llamaforge.data.templates import render_conversation
    from llamaforge.model.generate import SamplingParams, generate
    from llamaforge.serve.launch import build

    from .serve_helpers import serve_args

    folder, adapter = quantised / f"q{bits}", quantised / "adapter"
    ref, tok = _dequantised_with_adapter(folder, adapter)
    params = SamplingParams(max_new_tokens=6, stop_ids=sorted(tok.stop_ids))
    texts = ["Hello there", "How are you"]
    want = generate(ref, [tok.encode(t, bos=tok.add_bos) for t in texts], params)
    args = ["--adapter", str(adapter), "--max-new-tokens", "6"]
    assert main(["generate", str(folder), "--prompt", texts[0], "--prompt", texts[1], *args]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["completion"] for x in lines] == [tok.decode(w) for w in want]

    chat = render_conversation(
        tok, [{"role": "user", "content": "hi"}], "chatml", add_generation_prompt=True
    )[0]
    lines_in = iter(["hi", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines_in))
    assert main(["chat", str(folder), "--template", "chatml", *args]) == 0
    assert tok.decode(generate(ref, [chat], params)[0]) in capsys.readouterr().out

    _, engine, _ = build(serve_args(folder, "--adapter", f"one={adapter}"))
    assert engine.generate([chat], params, ["one"]) == generate(ref, [chat], params)
    # serve --quantize: the unquantised base quantised at load time serves the same answers
    base = quantised / "base"
    _, engine, _ = build(serve_args(base, "--quantize", str(bits), "--adapter", f"one={adapter}"))
    assert engine.generate([chat], params, ["one"]) == generate(ref, [chat], params)


def test_merge_over_int8_and_what_it_refuses(quantised, tmp_path):
    """`merge` of a LoRA adapter onto an int8 folder: the dequantised weights + the delta.
    QLoRA needs an NF4 base of the original weights: over int8 codes a one-line error."""
    import shutil

    from llamaforge.adapters.inject import apply_lora
    from llamaforge.adapters.lora import Int8BaseError
    from llamaforge.cli import main

    q8, adapter = quantised / "q8", quantised / "adapter"
    assert main(["merge", str(q8), str(adapter), str(tmp_path / "merged")]) == 0
    merged, tok = load_model(tmp_path / "merged", device="cpu", dtype="float32")
    ref, _ = _dequantised_with_adapter(q8, adapter)
    ids = tok.encode("Hello there, how are you today?")
    want = _logits(ref, ids)
    assert (_logits(merged, ids) - want).abs().max() <= 1e-5 * want.abs().max()

    model, _ = load_model(q8, device="cpu", dtype="float32")
    with pytest.raises(Int8BaseError, match="int8-quantised model .* cannot be re-quantised"):
        apply_lora(model, r=4, alpha=8, quantize_base=True)
    qlora = tmp_path / "qlora"
    shutil.copytree(adapter, qlora)
    (qlora / "llamaforge_method.json").write_text(json.dumps({"method": "qlora"}))
    assert main(["merge", str(q8), str(qlora), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
