"""One recipe for every stage: config -> model + method -> data -> the shared loop -> outputs.

What differs between stages (pt, sft, rm, dpo) comes from the stage table (`stages.py`):
the batch collation, the loss and its units, model additions (a reward head) and work
before training (reference log-probs). pt and sft minimise next-token loss on labelled
positions and differ only in the data.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.inject import apply_freeze, apply_lora, parameter_counts
from ..config import RunConfig, TrainConfig, save_resolved
from ..data.pipeline import DatasetSplits, build_dataset
from ..data.sources import DataError
from ..data.tokenizer import Tokenizer, save_tokenizer
from ..errors import UserError
from ..eval.generation import evaluate_generation
from ..io.hf import save_hf
from ..io.load import load_model, pick_device
from ..io.peft import save_peft_adapter
from ..losses import chunked_causal_lm_loss_fn
from . import distributed
from .batches import BatchSource, RankShard
from .loop import autocast_context, make_eval_fn, resolve_precision, seed_everything, train
from .memory_plan import allocator_hint, plan_memory
from .metrics import is_main_process
from .stages import STAGES, Stage

METHOD_FILE = "llamaforge_method.json"  # beside a saved adapter: how its base was held


def log(msg: str) -> None:
    """Progress messages go to stderr so stdout stays machine-readable (rank 0 only)."""
    if is_main_process():
        print(msg, file=sys.stderr, flush=True)


def base_dtype(method: str, precision: str, master_dtype: str = "auto") -> torch.dtype:
    """Weights' dtype: frozen ones in the compute dtype, trained full ones bf16 or fp32.

    Under precision bf16, full fine-tuning keeps bf16 weights and AdamW states updated by
    stochastic rounding (`master_dtype` auto or bf16), or fp32 masters under autocast
    (`master_dtype: fp32`; also under fp16 precision).
    """
    if precision == "fp32":
        return torch.float32
    if method == "full":
        bf16 = master_dtype in ("auto", "bf16") and precision == "bf16"
        return torch.bfloat16 if bf16 else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float16


def apply_method(model: nn.Module, cfg: RunConfig, compute_dtype: torch.dtype) -> nn.Module:
    """Make only what the method trains trainable (LoRA / QLoRA modules swapped in here)."""
    if cfg.method in ("lora", "qlora"):
        lo, q = cfg.lora, cfg.qlora
        return apply_lora(
            model,
            r=lo.r,
            alpha=lo.alpha,
            dropout=lo.dropout,
            targets=lo.targets,
            rslora=lo.rslora,
            quantize_base=cfg.method == "qlora",
            double_quant=q.double_quant,
            blocksize=q.blocksize,
            compute_dtype=compute_dtype,
            lora_dtype=torch.float32,
        )
    if cfg.method == "freeze":
        layers = cfg.freeze.train_layers or ([] if cfg.freeze.train_modules else [-2, -1])
        return apply_freeze(model, layers or None, cfg.freeze.train_modules or None)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def load_data(cfg: RunConfig, tok: Tokenizer) -> DatasetSplits:
    """Build the splits; continued pretraining reads raw text unless told otherwise."""
    data = cfg.data
    if cfg.stage == "pt" and data.format == "auto":
        data = replace(data, format="text")
    splits = build_dataset(data, tok)
    log(splits.report.summary())
    if not splits.train:
        raise ValueError(f"data.path {cfg.data.path!r}: no training examples after loading")
    pairs = "prompt_ids" in splits.train[0]
    if pairs == STAGES[cfg.stage].lm:  # LM stages read single sequences, the others pairs
        what = "preference pairs" if pairs else f"{splits.report.format} rows"
        raise DataError(
            "data.path",
            f"{cfg.data.path!r} holds {what}",
            f"stage {cfg.stage} needs " + ("single sequences" if pairs else "preference pairs"),
        )
    return splits


def eval_items(cfg: RunConfig, splits: DatasetSplits) -> list[dict]:
    """Held-out prompts for generation metrics: the test split, else validation."""
    items = splits.eval_items.get("test") or splits.eval_items.get("validation") or []
    return list(items[: cfg.eval.generate.max_examples])


def generation_scores(
    model: nn.Module, tok: Tokenizer, cfg: RunConfig, items: list[dict], desc: str
) -> dict[str, Any] | None:
    """Generation metrics (eval.generate.metrics) on held-out items, or None without any."""
    if cfg.stage != "sft" or not items or not cfg.eval.generate.metrics:
        return None
    report = evaluate_generation(
        model, tok, items, max_new_tokens=cfg.eval.generate.max_new_tokens, desc=desc
    ).to_dict()
    report["scores"] = {k: v for k, v in report["scores"].items() if k in cfg.eval.generate.metrics}
    return report


def save_outputs(
    model: nn.Module, tok: Tokenizer, cfg: RunConfig, out: Path, adapter_name: str = "default"
) -> Path:
    """Adapters in PEFT's format (lora/qlora) or a full Hugging Face folder (full/freeze)."""
    if cfg.stage == "rm":  # a HF LlamaForSequenceClassification folder, adapters merged
        from ..adapters.inject import merge_lora

        if cfg.method in ("lora", "qlora"):  # and the adapter + head, as peft saves them
            save_peft_adapter(
                model, out / "adapter", base_model_name_or_path=cfg.model, heads=("score",)
            )
        path = out / "model"
        save_hf(merge_lora(model), path)
        save_tokenizer(tok, path)
        return path
    if cfg.method in ("lora", "qlora"):
        path = save_peft_adapter(
            model, out / "adapter", adapter_name=adapter_name, base_model_name_or_path=cfg.model
        )
        method = {"method": cfg.method, **vars(cfg.qlora)} if cfg.method == "qlora" else {}
        (path / METHOD_FILE).write_text(json.dumps(method or {"method": cfg.method}))
        return path
    path = out / "model"
    save_hf(model, path)
    save_tokenizer(tok, path)
    return path


