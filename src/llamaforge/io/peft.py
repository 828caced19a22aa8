"""LoRA adapters in PEFT's on-disk format (`adapter_config.json` + `adapter_model.safetensors`).

Tensor keys are PEFT's: `base_model.model.<transformers module>.lora_A.weight` (r, in) and
`.lora_B.weight` (out, r), the adapter name left out. The module names are transformers'
(`model.layers.0.self_attn.q_proj`), i.e. ours through the checkpoint key map. Our q/k
weights use transformers' layout, so adapter tensors need no permutation.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters.inject import layer_index, linear_module_names
from ..adapters.lora import LoRALinear, adapter_names, check_adapters, lora_modules, set_adapter
from ..errors import UserError
from .atomic import write_dir_atomic
from .hf import hf_to_ours, ours_to_hf

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")

# Every field peft 0.21's LoraConfig writes, at its default value.
PEFT_LORA_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": None,
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": "CAUSAL_LM",
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}
# Options that change what the adapter computes and that we do not implement.
_UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "use_qalora",
    "alora_invocation_tokens",
    "use_bdlora",
)


class AdapterError(UserError):
    """A PEFT adapter folder does not fit the model or uses options we do not support."""


def hf_module_name(ours: str) -> str:
    """transformers module name of one of our modules (`layers.0...` -> `model.layers.0...`)."""
    return ours_to_hf(f"{ours}.weight").removesuffix(".weight")


def our_module_name(hf: str) -> str:
    """Our module name of a transformers LlamaForCausalLM module."""
    return hf_to_ours(f"{hf}.weight").removesuffix(".weight")


# ----------------------------------------------------------------------------- saving


def save_peft_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
    heads: tuple[str, ...] = (),
) -> Path:
    """Write one adapter as a PEFT LoRA folder, atomically; return the folder.

    `heads` names fully trained head modules saved beside it (PEFT's `modules_to_save`):
    a reward model's `score` makes it a SEQ_CLS adapter that peft loads on
    transformers' LlamaForSequenceClassification.
    """
    check_adapters(model, [adapter_name])
    mods = [(n, m) for n, m in lora_modules(model) if adapter_name in m.lora_A]
    config = _adapter_config(model, mods, adapter_name)
    config["base_model_name_or_path"] = base_model_name_or_path
    tensors = {}
    for name, m in mods:
        prefix = f"base_model.model.{hf_module_name(name)}"
        for part in ("lora_A", "lora_B"):
            t = getattr(m, part)[adapter_name].detach()
            tensors[f"{prefix}.{part}.weight"] = t.to("cpu", dtype or t.dtype).contiguous()
    for head in heads:
        w = model.get_submodule(head).weight.detach()
        tensors[f"base_model.model.{head}.weight"] = w.to("cpu", dtype or w.dtype).contiguous()
    if heads:
        config["modules_to_save"] = list(heads)
        config["task_type"] = "SEQ_CLS" if "score" in heads else config.get("task_type")

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    out = Path(out_dir)
    _write_dir_atomic(out, write, replaces={WEIGHTS_NAME, CONFIG_NAME, "adapter_model.bin"})
    return out


def _adapter_config(
    model: nn.Module, mods: list[tuple[str, LoRALinear]], adapter: str
) -> dict[str, Any]:
    """PEFT's LoraConfig fields for one adapter: the most common rank/alpha plus patterns."""
    rslora = {m.rslora[adapter] for _, m in mods}
    dropout = {m.dropout_p(adapter) for _, m in mods}
    if len(rslora) > 1 or len(dropout) > 1:
        raise ValueError(
            f"adapter {adapter!r} mixes use_rslora {rslora} or dropout {dropout} across "
            "layers; PEFT's config holds one value of each"
        )
    ranks = {hf_module_name(n): m.rank[adapter] for n, m in mods}
    alphas = {hf_module_name(n): _num(m.alpha[adapter]) for n, m in mods}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    targets, layers = _target_spec(model, [n for n, _ in mods])
    return {
        **PEFT_LORA_DEFAULTS,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout.pop(),
        "use_rslora": rslora.pop(),
        "target_modules": targets,
        "layers_to_transform": layers,
        "rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
    }


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _target_spec(model: nn.Module, adapted: list[str]) -> tuple[list[str], list[int] | None]:
    """target_modules (+ layers_to_transform) that make PEFT adapt exactly these modules."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    candidates = [n for n in linear_module_names(model) if n.rsplit(".", 1)[-1] in leaves]
    if set(candidates) == set(adapted):
        return leaves, None
    layers = {layer_index(n) for n in adapted}
    if None not in layers and {n for n in candidates if layer_index(n) in layers} == set(adapted):
        return leaves, sorted(layers)
    return sorted(hf_module_name(n) for n in adapted), None


def _write_dir_atomic(out: Path, write: Callable[[Path], None], replaces: set[str]) -> None:
    """Build the folder beside `out` and swap it in, keeping other files already there."""
    write_dir_atomic(out, write, replaces.__contains__)


# ----------------------------------------------------------------------------- loading


@dataclass
class _Planned:
    module: str  # our module name
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    alpha: float


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse and check `adapter_config.json`; errors name the file and the key."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter_config.json (is this a PEFT adapter folder?)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type={config.get('peft_type')!r}; only LORA is supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise AdapterError(f"{path}: missing required key {key!r}")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={config['bias']!r} is not supported (only 'none')")
    for key in _UNSUPPORTED:
        value = config.get(key)
        if key == "modules_to_save" and value and set(value) <= {"score", "classifier"}:
            continue  # a reward model's head (peft adds 'classifier' for SEQ_CLS itself)
        if value:
            raise AdapterError(f"{path}: {key}={value!r} is not supported by llamaforge")
    if config.get("layers_pattern") not in (None, "", "layers", ["layers"]):
        raise AdapterError(f"{path}: layers_pattern={config['layers_pattern']!r} is not 'layers'")
    return config


def _read_weights(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    path = adapter_dir / WEIGHTS_NAME
    if path.is_file():
        return load_file(str(path)), path
    path = adapter_dir / "adapter_model.bin"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True), path
    raise FileNotFoundError(f"{adapter_dir}: no {WEIGHTS_NAME} (nor adapter_model.bin)")


def _targeted(config: dict[str, Any], hf: str) -> bool:
    """Whether PEFT's rules (target_modules, exclude_modules, layers_to_transform) pick hf."""
    targets = config["target_modules"]
    if _matches(config.get("exclude_modules"), hf) or not _matches(targets, hf):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == [] or isinstance(targets, str) or hf in targets:
        return True
    layers = [layers] if isinstance(layers, int) else layers
    return layer_index(hf) in layers


def _matches(spec: str | list[str] | None, hf: str) -> bool:
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, hf) is not None
    return hf in spec or any(hf.endswith(f".{t}") for t in spec)


