"""Read llama-architecture GGUF files: config, dequantised weights, q/k un-permutation.

llama.cpp stores q and k projections with each head's rows interleaved for its rotary
layout (pairs (2i, 2i+1)); we use the rotate-half layout (pairs (i, i + D/2)), so each
head's rows are reordered back on load.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from ..model.config import ConfigError, LlamaConfig

_BLOCK_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_MAP = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """Memory-map a GGUF file with a clear error for missing or malformed files."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such GGUF file")
    try:
        return GGUFReader(str(p))
    except (ValueError, OSError, IndexError) as e:
        raise ConfigError(f"{p}: not a readable GGUF file ({e})") from None


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar, string or list (default when absent)."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_key_to_ours(name: str) -> str:
    """Map a llama.cpp tensor name to our state-dict key."""
    m = _BLOCK_RE.match(name)
    if m:
        layer, part, kind = m.groups()
        if part not in _BLOCK_MAP:
            raise ConfigError(f"unknown GGUF tensor {name!r}")
        return f"layers.{layer}.{_BLOCK_MAP[part]}.{kind}"
    stem, _, kind = name.rpartition(".")
    if stem not in _TOP_MAP:
        raise ConfigError(f"unknown GGUF tensor {name!r}")
    return f"{_TOP_MAP[stem]}.{kind}"


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleaving of q/k rows (out, in) -> rotate-half layout."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Apply llama.cpp's per-head interleaving (inverse of unpermute_qk)."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).transpose(1, 2).reshape(out, inp)


def config_from_gguf(reader: GGUFReader, where: str = "gguf") -> LlamaConfig:
    """LlamaConfig from `llama.*` metadata."""
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{where}: architecture {arch!r} is not supported (only 'llama')")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ConfigError(f"{where}: per-dimension rope_freqs (Llama 3.1 GGUF) not supported yet")

    def get(key: str, default: Any = None) -> Any:
        v = field_value(reader, f"llama.{key}", default)
        if v is None:
            raise ConfigError(f"{where}: missing metadata key 'llama.{key}'")
        return v

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    vocab = field_value(reader, "llama.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise ConfigError(f"{where}: cannot tell the vocabulary size")
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return LlamaConfig(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(get("rope.dimension_count", dim // n_heads)),
        ffn_dim=int(get("feed_forward_length")),
        norm_eps=float(f"{get('attention.layer_norm_rms_epsilon', 1e-5):.6g}"),  # f32 noise off
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_seq_len=int(get("context_length", 4096)),
        tie_embeddings=tied,
        bos_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=field_value(reader, "tokenizer.ggml.eos_token_id"),
        pad_id=field_value(reader, "tokenizer.ggml.padding_token_id"),
    )


def gguf_state_dict(reader: GGUFReader, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Dequantise every tensor to float32 with our key names, q/k back in rotate-half order."""
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        arr = dequantize(t.data, t.tensor_type)  # numpy, (out, in) for matrices
        shape = tuple(int(x) for x in reversed(t.shape))
        w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
        key = gguf_key_to_ours(t.name)
        if key.endswith("q_proj.weight"):
            w = unpermute_qk(w, cfg.n_heads)
        elif key.endswith("k_proj.weight"):
            w = unpermute_qk(w, cfg.n_kv_heads)
        sd[key] = w
    return sd
