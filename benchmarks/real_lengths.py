"""Real lengths: padded batches against packed rows on the chitchat chat data.

Issue 4, item 5. The built-in `chitchat` conversations (task `chitchat_chat`, the
model's own chat template, left truncation at --seq tokens, as
configs/smollm2_full_sft_chitchat.yaml) are tokenized once by llamaforge's data pipeline
(`build_dataset`, disk-cached) and trained on for the same number of steps in two ways:

- padded: --bs conversations per step, right-padded to the longest in the batch (the
  recipe's `BatchSource` + `collate`, what training without `packing` does);
- packed: the same conversations packed first-fit into rows of at most --seq tokens
  (`pack.pack_examples`, exactly what `data.packing: true` does), with as many rows per
  step as carry about the padded batches' real tokens (at least one), so both modes see
  about the same real tokens per step;
- graph: the packed mode's batches (same rows, same order) through
  `train.graph_step.PackedGraphStep`: forward, backward, clipping and AdamW captured once as
  a CUDA graph on the static (rows x --seq) shape and replayed each step (eager on the CPU);
  its per-step losses follow the packed mode's to bf16 rounding;
- hf: transformers' LlamaForCausalLM (sdpa) + peft on the padded mode's batches (the same
  conversations in the same order, attention mask, labels -100 outside the answers), what
  `../shared/bench/hf_quality.py` does: the same base weights and the same initial adapter
  weights as llamaforge's (copied by the checkpoint key map), bf16 autocast, clip 1.0, torch
  AdamW (fused), the model's own loss. With `--lora-dropout 0` the two stacks compute the same
  math, so their per-step losses match to bf16 rounding.

Each step is the training loop's own: `accumulate_gradients` with
`chunked_causal_lm_loss_fn` under the run's autocast (packed rows go through
`model_inputs`, which hands the model `positions` and `doc_ids`), then `optimizer_step`
(clip 1.0, AdamW). Reported per mode: real (non-pad) input tokens/s over the timed steps
(total real tokens / total time), label tokens/s, padding fraction (pad share of the
tokens the model computed), peak allocated memory; and the ratio packed / padded.

The model is the bundled SmolLM2-135M-Instruct by default (`--model preset:<name>` for
random weights of any llamaforge preset with the same tokenizer), LoRA by default
(`--method full` for full fine-tuning), bf16 autocast on CUDA and fp32 on CPU, the
recipe's base dtypes and LoRA settings (r16, alpha 32 on all seven projections).

Batch size matters: a 135M model is bound by per-step overhead (kernel launches) at a few
thousand tokens per step (on an H200 a step took ~0.2 s both at 8 padded rows, 8k computed
tokens, and at 4 packed rows, 4k), where dropping pad tokens saves nothing. The default of
32 conversations per step (~17k real tokens) is meant to be compute-bound; compare --bs.

    python benchmarks/real_lengths.py --out real_lengths_lora.json
    python benchmarks/real_lengths.py --method full --out real_lengths_full.json
    python benchmarks/real_lengths.py --tiny --out tiny.json    # CPU smoke test, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import ensure_llamaforge, init_like_hf, versions  # noqa: E402

BUNDLED = "smollm2-135m-instruct"
LR = {"lora": 2e-4, "qlora": 2e-4, "full": 5e-5}
TINY = {
    "model": "preset:tiny-smollm2",
    "seq": 512,
    "bs": 2,
    "steps": 2,
    "warmup": 1,
    "limit": 80,
}


# ----------------------------------------------------------------------------- data


def load_tokenizer(args: argparse.Namespace):
    """The tokenizer the data is rendered with: --tokenizer, else the bundled model's."""
    from llamaforge.data.tokenizer import load_tokenizer as load
    from llamaforge.io.load import builtin_path

    return load(args.tokenizer or builtin_path(BUNDLED))


