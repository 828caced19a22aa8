"""Hugging Face checkpoints: config.json (both rope dialects) and safetensors shards.

Our module names are Hugging Face's without the leading `model.`, so the key map is a
prefix rule; the tied output head is the only special case.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..model.config import ConfigError, LlamaConfig, RopeScaling
from ..model.llama import Llama
from .atomic import write_dir_atomic

INDEX_NAME = "model.safetensors.index.json"
REWARD_ARCH = "LlamaForSequenceClassification"
_SUPPORTED_ARCH = {"LlamaForCausalLM", "MistralForCausalLM", REWARD_ARCH}
HEADS = ("score",)  # extra heads a caller may ask for: a reward model's scalar `score`


def hf_to_ours(key: str) -> str:
    """Map a transformers LlamaForCausalLM state-dict key to ours."""
    return key.removeprefix("model.")


def add_score_head(model: Llama, n_labels: int = 1, weight: torch.Tensor | None = None) -> Llama:
    """Give `model` a reward model's head `score` (hidden -> n_labels, no bias), as HF's
    LlamaForSequenceClassification has; initialised N(0, 1/hidden) unless `weight` is given."""
    p = model.embed_tokens.weight
    head = torch.nn.Linear(model.cfg.dim, n_labels, bias=False, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        if weight is None:
            head.weight.normal_(0.0, model.cfg.dim**-0.5)
        else:
            head.weight.copy_(weight)
    model.score = head
    return model


def ours_to_hf(key: str) -> str:
    """Map one of our state-dict keys to transformers' LlamaForCausalLM naming."""
    return key if key.startswith(("lm_head.", "score.")) else f"model.{key}"


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where}: missing required key {key!r}")
    return d[key]


