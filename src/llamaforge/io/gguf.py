"""Read llama-architecture GGUF files: config, dequantised weights, q/k un-permutation.

llama.cpp stores q and k projections with each head's rows interleaved for its rotary
layout (pairs (2i, 2i+1)); we use the rotate-half layout (pairs (i, i + D/2)), so each
head's rows are reordered back on load.

Llama 3.1 / 3.2 files carry "llama3" RoPE scaling as a `rope_freqs` tensor of per-frequency
divisors; it is turned back into the four numbers of `RopeScaling` and checked to reproduce
every divisor. Anything wrong with a file (truncated, wrong magic, unknown tensor type,
shapes against the metadata, another architecture) is a one-line `ConfigError` naming it.
"""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from ..model.config import ConfigError, LlamaConfig, RopeScaling

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


_MAGIC = b"GGUF"
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count


def _check_header(p: Path) -> None:
    """Reject what is plainly not a GGUF file before the reader walks it."""
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < 4 or head[:4] != _MAGIC:
        raise ConfigError(f"{p}: not a GGUF file (starts with {head[:4]!r}, expected {_MAGIC!r})")
    if len(head) < _HEADER.size:
        raise ConfigError(f"{p}: truncated GGUF file ({size} bytes, header incomplete)")
    _, version, n_tensors, n_kv = _HEADER.unpack(head)
    if version not in (2, 3):
        raise ConfigError(f"{p}: GGUF version {version} is not supported (2 or 3)")
    # every tensor entry and metadata pair takes at least 24 / 12 bytes
    if n_tensors * 24 + n_kv * 12 > size:
        raise ConfigError(
            f"{p}: corrupt GGUF header ({n_tensors} tensors, {n_kv} metadata keys "
            f"cannot fit in {size} bytes)"
        )


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """Memory-map a GGUF file with a clear error for missing or malformed files."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such GGUF file")
    _check_header(p)
    try:
        reader = GGUFReader(str(p))
    except Exception as e:  # the reader raises many kinds on malformed bytes
        raise ConfigError(f"{p}: not a readable GGUF file ({_why(e)})") from None
    size = p.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ConfigError(f"{p}: truncated GGUF file (tensor {t.name!r} runs past the end)")
    return reader


def _why(e: BaseException) -> str:
    """A short, one-line reason from an exception."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return msg[:200]


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
    """LlamaConfig from `llama.*` metadata (and `rope_freqs` for Llama 3.1 scaling)."""
    try:
        return _config_from_gguf(reader, where)
    except ConfigError:
        raise
    except Exception as e:  # wrong value types in fuzzed or foreign files
        raise ConfigError(f"{where}: bad GGUF metadata ({_why(e)})") from None


