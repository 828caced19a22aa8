"""Preference training speed: llamaforge's DPO and reward-model stages against TRL's trainers.

One invocation trains, each in its own process on the same GPU: llamaforge `stage: dpo` (its
stage-table loss, pair collation and optimizer) and TRL `DPOTrainer` + peft (and the same with
Liger's layer kernels, `use_liger_kernel=True`), then llamaforge `stage: rm` and TRL
`RewardTrainer` + peft. Same shape for all: randomly initialised weights, LoRA r16 (alpha 16) on
all 7 projections with fp32 adapter weights over a bf16 base, `PAIRS` pairs per step, each pair
a shared prompt of `PROMPT` tokens and two answers of `ANSWER` tokens (so every sequence is
PROMPT + ANSWER long, 1,024 + 1,024 by default: 1,024 tokens of prompt and answer for the chosen
and as many for the rejected side), random token ids, gradient checkpointing (non-reentrant),
AdamW, clipping at 1.0, DPO sigmoid loss with beta 0.1 and the reference = the same base with
adapters switched off (neither stack keeps a second model). llamaforge's DPO puts each pair in
one row by default, the prompt once and the rejected answer masked from the chosen one
(`dpo.shared_prompt`; the stack `llamaforge-dpo-two-rows` turns it off). The `-precomputed`
stacks, llamaforge's `dpo.reference: precompute` and TRL's `precompute_ref_log_probs=True`,
compute the reference log-probs of every pair once before the timed steps (untimed in both),
so a step is the policy's forward and backward alone. Tokens/s counts every
token of both sequences of every pair, the prompt twice, whichever layout runs (8,192 a step at
the default shape), over the median step time after the warm-up steps; peak memory is the peak
allocated during training (weights included). TRL is driven through its own `train()` with a
callback that times each optimizer step (its Trainer fetches and collates the batch before the
step begins; llamaforge's batches are likewise collated before the timed steps, and both move
theirs to the GPU inside the step); its text datasets go through a word-level tokenizer
whose words are the token ids, so it sees exactly the same lengths.

`--workload qlora8b` runs the same stacks over a 4-bit base: llamaforge's NF4 + double quant
(bf16 compute, its fused LoRA layers) against TRL + peft on transformers' model loaded with
bitsandbytes NF4 + double quant (bf16 compute), from a random model saved once to disk;
neither upcasts the rest of the model (TRL 1.x does not call `prepare_model_for_kbit_training`).

    python benchmarks/preference_speed.py --out preference_speed.json          # 8B, GPU
    python benchmarks/preference_speed.py --workload qlora8b --stacks llamaforge-dpo,trl-dpo
    python benchmarks/preference_speed.py --shape tiny --steps 2 --warmup 1     # CPU smoke test

A stack whose package is missing is reported as skipped; one that runs out of memory as such.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402  (the shapes, model set-up and child plumbing)

STACKS = {
    "llamaforge-dpo": ("dpo", "llamaforge"),
    "llamaforge-dpo-two-rows": ("dpo", "llamaforge, dpo.shared_prompt false"),
    "llamaforge-dpo-host": ("dpo", "llamaforge, input embeddings in host memory"),
    "llamaforge-dpo-precomputed": ("dpo", "llamaforge, reference log-probs precomputed"),
    "trl-dpo": ("dpo", "TRL DPOTrainer + peft"),
    "trl-dpo-liger": ("dpo", "TRL DPOTrainer + peft + Liger kernels"),
    "trl-dpo-precomputed": ("dpo", "TRL DPOTrainer + peft, precompute_ref_log_probs"),
    "llamaforge-rm": ("rm", "llamaforge"),
    "llamaforge-rm-two-rows": ("rm", "llamaforge, rm.shared_prompt false"),
    "trl-rm": ("rm", "TRL RewardTrainer + peft"),
}
BETA, LR = 0.1, 2e-4
METHODS = {"lora": "LoRA", "qlora": "QLoRA (NF4 + double quant)"}


def sequences(spec: tt.Spec, prompt: int, gen: torch.Generator, vocab: int) -> list[dict]:
    """One step's pairs: random prompt ids shared by a chosen and a rejected answer."""
    answer = spec.seq - prompt
    pairs = []
    for _ in range(spec.bs):
        p, c, r = (
            torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (prompt, answer, answer)
        )
        pairs.append(
            {
                "prompt_ids": p,
                "chosen_ids": c,
                "chosen_labels": c,
                "rejected_ids": r,
                "rejected_labels": r,
            }
        )
    return pairs