def _rope_from_hf(d: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """Theta and llama3 scaling from `rope_parameters` or from `rope_theta` + `rope_scaling`."""
    params = d.get("rope_parameters") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or (params if params else None)
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ConfigError(f"{where}: rope type {kind!r} is not supported (only default, llama3)")
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    args = {k: _require(scaling, k, f"{where} rope scaling") for k in fields}
    return float(theta), RopeScaling(**args)


def config_from_hf(d: dict[str, Any], where: str = "config.json") -> LlamaConfig:
    """Build a LlamaConfig from a transformers config dict (v4 or v5 dialect)."""
    arch = d.get("architectures") or ["LlamaForCausalLM"]
    model_type = d.get("model_type", "llama")
    if model_type not in ("llama", "mistral") or not set(arch) & _SUPPORTED_ARCH:
        raise ConfigError(
            f"{where}: unsupported architecture {arch} (model_type {model_type!r}); "
            "llamaforge loads LLaMA-architecture checkpoints"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            raise ConfigError(f"{where}: {flag}=true is not a LLaMA layout we support")
    theta, scaling = _rope_from_hf(d, where)
    try:
        return LlamaConfig(
            vocab_size=_require(d, "vocab_size", where),
            dim=_require(d, "hidden_size", where),
            n_layers=_require(d, "num_hidden_layers", where),
            n_heads=_require(d, "num_attention_heads", where),
            n_kv_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"),
            ffn_dim=_require(d, "intermediate_size", where),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=int(d.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_id=d.get("bos_token_id"),
            eos_id=d.get("eos_token_id"),
            pad_id=d.get("pad_token_id"),
        )
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{where}: bad value type ({e})") from None


def config_to_hf(cfg: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """transformers config dict, rope as `rope_theta` + `rope_scaling` (read by v4 and v5)."""
    d: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_id,
        "pad_token_id": cfg.pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.rope_scaling is not None:
        r = cfg.rope_scaling
        d["rope_scaling"] = {
            "rope_type": r.rope_type,
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
        }
    return d


def read_config(model_dir: str | os.PathLike) -> LlamaConfig:
    """Parse `<dir>/config.json` with errors that name the file."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face model folder?)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config_from_hf(d, str(path))


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights found")
    return files


def load_hf_state_dict(
    model_dir: str | os.PathLike, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Read every shard into one state dict with our key names (optionally cast)."""
    sd: dict[str, torch.Tensor] = {}
    for f in _weight_files(Path(model_dir)):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                t = fh.get_tensor(key)
                sd[hf_to_ours(key)] = t.to(dtype) if dtype is not None else t
    return sd


def build_from_state_dict(
    cfg: LlamaConfig,
    sd: dict[str, torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    where: str = "checkpoint",
    heads: tuple[str, ...] = (),
) -> Llama:
    """Create a model from a full state dict without allocating random weights first.

    `heads` names extra heads the caller reads (e.g. "score" of a reward model); any other
    key the model does not have is an error naming it, never silently dropped. A reward
    model's folder has no `lm_head`: then the output head is tied to the embeddings.
    """
    bad_heads = set(heads) - set(HEADS)
    if bad_heads:
        raise ValueError(f"unknown heads {sorted(bad_heads)}; known: {HEADS}")
    head_sd = {k: sd.pop(k) for k in list(sd) if k.split(".")[0] in heads}
    sd = {k: v for k, v in sd.items() if "rotary_emb" not in k}
    with torch.device("meta"):
        model = Llama(cfg)
    expected = set(model.state_dict().keys())
    if cfg.tie_embeddings or (head_sd and "lm_head.weight" not in sd):
        sd.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = expected - sd.keys(), sd.keys() - expected
    if unexpected:
        hint = (
            " (a reward model's head: load it with heads=('score',))"
            if any(k.startswith("score.") for k in unexpected)
            else ""
        )
        raise ConfigError(f"{where}: unexpected weights {sorted(unexpected)[:5]}{hint}")
    if missing:
        raise ConfigError(f"{where}: missing weights {sorted(missing)[:5]}")
    for k, v in sd.items():
        want = model.state_dict()[k].shape
        if v.shape != want:
            raise ConfigError(
                f"{where}: weight {k} has shape {tuple(v.shape)}, config says {tuple(want)}"
            )
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    if "lm_head.weight" not in sd:
        model.lm_head.weight = model.embed_tokens.weight
    model.tie_weights()
    model.inv_freq = torch.empty(cfg.head_dim // 2, device=device)
    model.reset_rope()
    if "score.weight" in head_sd:
        w = head_sd["score.weight"]
        add_score_head(model, w.shape[0], w.to(device=device, dtype=dtype))
    return model


def load_hf(
    model_dir: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Llama:
    """Load a Hugging Face LLaMA folder (config.json + safetensors, sharded or not)."""
    cfg = read_config(model_dir)
    sd = load_hf_state_dict(model_dir)
    heads = ("score",) if is_reward_model(model_dir) else ()
    where = str(model_dir)
    return build_from_state_dict(cfg, sd, device=device, dtype=dtype, where=where, heads=heads)


def is_reward_model(model_dir: str | os.PathLike) -> bool:
    """Whether a HF folder holds a LlamaForSequenceClassification (a reward model)."""
    path = Path(model_dir) / "config.json"
    try:
        return REWARD_ARCH in (json.loads(path.read_text()).get("architectures") or [])
    except (OSError, ValueError):
        return False


def _shards(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    return shards


def save_hf(
    model: Llama,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> None:
    """Write config.json and safetensors shards (+ index when sharded), atomically per folder.

    The folder is assembled in a temporary sibling and renamed into place, so an
    interrupted save never leaves a half-written model where a good one was.
    """
    out = Path(out_dir)
    dtype = dtype or model.dtype
    reward = getattr(model, "score", None) is not None
    sd = {
        ours_to_hf(k): v.detach().to("cpu", dtype).contiguous()
        for k, v in model.state_dict().items()
        if not ((model.cfg.tie_embeddings or reward) and k == "lm_head.weight")
    }

    def write(tmp: Path) -> None:
        shards = _shards(sd, max_shard_bytes)
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
        else:
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=meta)
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(v.numel() * v.element_size() for v in sd.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        config = config_to_hf(model.cfg, dtype)
        if reward:  # transformers' LlamaForSequenceClassification reads it back
            config["architectures"] = [REWARD_ARCH]
            n = model.score.weight.shape[0]
            config["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
            config["label2id"] = {f"LABEL_{i}": i for i in range(n)}
            # transformers scores the last token that is not pad_token_id (it refuses
            # batches without one); ours scores each row's last token by length.
            if config["pad_token_id"] is None:
                config["pad_token_id"] = model.cfg.eos_id if model.cfg.eos_id is not None else 0
        (tmp / "config.json").write_text(json.dumps(config, indent=2))

    write_dir_atomic(out, write, lambda name: name.endswith(".safetensors") or name == INDEX_NAME)