def build_examples(args: argparse.Namespace, tok) -> tuple[list[dict], Any]:
    """Unpacked training examples of chitchat_chat, through the project's data pipeline."""
    from llamaforge.data.pipeline import build_dataset

    spec = {
        "path": "chitchat",
        "format": "chitchat_chat",
        "template": "auto",
        "max_seq_len": args.seq,
        "truncation": "left",
        "packing": False,
        "val_size": 0.02,
        "split_seed": 0,
        "limit": args.limit,
        "cache_dir": args.cache_dir,
    }
    splits = build_dataset(spec, tok, use_cache=not args.no_cache)
    return splits.train, splits.report


def length_stats(lengths: list[int]) -> dict[str, float]:
    a = np.asarray(lengths)
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        "p10": float(np.percentile(a, 10)),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "max": int(a.max()),
        "tokens": int(a.sum()),
    }


def epoch_padding(source) -> float:
    """Pad share of one whole epoch of a BatchSource's batches (from lengths alone)."""
    real = computed = 0
    for ids in source.order(0):
        lens = [len(source.examples[i]["input_ids"]) for i in ids]
        real += sum(lens)
        computed += max(lens) * len(lens)
    return 1.0 - real / computed


# ----------------------------------------------------------------------------- model


def base_model(args: argparse.Namespace, tok, dtype: torch.dtype):
    """The starting model on the CPU: the bundled weights, or a random preset."""
    from llamaforge.io.load import load_model
    from llamaforge.model.llama import Llama
    from llamaforge.model.presets import preset

    if args.model.startswith("preset:"):
        name = args.model.removeprefix("preset:")
        overrides: dict[str, Any] = {"max_seq_len": max(args.seq, 256)}
        if name.startswith("tiny-"):
            overrides["vocab_size"] = tok.vocab_size
        cfg = preset(name, **overrides)
        if cfg.vocab_size < tok.vocab_size:
            raise SystemExit(
                f"--model {args.model}: vocab {cfg.vocab_size} < the tokenizer's {tok.vocab_size}"
            )
        torch.manual_seed(args.seed)
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = Llama(cfg)
        finally:
            torch.set_default_dtype(old)
        init_like_hf(model)
        return model
    model, _ = load_model(args.model, device="cpu", dtype=dtype)
    return model


def trainable_copy(base, args: argparse.Namespace, dev: torch.device, compute: torch.dtype):
    """A fresh copy of the base on the device with the method applied as the recipe does."""
    from llamaforge.config import FreezeConfig, LoraConfig, QloraConfig
    from llamaforge.train.loop import seed_everything
    from llamaforge.train.recipe import apply_method

    seed_everything(args.seed)  # same LoRA init in both modes
    model = copy.deepcopy(base).to(dev)
    lora = LoraConfig() if args.lora_dropout is None else LoraConfig(dropout=args.lora_dropout)
    run = types.SimpleNamespace(
        method=args.method, lora=lora, qlora=QloraConfig(), freeze=FreezeConfig()
    )
    apply_method(model, run, compute)
    if args.kernels != "default":
        from llamaforge.kernels import Kernels

        # none: every kernel off; unfused-lora: the defaults but the LoRA layers as plain
        # autograd ops (`kernels.lora: false`, the fused layer's opt-out)
        kernels = Kernels.none() if args.kernels == "none" else Kernels(lora=False)
        model.set_kernels(kernels)
    model.gradient_checkpointing = args.checkpointing
    return model.train()