# ----------------------------------------------------------------------------- llamaforge


def llamaforge_trainee(name: str, spec: tt.Spec, prompt: int, dev: torch.device) -> tt.Trainee:
    """The stage's own loss, collation and optimizer on llamaforge's model; `step(None)`
    runs one optimizer step on fresh random pairs and returns the loss.

    DPO and RM run their default shared-prompt rows (one row a pair, the prompt once) unless
    the stack ends in `-two-rows` (chosen and rejected as two rows, as TRL's)."""
    from llamaforge.adapters.inject import parameter_counts
    from llamaforge.config import DataConfig, OptimConfig, RunConfig
    from llamaforge.train.loop import autocast_context
    from llamaforge.train.optim import build_optimizer
    from llamaforge.train.stages import STAGES

    objective = STACKS[name][0]
    model, precision, notes = tt.llamaforge_model(spec, tt.STACKS["llamaforge"], dev)
    cfg = RunConfig(model="random", data=DataConfig(path="-"), stage=objective, method=spec.method)
    cfg.dpo.beta = BETA
    cfg.dpo.shared_prompt = cfg.rm.shared_prompt = not name.endswith("-two-rows")
    precomputed = name.endswith("-precomputed")
    if precomputed:
        cfg.dpo.reference = "precompute"
    stage = STAGES[objective]
    collate_fn = stage.batches(cfg)
    if stage.prepare is not None:  # the reward head (trainable: added after the frozen base)
        stage.prepare(model, cfg)
        model.to(dev)
    if name.endswith("-host"):  # `embeddings_on_host: true`, as the loop applies it
        model.keep_embeddings_on_host()
        notes += "; input embeddings in host memory"
    loss_fn = stage.loss(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, OptimConfig(lr=LR))
    gen = torch.Generator().manual_seed(1)
    vocab = spec.hf_config["vocab_size"]

    # every step's pairs made and collated on the host before the timed steps, as TRL's
    # Trainer fetches and collates each batch before its step begins (moved to the device
    # inside the step in both); with a precomputed reference, scored by the starting model
    steps = [sequences(spec, prompt, gen, vocab) for _ in range(max(spec.warmup + spec.steps, 4))]
    if precomputed:
        from llamaforge.train.stages import precompute_reference

        with autocast_context(precision, dev):
            precompute_reference(model, [e for s in steps for e in s], 0, spec.bs, collate_fn)
        notes += "; reference log-probs precomputed before the timed steps"
    ready = itertools.cycle([collate_fn(examples, 0) for examples in steps])  # then again

    def step(_ids: torch.Tensor | None = None) -> torch.Tensor:
        batch = {k: v.to(dev) for k, v in next(ready).items()}
        with autocast_context(precision, dev):
            total, n, _extras = loss_fn(model, batch)
        (total / n).backward()
        tt.optimizer_update(opt, params)
        return (total / n).detach()

    return tt.Trainee(step, parameter_counts(model)[0], notes, model)


def llamaforge_child(name: str, spec: tt.Spec, prompt: int, dev: torch.device) -> dict:
    """`llamaforge_trainee`'s steps timed as the training loop runs them."""
    from llamaforge.runtime import frozen_gc

    trainee = llamaforge_trainee(name, spec, prompt, dev)
    # what existed before the steps stays out of the collector, as in the loop
    with tt.gpu_sampler(dev) as sampler, frozen_gc():
        times, losses = timed_steps(lambda: float(trainee.step(None)), spec, dev)
    return {
        **summary(times, losses, spec, dev),
        **sampler.summary(),
        "trainable_params": trainee.trainable,
        "notes": trainee.notes,
    }


