"""Training throughput: llamaforge against its peers, side by side on one GPU.

One invocation trains llamaforge and the baselines (transformers + peft; + Liger kernels;
+ bitsandbytes for QLoRA; Unsloth) on the same shape, batch, sequence length, LoRA rank,
alpha and targets, each in its own process: randomly initialised weights, random token ids
with labels = inputs, gradient checkpointing (non-reentrant), AdamW (fused on CUDA) with
gradient clipping at 1.0. Each stack reports tokens/s (median step time over the timed
steps after the warm-up steps), the peak allocated memory of its training steps, and the
first step's loss (random init: all should be near ln(vocab)). The table adds model-FLOPs
utilisation against the datasheet bf16 peak and against a bf16 matmul ceiling measured on
the same GPU, and llamaforge / baseline ratios. A stack whose package is missing is
reported as skipped. Results also go to JSON (--out).

    python benchmarks/train_throughput.py --workload lora8b --out lora8b.json
    python benchmarks/train_throughput.py --workload qlora8b --out qlora8b.json
    python benchmarks/train_throughput.py --workload full1b --out full1b.json   # batch 4
    python benchmarks/train_throughput.py --bs 1 --seq 16384 --stacks llamaforge,unsloth
    python benchmarks/train_throughput.py --workload lora8b --seqs 1024,2048,4096,8192,16384
    python benchmarks/train_throughput.py --shape tiny --steps 3 --warmup 1     # CPU test

Workloads are `<method><size>` (lora8b, qlora8b, full1b, lora1b, lora3b, ...) or
`<method>:<preset>` for any llamaforge preset (lora:smollm2-360m). `--shape tiny` keeps the
method but swaps in a small model and 128 tokens, so the whole script runs on a CPU (fp32,
foreach AdamW, one torch thread per child, MFU "n/a") in well under a minute as a smoke
test; its speeds mean nothing.

Stacks: llamaforge, hf (transformers + peft), hf-liger (+ Liger kernels), hf-bnb and
hf-bnb-liger (+ bitsandbytes NF4 + double quantisation: the QLoRA workload's HF stacks;
there `hf` means `hf-bnb`), unsloth. bitsandbytes and Unsloth load weights from disk, so
for them the script first saves the random model (and a small tokenizer Unsloth needs) to a
temporary folder, once per run.

Model FLOPs per token (as BASELINES.md): c*N + 12*L*T*d_attn, where N counts the matmul
weights (blocks and lm_head, not the embedding lookup), c = 4 for LoRA/QLoRA (forward plus
input-gradient backward through the frozen base) and 6 for full fine-tuning, and attention
is counted non-causal (QK^T and AV: 4*L*T*d_attn forward, twice that backward).
Recomputation from checkpointing and the LoRA matrices are not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
RESULT_TAG = "RESULT "
DATASHEET_TFLOPS = 989.0  # H100 SXM dense bf16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIZES = {"8b": "llama3.1-8b", "3b": "llama3.2-3b", "1b": "llama3.2-1b"}
DEFAULT_BS = {"lora": 2, "qlora": 2, "full": 4}
LR = {"lora": 2e-4, "qlora": 2e-4, "full": 1e-5}
TINY = {"preset": "tiny-llama3", "dim": 128, "ffn_dim": 352, "vocab_size": 512, "seq": 128}


@dataclass(frozen=True)
class Stack:
    """A contender: what it needs installed, and what it is called in the table."""

    label: str
    modules: tuple[str, ...] = ()
    liger: bool = False
    bnb: bool = False
    needs_dir: bool = False
    # llamaforge variants
    plain: bool = False  # every fused kernel off
    master: str = "auto"  # full fine-tuning's `optim.master_dtype` (auto: bf16 on a GPU)
    fused_adamw: bool = True  # bf16-master AdamW through its Triton kernel (the default)
    offload: bool = False  # checkpointed layer inputs in CPU memory
    fused_lora: bool = True  # LoRA layers as one autograd node (`kernels.lora`, the default)
    # the residual add fused into the next norm (`kernels.residual_rmsnorm`, the default)
    fused_residual: bool = True
    dist: str | None = None  # through torch.distributed at world size 1: fsdp2 | ddp
    in_backward: bool = False  # `optim.step_in_backward`: AdamW per tensor in the backward
    graph: bool = False  # each step one replayed CUDA graph (`cuda_graph`, LoRA/QLoRA)
    host_embeddings: bool = False  # the input table in host memory (`embeddings_on_host`)
    compiled: bool = False  # every block through torch.compile (inductor), one graph a block
    # the timed steps inside the training loop's `frozen_gc` (what `llamaforge train` does)
    gc_frozen: bool = True


STACKS = {
    "llamaforge": Stack("llamaforge"),
    "llamaforge-plain": Stack("llamaforge, kernels off", plain=True),
    "llamaforge-fp32": Stack("llamaforge, fp32 masters", master="fp32"),
    "llamaforge-bf16": Stack(
        "llamaforge, bf16 masters, unfused AdamW", master="bf16", fused_adamw=False
    ),
    "llamaforge-unfused-lora": Stack(
        "llamaforge, LoRA layers unfused (kernels.lora false)", fused_lora=False
    ),
    "llamaforge-unfused-residual": Stack(
        "llamaforge, residual add unfused from the norm", fused_residual=False
    ),
    "llamaforge-offload": Stack("llamaforge, activations offloaded", offload=True),
    "llamaforge-inbw": Stack(
        "llamaforge, AdamW applied in the backward (grads freed, no clipping)", in_backward=True
    ),
    "llamaforge-graph": Stack(
        "llamaforge, each step one CUDA graph (rows as packed one-document rows)", graph=True
    ),
    "llamaforge-compile": Stack("llamaforge, each block torch.compile'd", compiled=True),
    "llamaforge-compile-plain": Stack(
        "llamaforge, each block torch.compile'd over the plain PyTorch ops (inductor fuses)",
        plain=True,
        compiled=True,
    ),
    "llamaforge-gc": Stack(
        "llamaforge, the cyclic GC walking every object (no frozen_gc)", gc_frozen=False
    ),
    "llamaforge-host": Stack("llamaforge, input embeddings in host memory", host_embeddings=True),
    "llamaforge-graph-host": Stack(
        "llamaforge, each step one CUDA graph, input embeddings in host memory",
        graph=True,
        host_embeddings=True,
    ),
    "llamaforge-fsdp2": Stack("llamaforge, FSDP2 at world size 1", dist="fsdp2"),
    "llamaforge-ddp": Stack("llamaforge, DDP at world size 1", dist="ddp"),
    "hf": Stack("transformers + peft", ("transformers", "peft")),
    "hf-liger": Stack("+ Liger kernels", ("transformers", "peft", "liger_kernel"), liger=True),
    "hf-bnb": Stack(
        "transformers + peft + bitsandbytes", ("transformers", "peft", "bitsandbytes"), bnb=True
    ),
    "hf-bnb-liger": Stack(
        "+ bitsandbytes + Liger",
        ("transformers", "peft", "bitsandbytes", "liger_kernel"),
        liger=True,
        bnb=True,
    ),
    "unsloth": Stack("Unsloth", ("unsloth",), needs_dir=True),
}
DEFAULT_STACKS = "llamaforge,hf,hf-liger,unsloth"


# ----------------------------------------------------------------------------- workload


@dataclass
class Spec:
    """Everything a child needs to train its stack; travels as JSON on the command line."""

    workload: str
    method: str  # lora | qlora | full
    preset: str
    overrides: dict[str, Any]
    bs: int
    seq: int
    steps: int
    warmup: int
    rank: int
    model_dir: str | None = None
    threads: int | None = None  # torch CPU threads in the children (None: torch's default)
    mem_cap_gib: float | None = None  # cap each child's GPU memory (e.g. 79 for an 80 GB card)
    profile: bool = False  # llamaforge stacks: profile one more step, report the top ops
    ckpt_layers: int | None = None  # llamaforge stacks: checkpoint only the first N blocks
    memory_budget: str | None = None  # llamaforge stacks: GB or auto, the recipe's plan
    host_embeddings: bool = False  # llamaforge stacks: the input table in host memory
    hf_config: dict[str, Any] = field(default_factory=dict)


def ensure_llamaforge() -> None:
    """Make `import llamaforge` work from a plain checkout too."""
    if importlib.util.find_spec("llamaforge") is None:
        sys.path.insert(0, str(SRC))


def parse_workload(name: str) -> tuple[str, str]:
    """'lora8b' -> ('lora', 'llama3.1-8b'); 'full:smollm2-360m' -> ('full', 'smollm2-360m')."""
    m = re.fullmatch(r"(lora|qlora|full)(?::(.+)|(\d+b))", name)
    if not m or (m.group(3) and m.group(3) not in SIZES):
        sizes = ", ".join(SIZES)
        raise SystemExit(
            f"--workload {name!r}: use <lora|qlora|full><size> (sizes {sizes}) "
            "or <method>:<llamaforge preset>"
        )
    return m.group(1), m.group(2) or SIZES[m.group(3)]


def make_spec(args: argparse.Namespace) -> Spec:
    """The run's shape: the workload's preset, or a tiny one keeping its tied embeddings."""
    ensure_llamaforge()
    from llamaforge.model.presets import PRESETS

    method, preset_name = parse_workload(args.workload)
    if preset_name not in PRESETS:
        raise SystemExit(f"--workload: unknown preset {preset_name!r}")
    overrides: dict[str, Any] = {}
    seq = args.seq or 2048
    if args.shape == "tiny":
        tie = PRESETS[preset_name].get("tie_embeddings", False)
        preset_name = TINY["preset"]
        overrides = {k: TINY[k] for k in ("dim", "ffn_dim", "vocab_size")}
        overrides["tie_embeddings"] = tie
        seq = args.seq or TINY["seq"]
        overrides["max_seq_len"] = max(seq, 256)
    bs = args.bs or DEFAULT_BS[method]
    spec = Spec(
        args.workload, method, preset_name, overrides, bs, seq, args.steps, args.warmup, args.rank
    )
    spec.hf_config = hf_config(spec)
    spec.threads = args.threads or (1 if args.shape == "tiny" else None)
    return spec


def model_config(spec: Spec):
    """llamaforge's LlamaConfig of the run's shape."""
    ensure_llamaforge()
    from llamaforge.model.presets import preset

    return preset(spec.preset, **spec.overrides)


def hf_config(spec: Spec) -> dict[str, Any]:
    """The same shape as a transformers LlamaConfig dict (llamaforge's own exporter)."""
    from llamaforge.io.hf import config_to_hf

    d = config_to_hf(model_config(spec))
    d.pop("torch_dtype", None)
    return d


def matmul_params(cfg) -> int:
    """Weights that take part in matmuls: attention + MLP of every block, and lm_head."""
    attn = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 3 * cfg.dim * cfg.ffn_dim
    return cfg.n_layers * (attn + mlp) + cfg.vocab_size * cfg.dim


def flops_per_token(spec: Spec) -> dict[str, float]:
    """Model FLOPs per trained token and its parts (see the module docstring)."""
    cfg = model_config(spec)
    n = matmul_params(cfg)
    dense = (6 if spec.method == "full" else 4) * n
    attention = 12 * cfg.n_layers * spec.seq * cfg.n_heads * cfg.head_dim
    return {"total": dense + attention, "dense": dense, "attention": attention, "N": n}


# ----------------------------------------------------------------------------- children


class Skip(Exception):
    """The stack cannot run here (package missing or not applicable)."""


def need(module: str) -> Any:
    """Import a stack's package, or skip the stack with the reason."""
    if importlib.util.find_spec(module) is None:
        raise Skip(f"{module} is not installed")
    try:
        return importlib.import_module(module)
    except Exception as e:  # e.g. Unsloth refusing a machine without a GPU
        raise Skip(f"import {module} failed: {type(e).__name__}: {str(e)[:300]}") from e


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def versions(*names: str) -> dict[str, str]:
    """Installed versions of the given distributions (those that are installed)."""
    out = {}
    for name in ("torch", *names):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules in `dtype`, then restore the default (fp32) for everything after."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(dev: torch.device) -> dict[str, float | None]:
    if dev.type != "cuda":
        return {"peak_alloc_gb": None, "peak_reserved_gb": None}
    return {
        "peak_alloc_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2),
    }


def adamw(params: list[torch.Tensor], lr: float, dev: torch.device) -> torch.optim.AdamW:
    """The baselines' optimizer: torch AdamW, fused on CUDA, foreach elsewhere."""
    kind = {"fused": True} if dev.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **kind)


