"""Variants of one llamaforge training step taking turns inside one process.

    python benchmarks/interleaved.py --workload lora8b \
        --variants "default;kernels.lora=false" [--objective sft|dpo|rm] [--rounds 24]

Across processes the median step of the same 8B LoRA run moved by up to +-9% on the lent
H100s, more than most changes being measured. Here one model is built once and the variants
are switches the model reads on every forward, applied before each step: `kernels.NAME=
true|false` (the `Kernels` fields; not `adamw`, which the optimizer fixes when it is built)
`checkpoint_layers=N|all` and `keep_attention=true|false` (checkpointed blocks keep the
attention kernel's outputs: `activation_checkpointing_keep_attention`). The order rotates
each round, so every variant sees the same machine state. Reported per variant: the median
and mean step as tokens/s, the fastest and slowest step, the peak memory of its steps, and
"paired", the median over rounds of its step over the first variant's step in the same
round. Switching every step keeps the allocator's cache from settling, so absolute figures
sit below a one-variant process's; the ratios are what the run is for. `--objective dpo|rm`
times preference_speed.py's stage step (shared-prompt pairs, `--pairs` pairs of `--seq`
tokens a side, both sides counted). `--shape tiny` runs on the CPU in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import preference_speed as ps  # noqa: E402  (the DPO / RM stage step)
import train_throughput as tt  # noqa: E402  (shapes, model set-up, timing helpers)


def parse_variant(text: str) -> dict[str, Any]:
    """'default' or 'kernels.lora=false checkpoint_layers=0' -> {'kernels': {...}, ...}."""
    from llamaforge.kernels import Kernels

    kernel_names = {f.name for f in dataclasses.fields(Kernels)} - {"adamw"}
    out: dict[str, Any] = {"kernels": {}}
    for item in text.split():
        if item == "default":
            continue
        key, sep, value = item.partition("=")
        if key.startswith("kernels.") and key[8:] in kernel_names and sep:
            if value not in ("true", "false"):
                raise SystemExit(f"--variants: {item!r}: kernels switches take true or false")
            out["kernels"][key[8:]] = value == "true"
        elif key == "checkpoint_layers" and sep and (value == "all" or value.isdigit()):
            out["checkpoint_layers"] = None if value == "all" else int(value)
        elif key == "keep_attention" and value in ("true", "false"):
            out["keep_attention"] = value == "true"
        else:
            raise SystemExit(
                f"--variants: unknown switch {item!r}; use kernels.NAME=true|false "
                f"(NAME one of {', '.join(sorted(kernel_names))}), checkpoint_layers=N|all "
                "or keep_attention=true|false"
            )
    return out


def build(args: argparse.Namespace, dev: torch.device) -> tuple[tt.Trainee, tt.Spec, int]:
    """The trainee, its shape and the tokens one step counts."""
    ns = argparse.Namespace(
        workload=args.workload, seq=args.seq, shape=args.shape, steps=0, warmup=0,
        rank=args.rank, threads=None, bs=args.pairs if args.objective != "sft" else args.bs,
    )  # fmt: skip
    spec = tt.make_spec(ns)
    if args.objective == "sft":
        return tt.llamaforge_trainee(spec, tt.STACKS["llamaforge"], dev), spec, spec.bs * spec.seq
    name = f"llamaforge-{args.objective}"
    trainee = ps.llamaforge_trainee(name, spec, spec.seq // 2, dev)
    return trainee, spec, 2 * spec.bs * spec.seq


def run(args: argparse.Namespace) -> dict[str, Any]:
    tt.ensure_llamaforge()
    from llamaforge.runtime import frozen_gc

    names = [v.strip() for v in args.variants.split(";") if v.strip()]
    if len(names) < 2:
        raise SystemExit("--variants: name at least two, separated by ';'")
    settings = [parse_variant(v) for v in names]
    dev = tt.device()
    if args.threads:
        torch.set_num_threads(args.threads)
    trainee, spec, tokens = build(args, dev)
    model = trainee.model
    base_kernels, base_ckpt = model.kernels, model.checkpoint_layers
    base_keep = model.checkpoint_keeps_attention
    vocab = spec.hf_config["vocab_size"]
    gen = torch.Generator(device=dev).manual_seed(1)
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks = dict.fromkeys(names, 0.0)
    losses: dict[str, list[float]] = {n: [] for n in names}
    cuda = dev.type == "cuda"
    with frozen_gc():  # as the training loop runs its steps
        variants = list(zip(names, settings, strict=True))
        for r in range(args.warmup_rounds + args.rounds):
            k = r % len(variants)  # each round starts one variant later
            for name, s in variants[k:] + variants[:k]:
                model.set_kernels(dataclasses.replace(base_kernels, **s["kernels"]))
                model.checkpoint_layers = s.get("checkpoint_layers", base_ckpt)
                model.checkpoint_keeps_attention = s.get("keep_attention", base_keep)
                ids = torch.randint(0, vocab, (spec.bs, spec.seq), device=dev, generator=gen)
                tt.synchronize(dev)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                loss = float(trainee.step(ids))
                tt.synchronize(dev)
                dt = time.perf_counter() - t0
                if r >= args.warmup_rounds:
                    times[name].append(dt)
                    losses[name].append(loss)
                    if cuda:
                        peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 1e9)
    first = names[0]
    results = {}
    for name in names:
        t = times[name]
        paired = [a / b for a, b in zip(t, times[first], strict=True)]
        results[name] = {
            "tokens_per_s": tokens / statistics.median(t),
            "tokens_per_s_mean": tokens / statistics.fmean(t),
            "step_s_min": min(t),
            "step_s_max": max(t),
            "paired_step_ratio": statistics.median(paired),
            "peak_alloc_gb": peaks[name] if cuda else None,
            "step_times_s": t,
            "losses_finite": all(x == x and abs(x) != float("inf") for x in losses[name]),
        }
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "workload": args.workload,
        "objective": args.objective,
        "spec": dataclasses.asdict(spec),
        "tokens_per_step": tokens,
        "rounds": args.rounds,
        "notes": trainee.notes,
        "results": results,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"{report['workload']} {report['objective']}, {report['device']}, "
        f"{report['rounds']} rounds, {report['tokens_per_step']} tokens a step",
        "| variant | tokens/s (median step) | mean | steps (s) | paired step / first | peak GB |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        peak = "n/a" if r["peak_alloc_gb"] is None else f"{r['peak_alloc_gb']:.2f}"
        lines.append(
            f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_mean']:,.0f} | "
            f"{r['step_s_min']:.3f}-{r['step_s_max']:.3f} | {r['paired_step_ratio']:.4f} | {peak} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="lora8b", help="as train_throughput.py")
    p.add_argument(
        "--variants", required=True, help="';'-separated, e.g. default;kernels.lora=false"
    )
    p.add_argument("--objective", choices=["sft", "dpo", "rm"], default="sft")
    p.add_argument("--rounds", type=int, default=24, help="timed rounds (each variant once)")
    p.add_argument("--warmup-rounds", type=int, default=2)
    p.add_argument(
        "--bs", type=int, default=None, help="sft rows a step (default as train_throughput)"
    )
    p.add_argument("--pairs", type=int, default=2, help="dpo/rm pairs a step")
    p.add_argument("--seq", type=int, default=None, help="tokens a row / a side (2048; tiny 128)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--shape", choices=["full", "tiny"], default="full")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    args = p.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds: at least 1")
    report = run(args)
    if args.out:  # the JSON first: a table cut off by a time limit leaves the numbers
        args.out.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
