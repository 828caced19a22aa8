"""Where a SmolLM2 LoRA training step on packed real chitchat rows spends its time.

    python benchmarks/profile_step.py MODEL CONVERSATIONS [--tokenizer TOK]
        [--kernels default|unfused-lora] [--graph] [--steps 3]

MODEL is a checkpoint (the bundled GGUF) or `preset:NAME` (random weights, then --tokenizer
names the tokenizer). Builds `real_lengths.py`'s packed rows (1,024 tokens, as many rows as
CONVERSATIONS padded conversations hold), LoRA r16 on all 7 projections, dropout 0, bf16,
AdamW with clipping, then: the wall time of a step (5 steps after 4 warm-up) and a
torch.profiler table of `--steps` steps: launches, syncs, the ops by host and device time,
and the device time by kernel and by kind of kernel. `--graph` runs and profiles the step
captured as one CUDA graph (`train/graph_step.py`: the kernels are the eager step's, the
host work is gone). Kernel times summed are an upper bound of the device's busy time (the
profiler lists some kernels under their op as well; the kernel table counts kernels only).
A GPU measurement (issue 16 items 1 and 4); it runs on the CPU too, slowly, without the
device columns.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_lengths as rl  # noqa: E402

# kinds of kernel, first match wins (names as CUPTI reports them)
KINDS = (
    ("attention", r"flash"),  # before matmul: flash kernels' names carry cutlass types
    ("matmul", r"nvjet|gemm|sm90_xmma|cutlass|splitK|gemv"),
    ("triton: norm/rope/swiglu/ce", r"rms_norm|rope|swiglu|_ce_|cross|triton"),
    ("reduce", r"reduce_kernel"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("elementwise / copy", r"elementwise|copy|fill|cat|index"),
)


def kind(name: str) -> str:
    for label, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def kernel_table(prof, n: int) -> str:
    """Device time by kernel name and by kind, per step (kernels only, no op rows)."""
    per: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += 1
            per[e.name][1] += e.device_time_total
    total = sum(v[1] for v in per.values()) / n / 1e3
    kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, (c, t) in per.items():
        kinds[kind(name)][0] += c
        kinds[kind(name)][1] += t
    lines = [f"kernels: {sum(v[0] for v in per.values()) / n:.0f} a step, {total:.1f} ms a step"]
    lines.append("| kind | kernels a step | ms a step | share |")
    lines.append("|---|---|---|---|")
    for label, (c, t) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        ms = t / n / 1e3
        lines.append(f"| {label} | {c / n:.0f} | {ms:.2f} | {ms / max(total, 1e-9):.1%} |")
    lines.append("\n| kernel | a step | ms a step | us each |")
    lines.append("|---|---|---|---|")
    for name, (c, t) in sorted(per.items(), key=lambda kv: -kv[1][1])[:45]:
        lines.append(f"| {name[:90]} | {c / n:.0f} | {t / n / 1e3:.2f} | {t / c:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("conversations", type=int)
    p.add_argument("--tokenizer", help="default: MODEL's own")
    p.add_argument("--kernels", choices=["default", "unfused-lora"], default="default")
    p.add_argument("--graph", action="store_true", help="the step as one CUDA graph")
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    args = rl.parse_args(["--model", a.model, "--tokenizer", a.tokenizer or a.model,
                          "--lora-dropout", "0", "--bs", str(a.conversations),
                          "--kernels", a.kernels])  # fmt: skip
    rl.ensure_llamaforge()
    from torch.profiler import ProfilerActivity, profile

    from llamaforge.config import OptimConfig
    from llamaforge.data.pack import pack_examples
    from llamaforge.losses import chunked_causal_lm_loss_fn
    from llamaforge.train.batches import BatchSource
    from llamaforge.train.graph_step import PackedGraphStep
    from llamaforge.train.loop import (
        accumulate_gradients,
        autocast_context,
        autocast_dtype,
        optimizer_step,
    )
    from llamaforge.train.optim import build_optimizer, build_scheduler
    from llamaforge.train.recipe import base_dtype

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16" if dev.type == "cuda" else "fp32"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tok = rl.load_tokenizer(args)
    examples, _ = rl.build_examples(args, tok)
    packed = pack_examples(examples, args.seq)
    mean_ex = sum(len(e["input_ids"]) for e in examples) / len(examples)
    mean_row = sum(len(r["input_ids"]) for r in packed) / len(packed)
    rows = max(1, round(a.conversations * mean_ex / mean_row))
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    base = rl.base_model(args, tok, base_dtype("lora", precision))
    model = rl.trainable_copy(base, args, dev, compute)
    src = BatchSource(packed, rows, pad_id=tok.pad_id or 0, seed=0)
    optim = OptimConfig(lr=2e-4, schedule="constant")
    opt = build_optimizer(model, optim)
    sched = build_scheduler(opt, optim, 100)
    params = [q for q in model.parameters() if q.requires_grad]
    graphed = None
    if a.graph:
        dtype = autocast_dtype(precision)
        graphed = PackedGraphStep(
            model, opt, params, rows=rows, seq_len=args.seq, max_grad_norm=1.0, autocast_dtype=dtype
        )

    def step(batch) -> None:
        if graphed is not None:
            graphed(batch)
            sched.step()
            return
        accumulate_gradients(model, [batch], chunked_causal_lm_loss_fn,
                             autocast=lambda: autocast_context(precision, dev))  # fmt: skip
        optimizer_step(opt, sched, params, max_grad_norm=1.0)

    for _ in range(4 if dev.type == "cuda" else 1):
        step(next(src))
    batches = [next(src) for _ in range(5)]
    sync()
    t = time.perf_counter()
    for b in batches:
        step(b)
    sync()
    wall = (time.perf_counter() - t) / len(batches)
    what = "one graph" if a.graph else "eager"
    print(f"packed rows {rows} x {args.seq}, kernels {a.kernels}, {what}: "
          f"wall {wall * 1e3:.1f} ms a step", flush=True)  # fmt: skip
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    batches = [next(src) for _ in range(a.steps)]
    with profile(activities=acts) as prof:
        for b in batches:
            step(b)
        sync()
    ev = prof.key_averages()
    n = a.steps
    for key in ("cudaLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch",
                "cudaStreamSynchronize", "cudaMemcpyAsync", "aten::item"):  # fmt: skip
        hit = [e for e in ev if e.key == key]
        if hit:
            print(f"{key}: {hit[0].count / n:.0f} a step, {hit[0].cpu_time_total / n / 1e3:.1f} ms")
    print(ev.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    if dev.type == "cuda":
        print(kernel_table(prof, n))


if __name__ == "__main__":
    main()
