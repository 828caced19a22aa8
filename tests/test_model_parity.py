"""Our Llama against transformers' LlamaForCausalLM on the same weights (fp32, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from llamaforge.io.hf import load_hf, save_hf
from tests.helpers import TINY, random_model

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", TINY)
def test_logits_match_transformers(name, tmp_path):
    ours = random_model(name)
    save_hf(ours, tmp_path)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 40))
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", TINY)
def test_transformers_checkpoint_loads(name, tmp_path):
    """A folder written by transformers 5 (rope_parameters dialect) loads with equal logits."""
    ours = random_model(name, seed=1)
    save_hf(ours, tmp_path / "a")
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    ref.save_pretrained(tmp_path / "b")
    back = load_hf(tmp_path / "b")
    ids = torch.randint(0, ours.cfg.vocab_size, (1, 33))
    with torch.no_grad():
        assert (back(ids) - ref.eval()(ids).logits).abs().max().item() <= 1e-4


def test_llama3_rope_scaling_changes_long_positions():
    """The llama3 scaling must matter, or the parity test above would not exercise it."""
    a = random_model("tiny-llama3")
    b = random_model("tiny-llama3", rope_scaling=None)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 256, (1, 100))
    with torch.no_grad():
        assert (a(ids) - b(ids)).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_sharded(tmp_path, dtype):
    ours = random_model("tiny-llama3").to(dtype)
    save_hf(ours, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = load_hf(tmp_path, dtype=dtype)
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and v.dtype == v2.dtype and torch.equal(v, v2)


def test_tied_checkpoint_has_no_lm_head(tmp_path):
    ours = random_model("tiny-smollm2")
    save_hf(ours, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    back = load_hf(tmp_path)
    assert back.lm_head.weight is back.embed_tokens.weight
