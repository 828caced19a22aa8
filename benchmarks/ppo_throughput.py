"""PPO throughput and memory: samples/s split into generation and training, peak memory.

Each preset runs in its own process (one stack per process, as the other benchmarks do):
random weights, LoRA, one base in memory for all four roles (actor = adapter `actor`,
critic = adapter `critic` + value head, reference = adapters off, reward = adapter `reward`
+ a score head), random prompt ids of --prompt-len tokens and responses of exactly
--new-tokens tokens (no stop token, so every stack does the same work). After --warmup PPO
iterations, --steps iterations are timed; the report gives samples/s, the seconds of
generation, scoring (the no-grad forwards of all roles) and training per iteration, and the
peak CUDA memory of the timed iterations.

    python benchmarks/ppo_throughput.py --presets smollm2-135m,llama3.2-1b --out ppo.json
    python benchmarks/ppo_throughput.py --presets llama3.1-8b --batch 16 --qlora   # one GPU
    python benchmarks/ppo_throughput.py --tiny          # CPU smoke test; speeds mean nothing

Stacks (--stacks, each preset x stack in its own process): `llamaforge` (rollouts on the
serving engine, CUDA-graph decode), `llamaforge-generate` (rollouts on the plain
`model.generate` loop, `ppo.rollout_engine=false`) and `trl`: TRL's PPOTrainer
(`trl.experimental.ppo`) with peft LoRA on the policy, reference = adapter off, and
transformers' LlamaForSequenceClassification as value and reward model (TRL trains the value
model fully; that is its design). The pinned trl 1.16 no longer ships a PPO trainer; trl
0.29.1 still does: install it apart (`pip install --no-deps --target DIR trl==0.29.1`) and
pass `--trl-path DIR`. TRL gets the same shape of work: rollouts of --batch prompts of
--prompt-len random ids, --new-tokens sampled tokens (no stop token), one PPO epoch in
--mini-batches mini-batches of --micro-batch rows, generation in one batch of all rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _trl_child(args: argparse.Namespace) -> dict[str, Any]:
    """TRL's PPOTrainer + peft on the same shape of work; iteration times from a callback."""
    if args.trl_path:
        sys.path.insert(0, args.trl_path)
    import datasets
    import peft
    import torch
    import trl
    from preference_speed import word_tokenizer
    from train_throughput import TARGETS
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        LlamaConfig,
        TrainerCallback,
    )

    from llamaforge.io.hf import config_to_hf
    from llamaforge.model.presets import preset

    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        from trl.experimental.ppo import ppo_trainer as trl_ppo
    except ImportError as e:
        raise SystemExit(f"trl {trl.__version__} has no PPO trainer ({e}); see --trl-path") from e
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    hf = config_to_hf(preset("tiny-llama3" if args.tiny else args.preset))
    hf.pop("torch_dtype", None)
    vocab = hf["vocab_size"]
    config = LlamaConfig(**{**hf, "pad_token_id": vocab - 2, "num_labels": 1})
    torch.manual_seed(0)
    with torch.device(device):
        policy = AutoModelForCausalLM.from_config(config, dtype=dtype)
        value = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        reward = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    tok = word_tokenizer(vocab)
    tok.padding_side = "left"
    steps = args.warmup + args.steps
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab - 2, (args.batch * steps, args.prompt_len), generator=gen)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    out = Path(tempfile.mkdtemp(prefix="ppo-bench-trl-"))
    cfg = PPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.batch // args.micro_batch,
        num_mini_batches=args.mini_batches,
        num_ppo_epochs=1,
        local_rollout_forward_batch_size=args.batch,
        total_episodes=args.batch * steps,
        response_length=args.new_tokens,
        stop_token=None,
        temperature=1.0,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        bf16=cuda,
        num_sample_generations=0,
        report_to=[],
        save_strategy="no",
        logging_steps=1_000_000,
        seed=0,
    )
    lora = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
        target_modules=list(TARGETS), task_type="CAUSAL_LM",
    )  # fmt: skip

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    ends: list[float] = []
    gen_s: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *_a, **_k):
            sync()
            ends.append(time.perf_counter())

        def on_step_end(self, *_a, **_k):
            sync()
            ends.append(time.perf_counter())
            if len(ends) == args.warmup + 1 and cuda:
                torch.cuda.reset_peak_memory_stats()

    generate = trl_ppo.batch_generation

    def timed_generation(*a, **k):  # TRL's own function, timed (the call is unchanged)
        sync()
        t = time.perf_counter()
        result = generate(*a, **k)
        sync()
        gen_s.append(time.perf_counter() - t)
        return result

    trl_ppo.batch_generation = timed_generation
    trainer = PPOTrainer(
        args=cfg, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
        train_dataset=ds, value_model=value, peft_config=lora,
    )  # fmt: skip
    trainer.add_callback(Timer())
    trainer.train()
    iters = [b - a for a, b in zip(ends, ends[1:], strict=False)][args.warmup :]
    timed_gen = gen_s[args.warmup :]
    wall = sum(iters)
    return {
        "preset": args.preset or "tiny-llama3",
        "stack": "trl",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "samples_per_s": args.batch * len(iters) / wall,
        "generation_s": sum(timed_gen) / len(timed_gen),
        "other_s": (wall - sum(timed_gen)) / len(iters),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        "versions": {"trl": trl.__version__, "peft": peft.__version__},
        "notes": "value model trained fully (TRL's design); reward model a second full copy",
    }


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """One preset, in this process: build, warm up, time, report."""
    import torch

    from llamaforge.adapters.inject import add_adapter, quantize_linears
    from llamaforge.adapters.lora import set_adapter
    from llamaforge.config import config_from_dict
    from llamaforge.io.hf import add_score_head
    from llamaforge.model.llama import Llama
    from llamaforge.model.presets import preset
    from llamaforge.train.metrics import read_metrics
    from llamaforge.train.ppo import PPORun, train_ppo
    from llamaforge.train.rollout import ActorCritic, Roles

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    name = "tiny-llama3" if args.tiny else args.preset
    with torch.device(device):
        model = Llama(preset(name)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if args.qlora:
        quantize_linears(model, compute_dtype=dtype)
    add_score_head(model)
    model.score.requires_grad_(False)
    for adapter in ("actor", "critic", "reward"):
        add_adapter(model, adapter, r=args.rank, alpha=2 * args.rank, dtype=torch.float32)
    for n, p in model.named_parameters():
        p.requires_grad_(".actor" in n or ".critic" in n)
    set_adapter(model, "actor")
    roles = Roles(ActorCritic(model), lora=True)
    out = Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    steps = args.warmup + args.steps
    cfg = config_from_dict(
        {
            "model": name,
            "stage": "ppo",
            "data": {"path": "random", "format": "preference"},
            "output_dir": str(out),
            "max_steps": steps,
            "precision": "bf16" if cuda else "fp32",
            "optim": {"lr": 1e-5, "batch_size": args.micro_batch, "schedule": "constant"},
            "checkpoint": {"resume": "never"},
            "logging": {"tensorboard": False, "progress": False, "plot": False},
            "ppo": {
                "rollout_engine": args.stack != "llamaforge-generate",
                "reward_model": "random",
                "rollout_batch_size": args.batch,
                "max_new_tokens": args.new_tokens,
                "stop_on_eot": False,
                "epochs": 1,
                "mini_batches": args.mini_batches,
            },
        }
    )
    vocab = model.cfg.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, vocab, (args.batch * steps, args.prompt_len), generator=gen)
    run = PPORun(cfg, roles, prompts.tolist(), out, pad_id=0, eot=[2], decode=str)
    run.save = lambda: None  # timing only: no checkpoints
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run.total_steps = args.warmup
    train_ppo(run)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    run.total_steps = steps
    train_ppo(run)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t1
    timed = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > args.warmup]

    def mean(key: str) -> float:
        return sum(r[key] for r in timed) / len(timed)

    return {
        "preset": name,
        "stack": args.stack,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "qlora": args.qlora,
        "samples_per_s": args.batch * args.steps / wall,
        "generation_s": mean("generation_s"),
        "scoring_s": mean("scoring_s"),
        "training_s": mean("training_s"),
        "generation_tokens_per_s": mean("generation_tokens_per_s"),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        "warmup_s": t1 - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="smollm2-135m,llama3.2-1b")
    ap.add_argument("--preset", help=argparse.SUPPRESS)  # set in the child process
    ap.add_argument(
        "--stacks",
        default="llamaforge,trl",
        help="comma list of llamaforge, llamaforge-generate, trl",
    )
    ap.add_argument("--stack", default="llamaforge", help=argparse.SUPPRESS)
    ap.add_argument("--trl-path", help="a folder holding a trl that has trl.experimental.ppo")
    ap.add_argument("--batch", type=int, default=64, help="samples per PPO iteration")
    ap.add_argument("--micro-batch", type=int, default=16, help="rows per forward pass")
    ap.add_argument("--mini-batches", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--qlora", action="store_true", help="NF4 base (the 8B-on-one-GPU case)")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke test)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.preset or args.tiny:
        print(json.dumps(_trl_child(args) if args.stack == "trl" else _child(args)))
        return
    results = []
    for name in args.presets.split(","):
        for stack in args.stacks.split(","):
            cmd = [sys.executable, __file__, "--preset", name, "--stack", stack]
            for key in ("batch", "micro_batch", "mini_batches", "prompt_len", "new_tokens", "rank"):
                cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            cmd += ["--qlora"] if args.qlora else []
            cmd += ["--trl-path", args.trl_path] if args.trl_path else []
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                tail = done.stderr.strip().splitlines()[-3:]
                results.append({"preset": name, "stack": stack, "error": tail})
            else:
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
        by = {r["stack"]: r for r in results if r["preset"] == name and "samples_per_s" in r}
        if "trl" in by and "llamaforge" in by:
            ratio = by["llamaforge"]["samples_per_s"] / by["trl"]["samples_per_s"]
            print(f"{name}: llamaforge / trl samples/s = {ratio:.2f}x", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