def _config_from_gguf(reader: GGUFReader, where: str) -> LlamaConfig:
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{where}: architecture {arch!r} is not supported (only 'llama')")

    def get(key: str, default: Any = None) -> Any:
        v = field_value(reader, f"llama.{key}", default)
        if v is None:
            raise ConfigError(f"{where}: missing metadata key 'llama.{key}'")
        if isinstance(v, str | list):
            raise ConfigError(f"{where}: metadata key 'llama.{key}' is {v!r}, not a number")
        return v

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    if n_heads <= 0 or dim <= 0:
        raise ConfigError(f"{where}: embedding_length {dim} / head_count {n_heads} must be > 0")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    vocab = field_value(reader, "llama.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise ConfigError(f"{where}: cannot tell the vocabulary size")
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    head_dim = int(get("rope.dimension_count", dim // n_heads))
    theta = float(get("rope.freq_base", 10000.0))
    cfg = LlamaConfig(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_dim=int(get("feed_forward_length")),
        norm_eps=float(f"{get('attention.layer_norm_rms_epsilon', 1e-5):.6g}"),  # f32 noise off
        rope_theta=theta,
        rope_scaling=_rope_scaling(reader, head_dim, theta, where),
        max_seq_len=int(get("context_length", 4096)),
        tie_embeddings=tied,
        bos_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=field_value(reader, "tokenizer.ggml.eos_token_id"),
        pad_id=field_value(reader, "tokenizer.ggml.padding_token_id"),
    )
    if cfg.head_dim % 2:
        raise ConfigError(f"{where}: rope dimension {cfg.head_dim} must be even")
    return cfg


def _rope_scaling(
    reader: GGUFReader, head_dim: int, theta: float, where: str
) -> RopeScaling | None:
    """Llama 3.1 scaling from a `rope_freqs` tensor (None when the file has none)."""
    kind = field_value(reader, "llama.rope.scaling.type")
    if kind not in (None, "none"):
        raise ConfigError(f"{where}: rope scaling type {kind!r} is not supported (only llama3)")
    t = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if t is None:
        return None
    factors = np.array(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
    if factors.size != head_dim // 2:
        raise ConfigError(
            f"{where}: rope_freqs has {factors.size} values, rope dimension {head_dim} "
            f"needs {head_dim // 2}"
        )
    old_ctx = int(field_value(reader, "llama.rope.scaling.original_context_length", 8192))
    scaling = rope_scaling_from_factors(factors, head_dim, theta, old_ctx)
    if scaling is None and not np.allclose(factors, 1.0):
        raise ConfigError(f"{where}: rope_freqs is not Llama 3.1 ('llama3') scaling")
    return scaling


def llama3_factors(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """Per-frequency divisors that llama3 scaling applies (llama.cpp's `rope_freqs`)."""
    inv = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    mid = 1 / ((1 - smooth) / s.factor + smooth)
    out = np.where(wavelen > low_wavelen, s.factor, 1.0)
    return np.where((wavelen <= low_wavelen) & (wavelen >= high_wavelen), mid, out)


def rope_scaling_from_factors(
    factors: np.ndarray, head_dim: int, theta: float, old_ctx: int = 8192
) -> RopeScaling | None:
    """The llama3 `RopeScaling` whose divisors equal `factors` (None if there is none).

    Only the ratios low_freq_factor / old_ctx and high_freq_factor / old_ctx shape the
    divisors, so `old_ctx` (not stored by llama.cpp's converter) is taken as given. With two
    or more smoothly interpolated frequencies the two factors follow from a line fit; with
    fewer, any boundary between the unscaled and fully scaled frequencies is exact.
    """
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return None
    inv = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    u = inv / (2 * math.pi)  # 1 / wavelength: scaled where u < low / old_ctx
    tol = 1e-4 * factor
    ones, full = factors < 1 + tol, factors > factor - tol
    mid = ~(ones | full)
    smooth = (1 / factors - 1 / factor) / (1 - 1 / factor)
    bounds = []  # (L, H) = (low, high) / old_ctx
    if mid.sum() >= 2:  # smooth = (u - L) / (H - L) on the interpolated frequencies
        a, b = np.polyfit(u[mid], smooth[mid], 1)
        if a > 0:
            bounds.append((-b / a, (1 - b) / a))
    elif full.any() and ones.any():
        u_full, u_one = u[full].max(), u[ones].min()
        if not mid.any():
            r = u_one / u_full
            bounds.append((u_full * r ** (1 / 3), u_full * r ** (2 / 3)))
        else:
            u_m, s_m = u[mid][0], smooth[mid][0]
            lo = (u_full + u_m) / 2
            bounds.append((lo, lo + (u_m - lo) / s_m))
            hi = (u_m + u_one) / 2
            bounds.append(((u_m - s_m * hi) / (1 - s_m), hi))
    candidates = [(lo * old_ctx, hi * old_ctx) for lo, hi in bounds]
    for low, high in candidates:
        if not 0 < low < high:
            continue
        s = RopeScaling(factor, float(low), float(high), int(old_ctx))
        if np.allclose(llama3_factors(head_dim, theta, s), factors, rtol=1e-4, atol=1e-5):
            return s
    return None


def gguf_state_dict(
    reader: GGUFReader, cfg: LlamaConfig, where: str = "gguf"
) -> dict[str, torch.Tensor]:
    """Dequantise every tensor to float32 with our key names, q/k back in rotate-half order."""
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # read into cfg.rope_scaling
        try:
            key = gguf_key_to_ours(t.name)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        shape = tuple(int(x) for x in reversed(t.shape))
        try:
            arr = dequantize(t.data, t.tensor_type)  # numpy, (out, in) for matrices
            w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
        except NotImplementedError:
            raise ConfigError(
                f"{where}: tensor {t.name!r} has type {t.tensor_type.name}, which llamaforge "
                "cannot dequantise"
            ) from None
        except Exception as e:
            raise ConfigError(f"{where}: tensor {t.name!r} is malformed ({_why(e)})") from None
        if key.endswith("q_proj.weight"):
            w = _unpermute(w, cfg.n_heads, t.name, where)
        elif key.endswith("k_proj.weight"):
            w = _unpermute(w, cfg.n_kv_heads, t.name, where)
        sd[key] = w
    return sd


def _unpermute(w: torch.Tensor, n_head: int, name: str, where: str) -> torch.Tensor:
    if w.ndim != 2 or w.shape[0] % (2 * n_head):
        raise ConfigError(
            f"{where}: tensor {name!r} has shape {tuple(w.shape)}, which {n_head} heads "
            "cannot split"
        )
    return unpermute_qk(w, n_head)


def load_gguf(path: str | os.PathLike):
    """(LlamaConfig, float32 state dict, Tokenizer) of a llama GGUF file; bad files raise
    a one-line ConfigError naming the file."""
    from ..data.tokenizer import tokenizer_from_gguf

    reader = open_gguf(path)
    cfg = config_from_gguf(reader, str(path))
    sd = gguf_state_dict(reader, cfg, str(path))
    return cfg, sd, tokenizer_from_gguf(reader, path)