def _pattern_value(patterns: dict[str, Any], hf: str, default: Any) -> Any:
    """PEFT's rank/alpha_pattern lookup: a key matches a module name suffix (as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", hf):
            return value
    return default


def _check_target_list(config: dict[str, Any], cfg_path: Path, hf_linears: list[str]) -> None:
    targets = config["target_modules"]
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in hf_linears):
            raise AdapterError(f"{cfg_path}: target_modules={targets!r} matches no linear layer")
        return
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in hf_linears)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in hf_linears})
        raise AdapterError(
            f"{cfg_path}: target_modules {missing} match no linear layer of the model; "
            f"its linear layers are {leaves}"
        )


def _plan(
    model: nn.Module,
    config: dict[str, Any],
    cfg_path: Path,
    tensors: dict[str, torch.Tensor],
    wpath: Path,
) -> list[_Planned]:
    """Check every tensor against the config and the model before anything is changed."""
    linears = {hf_module_name(n): n for n in linear_module_names(model)}
    _check_target_list(config, cfg_path, list(linears))
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{wpath}:{key}: not a LoRA A/B weight llamaforge understands")
        hf = m["module"]
        if hf not in linears:
            raise AdapterError(f"{wpath}:{key}: the model has no linear layer {hf!r}")
        if not _targeted(config, hf):
            raise AdapterError(f"{wpath}:{key}: {hf} is not targeted by {cfg_path}")
        parts.setdefault(hf, {})[m["part"]] = (key, t)
    return [
        _plan_one(model, config, cfg_path, wpath, hf, linears[hf], p) for hf, p in parts.items()
    ]


def _plan_one(
    model: nn.Module,
    config: dict[str, Any],
    cfg_path: Path,
    wpath: Path,
    hf: str,
    ours: str,
    p: dict[str, tuple[str, torch.Tensor]],
) -> _Planned:
    """Shape/rank checks for one module's A and B; its alpha from the config."""
    for part in ("lora_A", "lora_B"):
        if part not in p:
            raise AdapterError(f"{wpath}: base_model.model.{hf}.{part}.weight is missing")
    (ka, a), (kb, b) = p["lora_A"], p["lora_B"]
    layer = model.get_submodule(ours)
    r = _pattern_value(config.get("rank_pattern"), hf, config["r"])
    want_a, want_b = (r, layer.in_features), (layer.out_features, r)
    for key, t, want in ((ka, a, want_a), (kb, b, want_b)):
        if tuple(t.shape) != want:
            raise AdapterError(
                f"{wpath}:{key}: shape {tuple(t.shape)}, expected {want} for r={r} "
                f"(from {cfg_path.name}) on {hf} (in={layer.in_features}, out={layer.out_features})"
            )
    alpha = _pattern_value(config.get("alpha_pattern"), hf, config["lora_alpha"])
    return _Planned(ours, a, b, float(alpha))