# ----------------------------------------------------------------------------- training


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def fresh_peak(dev: torch.device) -> None:
    """Peak memory counts from here (each mode's own)."""
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train_mode(
    model, source, args, dev: torch.device, precision: str, graph: bool = False
) -> dict[str, Any]:
    """warmup + steps optimizer steps of the training loop's own pieces; timed after warm-up.

    `graph`: packed rows through `PackedGraphStep` instead (captured on CUDA; its warm-up
    and capture fall in the first step, which the warm-up steps leave untimed).
    """
    from llamaforge.config import OptimConfig
    from llamaforge.losses import chunked_causal_lm_loss_fn, count_label_tokens
    from llamaforge.train.loop import (
        accumulate_gradients,
        autocast_context,
        autocast_dtype,
        optimizer_step,
    )
    from llamaforge.train.optim import build_optimizer, build_scheduler

    optim = OptimConfig(lr=args.lr or LR[args.method], schedule="constant")
    opt = build_optimizer(model, optim)
    sched = build_scheduler(opt, optim, args.warmup + args.steps)
    params = [p for p in model.parameters() if p.requires_grad]
    graphed = None
    if graph:  # packed rows of one shape through the captured step (train/graph_step.py)
        from llamaforge.train.graph_step import PackedGraphStep, most_labels

        graphed = PackedGraphStep(
            model, opt, params, rows=source.batch_size, seq_len=args.seq,
            max_grad_norm=optim.max_grad_norm, autocast_dtype=autocast_dtype(precision),
            labels=most_labels(source.examples, source.batch_size),
        )  # fmt: skip
    fresh_peak(dev)
    steps = []
    for i in range(args.warmup + args.steps):
        batch = next(source)
        synchronize(dev)
        start = time.perf_counter()
        if graphed is not None:
            loss_t, norm_t = graphed(batch)
            sched.step()
            loss, norm = float(loss_t), float(norm_t)  # the step's one sync, as the loop's
            graphed.check(norm, i)
            real, labels = int(batch["seq_lens"].sum()), count_label_tokens(batch)
        else:
            stats = accumulate_gradients(
                model,
                [batch],
                chunked_causal_lm_loss_fn,
                autocast=lambda: autocast_context(precision, dev),
            )
            optimizer_step(opt, sched, params, max_grad_norm=optim.max_grad_norm)
            loss, real, labels = stats.loss, stats.inputs, stats.tokens
        synchronize(dev)
        steps.append(
            {
                "s": time.perf_counter() - start,
                "rows": int(batch["input_ids"].shape[0]),
                "computed": int(batch["input_ids"].numel()),
                "real": real,
                "labels": labels,
                "loss": loss,
                "warmup": i < args.warmup,
            }
        )
    return summarize(steps, dev)