def report_line(before: dict, after: dict) -> str:
    """Human summary of held-out generation metrics before and after training."""
    b, a = before["scores"], after["scores"]
    sample = after["samples"][0]
    return (
        f"held-out ({len(after['samples'])} items): exact match {b['exact_match']:.1%} -> "
        f"{a['exact_match']:.1%}, ROUGE-L {b['rouge_l']:.3f} -> {a['rouge_l']:.3f}\n"
        f"sample: reference {sample['reference']!r}\n        answer    {sample['prediction']!r}"
    )


def _cached_json(path: Path, compute) -> Any:
    """Reuse a result a previous (resumed) run already wrote."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    if value is not None:
        path.write_text(json.dumps(value, indent=1))
    return value


def planned_train_config(
    model: nn.Module, cfg: RunConfig, stage: Stage, precision: str, out: Path | None
) -> TrainConfig:
    """The loop's settings; with `memory_budget_gb`, the activation plan that fits it."""
    tcfg = cfg.train_config()
    setting = cfg.memory_budget_gb
    auto = setting == "auto"
    hand = cfg.activation_checkpointing or cfg.activation_offload or cfg.embeddings_on_host
    if setting is None or auto and hand:
        return tcfg  # no plan, or settings given by hand win over the default one
    if distributed.world_size() > 1:
        if auto:
            return tcfg
        raise UserError("key 'memory_budget_gb': one process only for now (torchrun found)")
    if hasattr(model, "checkpoint_keeps_attention"):  # what a checkpointed block saves
        model.checkpoint_keeps_attention = cfg.activation_checkpointing_keep_attention
    plan = plan_memory(  # None for auto off a GPU, before any probe runs
        model,
        setting,
        rows=cfg.optim.batch_size * stage.rows,
        tokens=cfg.data.max_seq_len,
        autocast=lambda: autocast_context(precision, model.device),
        grads=not cfg.optim.step_in_backward,
    )
    if plan is None:
        return tcfg
    log(plan.describe())
    hint = allocator_hint(plan)
    if hint is not None and model.device.type == "cuda":
        log(hint)
    if out is not None:
        plan.save(out / "memory_plan.json")
    k, m = plan.checkpointed, plan.offloaded
    # kept attention outputs stay on the GPU: not where the plan must offload inputs to fit
    keep = k > 0 and not plan.offload and cfg.activation_checkpointing_keep_attention
    return replace(
        tcfg,
        activation_checkpointing=k > 0,
        activation_checkpointing_layers=k if 0 < k < plan.n_layers else None,
        activation_checkpointing_keep_attention=keep,
        activation_offload=plan.offload,
        activation_offload_layers=m if 0 < m < k else None,
        embeddings_on_host=plan.host_embeddings,
    )


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train per `cfg`, save the result, and report loss and generation metrics."""
    if cfg.stage in ("rs", "ppo"):  # generation inside the loop: one process for now
        distributed.require_one_process(f"stage {cfg.stage}")
    if cfg.stage == "rs":  # rounds of sample -> select -> SFT, each SFT through this recipe
        from .rejection import run_rejection_sampling

        return run_rejection_sampling(cfg)
    if cfg.stage == "ppo":  # a rollout/update cycle of its own on the loop's pieces
        from .ppo import run_ppo

        return run_ppo(cfg)
    out = Path(cfg.output_dir)
    seed_everything(cfg.seed)  # adapters and heads start the same in every run and process
    env = distributed.init(cfg.distributed, pick_device(cfg.device))  # None: one process
    device = env.device if env is not None else pick_device(cfg.device)
    main = env is None or env.main
    if main:
        save_resolved(cfg, out)
    precision = resolve_precision(cfg.precision, device)
    master = cfg.optim.master_dtype
    if master == "auto" and env is not None:  # FSDP2/DDP keep fp32 masters (their tested path)
        master = "fp32"
    dtype = base_dtype(cfg.method, precision, master)
    model, tok = distributed.load_for_rank(cfg.model, env, device=device, dtype=dtype)
    splits = load_data(cfg, tok)
    items = eval_items(cfg, splits)
    before = None
    if main:
        before = _cached_json(
            out / "eval_before.json",
            lambda: generation_scores(model, tok, cfg, items, "eval before"),
        )
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    stage = STAGES[cfg.stage]
    prepare_model(model, cfg, compute)
    trainable, total = parameter_counts(model)
    log(f"{cfg.method}: training {trainable:,} of {total:,} parameters on {device} ({precision})")
    pad = tok.pad_id if tok.pad_id is not None else 0
    if stage.before_train is not None:  # on rank 0, the one holding the starting weights
        if main:
            stage.before_train(model, cfg, splits, pad)
        splits.train, splits.validation = distributed.share_from_rank0(
            [splits.train, splits.validation]
        )
    stage_collate = stage.batches(cfg)
    collate_fn = lambda exs: stage_collate(exs, pad)  # noqa: E731
    source = BatchSource(
        splits.train, cfg.optim.batch_size, pad_id=pad, seed=cfg.seed, collate_fn=collate_fn
    )
    loss_fn = stage.loss(cfg)
    if env is not None:  # each rank its share of the data; the model sharded or replicated
        source = RankShard(source, env.rank, env.world)
        loss_fn = distributed.wrap(
            model,
            loss_fn,
            env,
            precision=precision,
            reshard_after_forward=cfg.distributed.reshard_after_forward,
        )
    eval_fn = None
    if splits.validation:
        held = BatchSource(
            splits.validation,
            cfg.optim.batch_size,
            pad_id=pad,
            shuffle=False,
            collate_fn=collate_fn,
        )
        limit = cfg.eval.max_batches
        if env is not None:  # the limit counts global batches
            held, limit = RankShard(held, env.rank, env.world, eval_limit=limit), None
        eval_fn = make_eval_fn(held, loss_fn, limit, perplexity=stage.lm)
    result = train(
        model,
        source=source,
        loss_fn=loss_fn,
        cfg=planned_train_config(model, cfg, stage, precision, out if main else None),
        out_dir=out,
        eval_fn=eval_fn,
        count_fn=stage.count,
    )
    if env is not None:
        model = _gathered(model, cfg, env, dtype, compute)
        if model is None:  # the other ranks are done: rank 0 writes the outputs
            return {"output": None, "steps": result.step, "stop_reason": result.stop_reason}
    saved = save_outputs(model, tok, cfg, out)
    after = generation_scores(model, tok, cfg, items, "eval after")
    summary = {
        "output": str(saved),
        "steps": result.step,
        "stop_reason": result.stop_reason,
        "final_train_loss": result.losses[-1] if result.losses else None,
        "validation": result.last_eval,
        "before": before["scores"] if before else None,
        "after": after["scores"] if after else None,
    }
    (out / "eval.json").write_text(json.dumps({**summary, "samples_after": after}, indent=1))
    if before and after:
        log(report_line(before, after))
    return {**summary, "sample": (after or {}).get("samples", [None])[0]}


def prepare_model(model: nn.Module, cfg: RunConfig, compute: torch.dtype) -> nn.Module:
    """The stage's additions (a reward head), the method (what trains) and the kernels."""
    stage = STAGES[cfg.stage]
    if stage.prepare is not None:
        stage.prepare(model, cfg)
    apply_method(model, cfg, compute)
    if getattr(model, "score", None) is not None:
        model.score.requires_grad_(True)  # a reward head always trains (PEFT: modules_to_save)
    model.set_kernels(cfg.kernels)
    return model


