"""Published LLaMA-family sizes, and tiny ones for tests, as data."""

from __future__ import annotations

from typing import Any

from .config import ConfigError, LlamaConfig

_L31 = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_L32 = {**_L31, "factor": 32.0}
_LLAMA2 = {
    "vocab_size": 32000,
    "max_seq_len": 4096,
    "rope_theta": 10000.0,
    "bos_id": 1,
    "eos_id": 2,
}
_LLAMA3 = {"vocab_size": 128256, "rope_theta": 500000.0, "bos_id": 128000, "eos_id": 128001}
_SMOL = {"vocab_size": 49152, "max_seq_len": 8192, "tie_embeddings": True, "bos_id": 1, "eos_id": 2}

PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": {**_LLAMA2, "dim": 4096, "n_layers": 32, "n_heads": 32, "ffn_dim": 11008},
    "llama2-13b": {**_LLAMA2, "dim": 5120, "n_layers": 40, "n_heads": 40, "ffn_dim": 13824},
    "llama2-70b": {
        **_LLAMA2,
        "dim": 8192,
        "n_layers": 80,
        "n_heads": 64,
        "n_kv_heads": 8,
        "ffn_dim": 28672,
    },
    "llama3-8b": {
        **_LLAMA3,
        "dim": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "ffn_dim": 14336,
        "max_seq_len": 8192,
    },
    "llama3-70b": {
        **_LLAMA3,
        "dim": 8192,
        "n_layers": 80,
        "n_heads": 64,
        "n_kv_heads": 8,
        "ffn_dim": 28672,
        "max_seq_len": 8192,
    },
    "llama3.1-8b": {
        **_LLAMA3,
        "dim": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "ffn_dim": 14336,
        "max_seq_len": 131072,
        "rope_scaling": _L31,
    },
    "llama3.2-1b": {
        **_LLAMA3,
        "dim": 2048,
        "n_layers": 16,
        "n_heads": 32,
        "n_kv_heads": 8,
        "ffn_dim": 8192,
        "max_seq_len": 131072,
        "rope_scaling": _L32,
        "tie_embeddings": True,
    },
    "llama3.2-3b": {
        **_LLAMA3,
        "dim": 3072,
        "n_layers": 28,
        "n_heads": 24,
        "n_kv_heads": 8,
        "ffn_dim": 8192,
        "max_seq_len": 131072,
        "rope_scaling": _L32,
        "tie_embeddings": True,
    },
    "smollm2-135m": {
        **_SMOL,
        "dim": 576,
        "n_layers": 30,
        "n_heads": 9,
        "n_kv_heads": 3,
        "ffn_dim": 1536,
        "rope_theta": 100000.0,
    },
    "smollm2-360m": {
        **_SMOL,
        "dim": 960,
        "n_layers": 32,
        "n_heads": 15,
        "n_kv_heads": 5,
        "ffn_dim": 2560,
        "rope_theta": 100000.0,
    },
    "smollm2-1.7b": {
        **_SMOL,
        "dim": 2048,
        "n_layers": 24,
        "n_heads": 32,
        "n_kv_heads": 32,
        "ffn_dim": 8192,
        "rope_theta": 130000.0,
    },
    # Tiny shapes for tests: one per feature the big ones exercise.
    "tiny-llama2": {
        **_LLAMA2,
        "vocab_size": 256,
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "ffn_dim": 160,
        "max_seq_len": 128,
    },
    "tiny-llama3": {
        **_LLAMA3,
        "vocab_size": 256,
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "ffn_dim": 160,
        "max_seq_len": 256,
        "rope_scaling": {**_L31, "original_max_position_embeddings": 32},
        "bos_id": 1,
        "eos_id": 2,
    },
    "tiny-smollm2": {
        **_SMOL,
        "vocab_size": 256,
        "dim": 48,
        "n_layers": 2,
        "n_heads": 3,
        "n_kv_heads": 1,
        "ffn_dim": 128,
        "max_seq_len": 128,
        "rope_theta": 100000.0,
    },
}


def preset(name: str, **overrides: Any) -> LlamaConfig:
    """Build the LlamaConfig of a named size, with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return LlamaConfig(**{**PRESETS[name], **overrides})