def optimizer_update(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """Clip to 1.0, step, clear: the same for every stack."""
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


@dataclass
class Trainee:
    """A ready-to-train stack: `step(ids)` runs one optimizer step and returns the loss."""

    step: Callable[[torch.Tensor], torch.Tensor]
    trainable: int
    notes: str
    model: torch.nn.Module | None = None  # llamaforge's (benchmarks/interleaved.py switches it)


def measure(trainee: Trainee, spec: Spec, vocab: int, dev: torch.device) -> dict[str, Any]:
    """Warm-up then timed steps on fresh random tokens; peak memory over all of them."""
    gen = torch.Generator(device=dev).manual_seed(1)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(spec.warmup + spec.steps):
        ids = torch.randint(0, vocab, (spec.bs, spec.seq), device=dev, generator=gen)
        synchronize(dev)
        start = time.perf_counter()
        loss = trainee.step(ids)
        synchronize(dev)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    step_s = statistics.median(times[spec.warmup :])
    mean_s = statistics.fmean(times[spec.warmup :])
    return {
        "tokens_per_s": spec.bs * spec.seq / step_s,
        "step_s_median": step_s,
        "tokens_per_s_mean": spec.bs * spec.seq / mean_s,  # the slow steps counted too
        "step_times_s": times,  # warm-up steps first
        **peak_memory(dev),
        "host_peak_rss_gb": host_peak_rss_gb(),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses_finite": all(x == x and abs(x) != float("inf") for x in losses),
        "trainable_params": trainee.trainable,
        "notes": trainee.notes,
    }


def profile_step(trainee: Trainee, spec: Spec, vocab: int, dev: torch.device) -> str:
    """One more step under torch.profiler: the ops that took the most device time, and on
    a GPU the device time by kind of kernel (matmul, attention, elementwise, ...)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ids = torch.randint(0, vocab, (spec.bs, spec.seq), device=dev)
    with profile(activities=acts) as prof:
        trainee.step(ids)
        synchronize(dev)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    ops = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)
    if not cuda:
        return ops
    from profile_step import kernel_table  # the same kinds of kernel as the packed profile

    return f"{ops}\n{kernel_table(prof, 1)}"


class GpuSampler:
    """The GPU's SM clock, power and temperature, sampled by `nvidia-smi -lms` in a process
    of its own while the steps run (nothing is asked of the benchmarked process). Runs have
    differed by 2-4% between processes on an H200 and by up to +-9% on an H100: with these
    numbers beside each row a clock or power change can be told from a code change."""

    QUERY = "clocks.sm,power.draw,temperature.gpu"

    def __init__(self, exe: str | None, ident: str, period_ms: int = 200) -> None:
        query = [f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits"]
        self.cmd = None if exe is None else [exe, "-i", ident, *query, "-lms", str(period_ms)]
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []

    def __enter__(self) -> GpuSampler:
        if self.cmd is not None:
            try:
                self.proc = subprocess.Popen(
                    self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
                )
            except OSError:
                self.proc = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.lines = out.splitlines()

    def summary(self) -> dict[str, Any]:
        """{"gpu": {...}} from the samples, {} without any."""
        rows = []
        for line in self.lines:
            try:
                rows.append([float(x) for x in line.split(",")])
            except ValueError:  # "[N/A]" or a partial last line
                continue
        rows = [r for r in rows if len(r) == 3]
        if not rows:
            return {}
        clock, power, temp = ([r[i] for r in rows] for i in range(3))
        return {
            "gpu": {
                "samples": len(rows),
                "sm_clock_mhz_median": statistics.median(clock),
                "sm_clock_mhz_min": min(clock),
                "sm_clock_mhz_max": max(clock),
                "power_w_median": statistics.median(power),
                "power_w_max": max(power),
                "temperature_c_max": max(temp),
            }
        }


def gpu_sampler(dev: torch.device) -> GpuSampler:
    """A sampler for `dev` (by UUID, so CUDA_VISIBLE_DEVICES cannot mislead it); a no-op off
    CUDA, without nvidia-smi, or with LLAMAFORGE_BENCH_GPU_SAMPLER=0 in the environment (to
    time a run with no nvidia-smi polling beside it)."""
    wanted = os.environ.get("LLAMAFORGE_BENCH_GPU_SAMPLER", "1") != "0"
    exe = shutil.which("nvidia-smi") if dev.type == "cuda" and wanted else None
    if exe is None:
        return GpuSampler(None, "")
    props = torch.cuda.get_device_properties(dev)
    uuid = getattr(props, "uuid", None)
    return GpuSampler(exe, f"GPU-{uuid}" if uuid is not None else str(dev.index or 0))


def host_peak_rss_gb() -> float | None:
    """This process's peak resident CPU memory (offloaded activations live there)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30, 2)


def init_like_hf(model: torch.nn.Module, std: float = 0.02) -> None:
    """Normal(0, 0.02) matrices like transformers' init, so first-step losses compare."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, std)


def llamaforge_model(spec: Spec, stack: Stack, dev: torch.device):
    """llamaforge's model as its recipe sets it up: base dtype, method, kernels, checkpointing.

    Returns (model, precision, notes); `llamaforge_trainee` documents the variants.
    """
    ensure_llamaforge()
    from llamaforge.adapters.inject import apply_lora
    from llamaforge.config import TrainConfig
    from llamaforge.kernels import Kernels
    from llamaforge.model.llama import Llama
    from llamaforge.train.loop import resolve_precision
    from llamaforge.train.recipe import base_dtype

    precision = resolve_precision("auto", dev)
    dtype = base_dtype(spec.method, precision, stack.master)
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.device(dev), default_dtype(dtype):
        model = Llama(model_config(spec))
    init_like_hf(model)
    if spec.method == "full":
        model.requires_grad_(True)
    else:
        apply_lora(
            model,
            r=spec.rank,
            alpha=spec.rank,
            targets=TARGETS,
            quantize_base=spec.method == "qlora",
            double_quant=True,
            compute_dtype=compute,
            lora_dtype=torch.float32,
        )
    model.set_kernels(
        Kernels.none()
        if stack.plain
        else Kernels(
            adamw=stack.fused_adamw,
            lora=stack.fused_lora,
            residual_rmsnorm=stack.fused_residual,
        )
    )
    model.gradient_checkpointing = True
    model.offload_activations = stack.offload
    model.checkpoint_layers = spec.ckpt_layers
    model.set_mlp_chunk(TrainConfig().mlp_chunk_tokens)
    model.train()
    plan = None
    if spec.memory_budget is not None:  # as `memory_budget_gb` makes the recipe do
        from llamaforge.train.loop import autocast_context
        from llamaforge.train.memory_plan import plan_memory

        plan = plan_memory(  # budget_bytes reads "24" or "auto" as given
            model, spec.memory_budget, spec.bs, spec.seq,
            lambda: autocast_context(precision, dev), grads=not stack.in_backward,
        )  # fmt: skip
        if plan is not None:
            model.checkpoint_layers = plan.checkpointed
            model.offload_activations = plan.offload
            model.offload_layers = plan.offloaded if plan.offload else None
    host = spec.host_embeddings or stack.host_embeddings
    if host or (plan is not None and plan.host_embeddings):
        try:
            model.keep_embeddings_on_host()  # what `embeddings_on_host` makes the loop do
        except ValueError as e:
            raise SystemExit(f"--host-embeddings: {e}") from None
    notes = {
        "lora": f"{dtype_name(dtype)} base, fp32 LoRA",
        "qlora": f"llamaforge NF4+DQ base, {dtype_name(compute)} compute, fp32 LoRA",
        "full": f"{dtype_name(dtype)} master weights + AdamW states"
        + (f", {precision} autocast" if precision != "fp32" else ""),
    }[spec.method]
    kernels = "plain PyTorch, chunked CE" if stack.plain else "Triton kernels, fused linear+CE"
    if dev.type != "cuda":
        kernels = "plain PyTorch (the kernels are CUDA-only), chunked CE"
    if model.offload_activations:
        kernels += ", checkpoints in CPU memory"
    if model.embeddings_on_host and (plan is None or not plan.host_embeddings):
        kernels += ", input embeddings in host memory"
    if stack.compiled and dev.type == "cuda":
        from torch import _dynamo

        # one compiled graph serves every block; each block object may guard once more
        _dynamo.config.cache_size_limit = max(64, 2 * len(model.layers))
        for layer in model.layers:
            layer.compile(dynamic=False)
        kernels += ", each block torch.compile'd"
    if spec.ckpt_layers is not None:
        n = min(spec.ckpt_layers, len(model.layers))
        kernels += f", {n} of {len(model.layers)} blocks checkpointed"
    if plan is not None:
        kernels += f"; {plan.describe()}"
    return model, precision, f"{notes}; {kernels}"


def llamaforge_trainee(spec: Spec, stack: Stack, dev: torch.device) -> Trainee:
    """llamaforge as its recipe sets it up: base dtype, method, loss, optimizer, autocast.

    Variants: `llamaforge-plain` turns every fused kernel off (the plain-PyTorch references);
    full fine-tuning keeps its weights and AdamW states in bf16 (the default on a GPU,
    updated by one Triton kernel per parameter); `llamaforge-fp32` keeps fp32 master weights
    and states, `llamaforge-bf16` bf16 ones updated by the unfused PyTorch ops;
    `llamaforge-offload` keeps the checkpointed layer inputs in CPU memory (long context).
    `llamaforge-graph` (LoRA/QLoRA, no activation offload) runs each step through the
    loop's captured step (`train/graph_step.py`, what `cuda_graph` does), each random row one
    packed document; checkpointed blocks (`--ckpt-layers`) are recomputed inside the graph.
    The feed-forward runs over 16,384-token slices past that many tokens, the loop's default.
    """
    from llamaforge.adapters.inject import parameter_counts
    from llamaforge.config import OptimConfig
    from llamaforge.losses import chunked_causal_lm_loss_fn
    from llamaforge.train.loop import autocast_context
    from llamaforge.train.optim import build_optimizer

    model, precision, notes = llamaforge_model(spec, stack, dev)
    loss_fn, reduce = chunked_causal_lm_loss_fn, None
    if stack.dist:  # the recipe's distributed path, as torchrun --nproc-per-node 1 runs it
        from llamaforge.config import DistributedConfig
        from llamaforge.train import distributed

        env = distributed.init(DistributedConfig(strategy=stack.dist), dev)
        loss_fn = distributed.wrap(model, loss_fn, env, precision=precision)
        reduce = distributed.all_reduce_sum  # the loop's per-step reduction of loss + count
        notes += f"; {stack.dist} over {'nccl' if dev.type == 'cuda' else 'gloo'}, 1 rank"
    params = [p for p in model.parameters() if p.requires_grad]  # after wrap: FSDP2's
    if stack.in_backward:
        notes += "; AdamW per tensor inside the backward, no clipping"
        optim = OptimConfig(lr=LR[spec.method], max_grad_norm=0.0, step_in_backward=True)
    else:
        optim = OptimConfig(lr=LR[spec.method])
    opt = build_optimizer(model, optim)
    if stack.graph:
        return graph_trainee(model, opt, params, spec, precision, notes)

    def step(ids: torch.Tensor) -> torch.Tensor:
        with autocast_context(precision, dev):
            loss_sum, n = loss_fn(model, {"input_ids": ids, "labels": ids})
        if reduce is not None:
            reduce(torch.stack([loss_sum.detach(), n.to(loss_sum.dtype)]))
        loss = loss_sum / n
        loss.backward()  # with in_backward the updates happen here
        if stack.in_backward:
            opt.drop_grad_norm()
        else:
            optimizer_update(opt, params)
        return loss.detach()

    return Trainee(step, parameter_counts(model)[0], notes, model)


def graph_trainee(model, opt, params, spec: Spec, precision: str, notes: str) -> Trainee:
    """The `llamaforge-graph` stack: every row of random tokens one packed document, each
    step `PackedGraphStep` (captured on CUDA in the first warm-up step; eager elsewhere)."""
    from llamaforge.adapters.inject import parameter_counts
    from llamaforge.train.graph_step import PackedGraphStep
    from llamaforge.train.loop import autocast_dtype

    if spec.method == "full":
        raise SystemExit("llamaforge-graph trains LoRA or QLoRA (a frozen head)")
    if model.gradient_checkpointing and model.offload_activations:
        raise SystemExit("llamaforge-graph captures no CPU copies: a plan without offload")
    if model.gradient_checkpointing and model.checkpoint_layers != 0:
        notes += "; checkpointed blocks recomputed inside the graph"
    else:
        model.gradient_checkpointing = False
    graphed = PackedGraphStep(
        model, opt, params, rows=spec.bs, seq_len=spec.seq, max_grad_norm=1.0,
        autocast_dtype=autocast_dtype(precision), labels=spec.bs * spec.seq,
    )  # fmt: skip
    positions = torch.arange(spec.seq).expand(spec.bs, spec.seq)
    doc_ids = torch.zeros(spec.bs, spec.seq, dtype=torch.long)

    def step(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.cpu()  # the loop's batches come from the host
        batch = {"input_ids": ids, "labels": ids, "positions": positions, "doc_ids": doc_ids}
        loss, norm = graphed(batch)
        graphed.check(float(norm), 0)
        return loss.detach().clone()

    notes += "; each step one CUDA graph (one document a row)"
    return Trainee(step, parameter_counts(model)[0], notes)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def bnb_nf4_model(spec: Spec, dev: torch.device, dtype: torch.dtype, auto: Any, **kwargs: Any):
    """The saved random model (`spec.model_dir`) loaded by `auto` (a transformers Auto class)
    with bitsandbytes NF4 + double quant, `dtype` compute; kwargs go to `from_pretrained`."""
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    return auto.from_pretrained(
        spec.model_dir,
        quantization_config=quant,
        dtype=dtype,
        device_map={"": 0 if dev.type == "cuda" else "cpu"},
        **kwargs,
    )


def hf_model(spec: Spec, stack: Stack, dev: torch.device, dtype: torch.dtype):
    """transformers' LlamaForCausalLM: built in place from the config, or NF4 from disk."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if stack.bnb:
        return bnb_nf4_model(spec, dev, dtype, AutoModelForCausalLM, attn_implementation="sdpa")
    config = LlamaConfig(**spec.hf_config)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(dev)


def hf_trainee(spec: Spec, stack: Stack, dev: torch.device) -> Trainee:
    """transformers + peft as hf_baseline.py measured it (bf16 weights, peft LoRA)."""
    if stack.bnb != (spec.method == "qlora"):
        raise Skip("bitsandbytes 4-bit is the QLoRA workload's HF stack only")
    for module in stack.modules:
        if module != "peft" or spec.method != "full":
            need(module)
    if stack.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = hf_model(spec, stack, dev, dtype)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.method != "full":
        from peft import LoraConfig, get_peft_model

        model.enable_input_require_grads()
        lora = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.rank,
            lora_dropout=0.0,
            target_modules=list(TARGETS),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    model.train()
    notes = {
        "lora": f"{dtype_name(dtype)} base, peft LoRA",
        "qlora": f"bnb NF4+DQ base, {dtype_name(dtype)} compute, peft LoRA",
        "full": f"{dtype_name(dtype)} weights and AdamW states",
    }[spec.method]
    return loss_output_trainee(model, spec, dev, notes)


def loss_output_trainee(model, spec: Spec, dev: torch.device, notes: str) -> Trainee:
    """A transformers-style model (`model(input_ids, labels).loss`) with torch AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, LR[spec.method], dev)

    def step(ids: torch.Tensor) -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer_update(opt, params)
        return loss.detach()

    return Trainee(step, sum(p.numel() for p in params), notes)


def unsloth_trainee(spec: Spec, stack: Stack, dev: torch.device) -> Trainee:
    """Unsloth as unsloth_baseline.py measured it (its offloaded checkpointing for LoRA)."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    need("unsloth")  # before transformers: Unsloth patches it on import
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=spec.model_dir,
        max_seq_length=spec.seq,
        dtype=torch.bfloat16,
        load_in_4bit=spec.method == "qlora",
        full_finetuning=spec.method == "full",
    )
    if spec.method == "full":
        model.gradient_checkpointing_enable()
    else:
        model = FastLanguageModel.get_peft_model(
            model,
            r=spec.rank,
            lora_alpha=spec.rank,
            lora_dropout=0,
            bias="none",
            target_modules=list(TARGETS),
            use_gradient_checkpointing="unsloth",
            random_state=0,
            max_seq_length=spec.seq,
        )
    FastLanguageModel.for_training(model)
    notes = {"lora": "bf16 base", "qlora": "bnb NF4 base", "full": "bf16 weights"}[spec.method]
    return loss_output_trainee(model, spec, dev, notes + ", Unsloth kernels")


