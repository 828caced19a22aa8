"""Weight-only quantisation for serving: int8 per output channel, or 4-bit NF4.

Every linear layer inside the decoder blocks is quantised; embeddings, norms and the output
head keep their dtype. int8 stores `round(w / s)` with `s = absmax(row) / 127` per output
row and multiplies through `torch._weight_int8pack_mm` on CUDA at decode batch sizes, else
dequantises the layer per call (memory is saved at rest, not compute). 4-bit reuses
QLoRA's NF4 code (blocks of 64, double-quantised constants), so LoRA adapters load on top
as they do in QLoRA training.

A quantised folder holds `config.json`, the tokenizer, `model.safetensors` (int8 codes and
scales, or NF4 codes and constants, beside the unquantised weights) and
`llamaforge_quant.json`; `load_model` reads it back without re-quantising.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapters.inject import layer_index, quantize_linears
from .adapters.int8 import Int8Linear
from .adapters.nf4 import NF4Linear, NF4Tensor, NF4Weight
from .errors import UserError
from .io.atomic import write_dir_atomic
from .io.hf import config_from_hf, config_to_hf
from .model.llama import Llama

QUANT_FILE = "llamaforge_quant.json"
WEIGHTS = "model.safetensors"
BITS = (8, 4)
NF4_BLOCKSIZE = 64


class QuantError(UserError):
    """A quantisation request or a quantised folder is wrong."""


def quantize_model(model: Llama, bits: int, compute_dtype: torch.dtype | None = None) -> Llama:
    """Quantise every linear layer inside the decoder blocks in place (8: int8, 4: NF4)."""
    if bits not in BITS:
        raise QuantError(f"--bits must be 8 or 4, got {bits}")
    if any(not isinstance(m, nn.Linear | Int8Linear | NF4Linear) for m in _block_linears(model)):
        raise QuantError("merge adapters before quantising (the model holds LoRA layers)")
    dtype = compute_dtype or model.dtype
    if bits == 4:
        return quantize_linears(
            model, blocksize=NF4_BLOCKSIZE, double_quant=True, compute_dtype=dtype
        )
    for name, module in list(model.named_modules()):
        if layer_index(name) is not None and type(module) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Int8Linear.from_linear(module))
    return model


def _block_linears(model: nn.Module) -> list[nn.Module]:
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (a tied embedding once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def save_quantized(model: Llama, tok, out_dir: str | os.PathLike, bits: int) -> Path:
    """Write a quantised model folder (atomically) that `load_quantized` reads back."""
    from .data.tokenizer import save_tokenizer

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    sd = {k: v for k, v in sd.items() if v is not None}
    dtype = model.dtype
    meta: dict[str, Any] = {"bits": bits, "scheme": "int8-per-channel" if bits == 8 else "nf4"}
    if bits == 4:
        meta |= {"blocksize": NF4_BLOCKSIZE, "double_quant": True}
    meta["dtype"] = str(dtype).removeprefix("torch.")

    def write(tmp: Path) -> None:
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": "llamaforge-quant"})
        (tmp / "config.json").write_text(json.dumps(config_to_hf(model.cfg, dtype), indent=2))
        (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_tokenizer(tok, tmp, model_max_length=model.cfg.max_seq_len)

    return write_dir_atomic(out_dir, write, lambda name: True)


def is_quantized_dir(path: str | os.PathLike) -> bool:
    """Whether a folder holds a model written by `save_quantized`."""
    return (Path(path) / QUANT_FILE).is_file()


def load_quantized(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Llama:
    """Load a quantised folder as stored (no re-quantising); `dtype` is the compute dtype."""
    p = Path(path)
    try:
        meta = json.loads((p / QUANT_FILE).read_text())
        cfg = config_from_hf(json.loads((p / "config.json").read_text()), str(p / "config.json"))
    except (OSError, json.JSONDecodeError) as e:
        raise QuantError(f"{p}: unreadable quantised model folder ({e})") from None
    bits = meta.get("bits")
    if bits not in BITS:
        raise QuantError(f"{p / QUANT_FILE}: bits must be 8 or 4, got {bits!r}")
    dtype = dtype or getattr(torch, meta.get("dtype", "float32"))
    if not (p / WEIGHTS).is_file():
        raise QuantError(f"{p}: missing {WEIGHTS}")
    with safe_open(str(p / WEIGHTS), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    with torch.device("meta"):
        model = Llama(cfg)
    for name, module in list(model.named_modules()):
        if layer_index(name) is None or type(module) is not nn.Linear:
            continue
        parent, _, child = name.rpartition(".")
        new = _quantized_module(sd, name, module, bits, dtype, meta, p)
        setattr(model.get_submodule(parent), child, new)
    expected = {k for k in model.state_dict() if not _is_quant_key(k)}
    if cfg.tie_embeddings:
        expected.discard("lm_head.weight")
    missing = expected - sd.keys()
    if missing:
        raise QuantError(f"{p / WEIGHTS}: missing weights {sorted(missing)[:5]}")
    rest = {k: sd[k].to(dtype) for k in expected}
    model.load_state_dict(rest, strict=False, assign=True)
    model.tie_weights()
    model.inv_freq = torch.empty(cfg.head_dim // 2)
    model = model.to(device)
    model.reset_rope()
    return model.eval()


def _is_quant_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("qweight", "scale", "packed", "absmax") or ".nf4." in key


def _quantized_module(
    sd: dict[str, torch.Tensor],
    name: str,
    linear: nn.Linear,
    bits: int,
    dtype: torch.dtype,
    meta: dict,
    p: Path,
) -> nn.Module:
    """The stored int8 / NF4 layer `name` (shaped like the config's `linear`)."""
    try:
        if bits == 8:
            return Int8Linear(sd[f"{name}.qweight"], sd[f"{name}.scale"])
        t = NF4Tensor(
            sd[f"{name}.nf4.packed"],
            sd[f"{name}.nf4.absmax"],
            torch.Size((linear.out_features, linear.in_features)),
            int(meta.get("blocksize", NF4_BLOCKSIZE)),
            sd.get(f"{name}.nf4.absmax_scale"),
            sd.get(f"{name}.nf4.absmax_offset"),
        )
        return NF4Linear(NF4Weight(t), None, dtype)
    except KeyError as e:
        raise QuantError(f"{p / WEIGHTS}: missing quantised tensor {e}") from None