def load_peft_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    *,
    adapter_name: str = "default",
    trainable: bool = False,
    activate: bool = True,
) -> list[str]:
    """Load a PEFT LoRA folder into the model as adapter `adapter_name`; return the modules.

    Linear layers (plain or NF4) get wrapped in LoRALinear as needed; layers that already
    hold other adapters get this one beside them. Nothing changes if any check fails.
    """
    d = Path(adapter_dir)
    config = read_adapter_config(d)
    if adapter_name in adapter_names(model):
        raise ValueError(f"adapter {adapter_name!r} already exists; load under another name")
    tensors, wpath = _read_weights(d)
    score = tensors.pop(SCORE_KEY, None)  # a reward model's head (modules_to_save)
    plan = _plan(model, config, d / CONFIG_NAME, tensors, wpath)
    if not plan:
        raise AdapterError(f"{wpath}: holds no LoRA weights")
    dropout, rslora = float(config.get("lora_dropout") or 0.0), bool(config.get("use_rslora"))
    for p in plan:
        layer = model.get_submodule(p.module)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            parent, _, leaf = p.module.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, layer)
        layer.add_adapter(adapter_name, p.a.shape[0], p.alpha, dropout, rslora)
        with torch.no_grad():
            layer.lora_A[adapter_name].copy_(p.a)
            layer.lora_B[adapter_name].copy_(p.b)
        layer.lora_A[adapter_name].requires_grad_(trainable)
        layer.lora_B[adapter_name].requires_grad_(trainable)
    if score is not None:
        _load_score_head(model, score.float(), wpath)
    if activate:
        set_adapter(model, adapter_name)
    return [p.module for p in plan]


SCORE_KEY = "base_model.model.score.weight"


def _load_score_head(model: nn.Module, weight: torch.Tensor, wpath: Path) -> None:
    """Give the model the adapter's reward head (or overwrite the one it has)."""
    from .hf import add_score_head

    if weight.ndim != 2 or weight.shape[1] != model.cfg.dim:
        raise AdapterError(
            f"{wpath}:{SCORE_KEY}: shape {tuple(weight.shape)}, expected (labels, {model.cfg.dim})"
        )
    add_score_head(model, weight.shape[0], weight)
    model.score.float()
