"""`llamaforge train` with and without `cuda_graph: true`: same losses, and how much faster.

    python benchmarks/graph_loop.py --tokenizer TOK [--preset smollm2-135m] [--steps 60]
        [--rows 16] [--out graph_loop.json]
    python benchmarks/graph_loop.py --tiny     # CPU smoke test (the graph step runs eagerly)

Writes a random-weight model of the preset's shape (Hugging Face folder, with the tokenizer
TOK) and runs the whole CLI twice on it, one process each: `configs/smollm2_full_sft_chitchat.yaml`
(the built-in chitchat conversations, chat template, left truncation, packed 1,024-token
rows) with method lora (r16 alpha 32, all 7 projections, dropout 0), lr 2e-4, grad_accum 1,
--rows packed rows a step, --steps steps, logging every step, no checkpoint, evaluation only
at the end (2 batches, no generation) — once as is, once with `cuda_graph=true`
(`train/graph_step.py` inside the training loop). Reported: the per-step losses of both
runs and their largest difference, and the input (non-pad) tokens per second of each run
over the steps after the first 5 (the graph's capture falls in step 1), from each run's own
metrics.jsonl, with the whole process wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import ensure_llamaforge, init_like_hf, versions  # noqa: E402


def write_model(preset_name: str, tokenizer: str, out: Path, seed: int = 0) -> None:
    """A random model of the preset's shape as a Hugging Face folder, with the tokenizer."""
    from llamaforge.data.tokenizer import load_tokenizer, save_tokenizer
    from llamaforge.io.hf import save_hf
    from llamaforge.model.llama import Llama
    from llamaforge.model.presets import preset

    tok = load_tokenizer(tokenizer)
    overrides: dict[str, Any] = {}
    if preset_name.startswith("tiny-"):
        overrides["vocab_size"] = tok.vocab_size
    cfg = preset(preset_name, **overrides)
    torch.manual_seed(seed)
    model = Llama(cfg)
    init_like_hf(model)
    save_hf(model, out, dtype=torch.bfloat16)
    save_tokenizer(tok, out)


def run(model: Path, out: Path, args: argparse.Namespace, graph: bool) -> dict[str, Any]:
    """One `llamaforge train` process; its per-step records and wall time."""
    cmd = [
        sys.executable, "-m", "llamaforge", "train",
        str(ROOT / "configs" / "smollm2_full_sft_chitchat.yaml"),
        f"model={model}", f"output_dir={out}", "method=lora", "lora.dropout=0.0",
        "optim.lr=2e-4", "optim.grad_accum=1", f"optim.batch_size={args.rows}",
        f"max_steps={args.steps}", "logging.every=1", "logging.tensorboard=false",
        "logging.plot=false", "logging.progress=false", "checkpoint.every=null",
        "checkpoint.resume=never", "eval.every=null", "eval.max_batches=2",
        "eval.patience=null", "eval.generate.max_examples=0", f"cuda_graph={str(graph).lower()}",
    ]  # fmt: skip
    if args.data_limit:
        cmd.append(f"data.limit={args.data_limit}")
    if args.max_seq_len:
        cmd.append(f"data.max_seq_len={args.max_seq_len}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"llamaforge train (cuda_graph={graph}) failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    timed = [r["input_tokens_per_s"] for r in train[5:]] or [train[-1]["input_tokens_per_s"]]
    return {
        "losses": [r["loss"] for r in train],
        "input_tokens_per_s_median": statistics.median(timed),
        "input_tokens_per_s_mean": statistics.fmean(timed),
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--tokenizer", help="tokenizer file or folder (the bundled model's, saved)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rows", type=int, default=16, help="packed rows a step")
    p.add_argument("--data-limit", type=int, help="data.limit (conversations)")
    p.add_argument("--max-seq-len", type=int, help="data.max_seq_len (default the config's 1024)")
    p.add_argument("--tiny", action="store_true", help="tiny model, few steps (CPU smoke test)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    ensure_llamaforge()
    if args.tiny:
        args.preset, args.steps, args.rows = "tiny-smollm2", 7, 2
        args.data_limit, args.max_seq_len = args.data_limit or 200, args.max_seq_len or 256
    if args.tokenizer is None:
        from llamaforge.data.tokenizer import load_tokenizer, save_tokenizer
        from llamaforge.io.load import builtin_path

        tmp_tok = Path(tempfile.mkdtemp(prefix="lf-tok-"))
        save_tokenizer(load_tokenizer(builtin_path("smollm2-135m-instruct")), tmp_tok)
        args.tokenizer = str(tmp_tok)
    with tempfile.TemporaryDirectory(prefix="lf-graph-loop-") as tmp:
        model = Path(tmp) / "model"
        write_model(args.preset, args.tokenizer, model)
        eager = run(model, Path(tmp) / "eager", args, graph=False)
        graph = run(model, Path(tmp) / "graph", args, graph=True)
    diff = max(abs(a - b) for a, b in zip(eager["losses"], graph["losses"], strict=True))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    report = {
        "setup": {
            "preset": args.preset,
            "steps": args.steps,
            "rows": args.rows,
            "device": device,
            "data_limit": args.data_limit,
        },  # fmt: skip
        "eager": eager,
        "graph": graph,
        "max_loss_diff": diff,
        "speedup": graph["input_tokens_per_s_median"] / eager["input_tokens_per_s_median"],
        "versions": versions("llamaforge"),
    }
    print(
        f"eager {eager['input_tokens_per_s_median']:,.0f} vs graph "
        f"{graph['input_tokens_per_s_median']:,.0f} input tok/s (median over steps 6+): "
        f"{report['speedup']:.2f}x; largest per-step loss difference {diff:.2e}; "
        f"process wall {eager['wall_s']:.0f} s / {graph['wall_s']:.0f} s"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
