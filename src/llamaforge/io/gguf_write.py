"""Write llama-architecture GGUF files that llama.cpp reads: metadata, tensors, tokenizer.

Tensors take llama.cpp's names and its q/k row order (`permute_qk`); 1-D tensors (norms,
`rope_freqs`) stay float32 in every type, as llama.cpp's own converter keeps them. Q8_0 and
Q4_0 blocks are made by `gguf.quants` (the PyPI package llama.cpp maintains). In `q4_0` files
the token embedding and output head are Q8_0 (they cost most perplexity at 4 bits), and a
matrix whose rows are not a multiple of the 32-value block falls back to f16.

Llama 3.1 "llama3" RoPE scaling is written the way llama.cpp expects it: a `rope_freqs`
tensor of per-frequency divisors (no `rope.scaling.type`, which would switch on linear
scaling), plus `rope.scaling.original_context_length`, which llama.cpp uses only for YaRN.

The tokenizer goes in as `tokenizer.ggml.*`: byte-level BPE as model `gpt2` with merges and
the pre-tokenizer's llama.cpp name, SentencePiece BPE as model `llama` with scores and token
types, plus special ids, add-BOS/EOS flags and the chat template.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize
from torch import nn

from ..data.tokenizer import (
    BYTE,
    CONTROL,
    LLAMA3_PATTERN,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    read_spm_proto,
)
from ..errors import UserError
from ..model.llama import Llama, rope_inv_freq
from .gguf import _BLOCK_MAP, _TOP_MAP, permute_qk

Q = GGMLQuantizationType
EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
DEFAULT_TYPE = "f16"
_FILE_TYPE = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
}
_MATRIX_TYPE = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
_BLOCK = 32  # values per Q8_0 / Q4_0 block
_OURS_TO_GGUF = {v: k for k, v in _BLOCK_MAP.items()} | {v: k for k, v in _TOP_MAP.items()}
# byte-level pre-tokenizers we can name for llama.cpp (`tokenizer.ggml.pre`)
PRE_LLAMA3, PRE_SMOLLM, PRE_GPT2 = "llama-bpe", "smollm", "gpt2"


class ExportError(UserError):
    """The model or tokenizer cannot be expressed as a llama.cpp GGUF file."""


@dataclass
class ExportReport:
    """What `export_gguf` wrote."""

    path: Path
    qtype: str
    bytes: int
    tensor_types: dict[str, int]  # GGML type name -> tensor count


def gguf_tensor_name(key: str) -> str:
    """llama.cpp's name for one of our state-dict keys."""
    parts = key.split(".")
    if parts[0] == "layers":
        stem = ".".join(parts[2:-1])
        if stem not in _OURS_TO_GGUF:
            raise ExportError(f"weight {key!r} has no llama.cpp tensor name")
        return f"blk.{parts[1]}.{_OURS_TO_GGUF[stem]}.{parts[-1]}"
    stem = ".".join(parts[:-1])
    if stem not in _OURS_TO_GGUF:
        raise ExportError(f"weight {key!r} has no llama.cpp tensor name")
    return f"{_OURS_TO_GGUF[stem]}.{parts[-1]}"


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Float32 weights of a plain Llama (adapters must be merged; NF4/int8 are dequantised)."""
    if not isinstance(model, Llama):
        raise ExportError(f"can only export a llamaforge Llama, got {type(model).__name__}")
    from ..adapters.lora import LoRALinear

    sd: dict[str, torch.Tensor] = {}
    quantised: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            raise ExportError(f"{name} carries an unmerged LoRA adapter: merge it first")
        dequant = getattr(module, "dequantized", None)
        if callable(dequant) and not isinstance(module, nn.Linear):
            sd[f"{name}.weight"] = dequant(torch.float32).weight.detach()
            quantised.append(f"{name}.")
    for key, value in model.state_dict().items():
        if key not in sd and not key.startswith(tuple(quantised)):
            sd[key] = value.detach()
    sd = {k: v.to("cpu", torch.float32) for k, v in sd.items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def rope_freq_factors(model: Llama) -> np.ndarray | None:
    """llama.cpp's `rope_freqs`: each frequency's divisor under llama3 scaling (None: plain)."""
    cfg = model.cfg
    if cfg.rope_scaling is None:
        return None
    if cfg.rope_scaling.rope_type != "llama3":
        raise ExportError(f"rope scaling {cfg.rope_scaling.rope_type!r} has no GGUF form here")
    plain = rope_inv_freq(cfg.head_dim, cfg.rope_theta, None).double()
    scaled = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).double()
    return (plain / scaled).float().numpy()


def _encode_tensor(name: str, w: np.ndarray, qtype: str) -> tuple[np.ndarray, Q]:
    """The stored array and GGML type of one tensor under the file's type."""
    if w.ndim == 1:
        return w.astype(np.float32), Q.F32
    want = _MATRIX_TYPE[qtype]
    if qtype == "q4_0" and name in ("token_embd.weight", "output.weight"):
        want = Q.Q8_0
    if want in (Q.Q8_0, Q.Q4_0) and w.shape[-1] % _BLOCK:
        want = Q.F16
    return quantize(np.ascontiguousarray(w, dtype=np.float32), want), want


