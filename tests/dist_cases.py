"""Distributed test scenarios, shared by the torchrun worker and the single-process references.

Every case trains tiny-llama2 on the same examples with the same *global* batch: GLOBAL_ACCUM
micro-batches of MICRO examples per optimizer step, whatever the world size, so a run at
world size N must give the losses and weights of one process with grad_accum GLOBAL_ACCUM.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llamaforge.adapters.inject import apply_lora
from llamaforge.config import CheckpointConfig, LoggingConfig, OptimConfig, TrainConfig
from llamaforge.losses import chunked_causal_lm_loss_fn
from llamaforge.model.presets import preset
from llamaforge.train.batches import BatchSource, RankShard
from llamaforge.train.distributed import meta_model
from llamaforge.train.loop import make_eval_fn
from tests.helpers import random_model

GLOBAL_ACCUM = 6  # divisible by 1, 2 and 3 processes
MICRO = 2
N_EXAMPLES = 60
VAL_BATCHES = 7


@dataclass(frozen=True)
class Case:
    """One scenario: engine, method, length, and what it does to the run."""

    strategy: str = "fsdp2"
    method: str = "full"
    steps: int = 3
    nan_window: int | None = None  # this window's loss is NaN on rank 1 (on the one process)
    crash_at_call: int | None = None  # the last rank raises on this micro-batch call
    signal_at_call: int | None = None  # rank 0 alone gets SIGINT on this micro-batch call
    checkpoint_every: int | None = None
    resume_from: str | None = None  # a case whose checkpoint-00000002 this run resumes
    evaluate: bool = False  # validation loss at the end (VAL_BATCHES, not a multiple of 2)
    meta: bool = False  # ranks other than 0 build the model on the meta device
    precision: str = "fp32"  # bf16: FSDP2 gathers bf16 weights (its mixed-precision policy)
    checkpointing: bool = False  # activation checkpointing: blocks recompute in backward

    def accum_per_rank(self, world: int) -> int:
        """Micro-batches per rank and step that keep the global batch."""
        return GLOBAL_ACCUM // world


CASES: dict[str, Case] = {
    "fsdp2_full": Case(steps=4, checkpoint_every=2),
    "ddp_full": Case(strategy="ddp"),
    "fsdp2_lora": Case(method="lora", evaluate=True),
    "fsdp2_full_bf16": Case(precision="bf16"),
    "ddp_lora": Case(strategy="ddp", method="lora", meta=True),
    "fsdp2_qlora": Case(method="qlora", meta=True, checkpointing=True),
    "fsdp2_nan": Case(method="lora", nan_window=1),
    "fsdp2_2to2": Case(steps=4, resume_from="fsdp2_full"),
    "fsdp2_signal": Case(method="lora", steps=4, signal_at_call=GLOBAL_ACCUM // 2 + 1),
    "fsdp2_from_single": Case(steps=4, resume_from="single"),
    "fsdp2_2to3": Case(steps=4, resume_from="fsdp2_full"),
    "fsdp2_crash": Case(steps=4, checkpoint_every=1, crash_at_call=GLOBAL_ACCUM // 3 * 2),
}


def examples(n: int = N_EXAMPLES, seed: int = 0) -> list[dict]:
    """Examples of varied length whose first part (the prompt) carries no labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = int(torch.randint(4, 21, (1,), generator=g))
        ids = torch.randint(3, 256, (t,), generator=g).tolist()
        p = int(torch.randint(1, t - 1, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def build_case(case: Case, *, rank: int = 0, world: int = 1) -> tuple[nn.Module, object]:
    """The model (method applied) and the loss of a case, as every process builds them."""
    if case.meta and rank != 0:  # no weights here: rank 0's arrive when the model is wrapped
        model = meta_model(preset("tiny-llama2"), torch.device("cpu"), torch.float32).train()
    else:
        model = random_model("tiny-llama2", seed=0).train()
    if case.method in ("lora", "qlora"):
        torch.manual_seed(1)
        apply_lora(model, r=4, alpha=8.0, quantize_base=case.method == "qlora", lora_dtype=None)
    else:
        model.requires_grad_(True)
    accum = case.accum_per_rank(world)
    calls = [0]

    def loss_fn(m: nn.Module, batch: dict) -> tuple:
        window, calls[0] = calls[0] // accum, calls[0] + 1
        if case.crash_at_call is not None and rank == world - 1 and calls[0] > case.crash_at_call:
            raise RuntimeError(f"rank {rank} fails on purpose at micro-batch {calls[0]}")
        if case.signal_at_call == calls[0] and rank == 0:  # as Ctrl-C would, on one rank
            os.kill(os.getpid(), signal.SIGINT)
        part, n = chunked_causal_lm_loss_fn(m, batch)
        if window == case.nan_window and rank == min(1, world - 1):
            part = part * math.nan
        return part, n

    return model, loss_fn


def case_source(case: Case, rank: int = 0, world: int = 1) -> RankShard:
    """This rank's share of the shuffled micro-batch stream."""
    return RankShard(BatchSource(examples(), MICRO, pad_id=0, seed=0), rank, world)


def case_eval(case: Case, loss_fn: object, rank: int = 0, world: int = 1) -> object | None:
    """The validation-loss eval_fn of a case (None when it does not evaluate)."""
    if not case.evaluate:
        return None
    held = BatchSource(examples(VAL_BATCHES * MICRO - 1, seed=1), MICRO, pad_id=0, shuffle=False)
    return make_eval_fn(RankShard(held, rank, world), loss_fn)


def case_cfg(
    case: Case, *, grad_accum: int, out: Path | None = None, steps: int | None = None
) -> TrainConfig:
    """A quiet fp32 config with clipping and warm-up; resumes from `resume_from`'s step 2."""
    resume = "never"
    if case.resume_from is not None and out is not None:
        resume = str(out / case.resume_from / "checkpoints" / "checkpoint-00000002")
    return TrainConfig(
        max_steps=steps or case.steps,
        precision=case.precision,
        activation_checkpointing=case.checkpointing,
        optim=OptimConfig(lr=1e-2, warmup_steps=1, grad_accum=grad_accum, max_grad_norm=0.5),
        checkpoint=CheckpointConfig(every=case.checkpoint_every, keep=3, resume=resume),
        logging=LoggingConfig(tensorboard=False, plot=False, progress=False),
    )