def _gathered(
    model: nn.Module,
    cfg: RunConfig,
    env: distributed.DistEnv,
    dtype: torch.dtype,
    compute: torch.dtype,
) -> nn.Module | None:
    """After a distributed run, the trained model whole on rank 0 (None on the others).

    DDP's replica on rank 0 is it. Under FSDP2 the trained weights are gathered to rank 0,
    which builds the model as a single process does and loads them (the frozen base comes
    from the model files again, quantised the same way for QLoRA).
    """
    if env.strategy == "ddp":
        return model if env.main else None
    weights = distributed.gather_trainable(model)
    if not env.main:
        return None
    plain, _ = load_model(cfg.model, device=env.device, dtype=dtype)
    prepare_model(plain, cfg, compute)
    unexpected = plain.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"gathered weights the rebuilt model lacks: {unexpected[:5]}")
    return plain


def merge_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Fold an adapter into the base; a QLoRA adapter's base is quantised as in training."""
    from ..adapters.inject import merge_lora, quantize_linears
    from ..io.peft import load_peft_adapter

    meta_path = adapter_dir / METHOD_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("method") == "qlora":
        # The adapter learned against the NF4-rounded base: merge onto that same base.
        quantize_linears(
            model,
            blocksize=meta.get("blocksize", 64),
            double_quant=meta.get("double_quant", True),
            compute_dtype=torch.float32,
        )
    load_peft_adapter(model, adapter_dir)
    return merge_lora(model)


def evaluate_run(cfg: RunConfig, adapter: str | None = None) -> dict[str, Any]:
    """Validation loss/perplexity and generation metrics of a model (+ adapter) on cfg.data."""
    from ..io.peft import load_peft_adapter
    from .loop import evaluate_loss

    device = pick_device(cfg.device)
    dtype = base_dtype("lora", resolve_precision(cfg.precision, device))
    model, tok = load_model(cfg.model, device=device, dtype=dtype)
    if adapter:
        load_peft_adapter(model, adapter)
    splits = load_data(cfg, tok)
    held_out = splits.validation or splits.test
    result: dict[str, Any] = {"model": cfg.model, "adapter": adapter}
    if held_out:
        pad = tok.pad_id if tok.pad_id is not None else 0
        result.update(
            evaluate_loss(
                model,
                held_out,
                chunked_causal_lm_loss_fn,
                cfg.eval.max_batches,
                batch_size=cfg.optim.batch_size,
                pad_id=pad,
            )
        )
    gen = generation_scores(model, tok, cfg, eval_items(cfg, splits), "eval")
    if gen:
        result.update(gen["scores"])
        result["sample"] = gen["samples"][0]
    return result
