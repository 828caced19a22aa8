"""GGUF import: Llama 3.1 rope_freqs files, and bad files as one-line errors (with a fuzz test).

The rope_freqs file here is written with `gguf`'s writer directly (not our exporter), in
the layout llama.cpp's converter produces: `rope_freqs.weight` and no rope metadata.
"""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
import torch
from gguf import GGUFWriter

from llamaforge.io.gguf import llama3_factors, permute_qk, rope_scaling_from_factors
from llamaforge.io.gguf_write import export_gguf
from llamaforge.io.load import load_model
from llamaforge.model.config import ConfigError, RopeScaling

from .export_helpers import byte_level_bpe
from .helpers import random_model


@pytest.mark.parametrize(
    "head_dim,theta,scaling",
    [
        (128, 500000.0, RopeScaling(8.0, 1.0, 4.0, 8192)),  # Llama 3.1 8B
        (64, 500000.0, RopeScaling(32.0, 1.0, 4.0, 8192)),  # Llama 3.2 1B
        (16, 500000.0, RopeScaling(8.0, 1.0, 4.0, 32)),  # tiny, no interpolated frequency
        (32, 10000.0, RopeScaling(4.0, 2.0, 3.0, 64)),
    ],
)
def test_rope_scaling_recovered_from_factors(head_dim, theta, scaling):
    factors = llama3_factors(head_dim, theta, scaling)
    got = rope_scaling_from_factors(
        factors, head_dim, theta, scaling.original_max_position_embeddings
    )
    assert got is not None
    np.testing.assert_allclose(llama3_factors(head_dim, theta, got), factors, rtol=1e-6)


def test_factors_that_are_not_llama3_are_refused():
    factors = np.linspace(1.0, 8.0, 64) ** 1.5  # smooth everywhere, not a llama3 ramp
    assert rope_scaling_from_factors(factors, 128, 500000.0) is None
    assert rope_scaling_from_factors(np.ones(64), 128, 500000.0) is None


