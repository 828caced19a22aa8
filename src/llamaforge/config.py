"""Typed run configuration: YAML file + `key=value` overrides, validated on load.

Every error is one line that names the key, and `file:line` where the YAML says it:
`configs/x.yaml:7: unknown key 'data.pth' (did you mean 'data.path'?)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .kernels import Kernels
from .model.config import ConfigError as _BaseConfigError


class ConfigError(_BaseConfigError):
    """A run configuration is malformed; the message is one line naming the key."""


Check = tuple[Callable[[Any], bool], str]
POSITIVE: Check = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE: Check = (lambda v: v >= 0, "must be >= 0")
AT_LEAST_1: Check = (lambda v: v >= 1, "must be >= 1")
AT_LEAST_2: Check = (lambda v: v >= 2, "must be >= 2")
FRACTION: Check = (lambda v: 0 <= v < 1, "must be in [0, 1)")
UNIT: Check = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
NON_EMPTY: Check = (lambda v: len(v) > 0, "must not be empty")
BETAS: Check = (
    lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
    "must be two numbers in [0, 1)",
)
BUDGET: Check = (lambda v: v == "auto" or v > 0, "must be a number of GB > 0 or auto")
DEVICE: Check = (
    lambda v: re.fullmatch(r"cpu|mps|cuda(:\d+)?", v) is not None,
    "must be cpu, cuda, cuda:N or mps",
)


def _f(default: Any = dataclasses.MISSING, check: Check | None = None, **kw: Any) -> Any:
    """A dataclass field with an optional value check (skipped for None)."""
    meta = {"check": check} if check else {}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _default_output_dir() -> str:
    return time.strftime("runs/%Y%m%d-%H%M%S")


DATA_FORMATS = Literal[
    "alpaca",
    "dialogsum",
    "messages",
    "sharegpt",
    "text",
    "preference",
    "chitchat_chat",
    "chitchat_topic",
    "chitchat_next_turn",
    "chitchat_ratings",
    "auto",
]
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DataConfig:
    """Where the training data is and how it becomes token ids."""

    path: str
    format: DATA_FORMATS = "auto"
    columns: dict[str, str] = _f({})
    template: str = "auto"
    max_seq_len: int = _f(1024, AT_LEAST_2)
    truncation: Literal["right", "left", "drop"] = "right"
    packing: bool = False
    train_on_prompt: bool = False
    val_size: float = _f(0.05, FRACTION)
    test_size: float = _f(0.0, FRACTION)
    split_seed: int = 0
    lenient: bool = False
    limit: int | None = _f(None, AT_LEAST_1)
    cache_dir: str | None = None
    # processes that render and tokenize rows (null: one per CPU core, at most 8; 1: this
    # process only); the result does not depend on it
    num_workers: int | None = _f(None, AT_LEAST_1)
    text_key: str = "text"
    system: str | None = None
    val_path: str | None = None
    max_words: int | None = _f(None, AT_LEAST_1)  # chitchat_topic: dialogue cut (default 350)
    # preference pairs: the prompt keeps at most this many tokens when a pair is too long
    # (default max_seq_len // 2), cut from the left (keeps its end) or the right
    max_prompt_len: int | None = _f(None, AT_LEAST_1)
    prompt_truncation: Literal["left", "right"] = "left"


@dataclass
class LoraConfig:
    """Low-rank adapters beside frozen weights."""

    r: int = _f(16, AT_LEAST_1)
    alpha: float = _f(32.0, POSITIVE)
    # 0 as in peft's LoraConfig, Unsloth and LLaMA-Factory; it also lets `cuda_graph: auto`
    # capture the step (a run with dropout trains eagerly)
    dropout: float = _f(0.0, FRACTION)
    targets: list[str] = _f(DEFAULT_TARGETS, NON_EMPTY)
    rslora: bool = False


@dataclass
class QloraConfig:
    """4-bit NormalFloat base weights under LoRA."""

    double_quant: bool = True
    blocksize: int = _f(64, AT_LEAST_1)


@dataclass
class FreezeConfig:
    """Which parts train when method is `freeze` ([] train_layers means the last 2)."""

    train_layers: list[int] = _f([])
    train_modules: list[str] = _f([])


@dataclass
class OptimConfig:
    """AdamW, the learning-rate schedule, clipping and batch shape."""

    lr: float = _f(2e-4, POSITIVE)
    weight_decay: float = _f(0.0, NON_NEGATIVE)
    betas: list[float] = _f([0.9, 0.999], BETAS)
    eps: float = _f(1e-8, POSITIVE)
    warmup_steps: int = _f(0, NON_NEGATIVE)
    warmup_ratio: float = _f(0.0, UNIT)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = _f(0.0, UNIT)
    max_grad_norm: float = _f(1.0, NON_NEGATIVE)
    batch_size: int = _f(8, AT_LEAST_1)
    grad_accum: int = _f(1, AT_LEAST_1)
    max_nonfinite_steps: int = _f(5, AT_LEAST_1)
    # full fine-tuning under bf16: bf16 weights and AdamW states with stochastically
    # rounded updates (8 bytes/param; `auto`, the default, when precision is bf16), or fp32
    # master weights + states under autocast (16 bytes/param). Same loss curve within
    # seed noise over 500 steps of real data (benchmarks/RESULTS.md, optimizer_curve.py).
    master_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    # apply each parameter's AdamW update as soon as its gradient is complete, during the
    # backward, and free that gradient (train/optim.py::InBackwardOptimizer): a full set of
    # gradients never lives at once. Needs grad_accum 1 and max_grad_norm 0 (clipping needs
    # every gradient at once), not fp16, one process.
    step_in_backward: bool = False


@dataclass
class GenerateEvalConfig:
    """Generation-based evaluation on held-out examples."""

    max_examples: int = _f(50, NON_NEGATIVE)
    max_new_tokens: int = _f(32, AT_LEAST_1)
    metrics: list[str] = _f(["exact_match", "rouge_l"])


@dataclass
class EvalConfig:
    """When to evaluate and when to stop early (every: null means at the end only)."""

    every: int | None = _f(None, AT_LEAST_1)
    max_batches: int | None = _f(None, AT_LEAST_1)
    patience: int | None = _f(None, AT_LEAST_1)
    min_delta: float = _f(0.0, NON_NEGATIVE)
    generate: GenerateEvalConfig = field(default_factory=GenerateEvalConfig)


@dataclass
class CheckpointConfig:
    """How often to save, how many to keep, and where to resume from (auto|never|<path>)."""

    every: int | None = _f(None, AT_LEAST_1)
    keep: int = _f(2, AT_LEAST_1)
    resume: str = "auto"


@dataclass
class LoggingConfig:
    """Metrics cadence and sinks."""

    every: int = _f(1, AT_LEAST_1)
    tensorboard: bool = True
    plot: bool = True
    progress: bool = True


@dataclass
class DistributedConfig:
    """Several processes under torchrun (`auto`: fsdp2 when launched by torchrun, else none).

    fsdp2 shards every block and the root with `fully_shard`; ddp replicates the model and
    all-reduces gradients. timeout_s bounds every collective, so a rank that died or hangs
    ends the job instead of stalling it. reshard_after_forward: FSDP2 frees each block's
    gathered weights after its forward and gathers them again for backward (false keeps
    them: less communication, more memory).
    """

    strategy: Literal["auto", "none", "fsdp2", "ddp"] = "auto"
    timeout_s: int = _f(1800, AT_LEAST_1)
    reshard_after_forward: bool = True


@dataclass
class RewardConfig:
    """Reward model (`stage: rm`): loss -log σ(r_chosen - r_rejected - margin) + centring."""

    margin: float = 0.0
    center_coef: float = _f(0.0, NON_NEGATIVE)  # weight of (r_c + r_r)^2, keeps rewards near 0
    # each pair one row, the prompt once (as dpo.shared_prompt); false: two rows a pair
    shared_prompt: bool = True


@dataclass
class DpoConfig:
    """Direct preference optimisation (`stage: dpo`) and its relatives.

    reference: `auto` is the base with adapters switched off for lora/qlora (no second copy
    in memory) and log-probs precomputed once for full/freeze; `precompute` always
    precomputes (before training, with the starting weights). shared_prompt: each pair is
    one row, its prompt once and both answers after it (the rejected one masked from the
    chosen one), so the prompt's tokens go through the model once instead of twice; false:
    chosen and rejected as two rows, each with its own copy of the prompt.
    """

    loss: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo"] = "sigmoid"
    beta: float = _f(0.1, POSITIVE)
    gamma: float = _f(0.5, NON_NEGATIVE)  # SimPO's target margin
    label_smoothing: float = _f(0.0, (lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"))
    reference: Literal["auto", "adapters_off", "precompute"] = "auto"
    shared_prompt: bool = True


@dataclass
class RsConfig:
    """Rejection sampling (`stage: rs`): the best of n answers by a reward model, then SFT.

    Each round samples `n` answers for `prompts` training prompts, keeps each prompt's best
    (only when its reward >= threshold, and >= the mean of its n + min_margin, where set)
    and fine-tunes the starting model on the kept answers (of every round so far with
    accumulate). reward_model: the `model/` folder a `stage: rm` run writes.
    """

    reward_model: str | None = None
    n: int = _f(4, AT_LEAST_1)
    rounds: int = _f(1, AT_LEAST_1)
    prompts: int = _f(64, AT_LEAST_1)  # training prompts sampled per round
    eval_prompts: int = _f(32, AT_LEAST_1)  # held-out prompts for the greedy reward
    max_new_tokens: int = _f(64, AT_LEAST_1)
    temperature: float = _f(1.0, NON_NEGATIVE)
    top_k: int = _f(0, NON_NEGATIVE)
    top_p: float = _f(1.0, (lambda v: 0 < v <= 1, "must be in (0, 1]"))
    threshold: float | None = None
    min_margin: float | None = None
    accumulate: bool = True
    batch_size: int = _f(16, AT_LEAST_1)  # rows the engine samples at once


@dataclass
class PpoConfig:
    """RLHF with PPO (`stage: ppo`): rollouts, KL penalty to the reference, GAE, clipping.

    Prompts come from `data` (only the prompt side of SFT/preference rows; `text` rows are
    user messages). reward_model: a `stage: rm` output, its merged `model/` folder or its
    `adapter/` (a LoRA reward model of the same base becomes a third adapter on it).
    kl_controller `adaptive` moves kl_coef toward kl_target (summed KL per response) over
    kl_horizon samples. reward_clip bounds the reward model's score to [-c, c];
    length_penalty is subtracted per response token; missing_eos_penalty from responses cut
    at max_new_tokens. Each rollout of rollout_batch_size x samples_per_prompt responses
    gets `epochs` passes in `mini_batches` optimizer steps each (optim.batch_size is the
    micro-batch of every forward pass). rollout_engine: sample on the serving engine
    (continuous batching; CUDA-graph decode on a GPU when the actor is a LoRA adapter);
    false: the plain `model.generate` KV-cache loop.
    """

    reward_model: str | None = None
    rollout_batch_size: int = _f(8, AT_LEAST_1)
    samples_per_prompt: int = _f(1, AT_LEAST_1)
    max_new_tokens: int = _f(48, AT_LEAST_1)
    temperature: float = _f(1.0, POSITIVE)
    top_p: float = _f(1.0, (lambda v: 0 < v <= 1, "must be in (0, 1]"))
    stop_on_eot: bool = True
    kl_coef: float = _f(0.05, NON_NEGATIVE)
    kl_controller: Literal["fixed", "adaptive"] = "fixed"
    kl_target: float = _f(6.0, POSITIVE)
    kl_horizon: int = _f(10000, AT_LEAST_1)
    kl_estimator: Literal["k1", "k3"] = "k1"
    gamma: float = _f(1.0, UNIT)
    lam: float = _f(0.95, UNIT)
    clip_ratio: float = _f(0.2, POSITIVE)
    clip_value: float = _f(0.2, POSITIVE)
    vf_coef: float = _f(0.1, NON_NEGATIVE)
    epochs: int = _f(1, AT_LEAST_1)
    mini_batches: int = _f(1, AT_LEAST_1)
    reward_clip: float | None = _f(None, POSITIVE)
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    length_penalty: float = 0.0
    missing_eos_penalty: float | None = _f(None, NON_NEGATIVE)
    eval_prompts: int = _f(32, NON_NEGATIVE)  # held-out prompts scored before and after
    rollout_engine: bool = True


@dataclass
class TrainConfig:
    """What the shared training loop needs (a view of RunConfig, or built directly)."""

    max_steps: int | None = _f(None, AT_LEAST_1)
    epochs: float = _f(1.0, POSITIVE)
    seed: int = _f(0, NON_NEGATIVE)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    activation_checkpointing: bool = False
    activation_offload: bool = False  # checkpointed layer inputs kept in CPU memory (long ctx)
    # With offload, only the inputs of the first N checkpointed blocks go to CPU memory
    # (None: every checkpointed block's); the rest stay on the GPU
    activation_offload_layers: int | None = _f(None, NON_NEGATIVE)
    # With checkpointing, recompute only the first N blocks (None: every block)
    activation_checkpointing_layers: int | None = _f(None, NON_NEGATIVE)
    # With checkpointing, checkpointed blocks keep their fused attention kernel's output and
    # log-sum-exp (tokens x dim each), so the recompute skips the attention forward
    activation_checkpointing_keep_attention: bool = False
    # With checkpointing, a batch of more tokens runs each feed-forward over slices this size
    mlp_chunk_tokens: int | None = _f(16384, AT_LEAST_1)
    # a frozen, untied input embedding table kept in host memory (rows gathered there)
    embeddings_on_host: bool = False
    # packed LoRA/QLoRA pt/sft: each step one replayed CUDA graph (train/graph_step.py);
    # auto (the default): where the run qualifies (see RunConfig.cuda_graph)
    cuda_graph: bool | Literal["auto"] = "auto"
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class RunConfig:
    """One training run, as written in a YAML file (max_steps, if set, wins over epochs)."""

    model: str
    data: DataConfig
    stage: Literal["pt", "sft", "rm", "dpo", "ppo", "rs"] = "sft"
    method: Literal["full", "freeze", "lora", "qlora"] = "lora"
    output_dir: str = field(default_factory=_default_output_dir)
    seed: int = _f(0, NON_NEGATIVE)
    max_steps: int | None = _f(None, AT_LEAST_1)
    epochs: float = _f(1.0, POSITIVE)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str | None = _f(None, DEVICE)
    activation_checkpointing: bool = False
    activation_offload: bool = False
    activation_offload_layers: int | None = _f(None, NON_NEGATIVE)
    activation_checkpointing_layers: int | None = _f(None, NON_NEGATIVE)
    activation_checkpointing_keep_attention: bool = False
    mlp_chunk_tokens: int | None = _f(16384, AT_LEAST_1)
    # Keep a frozen, untied input embedding table (LoRA/QLoRA/freeze of Llama-3.1-8B: 1.05
    # GB) in host memory: each step's rows are gathered there and copied over. The memory
    # plan turns it on when every block is checkpointed and the run still does not fit
    embeddings_on_host: bool = False
    # Packed LoRA/QLoRA pt or sft in one process: capture each step (forward, backward,
    # clipping, AdamW) once as a CUDA graph and replay it: no per-kernel host work, which
    # bounds small models (train/graph_step.py; eager on the CPU). auto: on a GPU where
    # the run qualifies (and, until measured otherwise, without LoRA dropout or
    # activation checkpointing; a capture that fails falls back to eager steps), the
    # default since a whole `llamaforge train` run with it trained the same losses 2.12x
    # faster on an H100; true: required (a conflicting key is an error); false: off
    cuda_graph: bool | Literal["auto"] = "auto"
    # GB the run may use (auto: the GPU's free memory; null: no plan); the recipe measures
    # the run and chooses which blocks are checkpointed or offloaded (train/memory_plan.py).
    # Under auto, activation_checkpointing/_offload set by hand win over the plan.
    memory_budget_gb: float | Literal["auto"] | None = _f("auto", BUDGET)
    kernels: Kernels = field(default_factory=Kernels)  # fused GPU kernels, each opt-out
    lora: LoraConfig = field(default_factory=LoraConfig)
    qlora: QloraConfig = field(default_factory=QloraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    rm: RewardConfig = field(default_factory=RewardConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    rs: RsConfig = field(default_factory=RsConfig)
    ppo: PpoConfig = field(default_factory=PpoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-ready)."""
        return dataclasses.asdict(self)

    def train_config(self) -> TrainConfig:
        """The loop's view of this run."""
        names = [f.name for f in dataclasses.fields(TrainConfig)]
        tcfg = TrainConfig(**{n: getattr(self, n) for n in names})
        if self.cuda_graph == "auto" and self.method not in ("lora", "qlora"):
            tcfg.cuda_graph = False  # captured steps are measured for adapters only
        return tcfg