TRAINEES = {name: llamaforge_trainee for name in STACKS if name.startswith("llamaforge")}
TRAINEES.update({name: hf_trainee for name in STACKS if name.startswith("hf")})
TRAINEES["unsloth"] = unsloth_trainee
MODULE_VERSIONS = ("llamaforge", "transformers", "peft", "bitsandbytes", "liger-kernel", "unsloth")


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def train_child(name: str, spec: Spec) -> dict[str, Any]:
    """Set one stack up, train it, report; skips and out-of-memory become results."""
    dev = device()
    if spec.mem_cap_gib and dev.type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec.mem_cap_gib * 2**30 / total))
    start = time.perf_counter()
    try:
        stack = STACKS[name]
        trainee = TRAINEES[name](spec, stack, dev)
        setup_s = time.perf_counter() - start
        frozen = name.startswith("llamaforge") and stack.gc_frozen
        if frozen:
            from llamaforge.runtime import frozen_gc
        with gpu_sampler(dev) as sampler, frozen_gc() if frozen else contextlib.nullcontext():
            result = measure(trainee, spec, spec.hf_config["vocab_size"], dev)
        result.update(sampler.summary())
        if spec.profile and name.startswith("llamaforge"):
            result["profile"] = profile_step(trainee, spec, spec.hf_config["vocab_size"], dev)
    except Skip as e:
        return {"skipped": str(e)}
    except Exception as e:
        if not is_oom(e):
            raise
        return {"error": "out of memory", **peak_memory(dev)}
    return {"setup_s": setup_s, **result, "versions": versions(*MODULE_VERSIONS)}