def gguf_tensors(model: Llama, qtype: str) -> Iterator[tuple[str, np.ndarray, Q]]:
    """(llama.cpp name, stored array, GGML type) for every tensor, in llama.cpp's order."""
    cfg = model.cfg
    sd = plain_state_dict(model)
    factors = rope_freq_factors(model)
    if factors is not None:
        yield "rope_freqs.weight", factors, Q.F32
    for key, w in sd.items():
        name = gguf_tensor_name(key)
        if key.endswith("q_proj.weight"):
            w = permute_qk(w, cfg.n_heads)
        elif key.endswith("k_proj.weight"):
            w = permute_qk(w, cfg.n_kv_heads)
        if not torch.isfinite(w).all():
            raise ExportError(f"weight {key} holds NaN or infinite values")
        data, t = _encode_tensor(name, w.numpy(), qtype)
        yield name, data, t


# ---------------------------------------------------------------- tokenizer


def _backend_json(tok: HFTokenizer) -> dict[str, Any]:
    return json.loads(tok.backend.to_str())


def _byte_level_pre(pre: dict[str, Any] | None) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level tokenizer.json pre-tokenizer."""
    if pre is None:
        raise ExportError("byte-level tokenizer without a pre-tokenizer has no llama.cpp form")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    last = steps[-1]
    if kinds[-1] != "ByteLevel" or last.get("add_prefix_space"):
        raise ExportError(f"pre-tokenizer {kinds} has no llama.cpp name")
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return PRE_GPT2
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return PRE_SMOLLM
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern == LLAMA3_PATTERN:
            return PRE_LLAMA3
    raise ExportError(f"pre-tokenizer {kinds} has no llama.cpp name")


def _is_byte_level(j: dict[str, Any]) -> bool:
    return (j.get("decoder") or {}).get("type") == "ByteLevel"


def _merge_strings(merges: list[Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _vocab_by_id(tok: HFTokenizer) -> list[str]:
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    tokens: list[str | None] = [None] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        raise ExportError(f"tokenizer vocabulary has no token for ids {missing[:5]}")
    return tokens  # type: ignore[return-value]


def _added_types(tok: HFTokenizer) -> dict[int, int]:
    return {
        i: CONTROL if t.special else USER_DEFINED
        for i, t in tok.backend.get_added_tokens_decoder().items()
    }


def tokenizer_metadata(tok: Tokenizer) -> dict[str, Any]:
    """`tokenizer.ggml.*` fields (tokens, types, scores or merges, pre) of a tokenizer."""
    if isinstance(tok, SentencePieceTokenizer):
        info = read_spm_proto(tok.model_proto)
        if info.get("model_type", 1) != 2:
            raise ExportError("only SentencePiece BPE vocabularies (Llama 2 style) export")
        return {
            "model": "llama",
            "tokens": info["pieces"],
            "scores": info["scores"],
            "types": info["types"],
            "add_space_prefix": info["add_dummy_prefix"],
        }
    if not isinstance(tok, HFTokenizer):
        raise ExportError(f"cannot export a {type(tok).__name__} tokenizer")
    j = _backend_json(tok)
    model = j.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer model {model.get('type')!r} has no llama.cpp form here")
    tokens = _vocab_by_id(tok)
    added = _added_types(tok)
    merges = _merge_strings(model.get("merges") or [])
    if _is_byte_level(j):
        types = [added.get(i, NORMAL) for i in range(len(tokens))]
        pre = _byte_level_pre(j.get("pre_tokenizer"))
        return {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges, "pre": pre}
    return _spm_style_metadata(j, tokens, added, merges)


def _spm_style_metadata(
    j: dict[str, Any], tokens: list[str], added: dict[int, int], merges: list[str]
) -> dict[str, Any]:
    """A SentencePiece vocabulary rebuilt as BPE (▁ pieces, byte fallback): scores by merge rank."""
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        left, _, right = m.partition(" ")
        rank.setdefault(left + right, r)
    unk = (j.get("model") or {}).get("unk_token")
    scores, types = [], []
    for i, t in enumerate(tokens):
        if t == unk:
            types.append(UNKNOWN)
        elif i in added:
            types.append(added[i])
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
        scores.append(-float(rank.get(t, len(merges))) if types[-1] == NORMAL else 0.0)
    norm = json.dumps(j.get("normalizer"))
    return {
        "model": "llama",
        "tokens": tokens,
        "scores": scores,
        "types": types,
        "add_space_prefix": '"Prepend"' in norm,
    }


def _special_ids(tok: Tokenizer) -> dict[str, int]:
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "padding": tok.pad_id}
    for name, text in (("eot", "<|eot_id|>"), ("eom", "<|eom_id|>")):
        ids[name] = tok.special_tokens.get(text)
    unk = next((i for t, i in tok.special_tokens.items() if t in ("<unk>",)), None)
    ids["unknown"] = unk
    return {k: int(v) for k, v in ids.items() if v is not None}


def _write_tokenizer(w: GGUFWriter, tok: Tokenizer, n_vocab: int) -> None:
    meta = tokenizer_metadata(tok)
    tokens, types = list(meta["tokens"]), list(meta["types"])
    if len(tokens) > n_vocab:
        raise ExportError(f"tokenizer has {len(tokens)} tokens but the model only {n_vocab} rows")
    for i in range(len(tokens), n_vocab):  # llama.cpp needs one token per embedding row
        tokens.append(f"[PAD{i}]")
        types.append(int(TokenType.UNUSED))
    w.add_tokenizer_model(meta["model"])
    if "pre" in meta:
        w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    if "scores" in meta:
        w.add_token_scores(list(meta["scores"]) + [-1e4] * (n_vocab - len(meta["scores"])))
        w.add_add_space_prefix(bool(meta["add_space_prefix"]))
    if "merges" in meta:
        w.add_token_merges(meta["merges"])
    special = _special_ids(tok)
    for name, i in special.items():
        w.add_uint32(f"tokenizer.ggml.{name}_token_id", i)
    w.add_add_bos_token(bool(tok.add_bos))
    w.add_add_eos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


# ---------------------------------------------------------------- the file


def _write_config(w: GGUFWriter, model: Llama, qtype: str, name: str) -> None:
    cfg = model.cfg
    w.add_name(name)
    w.add_file_type(int(_FILE_TYPE[qtype]))
    if qtype in ("q8_0", "q4_0"):
        w.add_quantization_version(2)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.n_heads != cfg.dim:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling is not None:
        w.add_rope_scaling_orig_ctx_len(cfg.rope_scaling.original_max_position_embeddings)


def export_gguf(
    model: Llama,
    tok: Tokenizer,
    out: str | os.PathLike,
    *,
    qtype: str = DEFAULT_TYPE,
    name: str = "llamaforge-export",
) -> ExportReport:
    """Write `model` + `tok` to `out` as a llama.cpp GGUF of type `qtype`, atomically."""
    if qtype not in EXPORT_TYPES:
        raise ExportError(f"unknown GGUF type {qtype!r}; use one of {', '.join(EXPORT_TYPES)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise ExportError(f"{out}: the output file name must end in .gguf")
    if out.is_dir():
        raise ExportError(f"{out}: is a folder, give a file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    counts: dict[str, int] = {}
    try:
        w = GGUFWriter(tmp, "llama")
        _write_config(w, model, qtype, name)
        _write_tokenizer(w, tok, model.cfg.vocab_size)
        for tname, data, t in gguf_tensors(model, qtype):
            w.add_tensor(tname, data, raw_dtype=t)
            counts[t.name] = counts.get(t.name, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportReport(out, qtype, out.stat().st_size, counts)