def _write_llama31(path, model, tok_tokens: list[str], merges: list[str]):
    """A tiny Llama-3.1-style GGUF written with gguf's writer, as llama.cpp's converter lays
    it out (rope_freqs tensor, no rope scaling keys)."""
    cfg = model.cfg
    w = GGUFWriter(path, "llama")
    # raw key names (llama.cpp's), not the exporter's code: an independent writer
    u32 = {
        "context_length": cfg.max_seq_len,
        "embedding_length": cfg.dim,
        "block_count": cfg.n_layers,
        "feed_forward_length": cfg.ffn_dim,
        "attention.head_count": cfg.n_heads,
        "attention.head_count_kv": cfg.n_kv_heads,
        "rope.dimension_count": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
    }
    for key, value in u32.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.rope.freq_base", cfg.rope_theta)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tok_tokens)
    w.add_token_types([1] * len(tok_tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    s = cfg.rope_scaling
    factors = llama3_factors(cfg.head_dim, cfg.rope_theta, s).astype(np.float32)
    w.add_tensor("rope_freqs.weight", factors)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    names |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    names |= {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, v in model.state_dict().items():
        v = v.float()
        parts = key.split(".")
        if parts[0] == "layers":
            name = f"blk.{parts[1]}.{names[parts[-2]]}.weight"
            if parts[-2] == "q_proj":
                v = permute_qk(v, cfg.n_heads)
            elif parts[-2] == "k_proj":
                v = permute_qk(v, cfg.n_kv_heads)
        else:
            name = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
            name = f"{name[parts[0]]}.weight"
        w.add_tensor(name, v.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_llama31_gguf_from_gguf_writer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from llamaforge.io.hf import config_to_hf

    tok = byte_level_bpe("llama-bpe")
    # head_dim 64 at theta 500000 and an 8192 original context: interpolated frequencies too
    model = random_model(
        "tiny-llama3",
        vocab_size=tok.vocab_size,
        dim=128,
        n_heads=2,
        n_kv_heads=1,
        max_seq_len=256,
        rope_scaling={"factor": 8.0, "original_max_position_embeddings": 8192},
    )
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    import json

    merges = json.loads(tok.backend.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    path = tmp_path / "llama31.gguf"
    _write_llama31(path, model, tokens, merges)
    ours, _ = load_model(path, device="cpu", dtype="float32")
    s = ours.cfg.rope_scaling
    assert s is not None and s.factor == pytest.approx(8.0)
    assert (s.low_freq_factor, s.high_freq_factor) == pytest.approx((1.0, 4.0), rel=1e-3)
    config = transformers.LlamaConfig(**config_to_hf(model.cfg))  # GGUF's rope is not read
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32, config=config
    ).eval()
    ids = torch.randint(0, tok.vocab_size, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(ids).logits, ours(ids)
    assert (want - got).abs().max() <= 1e-5 * want.abs().max()
    # and the scaling matters at these positions: plain RoPE would give other logits
    plain = transformers.LlamaConfig(**(config_to_hf(model.cfg) | {"rope_scaling": None}))
    ref_plain = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32, config=plain
    ).eval()
    with torch.no_grad():
        assert (ref_plain(ids).logits - got).abs().max() > 1e-3 * want.abs().max()


# ---------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    tok = byte_level_bpe("smollm", vocab_size=300)
    model = random_model("tiny-smollm2", vocab_size=tok.vocab_size, n_layers=1)
    path = tmp_path_factory.mktemp("small") / "small.gguf"
    export_gguf(model, tok, path, qtype="q8_0")
    return path.read_bytes()


def _load_error(path) -> str:
    with pytest.raises(ConfigError) as e:
        load_model(path, device="cpu", dtype="float32")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_truncated_file(small_gguf, tmp_path):
    for n in (0, 3, 20, 200, len(small_gguf) // 2, len(small_gguf) - 1):
        p = tmp_path / f"cut{n}.gguf"
        p.write_bytes(small_gguf[:n])
        msg = _load_error(p)
        assert "truncated" in msg or "not a GGUF" in msg or "not a readable" in msg, msg


def test_wrong_magic(small_gguf, tmp_path):
    p = tmp_path / "magic.gguf"
    p.write_bytes(b"GGML" + small_gguf[4:])
    assert "not a GGUF file" in _load_error(p)


def _tensor_type_offset(data: bytes, name: str) -> int:
    """Byte offset of the GGML type field of tensor `name` in a GGUF v3 header."""
    i = data.index(name.encode()) + len(name)
    (n_dims,) = struct.unpack_from("<I", data, i)
    return i + 4 + 8 * n_dims


def test_unknown_quant_type(small_gguf, tmp_path):
    data = bytearray(small_gguf)
    struct.pack_into("<I", data, _tensor_type_offset(small_gguf, "blk.0.ffn_up.weight"), 77)
    p = tmp_path / "qtype.gguf"
    p.write_bytes(bytes(data))
    assert "77" in _load_error(p)


def test_shapes_that_disagree_with_the_metadata(small_gguf, tmp_path):
    data = bytearray(small_gguf)
    key = b"llama.feed_forward_length"
    i = data.index(key) + len(key) + 4  # after the key, a uint32 value type, then the value
    struct.pack_into("<I", data, i, 96)  # the tensors say 128
    p = tmp_path / "shape.gguf"
    p.write_bytes(bytes(data))
    assert "shape" in _load_error(p)


def test_non_llama_architecture(small_gguf, tmp_path):
    data = small_gguf.replace(
        b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05" + b"\x00" * 7 + b"qwen2"
    )
    p = tmp_path / "qwen2.gguf"
    p.write_bytes(data)
    assert "architecture 'qwen2' is not supported" in _load_error(p)


def test_cli_prints_one_line(small_gguf, tmp_path, capsys):
    from llamaforge.cli import main

    p = tmp_path / "bad.gguf"
    p.write_bytes(small_gguf[: len(small_gguf) // 3])
    assert main(["generate", str(p), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(p) in err


def _fuzzed(good: bytes, header_end: int, trials: int, seed: int, d):
    """`trials` files (paths in `d`), each `good` with 1-8 random bytes changed before
    `header_end`."""
    rng = random.Random(seed)
    for trial in range(trials):
        data = bytearray(good)
        for _ in range(rng.choice((1, 2, 4, 8))):
            i = rng.randrange(0, header_end)
            data[i] = rng.choice((0, 0xFF, rng.randrange(256), data[i] ^ (1 << rng.randrange(8))))
        p = d / f"fuzz{trial % 5}.gguf"
        p.write_bytes(bytes(data))
        yield p


def test_fuzzed_headers_fail_cleanly(small_gguf, tmp_path):
    """Random byte changes in the header and metadata: a loaded model or a ConfigError,
    never another exception, a crash or a hang."""
    header_end = small_gguf.index(b"blk.0.") + 2000  # metadata + tensor infos
    outcomes = {"error": 0, "loaded": 0}
    for p in _fuzzed(small_gguf, header_end, 150, 0, tmp_path):
        try:
            load_model(p, device="cpu", dtype="float32")
            outcomes["loaded"] += 1
        except ConfigError as e:
            assert "\n" not in str(e) and str(p) in str(e), str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 50, outcomes


# ---------------------------------------------------------------- tokenizer from a GGUF file


def _tokenizer_gguf(path, **kv) -> None:
    """A GGUF file with only tokenizer metadata (`kv`: name -> value, None to leave out)."""
    w = GGUFWriter(path, "llama")
    tokens = kv.pop("tokens", ["<unk>", "<s>", "</s>", "a", "b"])
    if tokens is not None:
        w.add_token_list(tokens)
    for key, value in kv.items():
        if value is None:
            continue
        add = {str: w.add_string, int: w.add_uint32, list: w.add_array}[type(value)]
        add(f"tokenizer.ggml.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def _tokenizer_error(path) -> str:
    from llamaforge.data.tokenizer import TokenizerError, load_tokenizer
    from llamaforge.errors import UserError

    with pytest.raises(TokenizerError) as e:
        load_tokenizer(path)
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg and str(path) in msg, msg
    return msg


def test_load_tokenizer_names_the_bad_gguf_and_why(small_gguf, tmp_path):
    from llamaforge.data.tokenizer import load_tokenizer

    good = tmp_path / "good.gguf"
    _tokenizer_gguf(good, model="llama", scores=[0.0] * 5)
    assert load_tokenizer(good).vocab_size == 5
    cases = {
        "not a GGUF file": b"GGML" + small_gguf[4:],
        "truncated": small_gguf[:20],
    }
    for why, data in cases.items():
        p = tmp_path / f"{why[:3]}.gguf"
        p.write_bytes(data)
        assert why in _tokenizer_error(p)
    metadata = {
        "unsupported tokenizer.ggml.model 'bert'": {"model": "bert"},
        "'llama' tokenizer without tokenizer.ggml.scores": {"model": "llama"},
        "tokenizer.ggml.tokens is missing": {"model": "gpt2", "tokens": None},
        "bad tokenizer metadata": {"model": "llama", "scores": [0.0, 1.0]},  # 2 scores, 5 tokens
    }
    for i, (why, kv) in enumerate(metadata.items()):
        p = tmp_path / f"meta{i}.gguf"
        _tokenizer_gguf(p, **kv)
        assert why in _tokenizer_error(p), why


def test_load_tokenizer_fuzzed_headers_fail_cleanly(small_gguf, tmp_path):
    """Random byte changes in the metadata: a tokenizer or a TokenizerError, nothing else."""
    from llamaforge.data.tokenizer import TokenizerError, load_tokenizer

    outcomes = {"error": 0, "loaded": 0}
    for p in _fuzzed(small_gguf, small_gguf.index(b"blk.0."), 100, 1, tmp_path):
        try:
            load_tokenizer(p)
            outcomes["loaded"] += 1
        except TokenizerError as e:
            assert "\n" not in str(e) and str(p) in str(e), str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 20, outcomes