def summarize(steps: list[dict[str, Any]], dev: torch.device) -> dict[str, Any]:
    """Rates over the timed (non-warm-up) steps, and the run's peak memory."""
    timed = [s for s in steps if not s["warmup"]]
    total_s = sum(s["s"] for s in timed)
    real = sum(s["real"] for s in timed)
    computed = sum(s["computed"] for s in timed)
    out = {
        "real_tokens_per_s": real / total_s,
        "label_tokens_per_s": sum(s["labels"] for s in timed) / total_s,
        "computed_tokens_per_s": computed / total_s,
        "padding_fraction": 1.0 - real / computed,
        "real_tokens_per_step": real / len(timed),
        "rows_per_step": statistics.mean(s["rows"] for s in timed),
        "step_s_median": statistics.median(s["s"] for s in timed),
        "timed_s": total_s,
        "loss_first": steps[0]["loss"],
        "loss_last": steps[-1]["loss"],
        "losses_finite": all(math.isfinite(s["loss"]) for s in steps),
        "steps": steps,
    }
    if dev.type == "cuda":
        out["peak_alloc_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return out


def hf_trainee(model, args: argparse.Namespace):
    """transformers + peft holding `model`'s base and adapter weights (LoRA only)."""
    from serve_throughput import hf_peft_model

    from llamaforge.config import LoraConfig

    if args.method != "lora":
        raise SystemExit("--modes hf: LoRA only (transformers + peft, as hf_quality.py)")
    lo = LoraConfig() if args.lora_dropout is None else LoraConfig(dropout=args.lora_dropout)
    if lo.alpha != 2 * lo.r:
        raise SystemExit(f"hf mode copies LoRA r{lo.r} alpha {2 * lo.r}; the config has {lo.alpha}")
    hf = hf_peft_model(model, ["default"], lo.r, dropout=lo.dropout)
    if args.checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf.enable_input_require_grads()
    return hf.train()


def train_hf(model, source, args, dev: torch.device, precision: str) -> dict[str, Any]:
    """The hf mode's steps: forward with labels, backward, clip, AdamW; timed as train_mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=args.lr or LR[args.method], weight_decay=0.0, fused=dev.type == "cuda"
    )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    fresh_peak(dev)
    steps = []
    for i in range(args.warmup + args.steps):
        batch = next(source)
        ids, labels = batch["input_ids"].to(dev), batch["labels"].to(dev)
        lens = batch["seq_lens"]
        mask = (torch.arange(ids.shape[1])[None] < lens[:, None]).long().to(dev)
        synchronize(dev)
        start = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(dev)
        steps.append(
            {
                "s": time.perf_counter() - start,
                "rows": int(ids.shape[0]),
                "computed": int(ids.numel()),
                "real": int(lens.sum()),
                "labels": int((labels[:, 1:] != -100).sum()),
                "loss": float(loss),
                "warmup": i < args.warmup,
            }
        )
    return summarize(steps, dev)


# ----------------------------------------------------------------------------- report


def fmt(x: Any, spec: str, na: str = "n/a") -> str:
    return na if x is None else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    s, d = report["setup"], report["data"]
    lines = [
        f"## Real lengths: chitchat_chat, padded vs packed ({s['device']})",
        "",
        f"{s['model']} {s['method']}, {s['precision']}, max {s['seq']} tokens per row, "
        f"activation checkpointing {'on' if s['checkpointing'] else 'off'}, kernels "
        f"{s['kernels']}; "
        f"{s['steps']} timed steps after {s['warmup']} warm-up",
        f"{d['examples']['n']} training conversations, tokens per conversation: mean "
        f"{d['examples']['mean']:.0f}, p50 {d['examples']['p50']:.0f}, p90 "
        f"{d['examples']['p90']:.0f}, max {d['examples']['max']}; packed into "
        f"{d['packed_rows']['n']} rows (fill {d['pack_fill']:.1%} of {s['seq']})",
        "",
        "| mode | rows/step | real tokens/step | padding (timed) | padding (epoch) "
        "| real tokens/s | label tokens/s | step s (median) | peak alloc GB | loss first -> last |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {mode} | **{r['error']}** | | | | | | | | |")
            continue
        cells = [
            f"{r['rows_per_step']:.1f}",
            f"{r['real_tokens_per_step']:,.0f}",
            f"{r['padding_fraction']:.1%}",
            f"{r['epoch_padding_fraction']:.1%}",
            f"{r['real_tokens_per_s']:,.0f}",
            f"{r['label_tokens_per_s']:,.0f}",
            f"{r['step_s_median']:.3f}",
            fmt(r.get("peak_alloc_gb"), ".2f"),
            f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}",
        ]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    for key, what in (
        ("ratio_graph_over_packed", "graph / packed"),
        ("ratio_graph_over_hf", "graph / hf"),
        ("ratio_packed_over_padded", "packed / padded"),
        ("ratio_packed_over_hf", "packed / hf"),
        ("ratio_padded_over_hf", "padded / hf"),
    ):
        if report.get(key):
            lines += ["", f"{what} real tokens/s: {report[key]:.2f}x"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"{BUNDLED} (default), a path, or preset:NAME")
    p.add_argument("--tokenizer", help=f"tokenizer file or folder (default: {BUNDLED}'s)")
    p.add_argument("--method", choices=["lora", "qlora", "full"], default="lora")
    p.add_argument("--seq", type=int, help="max tokens per row (default 1024)")
    p.add_argument("--bs", type=int, help="padded batch: conversations per step (default 32)")
    p.add_argument("--packed-bs", type=int, help="packed rows per step (default: token-matched)")
    p.add_argument("--steps", type=int, help="timed steps per mode (default 30)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5)")
    p.add_argument("--limit", type=int, help="use the first N conversations only")
    p.add_argument("--lr", type=float, help="default 2e-4 (LoRA), 5e-5 (full)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument(
        "--kernels",
        choices=["default", "none", "unfused-lora"],
        default="default",
        help="llamaforge's fused kernels at their defaults, all off (plain PyTorch), or the "
        "defaults with the LoRA layers unfused (kernels.lora false)",
    )
    p.add_argument(
        "--group-by-length", action="store_true", help="padded batches grouped by length"
    )
    p.add_argument(
        "--modes",
        default="padded,packed",
        help="comma list of padded, packed, graph (packed through the CUDA-graph step), hf",
    )
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout (default: the recipe's)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--cache-dir", help="tokenized-data cache (default: llamaforge's)")
    p.add_argument("--no-cache", action="store_true", help="tokenize afresh, write no cache")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny random model, few steps (CPU test)")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    args = p.parse_args(argv)
    full = {"model": BUNDLED, "seq": 1024, "bs": 32, "steps": 30, "warmup": 5, "limit": None}
    for key, value in (TINY if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in ("padded", "packed", "graph", "hf") for m in modes):
        raise SystemExit(f"--modes {args.modes!r}: use padded, packed, graph and/or hf")
    args.modes = modes
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    ensure_llamaforge()
    from llamaforge.data.pack import pack_examples
    from llamaforge.io.load import pick_device
    from llamaforge.train.batches import BatchSource
    from llamaforge.train.loop import resolve_precision
    from llamaforge.train.recipe import base_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    dev = pick_device(args.device)
    precision = resolve_precision("auto", dev)
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    tok = load_tokenizer(args)
    log("building the chitchat_chat examples ...")
    examples, data_report = build_examples(args, tok)
    packed = pack_examples(examples, args.seq)
    ex_stats = length_stats([len(e["input_ids"]) for e in examples])
    row_stats = length_stats([len(r["input_ids"]) for r in packed])
    packed_bs = args.packed_bs or max(1, round(args.bs * ex_stats["mean"] / row_stats["mean"]))
    pad = tok.pad_id if tok.pad_id is not None else 0

    def source(mode: str) -> BatchSource:  # hf reads the padded mode's batches, afresh
        if mode in ("packed", "graph"):
            return BatchSource(packed, packed_bs, pad_id=pad, seed=args.seed)
        return BatchSource(
            examples, args.bs, pad_id=pad, seed=args.seed, group_by_length=args.group_by_length
        )

    log(f"loading {args.model} ...")
    base = base_model(args, tok, base_dtype(args.method, precision))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    results: dict[str, Any] = {}
    for mode in args.modes:
        log(f"training {mode} ({args.warmup} + {args.steps} steps) ...")
        try:
            model, src = trainable_copy(base, args, dev, compute), source(mode)
            if mode == "hf":
                model = hf_trainee(model, args)
                results[mode] = train_hf(model, src, args, dev, precision)
            else:
                results[mode] = train_mode(model, src, args, dev, precision, mode == "graph")
            results[mode]["batch_size"] = src.batch_size
            results[mode]["epoch_padding_fraction"] = epoch_padding(src)
        except torch.cuda.OutOfMemoryError:
            results[mode] = {"error": "out of memory"}
        model = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        r = results[mode]
        log(f"  {mode}: " + (r.get("error") or f"{r['real_tokens_per_s']:,.0f} real tokens/s"))
    report: dict[str, Any] = {
        "setup": {
            "model": args.model,
            "method": args.method,
            "lora_dropout": args.lora_dropout,
            "precision": precision,
            "seq": args.seq,
            "padded_bs": args.bs,
            "packed_bs": packed_bs,
            "group_by_length": args.group_by_length,
            "steps": args.steps,
            "warmup": args.warmup,
            "limit": args.limit,
            "checkpointing": args.checkpointing,
            "kernels": args.kernels,
            "device": name,
        },
        "data": {
            "examples": ex_stats,
            "packed_rows": row_stats,
            "pack_fill": row_stats["tokens"] / (row_stats["n"] * args.seq),
            "truncated": data_report.truncated,
        },
        "results": results,
        "versions": versions("llamaforge"),
    }
    modes = ("graph", "packed", "padded", "hf")
    rate = {m: results.get(m, {}).get("real_tokens_per_s") for m in modes}
    if rate["packed"] and rate["padded"]:
        report["ratio_packed_over_padded"] = rate["packed"] / rate["padded"]
    if rate["graph"] and rate["packed"]:
        report["ratio_graph_over_packed"] = rate["graph"] / rate["packed"]
    for m in ("graph", "packed", "padded"):
        if rate[m] and rate["hf"]:
            report[f"ratio_{m}_over_hf"] = rate[m] / rate["hf"]
    report["wall_s"] = time.perf_counter() - start
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
        log(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