def timed_steps(step, spec: tt.Spec, dev: torch.device) -> tuple[list[float], list[float]]:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(spec.warmup + spec.steps):
        tt.synchronize(dev)
        t0 = time.perf_counter()
        losses.append(step())
        tt.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return times, losses


def summary(times: list[float], losses: list[float], spec: tt.Spec, dev: torch.device) -> dict:
    step_s = statistics.median(times[spec.warmup :])
    return {
        "tokens_per_s": 2 * spec.bs * spec.seq / step_s,
        "step_s_median": step_s,
        "step_times_s": times,
        **tt.peak_memory(dev),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }


# ----------------------------------------------------------------------------- TRL


def word_tokenizer(vocab: int):
    """A tokenizer whose words 'w<id>' are token ids: texts tokenize to known lengths."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 2)}
    words |= {"<pad>": vocab - 2, "<eos>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def text(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


class StepTimer:
    """A transformers TrainerCallback (built lazily) timing each optimizer step."""

    def __new__(cls, dev: torch.device):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self) -> None:
                self.times: list[float] = []

            def on_train_begin(self, args, state, control, **kw):
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()

            def on_step_begin(self, args, state, control, **kw):
                tt.synchronize(dev)
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                tt.synchronize(dev)
                self.times.append(time.perf_counter() - self.t0)

        return _Timer()


def trl_model(objective: str, spec: tt.Spec, dev: torch.device, dtype: torch.dtype):
    """transformers' model for TRL: built in place from the config (LoRA), or for QLoRA the
    saved random weights loaded as bitsandbytes NF4 + double quant with `dtype` compute
    (as `hf_baseline.py` and train_throughput's `hf` QLoRA stack load them)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    auto = AutoModelForCausalLM if objective == "dpo" else AutoModelForSequenceClassification
    extra = {"pad_token_id": spec.hf_config["vocab_size"] - 2, "num_labels": 1}
    if spec.method == "qlora":
        tt.need("bitsandbytes")
        if spec.model_dir is None:
            raise tt.Skip("no saved model folder for bitsandbytes to load")
        model = tt.bnb_nf4_model(spec, dev, dtype, auto, **extra)
        if objective == "rm":  # the new, randomly drawn head in the compute dtype
            model.score.to(dtype)
        return model
    with torch.device(dev):
        return auto.from_config(LlamaConfig(**{**spec.hf_config, **extra}), dtype=dtype)


def trl_child(name: str, spec: tt.Spec, prompt: int, dev: torch.device) -> dict:
    datasets, peft, trl = (tt.need(m) for m in ("datasets", "peft", "trl"))
    liger = name.endswith("liger")
    if liger:
        tt.need("liger_kernel")
    objective = STACKS[name][0]
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = trl_model(objective, spec, dev, dtype)
    tok = word_tokenizer(spec.hf_config["vocab_size"])
    gen = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(spec.steps + spec.warmup):
        for e in sequences(spec, prompt, gen, spec.hf_config["vocab_size"] - 2):
            if objective == "dpo":  # the answers end in EOS already, so TRL adds none
                answers = {
                    s: " " + text(e[f"{s}_ids"][:-1]) + " <eos>" for s in ("chosen", "rejected")
                }
                rows.append({"prompt": text(e["prompt_ids"]), **answers})
            else:
                rows.append(
                    {f"{s}_ids": e["prompt_ids"] + e[f"{s}_ids"] for s in ("chosen", "rejected")}
                )
    common = dict(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-{name}"),
        max_steps=spec.steps + spec.warmup,
        per_device_train_batch_size=spec.bs,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        bf16=cuda,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=None,
        report_to=[],
        save_strategy="no",
        logging_steps=spec.steps + spec.warmup,
        disable_dropout=True,
        dataloader_num_workers=0,
        use_liger_kernel=liger,
        seed=0,
    )
    task = "CAUSAL_LM" if objective == "dpo" else "SEQ_CLS"
    lora = peft.LoraConfig(
        r=spec.rank,
        lora_alpha=spec.rank,
        lora_dropout=0.0,
        target_modules=list(tt.TARGETS),
        task_type=task,
    )
    ds = datasets.Dataset.from_list(rows)
    if objective == "dpo":
        args = trl.DPOConfig(
            **common,
            beta=BETA,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=name.endswith("-precomputed"),
        )
        trainer = trl.DPOTrainer(
            model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora
        )
        first = trainer.train_dataset[0]
        lengths = (len(first["prompt_ids"]) + len(first["chosen_ids"]), len(first["rejected_ids"]))
        if lengths != (spec.seq, spec.seq - prompt):
            raise RuntimeError(
                f"TRL tokenized a pair to {lengths}, not ({spec.seq}, {spec.seq - prompt})"
            )
    else:
        args = trl.RewardConfig(**common)
        trainer = trl.RewardTrainer(
            model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora
        )
    timer = StepTimer(dev)
    trainer.add_callback(timer)
    with tt.gpu_sampler(dev) as sampler:
        out = trainer.train()
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in trained)
    base = "bnb NF4+DQ base" if spec.method == "qlora" else f"{tt.dtype_name(dtype)} base"
    kinds = "/".join(sorted({tt.dtype_name(p.dtype) for p in trained}))  # TRL: bf16 for QLoRA
    notes = f"{base}, peft LoRA ({kinds} trained weights)" + (", Liger kernels" if liger else "")
    res = {**summary(timer.times, [], spec, dev), **sampler.summary()}
    return {**res, "loss_mean": out.training_loss, "trainable_params": trainable, "notes": notes}


