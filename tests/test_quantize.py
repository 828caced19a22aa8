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


def test_nf4_folder_takes_an_adapter(tok, tmp_path):
    from llamaforge.adapters.inject import apply_lora
    from llamaforge.io.peft import load_peft_adapter, save_peft_adapter

    model = random_model("tiny-llama2", vocab_size=tok.vocab_size)
    save_quantized(quantize_model(model, 4), tok, tmp_path / "q4", 4)
    lora = apply_lora(random_model("tiny-llama2", vocab_size=tok.vocab_size), r=4, alpha=8)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_peft_adapter(lora, tmp_path / "adapter")
    base, _ = load_model(tmp_path / "q4", device="cpu", dtype="float32")
    ids = tok.encode(TEXTS[1], bos=True)
    plain = _logits(base, ids)
    load_peft_adapter(base, tmp_path / "adapter")
    assert (_logits(base, ids) - plain).abs().max() > 1e-3


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