# ---------------------------------------------------------------- loading


class _Origins:
    """Where each dotted key came from: `file:line`, `override 'k=v'`, or the file."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.where: dict[str, str] = {}

    def of(self, key: str) -> str:
        """The origin of `key`, else of its nearest parent, else the file."""
        while key:
            if key in self.where:
                return self.where[key]
            key = re.sub(r"\[\d+\]$", "", key) if key.endswith("]") else key.rpartition(".")[0]
        return self.source

    def error(self, key: str, msg: str) -> ConfigError:
        """A ConfigError prefixed with the key's origin."""
        return ConfigError(f"{self.of(key)}: {msg}")


def _read_yaml(path: Path, origins: _Origins) -> dict[str, Any]:
    """Parse `path`, recording each key's line; syntax errors become `file:line` errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 at byte {e.start}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        _record_lines(node, "", path, origins)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {e.problem or e.context}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def _record_lines(node: yaml.Node, prefix: str, path: Path, origins: _Origins) -> None:
    """Walk a composed mapping, storing `file:line` per dotted key; reject duplicate keys."""
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = f"{prefix}{key_node.value}"
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"{path}:{line}: duplicate key '{key}' (first at line {seen[key]})")
        seen[key] = line
        origins.where[key] = f"{path}:{line}"
        _record_lines(value_node, f"{key}.", path, origins)


def _apply_override(raw: dict[str, Any], item: str, origins: _Origins) -> None:
    """Set one dotted `key=value` (value parsed as YAML) into the raw dict."""
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"override '{item}': expected key=value with a dotted key")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    origins.where[key] = f"override '{item}'"


def _section_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted keys a dataclass accepts (for did-you-mean suggestions)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _section_keys(hints[f.name], f"{key}.")
    return keys


def _unknown_key(key: str, origins: _Origins) -> ConfigError:
    """Error for an unknown key, with the closest valid key suggested."""
    near = difflib.get_close_matches(key, _section_keys(RunConfig), n=1, cutoff=0.6)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return origins.error(key, f"unknown key '{key}'{hint}")


def _build(cls: type, raw: Any, prefix: str, origins: _Origins) -> Any:
    """Instantiate dataclass `cls` from a raw mapping, validating every key."""
    where = prefix.rstrip(".")
    if not isinstance(raw, dict):
        raise origins.error(where, f"key '{where}': expected a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in fields:
            raise _unknown_key(f"{prefix}{name}", origins)
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], key, origins)
            _check(kwargs[name], f, key, origins)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise origins.error(where, f"missing required key '{key}'")
    return cls(**kwargs)


def _check(value: Any, f: dataclasses.Field, key: str, origins: _Origins) -> None:
    """Apply the field's range check, if any (None always passes)."""
    check = f.metadata.get("check")
    if check is not None and value is not None and not check[0](value):
        raise origins.error(key, f"key '{key}': {check[1]}, got {_show(value)}")


