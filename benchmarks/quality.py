"""Quality benchmark: SmolLM2-135M-Instruct on chitchat dialogue -> topic (whole train split).

Fine-tunes with llamaforge's own recipe (LoRA and/or full SFT), then reports held-out exact
match and ROUGE-L before and after on the benchmark's test split (sha256 5%, 337 items), the
same task and split as ../shared/bench/hf_quality.py. Meant for a GPU:

    python benchmarks/quality.py --model smollm2-135m-instruct --methods lora full --out res.json

Extra `key=value` arguments override the run config (e.g. optim.lr=5e-4 epochs=2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from llamaforge.config import config_from_dict
from llamaforge.train.metrics import read_metrics
from llamaforge.train.recipe import run

BASE = {
    "stage": "sft",
    "data": {"path": "chitchat", "format": "chitchat_topic", "val_size": 0.0, "max_seq_len": 1024},
    "eval": {"generate": {"max_examples": 10000, "max_new_tokens": 40}},
    "logging": {"every": 20, "tensorboard": False},
    "checkpoint": {"keep": 1, "resume": "never"},
}
METHODS = {
    "lora": {
        "method": "lora",
        "epochs": 3,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "optim": {"lr": 1e-3, "batch_size": 16, "warmup_steps": 20, "weight_decay": 0.0},
    },
    "full": {
        "method": "full",
        "epochs": 3,
        "optim": {"lr": 1e-4, "batch_size": 16, "warmup_steps": 20, "weight_decay": 0.01},
    },
}


def one(model: str, method: str, out: Path, overrides: list[str]) -> dict:
    """Train and score one method; returns the recipe's summary plus timing."""
    raw = {**BASE, **METHODS[method], "model": model, "output_dir": str(out / method)}
    cfg = config_from_dict(raw, overrides, source=f"benchmarks/quality.py[{method}]")
    t0 = time.time()
    summary = run(cfg)
    steps = [m for m in read_metrics(out / method / "metrics.jsonl") if m.get("kind") == "train"]
    rates = sorted(m["input_tokens_per_s"] for m in steps) or [float("nan")]
    return {
        "method": method,
        "wall_s": round(time.time() - t0, 1),
        "steps": summary["steps"],
        "input_tokens_per_s_median": rates[len(rates) // 2],
        "before": summary["before"],
        "after": summary["after"],
        "sample": summary["sample"],
        "config": cfg.to_dict(),
    }


def main() -> int:
    """Run the chosen methods and print a table (JSON to --out)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--methods", nargs="+", default=["lora", "full"], choices=list(METHODS))
    p.add_argument("--runs", default="runs/quality")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = []
    for m in args.methods:  # results are written after each method, in case of a time limit
        results.append(one(args.model, m, Path(args.runs), args.overrides))
        if args.out:
            Path(args.out).write_text(json.dumps({"device": device, "results": results}, indent=1))
    print(f"\nchitchat dialogue->topic, SmolLM2-135M-Instruct, {device}")
    print("| method | EM before | EM after | ROUGE-L after | wall s | real tok/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        b, a = r["before"], r["after"]
        print(
            f"| {r['method']} | {b['exact_match']:.1%} | {a['exact_match']:.1%} | "
            f"{a['rouge_l']:.3f} | {r['wall_s']} | {r['input_tokens_per_s_median']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