# ----------------------------------------------------------------------------- plumbing


def child(name: str, spec: tt.Spec, prompt: int) -> dict:
    dev = tt.device()
    t0 = time.perf_counter()
    try:
        if name.startswith("llamaforge"):
            result = llamaforge_child(name, spec, prompt, dev)
        else:
            result = trl_child(name, spec, prompt, dev)
    except tt.Skip as e:
        return {"skipped": str(e)}
    except Exception as e:
        if not tt.is_oom(e):
            raise
        return {"error": "out of memory", **tt.peak_memory(dev)}
    modules = ("transformers", "peft", "trl", "liger_kernel", "datasets")
    return {
        "wall_s": round(time.perf_counter() - t0, 1),
        **result,
        "versions": tt.versions(*modules),
    }


def run_child(name: str, spec: tt.Spec, prompt: int, timeout: float) -> dict:
    script, extra = str(Path(__file__).resolve()), ("--prompt-tokens", str(prompt))
    return tt.run_child(name, spec, timeout, False, script, extra)


def ratios(results: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """llamaforge / each TRL stack of the same objective (and the same reference: precomputed
    against precomputed): tokens/s and peak memory."""
    out = {}
    for name, r in results.items():
        objective = STACKS[name][0]
        same = "-precomputed" if name.endswith("-precomputed") else ""
        ours = results.get(f"llamaforge-{objective}{same}", {})
        if name.startswith("llamaforge") or "tokens_per_s" not in r or "tokens_per_s" not in ours:
            continue
        mem = (ours.get("peak_alloc_gb"), r.get("peak_alloc_gb"))
        out[name] = {
            "tokens_per_s": ours["tokens_per_s"] / r["tokens_per_s"],
            "peak_memory": mem[0] / mem[1] if None not in mem else None,
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    s, prompt = report["spec"], report["prompt_tokens"]
    lines = [
        f"{report['device']}; {s['preset']} {METHODS[s['method']]} r{s['rank']}, "
        f"{s['bs']} pairs of {prompt} prompt + {s['seq'] - prompt} answer tokens a side; "
        f"median of {s['steps']} steps after {s['warmup']}",
        "",
        "| stage | stack | tokens/s | step s | peak alloc GB | loss | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        objective, label = STACKS[name]
        if "tokens_per_s" not in r:
            lines.append(
                f"| {objective} | {label} | {r.get('skipped') or r.get('error')} | | | | |"
            )
            continue
        first = r.get("loss_first")  # llamaforge: the first step's; TRL: its mean over the run
        loss = first if first is not None else r["loss_mean"]
        mem = r["peak_alloc_gb"]
        lines.append(
            f"| {objective} | {label} | {r['tokens_per_s']:,.0f} | {r['step_s_median']:.3f} | "
            f"{'n/a' if mem is None else mem} | {loss:.4f} | {r['notes']} |"
        )
    lines += ["", "| llamaforge vs | tokens/s | peak memory |", "|---|---|---|"]
    for name, q in report["ratios"].items():
        mem = "n/a" if q["peak_memory"] is None else f"{q['peak_memory']:.2f}x"
        lines.append(f"| {STACKS[name][1]} | {q['tokens_per_s']:.2f}x | {mem} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stacks", default=",".join(STACKS), help=f"comma list of {', '.join(STACKS)}")
    p.add_argument(
        "--workload",
        default="lora8b",
        help="as train_throughput.py, lora or qlora (qlora: TRL on bitsandbytes NF4 + DQ)",
    )
    p.add_argument(
        "--model-dir",
        help="qlora: the folder of the saved random model bitsandbytes loads, written there "
        "if it holds none and kept (default: a temporary folder, removed afterwards)",
    )
    p.add_argument("--pairs", type=int, default=2, help="pairs per step")
    p.add_argument(
        "--seq", type=int, default=None, help="prompt + answer tokens a side (2048; tiny 128)"
    )
    p.add_argument("--prompt-tokens", type=int, default=None, help="default: half of --seq")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--shape", choices=["full", "tiny"], default="full")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        spec = tt.Spec(**json.loads(a.spec))
        if spec.threads:
            torch.set_num_threads(spec.threads)
        print(tt.RESULT_TAG + json.dumps(child(a.child, spec, a.prompt_tokens)), flush=True)
        return {}
    args = argparse.Namespace(
        workload=a.workload, seq=a.seq, shape=a.shape, bs=a.pairs, steps=a.steps, warmup=a.warmup,
        rank=a.rank, threads=None,
    )  # fmt: skip
    spec = tt.make_spec(args)
    if spec.method not in METHODS:
        raise SystemExit(f"--workload {a.workload}: preference speed runs lora or qlora")
    prompt = a.prompt_tokens or spec.seq // 2
    if not 0 < prompt < spec.seq:
        raise SystemExit(f"--prompt-tokens {prompt}: must be between 0 and --seq {spec.seq}")
    names = [n for n in a.stacks.split(",") if n]
    unknown = [n for n in names if n not in STACKS]
    if unknown:
        raise SystemExit(f"--stacks: unknown {unknown}; choose from {list(STACKS)}")
    results: dict[str, dict] = {}
    spec.model_dir = a.model_dir
    trl_qlora = spec.method == "qlora" and any(n.startswith("trl") for n in names)
    wanted = trl_qlora and importlib.util.find_spec("bitsandbytes") is not None
    with tt.saved_model_dir(spec, wanted, a.timeout) as failed:
        if failed is not None:  # the TRL stacks then fail to load it and say so
            tt.log(f"  saving failed: {failed['error']}")
        for name in names:
            tt.log(f"training {name} ...")
            results[name] = run_child(name, replace(spec), prompt, a.timeout)
            r = results[name]
            tt.log(f"  {name}: {tt.summary(r) if 'tokens_per_s' in r else r}")
    dev = tt.device()
    report = {
        "device": torch.cuda.get_device_name()
        if dev.type == "cuda"
        else f"CPU ({os.cpu_count()} cores)",
        "spec": asdict(spec),
        "prompt_tokens": prompt,
        "results": results,
        "ratios": ratios(results),
    }
    print(markdown(report))
    if a.out:
        a.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
