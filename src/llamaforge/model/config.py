"""The LLaMA architecture's hyper-parameters as one typed dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import UserError


class ConfigError(UserError):
    """A model configuration is malformed or describes an architecture we do not support."""


@dataclass
class RopeScaling:
    """Llama 3.1's "llama3" RoPE frequency scaling (None of it means plain RoPE)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"


@dataclass
class LlamaConfig:
    """Shape and numerics of a LLaMA-family decoder."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    bos_id: int | None = 1
    eos_id: int | list[int] | None = 2
    pad_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "n_kv_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for YAML/JSON)."""
        return asdict(self)

    def num_params(self) -> int:
        """Parameter count, counting a tied embedding once."""
        hd, kv = self.head_dim or 0, self.n_kv_heads or 0
        attn = self.dim * hd * (self.n_heads * 2 + kv * 2)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + self.dim