def _show(value: Any) -> str:
    """A short rendering of a bad value for error messages."""
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(tp: Any) -> str:
    """Human words for an expected type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    return {list: "a list", dict: "a mapping"}.get(origin, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str, origins: _Origins) -> Any:
    """Validate `value` against type `tp`; return it converted (e.g. int -> float)."""
    bad = origins.error(key, f"key '{key}': expected {_describe(tp)}, got {_show(value)}")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.", origins)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for alt in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, alt, key, origins)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, args[0], f"{key}[{i}]", origins) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {
            _coerce(k, args[0], key, origins): _coerce(v, args[1], f"{key}.{k}", origins)
            for k, v in value.items()
        }
    return _coerce_scalar(value, tp, bad)


def _coerce_scalar(value: Any, tp: type, bad: ConfigError) -> Any:
    """bool/int/float/str checks; a float also accepts '2e-4' (PyYAML reads it as a string)."""
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - schema uses only the types above
        raise TypeError(f"unsupported config type {tp!r}")
    if not ok:
        raise bad
    return value


PAIR_FORMATS = ("preference", "chitchat_next_turn", "chitchat_ratings")


def _in_backward_checks(cfg: RunConfig | TrainConfig, origins: _Origins) -> None:
    """optim.step_in_backward: what it cannot do, named by key."""
    o = cfg.optim
    if not o.step_in_backward:
        return
    if o.grad_accum != 1:
        raise origins.error(
            "optim.grad_accum",
            "key 'optim.grad_accum' must be 1 with 'optim.step_in_backward: true' (each "
            "gradient is applied and freed as soon as the backward completes it)",
        )
    if o.max_grad_norm > 0:
        raise origins.error(
            "optim.max_grad_norm",
            "key 'optim.max_grad_norm' must be 0 with 'optim.step_in_backward: true' "
            "(clipping to a global norm needs every gradient at once)",
        )
    if cfg.precision == "fp16":
        raise origins.error(
            "precision",
            "key 'precision: fp16' cannot be used with 'optim.step_in_backward: true' (the "
            "grad scaler must see every gradient before any is applied); use bf16",
        )


def _cross_checks(cfg: RunConfig | TrainConfig, origins: _Origins) -> None:
    """Rules spanning several keys (those of the loop for a TrainConfig too)."""
    if isinstance(cfg, RunConfig):
        _run_checks(cfg, origins)
    if cfg.checkpoint.resume not in ("auto", "never") and not cfg.checkpoint.resume.strip():
        raise origins.error("checkpoint.resume", "key 'checkpoint.resume': empty path")
    _in_backward_checks(cfg, origins)
    if cfg.activation_offload and not cfg.activation_checkpointing:
        raise origins.error(
            "activation_offload",
            "key 'activation_offload' needs 'activation_checkpointing: true' (it offloads "
            "the checkpointed layer inputs)",
        )
    if cfg.activation_offload_layers is not None and not cfg.activation_offload:
        raise origins.error(
            "activation_offload_layers",
            "key 'activation_offload_layers' needs 'activation_offload: true' (it says how "
            "many checkpointed blocks offload their inputs)",
        )
    if cfg.cuda_graph is True:
        _cuda_graph_checks(cfg, origins)
    keep, plan = cfg.activation_checkpointing_keep_attention, getattr(cfg, "memory_budget_gb", None)
    if keep and cfg.activation_offload:
        raise origins.error(
            "activation_checkpointing_keep_attention",
            "key 'activation_checkpointing_keep_attention' with 'activation_offload: true': "
            "the kept attention outputs would stay on the GPU while the inputs leave it; "
            "drop one of them",
        )
    if keep and not cfg.activation_checkpointing and plan is None:
        raise origins.error(
            "activation_checkpointing_keep_attention",
            "key 'activation_checkpointing_keep_attention' needs 'activation_checkpointing: "
            "true' or a 'memory_budget_gb' plan (it applies to checkpointed blocks)",
        )
    if cfg.activation_checkpointing_layers is not None and not cfg.activation_checkpointing:
        raise origins.error(
            "activation_checkpointing_layers",
            "key 'activation_checkpointing_layers' needs 'activation_checkpointing: true' (it "
            "says how many blocks are checkpointed)",
        )


def _cuda_graph_checks(cfg: RunConfig | TrainConfig, origins: _Origins) -> None:
    """What a captured step cannot do: each conflict named by its key."""
    conflicts = [
        (cfg.optim.grad_accum != 1, "optim.grad_accum", "one micro-batch a step"),
        (cfg.activation_offload, "activation_offload", "no CPU copies inside the graph"),
        (cfg.optim.step_in_backward, "optim.step_in_backward", "AdamW after the backward"),
        (cfg.precision == "fp16", "precision", "no fp16 grad scaler (use bf16)"),
        (
            cfg.activation_checkpointing_keep_attention,
            "activation_checkpointing_keep_attention",
            "plain checkpointing (kept attention outputs are not tried inside a capture)",
        ),
    ]
    if isinstance(cfg, RunConfig):
        conflicts += [
            (not cfg.data.packing, "data.packing", "packed rows (data.packing: true)"),
            (cfg.method not in ("lora", "qlora"), "method", "method lora or qlora"),
            (cfg.stage not in ("pt", "sft"), "stage", "stage pt or sft"),
            (cfg.distributed.strategy in ("fsdp2", "ddp"), "distributed.strategy", "one process"),
        ]
    for bad, key, need in conflicts:
        if bad:
            raise origins.error(key, f"key 'cuda_graph: true' needs {need} (see key '{key}')")


def _run_checks(cfg: RunConfig, origins: _Origins) -> None:
    """Rules of a whole run: data splits, and stages with the data they need."""
    if cfg.memory_budget_gb not in (None, "auto"):  # a budget the user gave: check its use
        hand = (
            "activation_checkpointing",
            "activation_offload",
            "activation_offload_layers",
            "embeddings_on_host",
        )
        for key in hand:
            if getattr(cfg, key) not in (False, None):
                raise origins.error(
                    key,
                    f"key '{key}' and key 'memory_budget_gb' both set: the budget chooses the "
                    "checkpointed and offloaded blocks and the embeddings' place itself; drop "
                    "one of them",
                )
        if cfg.stage in ("ppo", "rs"):
            raise origins.error(
                "memory_budget_gb",
                f"key 'memory_budget_gb': stages pt, sft, rm and dpo only (not {cfg.stage})",
            )
        if cfg.distributed.strategy in ("fsdp2", "ddp"):
            raise origins.error(
                "memory_budget_gb",
                "key 'memory_budget_gb': one process only for now (the plan does not model "
                f"{cfg.distributed.strategy}'s sharding)",
            )
    if cfg.embeddings_on_host and (
        cfg.method == "full" or cfg.distributed.strategy in ("fsdp2", "ddp")
    ):
        why = "full fine-tuning trains them" if cfg.method == "full" else "one process only"
        raise origins.error(
            "embeddings_on_host", f"key 'embeddings_on_host: true' cannot be used: {why}"
        )
    if cfg.data.val_size + cfg.data.test_size >= 1:
        raise origins.error("data.test_size", "keys 'data.val_size' + 'data.test_size' must be < 1")
    pairs = cfg.data.format in PAIR_FORMATS
    if cfg.stage in ("rm", "dpo") and not pairs and cfg.data.format != "auto":
        raise origins.error(
            "data.format",
            f"stage {cfg.stage} trains on preference pairs: data.format must be one of "
            f"{', '.join(PAIR_FORMATS)}, got {cfg.data.format!r}",
        )
    if pairs and cfg.stage not in ("rm", "dpo", "ppo", "rs"):
        raise origins.error(
            "stage", f"data.format {cfg.data.format} holds preference pairs: use stage rm or dpo"
        )
    if cfg.stage == "ppo":
        _ppo_checks(cfg.ppo, origins)
    if cfg.dpo.reference == "adapters_off" and cfg.method not in ("lora", "qlora"):
        raise origins.error(
            "dpo.reference",
            "key 'dpo.reference': adapters_off needs method lora or qlora (use precompute)",
        )


def _ppo_checks(p: PpoConfig, origins: _Origins) -> None:
    """Rules of `stage: ppo`: a reward model, and rollouts that split into mini-batches."""
    if not p.reward_model:
        raise origins.error(
            "ppo.reward_model",
            "stage ppo needs key 'ppo.reward_model' (a folder written by stage rm)",
        )
    n = p.rollout_batch_size * p.samples_per_prompt
    if n % p.mini_batches:
        raise origins.error(
            "ppo.mini_batches",
            f"key 'ppo.mini_batches': {p.mini_batches} does not divide the {n} samples of a "
            "rollout (ppo.rollout_batch_size x ppo.samples_per_prompt)",
        )


def _resolve(raw: dict[str, Any], overrides: list[str] | None, origins: _Origins) -> RunConfig:
    """Apply overrides to a raw dict, then build and cross-check the RunConfig."""
    for item in overrides or []:
        _apply_override(raw, item, origins)
    cfg = _build(RunConfig, raw, "", origins)
    _cross_checks(cfg, origins)
    return cfg


def config_from_dict(
    raw: dict[str, Any], overrides: list[str] | None = None, *, source: str = "<config>"
) -> RunConfig:
    """Validate a raw nested dict (plus overrides) into a RunConfig."""
    return _resolve(_deep_copy(raw), overrides, _Origins(source))


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config, apply dotted `key=value` overrides, validate everything."""
    origins = _Origins(str(path))
    return _resolve(_read_yaml(Path(path), origins), overrides, origins)


def validate(cfg: Any) -> None:
    """Check a config dataclass built in code with the same rules as a loaded one."""
    origins = _Origins(f"<{type(cfg).__name__}>")
    _build(type(cfg), dataclasses.asdict(cfg), "", origins)
    if isinstance(cfg, RunConfig | TrainConfig):
        _cross_checks(cfg, origins)


def _deep_copy(raw: Any) -> Any:
    """Copy nested dicts so overrides do not mutate the caller's mapping."""
    return {k: _deep_copy(v) for k, v in raw.items()} if isinstance(raw, dict) else raw


def save_resolved(cfg: RunConfig, out_dir: str | Path) -> Path:
    """Write the fully resolved config to `out_dir/config.yaml` and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    return path
