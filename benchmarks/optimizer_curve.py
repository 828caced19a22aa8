"""bf16 weights + stochastic-rounding AdamW against fp32 master weights: same loss curve?

Full fine-tuning on real data (default: SmolLM2 on chitchat,
`configs/smollm2_full_sft_chitchat.yaml`) three times, each its own `llamaforge train`
process, same data, same steps:

- `fp32`: fp32 master weights and AdamW states under bf16 autocast (`optim.master_dtype=fp32`);
- `bf16`: bf16 weights and states, stochastically rounded updates, the fused Triton update
  (the default on a GPU since this curve matched): half the memory of the weights+states;
- `fp32_seed1`: as `fp32` with another data-order seed: the noise a seed alone makes.

The verdict compares |bf16 - fp32| with |fp32_seed1 - fp32| on the validation loss at every
evaluation and on the smoothed training loss (window --smooth steps): bf16 is "within noise"
when its largest gap is no larger than the seed's. Writes a JSON and a PNG of both. On a
CPU precision is fp32 and both weight settings train the same fp32 model (a smoke run only).

    python benchmarks/optimizer_curve.py --model SmolLM2.gguf --steps 500 --out curve.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "fp32": ("0", ["optim.master_dtype=fp32"]),
    "bf16": ("0", ["optim.master_dtype=bf16", "kernels.adamw=true"]),
    "fp32_seed1": ("1", ["optim.master_dtype=fp32"]),
}


def train(a: argparse.Namespace, name: str) -> dict:
    seed, extra = VARIANTS[name]
    out = Path(a.work) / name
    cmd = [
        sys.executable, "-m", "llamaforge.cli", "train", a.config, f"model={a.model}",
        f"max_steps={a.steps}", "epochs=100", f"seed={seed}", f"optim.batch_size={a.batch}",
        "optim.grad_accum=1", f"eval.every={a.eval_every}", f"eval.max_batches={a.eval_batches}",
        "eval.patience=1000000", "eval.generate.max_examples=0", "checkpoint.every=null",
        "logging.tensorboard=false", "logging.plot=false", "logging.progress=false",
        "logging.every=1",
        f"output_dir={out}", *extra, *a.override,
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_loss = {r["step"]: r["loss"] for r in rows if r.get("kind") == "train" and "loss" in r}
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    return {"seconds": round(time.perf_counter() - t0, 1), "train": train_loss, "val": val}


def smooth(points: dict[int, float], window: int) -> dict[int, float]:
    steps = sorted(points)
    out = {}
    for i, s in enumerate(steps):
        part = [points[t] for t in steps[max(0, i - window + 1) : i + 1]]
        out[s] = sum(part) / len(part)
    return out


def max_gap(a: dict[int, float], b: dict[int, float], from_step: int = 0) -> float:
    common = [s for s in a if s in b and s >= from_step]
    return max((abs(a[s] - b[s]) for s in common), default=float("nan"))


def plot(runs: dict, window: int, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, r in runs.items():
        sm = smooth(r["train"], window)
        left.plot(list(sm), list(sm.values()), label=f"{name} train (mean of {window})")
        left.plot(list(r["val"]), list(r["val"].values()), "o--", label=f"{name} val")
    base = runs["fp32"]
    for name in ("bf16", "fp32_seed1"):
        a, b = smooth(runs[name]["train"], window), smooth(base["train"], window)
        steps = [s for s in a if s in b]
        right.plot(steps, [a[s] - b[s] for s in steps], label=f"{name} - fp32 (train)")
    right.axhline(0, color="k", lw=0.5)
    left.set_xlabel("step")
    right.set_xlabel("step")
    left.set_ylabel("loss (nats/token)")
    right.set_ylabel("difference")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--config", default=str(ROOT / "configs/smollm2_full_sft_chitchat.yaml"))
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--smooth", type=int, default=50, help="training-loss window (steps)")
    p.add_argument("--work", default="/tmp/optimizer_curve")
    p.add_argument("--out", default="optimizer_curve.json")
    p.add_argument("--only", default="fp32,bf16,fp32_seed1", help="comma list of variants")
    p.add_argument("override", nargs="*", help="more config overrides (key=value)")
    a = p.parse_args()
    out = Path(a.out)
    runs: dict = json.loads(out.read_text())["runs"] if out.is_file() else {}
    for name in a.only.split(","):
        runs[name] = train(a, name)
        out.write_text(json.dumps({"settings": vars(a), "runs": runs}, indent=1))
    result: dict = {"settings": vars(a), "runs": runs}
    if all(k in runs for k in VARIANTS):
        w, half = a.smooth, a.steps // 2
        sm = {k: smooth(r["train"], w) for k, r in runs.items()}
        gaps = {
            "val_bf16": max_gap(runs["bf16"]["val"], runs["fp32"]["val"]),
            "val_seed": max_gap(runs["fp32_seed1"]["val"], runs["fp32"]["val"]),
            "train_bf16": max_gap(sm["bf16"], sm["fp32"], from_step=w),
            "train_seed": max_gap(sm["fp32_seed1"], sm["fp32"], from_step=w),
            "train_bf16_second_half": max_gap(sm["bf16"], sm["fp32"], from_step=half),
            "train_seed_second_half": max_gap(sm["fp32_seed1"], sm["fp32"], from_step=half),
        }
        result["gaps"] = gaps
        result["within_seed_noise"] = (
            gaps["val_bf16"] <= gaps["val_seed"] and gaps["train_bf16"] <= gaps["train_seed"]
        )
        plot(runs, w, out.with_suffix(".png"))
        print(json.dumps({"gaps": gaps, "within_seed_noise": result["within_seed_noise"]}))
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
