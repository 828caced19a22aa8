"""Where a SmolLM2 LoRA training step on packed real chitchat rows spends its time.

    python benchmarks/profile_step.py MODEL.gguf CONVERSATIONS [--steps 3]

Builds `real_lengths.py`'s packed rows (1,024 tokens, as many rows as CONVERSATIONS padded
conversations hold), LoRA r16 on all 7 projections, dropout 0, bf16, AdamW with clipping
(the loop's own pieces), then: the wall time of a step (5 steps after 4 warm-up) and a
torch.profiler table of `--steps` steps: launches, syncs, and the ops by host and device
time. The kernel times summed are an upper bound of the device's busy time (the profiler
lists some kernels under their op as well). A GPU measurement (issue 16 item 4); it runs
on the CPU too, slowly, without the device columns.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_lengths as rl  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("conversations", type=int)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    args = rl.parse_args(["--model", a.model, "--tokenizer", a.model, "--lora-dropout", "0",
                          "--bs", str(a.conversations)])  # fmt: skip
    rl.ensure_llamaforge()
    from torch.profiler import ProfilerActivity, profile

    from llamaforge.config import OptimConfig
    from llamaforge.data.pack import pack_examples
    from llamaforge.losses import chunked_causal_lm_loss_fn
    from llamaforge.train.batches import BatchSource
    from llamaforge.train.loop import accumulate_gradients, autocast_context, optimizer_step
    from llamaforge.train.optim import build_optimizer, build_scheduler
    from llamaforge.train.recipe import base_dtype

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16" if dev.type == "cuda" else "fp32"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tok = rl.load_tokenizer(args)
    examples, _ = rl.build_examples(args, tok)
    packed = pack_examples(examples, 1024)
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

    def step(batch) -> None:
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
    print(f"packed rows {rows} x 1024, wall {wall * 1e3:.1f} ms a step", flush=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    batches = [next(src) for _ in range(a.steps)]
    with profile(activities=acts) as prof:
        for b in batches:
            step(b)
        sync()
    ev = prof.key_averages()
    n = a.steps
    busy = sum(e.self_device_time_total for e in ev) / n / 1e3
    print(f"kernel time summed: {busy:.1f} ms a step (an upper bound of the busy time)")
    for key in ("cudaLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
                "cudaStreamSynchronize", "cudaMemcpyAsync", "aten::item"):  # fmt: skip
        hit = [e for e in ev if e.key == key]
        if hit:
            print(f"{key}: {hit[0].count / n:.0f} a step, {hit[0].cpu_time_total / n / 1e3:.1f} ms")
    print(ev.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    if dev.type == "cuda":
        print(ev.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
