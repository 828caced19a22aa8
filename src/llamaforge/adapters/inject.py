"""Swap adapters and 4-bit base weights into a model once, when it is built, and back out.

Module names are matched by their last component (`q_proj`) or in full
(`layers.0.self_attn.q_proj`); the decoder blocks are the modules under `layers.N.`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from .int8 import Int8Linear
from .lora import (
    Int8BaseError,
    LoRALinear,
    adapter_names,
    check_adapters,
    lora_modules,
    set_adapter,
)
from .nf4 import NF4Linear, plain_linear

FROZEN_LINEAR = nn.Linear | NF4Linear | Int8Linear  # what a LoRALinear wraps

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """Index N of the decoder block a module name lies in (`layers.N.`), else None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _outside_lora(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() without what a LoRALinear holds (its int8 base is a child module)."""
    inside: str | None = None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        inside = f"{name}." if isinstance(module, LoRALinear) else None
        yield name, module


def linear_module_names(model: nn.Module) -> list[str]:
    """Every linear layer (plain, NF4, int8, or LoRA-wrapped, which counts once) by name."""
    kinds = FROZEN_LINEAR | LoRALinear
    return [n for n, m in _outside_lora(model) if isinstance(m, kinds)]


def _linear_names(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(model)})


def _num_layers(model: nn.Module) -> int:
    idx = [layer_index(n) for n, _ in model.named_modules()]
    return max((i for i in idx if i is not None), default=-1) + 1


def quantize_linears(
    model: nn.Module,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Store every linear layer inside the decoder blocks as NF4 (embeddings, lm_head stay)."""
    for name, module in list(model.named_modules()):
        if layer_index(name) is None:
            continue
        if isinstance(module, LoRALinear):
            module.quantize_(blocksize, double_quant, compute_dtype)
        elif isinstance(module, Int8Linear):
            raise Int8BaseError("re-quantised to NF4 (QLoRA)")
        elif isinstance(module, nn.Linear):
            q = NF4Linear.from_linear(
                module, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype
            )
            _set_module(model, name, q)
    return model


def add_adapter(
    model: nn.Module,
    name: str,
    *,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rslora: bool = False,
    layers: Iterable[int] | None = None,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Add LoRA adapter `name` to the target linear layers; return their module names.

    Layers not yet adapted are wrapped in LoRALinear; other adapters are left as they are.
    """
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists; adapters: {adapter_names(model)}")
    keep = None if layers is None else set(layers)
    found = []
    for mname, module in list(model.named_modules()):
        if mname.rsplit(".", 1)[-1] not in targets and mname not in targets:
            continue
        if keep is not None and layer_index(mname) not in keep:
            continue
        if isinstance(module, FROZEN_LINEAR):
            module = LoRALinear(module)
            if hasattr(model, "kernels"):  # the model's kernel switches, as set_kernels sets
                module.kernels = model.kernels
            _set_module(model, mname, module)
        if isinstance(module, LoRALinear):
            module.add_adapter(name, r, alpha, dropout, rslora, dtype)
            found.append(mname)
    if not found:
        raise ValueError(
            f"LoRA targets {list(targets)}{'' if keep is None else f' in layers {sorted(keep)}'}"
            " match no linear layer; "
            f"the model's linear layers are {_linear_names(model)}"
        )
    return found


def apply_lora(
    model: nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rslora: bool = False,
    adapter_name: str = "default",
    quantize_base: bool = False,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
    layers: Iterable[int] | None = None,
    lora_dtype: torch.dtype | None = None,
) -> nn.Module:
    """LoRA (or QLoRA with `quantize_base`) in place: only the new adapter stays trainable.

    LoRA weights take the base weight's dtype, or float32 over NF4, unless `lora_dtype`.
    """
    if quantize_base:
        quantize_linears(
            model, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype
        )
    add_adapter(
        model,
        adapter_name,
        r=r,
        alpha=alpha,
        dropout=dropout,
        targets=targets,
        rslora=rslora,
        layers=layers,
        dtype=lora_dtype,
    )
    for pname, p in model.named_parameters():
        p.requires_grad_(f".lora_A.{adapter_name}" in pname or f".lora_B.{adapter_name}" in pname)
    set_adapter(model, adapter_name)
    return model


def _module_hits(name: str, wanted: set[str]) -> set[str]:
    return wanted & set(name.split("."))


def apply_freeze(
    model: nn.Module,
    train_layers: Sequence[int] | None = None,
    train_modules: Sequence[str] | None = None,
) -> nn.Module:
    """The `freeze` method: train only some decoder blocks and/or named modules.

    train_layers: block indices (negative counts from the end); all their parameters train
    unless train_modules names sub-modules found inside blocks (e.g. "mlp", "q_proj"),
    which narrows them to those. Modules outside the blocks ("embed_tokens", "norm",
    "lm_head") train only when named in train_modules.
    """
    if train_layers is None and train_modules is None:
        raise ValueError("freeze: give train_layers and/or train_modules (both are None)")
    n = _num_layers(model)
    layers = None if train_layers is None else {_check_layer(i, n) for i in train_layers}
    wanted = set(train_modules or ())
    names = [name for name, _ in model.named_modules()]
    unknown = [w for w in wanted if not any(w in name.split(".") for name in names)]
    if unknown:
        raise ValueError(f"freeze: train_modules {unknown} match no module of the model")
    in_blocks = {
        w for name in names if layer_index(name) is not None for w in _module_hits(name, wanted)
    }
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in model.named_modules():
        idx, hits = layer_index(name), _module_hits(name, wanted)
        if idx is None:
            train = bool(hits)
        elif layers is None:
            train = bool(hits & in_blocks)
        else:
            train = idx in layers and (not in_blocks or bool(hits & in_blocks))
        if train:
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
    return model


def _check_layer(i: int, n: int) -> int:
    if not -n <= i < n:
        raise ValueError(f"freeze: layer {i} is out of range for a model with {n} layers")
    return i % n


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that require grad, by name (what the optimizer should get)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; NF4 / int8 weights count as their full size."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    for m in model.modules():  # quantised weights are buffers, not parameters
        if isinstance(m, NF4Linear | LoRALinear) and m.nf4 is not None:
            total += m.nf4.shape.numel()
        elif isinstance(m, Int8Linear):
            total += m.qweight.numel()
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    return trainable, total


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """One adapter's tensors under the model's own state-dict keys (`...lora_A.<name>`)."""
    sd = {}
    for mname, m in lora_modules(model):
        if adapter_name in m.lora_A:
            sd[f"{mname}.lora_A.{adapter_name}"] = m.lora_A[adapter_name].detach()
            sd[f"{mname}.lora_B.{adapter_name}"] = m.lora_B[adapter_name].detach()
    if not sd:
        check_adapters(model, [adapter_name])
    return sd


def merge_lora(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Fold an adapter (default: each layer's active one) into plain nn.Linear layers.

    NF4 and int8 bases, adapted or not, are dequantised first, so the result saves as a plain
    Hugging Face checkpoint. A LoRA on a tied lm_head unties it from the embedding.
    """
    check_adapters(model, [adapter_name])
    for mname, m in list(_outside_lora(model)):
        if isinstance(m, LoRALinear):
            name = adapter_name if adapter_name is not None else m.active
            new = m.merge(name) if name in m.lora_A else plain_linear(m.base_weight(), m.bias)
            _set_module(model, mname, new)
            if mname.rsplit(".", 1)[-1] == "lm_head":
                _untie(model)
        elif isinstance(m, NF4Linear | Int8Linear):
            _set_module(model, mname, m.dequantized())
    return model


def _untie(model: nn.Module) -> None:
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "tie_embeddings", False):
        model.cfg = dataclasses.replace(cfg, tie_embeddings=False)


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every adapter, putting the frozen base layers back (NF4 ones stay NF4)."""
    for mname, m in list(lora_modules(model)):
        _set_module(model, mname, m.unmerged())
    return model