def ceiling_child(_spec: Spec) -> dict[str, Any]:
    """bf16 8192^3 matmul throughput on random data (median of CUDA-event timings)."""
    if not torch.cuda.is_available():
        return {"device": f"CPU ({os.cpu_count()} cores)", "ceiling_tflops": None}
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    tflops = 2 * n**3 / statistics.median(times) / 1e12
    return {"device": torch.cuda.get_device_name(), "ceiling_tflops": tflops}


def write_tokenizer(folder: str) -> None:
    """A small byte-level BPE tokenizer: Unsloth insists on finding one beside the weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["a random model for a throughput benchmark"] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1], pad_token=specials[2]
    )
    fast.save_pretrained(folder)


def make_dir_child(spec: Spec) -> dict[str, Any]:
    """Save a random transformers model of the shape (bf16 on GPU) and a tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**spec.hf_config), dtype=dtype)
    model.save_pretrained(spec.model_dir, max_shard_size="5GB")
    write_tokenizer(spec.model_dir)
    return {"saved": spec.model_dir}


def child_main(name: str, spec: Spec) -> None:
    """Run one job and print its result as the last line: `RESULT {json}`."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    jobs = {"ceiling": ceiling_child, "make-dir": make_dir_child}
    result = jobs[name](spec) if name in jobs else train_child(name, spec)
    print(RESULT_TAG + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent


def run_child(
    name: str,
    spec: Spec,
    timeout: float,
    verbose: bool,
    script: str | None = None,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A script (default: this one) in a fresh process for one job, `--child NAME --spec JSON`
    plus `extra` arguments; crashes become results with stderr's tail."""
    cmd = [sys.executable, script or str(Path(__file__).resolve()), "--child", name, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(
            cmd + ["--spec", json.dumps(asdict(spec))],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if verbose:
        sys.stderr.write(proc.stderr)
    return child_result(proc)


def child_result(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1][len(RESULT_TAG) :])
    tail = proc.stderr[-2000:]
    if "out of memory" in tail.lower():
        return {"error": "out of memory", "stderr_tail": tail}
    last = ([ln for ln in tail.splitlines() if ln.strip()] or ["(no stderr)"])[-1]
    rc = proc.returncode
    status = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
    return {"error": f"{status}: {last[:160]}", "stderr_tail": tail}


def resolve_stacks(names: str, method: str) -> list[str]:
    """Known stack names in order, without repeats; under QLoRA `hf*` means `hf-bnb*`."""
    out = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in STACKS:
            raise SystemExit(f"--stacks: unknown stack {name!r}; known: {', '.join(STACKS)}")
        if method == "qlora" and name.startswith("hf") and "bnb" not in name:
            name = name.replace("hf", "hf-bnb", 1)
        if name not in out:
            out.append(name)
    return out


def needs_model_dir(stacks: list[str], method: str) -> bool:
    """Save weights only for stacks that load from disk and whose packages are installed."""
    for name in stacks:
        stack = STACKS[name]
        on_disk = stack.needs_dir or (stack.bnb and method == "qlora")
        if on_disk and all(importlib.util.find_spec(m) for m in stack.modules):
            return True
    return False


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def saved_model_dir(
    spec: Spec,
    wanted: bool,
    timeout: float,
    verbose: bool = False,
    tmp_dir: str | None = None,
    keep: bool = False,
):
    """While the block runs, `spec.model_dir` holds a random model of the shape saved for the
    from-disk stacks (when `wanted`): the folder given, filled if it holds none and kept, else
    a temporary one removed afterwards unless `keep`. Yields the saving child's error result,
    or None."""
    made, failed = None, None
    if wanted and spec.model_dir is None:
        made = spec.model_dir = tempfile.mkdtemp(prefix="lf-bench-", dir=tmp_dir)
    if wanted and not (Path(spec.model_dir) / "config.json").exists():
        log(f"saving a random model for the from-disk stacks to {spec.model_dir} ...")
        saved = run_child("make-dir", spec, timeout, verbose)
        failed = saved if "error" in saved else None
    try:
        yield failed
    finally:
        if made and not keep:
            shutil.rmtree(made, ignore_errors=True)


def train_stacks(spec: Spec, stacks: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Each stack in turn on one shape, each in its own process."""
    results = {}
    for name in stacks:
        log(f"training {name} (batch {spec.bs} x {spec.seq}) ...")
        results[name] = run_child(name, spec, args.timeout, args.verbose)
        log(f"  {name}: {summary(results[name])}")
        if "profile" in results[name]:
            log(f"profile of one {name} step:\n{results[name]['profile']}")
    return results


def run_all(
    spec: Spec, stacks: list[str], args: argparse.Namespace, seqs: list[int] | None = None
) -> dict[str, Any]:
    """The ceiling, then each stack in turn (at each of `seqs` if given: `sweep`, by length);
    the model folder lives only for this run."""
    log("measuring the matmul ceiling ...")
    env = run_child("ceiling", spec, args.timeout, args.verbose)
    results: dict[str, Any] = {}
    sweep: dict[str, Any] = {}
    wanted = needs_model_dir(stacks, spec.method)
    with saved_model_dir(spec, wanted, args.timeout, args.verbose, args.tmp_dir,
                         args.keep_model_dir) as failed:  # fmt: skip
        if failed is not None:
            results["make-dir"] = failed
        if seqs:
            out_of_memory: set[str] = set()
            for seq in seqs:
                at = replace(spec, seq=seq)
                runnable = [n for n in stacks if n not in out_of_memory]
                done = train_stacks(at, runnable, args)
                out_of_memory |= {n for n, r in done.items() if r.get("error") == "out of memory"}
                for name in stacks:
                    done.setdefault(name, {"skipped": "out of memory at a shorter length"})
                sweep[str(seq)] = {"flops_per_token": flops_per_token(at), "results": done}
        else:
            results.update(train_stacks(spec, stacks, args))
    return {"environment": env, "results": results, **({"sweep": sweep} if seqs else {})}


def summary(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if "error" in r:
        return f"error: {r['error']}"
    mem = r.get("peak_alloc_gb")
    line = f"{r['tokens_per_s']:,.0f} tokens/s" + (f", {mem} GB" if mem is not None else "")
    gpu = r.get("gpu")
    if gpu:  # GpuSampler's numbers over the timed steps
        line += (
            f"; SM clock {gpu['sm_clock_mhz_median']:,.0f} MHz "
            f"({gpu['sm_clock_mhz_min']:,.0f}-{gpu['sm_clock_mhz_max']:,.0f}), "
            f"{gpu['power_w_max']:.0f} W, {gpu['temperature_c_max']:.0f} C at most"
        )
    return line


def add_mfu(report: dict[str, Any], peak_tflops: float) -> None:
    """MFU of every trained stack against the datasheet peak and the measured ceiling."""
    flops = report["flops_per_token"]["total"]
    ceiling = report["environment"].get("ceiling_tflops")
    on_gpu = ceiling is not None
    for r in report["results"].values():
        if "tokens_per_s" in r:
            achieved = flops * r["tokens_per_s"] / 1e12
            r["model_tflops"] = achieved
            r["mfu_datasheet"] = achieved / peak_tflops if on_gpu else None
            r["mfu_ceiling"] = achieved / ceiling if on_gpu else None


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """llamaforge / baseline for tokens/s (> 1: faster) and peak memory (< 1: leaner)."""
    ours = results.get("llamaforge", {})
    if "tokens_per_s" not in ours:
        return {}
    out = {}
    for name, r in results.items():
        if name.startswith("llamaforge") or name == "make-dir" or "tokens_per_s" not in r:
            continue
        mem = None
        if ours.get("peak_alloc_gb") and r.get("peak_alloc_gb"):
            mem = ours["peak_alloc_gb"] / r["peak_alloc_gb"]
        out[name] = {"tokens_per_s": ours["tokens_per_s"] / r["tokens_per_s"], "peak_alloc": mem}
    return out


def si(x: float, unit: str = "FLOP") -> str:
    """3.32e10 -> '33.24 GFLOP'."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def fmt(x: float | None, spec: str, na: str = "n/a") -> str:
    return na if x is None else format(x, spec)


def row(name: str, r: dict[str, Any], method: str) -> str:
    label = name
    if name.startswith(("hf", "unsloth")):
        kind = STACKS[name].label
        label = f"{name} ({kind.replace(' + peft', '') if method == 'full' else kind})"
    if "tokens_per_s" not in r:
        why = f"skipped: {r['skipped']}" if "skipped" in r else f"**{r['error']}**"
        why = why.replace("|", "/")
        mem = f" (peak {r['peak_alloc_gb']} GB)" if r.get("peak_alloc_gb") else ""
        return f"| {label} | {why}{mem} | | | | | | | |"
    cells = [
        f"{r['tokens_per_s']:,.0f}",
        f"{r['step_s_median']:.3f}",
        fmt(r["peak_alloc_gb"], ".1f"),
        fmt(r["peak_reserved_gb"], ".1f"),
        fmt(r["mfu_datasheet"], ".1%"),
        fmt(r["mfu_ceiling"], ".1%"),
        f"{r['loss_first']:.3f}",
        r["notes"],
    ]
    return f"| {label} | " + " | ".join(cells) + " |"


def cap_note(spec: dict[str, Any]) -> str:
    """'; GPU memory capped at 79 GiB' when the run had a cap, else nothing."""
    cap = spec.get("mem_cap_gib")
    return f"; GPU memory capped at {cap:g} GiB" if cap else ""


def heading(report: dict[str, Any]) -> list[str]:
    s, f, env = report["spec"], report["flops_per_token"], report["environment"]
    ceiling = env.get("ceiling_tflops")
    lora = f", LoRA r{s['rank']} alpha {s['rank']} on {','.join(TARGETS)}"
    return [
        f"## {s['workload']}: {s['preset']} {s['method']}, batch {s['bs']} x {s['seq']}"
        + (lora if s["method"] != "full" else ""),
        "",
        f"device: {env.get('device', '?')}; bf16 matmul ceiling (8192^3): "
        f"{fmt(ceiling, ',.0f')} TFLOP/s; datasheet {report['peak_tflops']:.0f} TFLOP/s; "
        f"median of {s['steps']} steps after {s['warmup']} warm-up{cap_note(s)}",
        f"model FLOPs/token: {si(f['total'])} = {f['dense'] / f['N']:.0f}N "
        f"(N = {si(f['N'], '')}) + attention {si(f['attention'])} (non-causal)"
        + (
            f"; limit at the ceiling {ceiling * 1e12 / f['total']:,.0f} tokens/s" if ceiling else ""
        ),
        f"first-step loss of a random model should be near ln(vocab) = {report['ln_vocab']:.3f}",
        "",
    ]


def markdown(report: dict[str, Any]) -> str:
    lines = heading(report) + [
        "| stack | tokens/s | step s | peak alloc GB | peak reserved GB | MFU vs datasheet "
        "| MFU vs ceiling | first loss | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    method = report["spec"]["method"]
    lines += [row(name, r, method) for name, r in report["results"].items()]
    if report["ratios"]:
        lines += [
            "",
            "llamaforge / baseline (tokens/s: > 1 is faster; peak allocated: < 1 is leaner)",
            "",
            "| baseline | tokens/s ratio | peak memory ratio |",
            "|---|---|---|",
        ]
        for name, q in report["ratios"].items():
            lines.append(f"| {name} | {q['tokens_per_s']:.2f}x | {fmt(q['peak_alloc'], '.2f')} |")
    return "\n".join(lines)


def parse_seqs(text: str | None) -> list[int]:
    """'1024,2048' -> [1024, 2048] (in the order given)."""
    if not text:
        return []
    try:
        seqs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--seqs {text!r}: give comma-separated integers") from None
    if not seqs or min(seqs) < 2:
        raise SystemExit(f"--seqs {text!r}: lengths must be >= 2")
    return seqs


def sweep_cell(r: dict[str, Any]) -> list[str]:
    """tokens/s and peak allocated GB of one stack at one length (or why there are none)."""
    if "tokens_per_s" in r:
        return [f"{r['tokens_per_s']:,.0f}", fmt(r["peak_alloc_gb"], ".1f")]
    if "skipped" in r:
        return ["skipped", ""]
    why = "OOM" if r.get("error") == "out of memory" else f"error: {r.get('error', '?')}"
    mem = f"> {r['peak_alloc_gb']}" if r.get("peak_alloc_gb") else ""
    return [why.replace("|", "/")[:80], mem]


def sweep_markdown(report: dict[str, Any], stacks: list[str]) -> str:
    """One table: a row per sequence length, tokens/s and peak GB per stack."""
    s, env = report["spec"], report["environment"]
    lora = f", LoRA r{s['rank']} alpha {s['rank']}" if s["method"] != "full" else ""
    lines = [
        f"## {s['workload']}: {s['preset']} {s['method']}, batch {s['bs']}, "
        f"sequence lengths {','.join(report['sweep'])}{lora}",
        "",
        f"device: {env.get('device', '?')}; median of {s['steps']} steps after "
        f"{s['warmup']} warm-up; peak = peak allocated GB of the training steps{cap_note(s)}",
        "",
        "| seq | " + " | ".join(f"{n} tokens/s | {n} peak GB" for n in stacks) + " |",
        "|---|" + "---|---|" * len(stacks),
    ]
    for seq, at in report["sweep"].items():
        cells = [c for n in stacks for c in sweep_cell(at["results"].get(n, {"error": "?"}))]
        lines.append(f"| {seq} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_main(spec: Spec, stacks: list[str], seqs: list[int], args: argparse.Namespace) -> None:
    """--seqs: every stack at every length (batch spec.bs), one table, one JSON."""
    report: dict[str, Any] = {
        "spec": asdict(spec),
        "seqs": seqs,
        **run_all(spec, stacks, args, seqs),
    }
    print(sweep_markdown(report, stacks))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
        log(f"wrote {args.out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workload", default="lora8b", help="lora8b, qlora8b, full1b, <method>:<preset>"
    )
    p.add_argument("--stacks", default=DEFAULT_STACKS, help=f"comma list of {', '.join(STACKS)}")
    p.add_argument("--bs", type=int, default=None, help="default: 4 for full, else 2")
    p.add_argument("--seq", type=int, default=None, help="default: 2048 (tiny: 128)")
    p.add_argument(
        "--seqs",
        help="comma list of sequence lengths (e.g. 1024,2048,4096,8192,16384): train the "
        "stacks at each, batch 1 unless --bs, and print one table of tokens/s and peak memory",
    )
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    p.add_argument("--shape", "--shape-override", choices=["full", "tiny"], default="full")
    p.add_argument("--peak-tflops", type=float, default=DATASHEET_TFLOPS, help="datasheet bf16")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    p.add_argument(
        "--model-dir",
        help="the random model for the from-disk stacks (bitsandbytes, Unsloth): reused if "
        "there, else saved there and kept (default: a temporary folder, deleted after)",
    )
    p.add_argument("--keep-model-dir", action="store_true", help="do not delete the saved model")
    p.add_argument("--tmp-dir", help="where to save the random model (default: system temp)")
    p.add_argument("--threads", type=int, help="torch CPU threads per child (tiny: 1)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    p.add_argument(
        "--mem-cap-gib",
        type=float,
        help="cap every child's GPU memory (79 holds a run to what an 80 GB H100 offers)",
    )
    p.add_argument(
        "--profile", action="store_true", help="profile one more llamaforge step; print top ops"
    )
    p.add_argument(
        "--ckpt-layers",
        type=int,
        help="llamaforge stacks: recompute only the first N blocks (0: none; default: all)",
    )
    p.add_argument(
        "--memory-budget",
        help="llamaforge stacks: GB (or auto) for the recipe's memory plan, which then picks "
        "the checkpointed blocks (its line goes into the row's notes)",
    )
    p.add_argument(
        "--host-embeddings",
        action="store_true",
        help="llamaforge LoRA/QLoRA stacks: keep the input embedding table in host memory",
    )
    p.add_argument("--verbose", action="store_true", help="show the children's stderr")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, Spec(**json.loads(args.spec)))
    seqs = parse_seqs(args.seqs)
    if seqs:  # the longest sets max_seq_len of the tiny shape; batch 1 by default
        args.seq, args.bs = max(seqs), args.bs or 1
    spec = make_spec(args)
    spec.model_dir = args.model_dir
    spec.mem_cap_gib, spec.profile = args.mem_cap_gib, args.profile
    if args.ckpt_layers is not None and args.ckpt_layers < 0:
        raise SystemExit(f"--ckpt-layers {args.ckpt_layers}: give a number of blocks >= 0")
    spec.ckpt_layers = args.ckpt_layers
    if args.memory_budget is not None and args.ckpt_layers is not None:
        raise SystemExit("--memory-budget chooses the checkpointed blocks: drop --ckpt-layers")
    spec.memory_budget = args.memory_budget
    spec.host_embeddings = args.host_embeddings
    stacks = resolve_stacks(args.stacks, spec.method)
    if seqs:
        return sweep_main(spec, stacks, seqs, args)
    report: dict[str, Any] = {
        "spec": asdict(spec),
        "peak_tflops": args.peak_tflops,
        "flops_per_token": flops_per_token(spec),
        "ln_vocab": math.log(spec.hf_config["vocab_size"]),
        **run_all(spec, stacks, args),
    }
    add_mfu(report, args.peak_tflops)
    report["ratios"] = ratios(report["results"])
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
