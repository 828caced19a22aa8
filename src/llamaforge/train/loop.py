"""The one training loop every stage shares: it takes a loss function and a batch source.

A step draws `grad_accum` micro-batches, counts their trainable units (tokens) first, and
back-propagates each micro-batch's loss *sum* divided by the window's total, so the
gradient equals that of one large batch. Then: clip, AdamW, schedule; log, evaluate,
checkpoint; stop on max_steps, early stopping, or SIGINT/SIGTERM (after saving).
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..config import TrainConfig, validate
from ..errors import NonFiniteLossError, UserError
from ..losses import chunked_causal_lm_loss_fn, count_label_tokens
from ..model.llama import compute_device
from ..runtime import frozen_gc
from .batches import FILLER, Batch, BatchSource
from .checkpoint import (
    Stateful,
    is_sharded,
    latest_checkpoint,
    load_checkpoint,
    load_sharded_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
    trainable_state,
)
from .distributed import all_reduce_sum, any_rank, is_distributed, world_size
from .graph_step import PackedGraphStep, most_labels
from .metrics import MetricsLogger, is_main_process, plot_losses, read_metrics, truncate_metrics
from .optim import build_optimizer, build_scheduler

# A loss returns (sum over its units, unit count) or (sum, count, {metric: sum over units}).
LossFn = Callable[[nn.Module, Batch], tuple]
EvalFn = Callable[[nn.Module], dict[str, float]]
CountFn = Callable[[Batch], int]
CHECKPOINT_DIR = "checkpoints"


@runtime_checkable
class BatchStream(Protocol):
    """What the loop needs of a batch source: batches, a resumable position, a length."""

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...

    def total_steps(self, epochs: float, grad_accum: int = 1) -> int: ...

    @property
    def progress(self) -> float: ...

    def epoch_batches(self, epoch: int = 0) -> Iterator[Batch]: ...


@dataclass
class TrainResult:
    """How a call to `train` ended."""

    step: int
    stop_reason: str  # "completed", "early_stop" or "signal"
    losses: list[float] = field(default_factory=list)  # per optimizer step of this call
    last_eval: dict[str, float] = field(default_factory=dict)
    best_val_loss: float | None = None
    skipped_steps: int = 0
    checkpoint: Path | None = None
    out_dir: Path | None = None


# ---------------------------------------------------------------- precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA (fp16 where bf16 is unsupported), fp32 elsewhere.

    fp16 is rejected off CUDA: its loss scaling (GradScaler) is a GPU feature.
    """
    cuda = device.type == "cuda"
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not cuda:
        raise ValueError(
            f"precision 'fp16' needs a CUDA GPU (loss scaling), but the model is on "
            f"{device.type}; use precision fp32 or bf16"
        )
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r} (auto, fp32, bf16, fp16)")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The 16-bit dtype a resolved precision computes in under autocast; None for fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16 on `device`, a no-op context for fp32."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _embeddings_to_host(model: nn.Module) -> None:
    """`embeddings_on_host: true`: the frozen input table to host memory, or a config error."""
    move = getattr(model, "keep_embeddings_on_host", None)
    why = None
    if move is None:
        why = f"{type(model).__name__} has no input embedding table to move"
    elif world_size() > 1:
        why = "one process only (torchrun found)"
    else:
        try:
            move()
        except ValueError as e:
            why = str(e)
    if why is not None:
        raise UserError(f"key 'embeddings_on_host: true' cannot be used: {why}")


def _model_device(model: nn.Module) -> torch.device:
    return compute_device(model)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ---------------------------------------------------------------- one step


@dataclass
class WindowStats:
    """Outcome of accumulating one window: mean loss per unit and the unit count."""

    loss: float
    tokens: int
    inputs: int = 0  # real (non-pad) input tokens of the window
    extras: dict[str, float] = field(default_factory=dict)  # metric means per unit


def _add_metrics(sums: dict[str, Any], more: list, convert: Callable[[Tensor], Any]) -> None:
    """Add the metric sums a loss returned (its optional third value) into `sums`."""
    for k, v in (more[0] if more else {}).items():
        sums[k] = sums.get(k, 0.0) + convert(v)


def accumulate_gradients(
    model: nn.Module,
    window: Sequence[Batch],
    loss_fn: LossFn,
    *,
    count_fn: CountFn = count_label_tokens,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    finite_first: bool = False,
) -> WindowStats:
    """Backward every micro-batch's loss sum / the window's unit count; grads accumulate.

    `finite_first` (an optimizer that steps inside the backward) checks each loss before
    its backward (one sync) and runs no backward for a non-finite one: the window's loss
    comes back non-finite and nothing was applied.

    A window without trainable units gives loss 0 and zero gradients. Under a process group
    the unit count is the window's over all ranks, and each rank's loss is multiplied by the
    world size (DDP and FSDP2 average gradients), so the gradient is the one of the
    concatenated window; loss, input tokens and metrics come back summed over ranks (a NaN
    on any rank is a NaN on all, so they all skip the step together).
    """
    device = _model_device(model)
    local = sum(count_fn(b) for b in window)
    world = world_size()
    total = local if world == 1 else int(all_reduce_sum(torch.tensor([local], device=device)))
    denom = max(total, 1)
    loss_sum = torch.zeros((), device=device)
    counted = torch.zeros((), dtype=torch.long, device=device)
    extras: dict[str, Tensor] = {}
    # DDP's wrapped loss carries `no_sync`: gradients all-reduce once, after the last one.
    no_sync = getattr(loss_fn, "no_sync", None)
    for i, batch in enumerate(window):
        quiet = no_sync is not None and i < len(window) - 1
        with no_sync() if quiet else contextlib.nullcontext():
            with autocast():
                part, n, *more = loss_fn(model, _to_device(batch, device))
            loss = part / denom * world
            skip = finite_first and not bool(torch.isfinite(loss.detach()))
            if loss.requires_grad and not skip:
                (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += part.detach().float()
        counted += n
        _add_metrics(extras, more, lambda v: v.detach().float())
    if int(counted) != local:  # one host sync per window
        raise ValueError(
            f"the loss function counted {int(counted)} trainable units but count_fn {local}; "
            "pass train(count_fn=...) that counts what the loss sums over"
        )
    inputs = sum(int(b["seq_lens"].sum()) for b in window if "seq_lens" in b)
    if world > 1:  # one all-reduce: loss sum, input tokens, metric sums
        parts = [loss_sum, torch.tensor(float(inputs), device=device), *extras.values()]
        summed = all_reduce_sum(torch.stack([t.double() for t in parts]))
        loss_sum, inputs = summed[0], int(summed[1])
        extras = dict(zip(extras, summed[2:], strict=True))
    means = {k: float(v) / denom for k, v in extras.items()}
    return WindowStats(loss=float(loss_sum) / denom, tokens=total, inputs=inputs, extras=means)


def _grad_norm(params: list[Tensor], max_norm: float) -> float:
    """Total gradient norm before clipping; clips to `max_norm` when it is > 0.

    Under FSDP2 the gradients are shards: the norm is combined over ranks (the global one),
    so every rank clips alike and sees the same non-finite verdict.
    """
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(norm, "full_tensor"):  # a DTensor of per-shard partial norms
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[Tensor],
    *,
    max_grad_norm: float,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, bool]:
    """Unscale, clip, step optimizer and scheduler; returns (grad_norm, applied).

    Nothing is applied (and the schedule does not advance) when the gradient is not
    finite: the grad scaler's overflow under fp16, a NaN/inf gradient otherwise.
    """
    if getattr(optimizer, "in_backward", False):  # train/optim.py: applied in the backward
        if scaler is not None:
            raise ValueError("optim.step_in_backward cannot run with fp16's grad scaler")
        norm = optimizer.take_grad_norm()
        applied = math.isfinite(norm)
        if applied:
            optimizer.step()  # counts only (the scheduler expects it first)
            scheduler.step()
        return norm, applied
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = _grad_norm(params, max_grad_norm)
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        applied = scaler.get_scale() >= scale
    else:
        applied = math.isfinite(norm)
        if applied:
            optimizer.step()
    if applied:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, applied


# ---------------------------------------------------------------- evaluation


def _batches_of(
    data: BatchStream | Sequence[dict] | Iterable[Batch], batch_size: int, pad_id: int
) -> Iterable[Batch]:
    """Evaluation batches from a batch source (one epoch), examples, or ready batches."""
    if isinstance(data, BatchStream):
        return data.epoch_batches(0)
    if isinstance(data, Sequence) and data and not isinstance(data[0]["input_ids"], Tensor):
        return BatchSource(data, batch_size, pad_id=pad_id, shuffle=False).epoch_batches(0)
    return data


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    data: BatchStream | Sequence[dict] | Iterable[Batch],
    loss_fn: LossFn,
    max_batches: int | None = None,
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    perplexity: bool = True,
) -> dict[str, float]:
    """Unit-weighted validation loss, its perplexity (LM losses) and the loss's metrics.

    Returns {"val_loss", "val_ppl"} (perplexity=True) plus "val_<metric>" per metric the
    loss function reports (e.g. a reward model's val_accuracy). Under a process group each
    rank evaluates its share (batches marked FILLER only keep ranks in step) and the sums
    are reduced over ranks.
    """
    was_training = model.training
    model.eval()
    device = _model_device(model)
    total, count = 0.0, 0
    extras: dict[str, float] = {}
    try:
        for i, batch in enumerate(_batches_of(data, batch_size, pad_id)):
            if max_batches is not None and i >= max_batches:
                break
            filler = batch.pop(FILLER, None) is not None
            part, n, *more = loss_fn(model, _to_device(batch, device))
            if filler:  # same metric keys on every rank, nothing counted
                _add_metrics(extras, more, lambda _v: 0.0)
                continue
            total, count = total + float(part), count + int(n)
            _add_metrics(extras, more, float)
    finally:
        model.train(was_training)
    if world_size() > 1:
        sums = torch.tensor([total, count, *extras.values()], dtype=torch.float64, device=device)
        total, count, *values = all_reduce_sum(sums).tolist()
        extras = dict(zip(extras, values, strict=True))
    if count == 0:
        raise ValueError("evaluation data has no positions with labels")
    loss = total / count
    out = {"val_loss": loss}
    if perplexity:
        out["val_ppl"] = math.exp(loss) if loss < 700 else float("inf")
    return out | {f"val_{k}": v / count for k, v in extras.items()}


def make_eval_fn(
    data: BatchStream | Sequence[dict] | Iterable[Batch],
    loss_fn: LossFn,
    max_batches: int | None = None,
    **kwargs: Any,
) -> EvalFn:
    """An `eval_fn` for `train` that reports validation loss and perplexity on `data`."""
    return lambda model: evaluate_loss(model, data, loss_fn, max_batches, **kwargs)


# ---------------------------------------------------------------- signals


class StopSignals:
    """While active, SIGINT/SIGTERM ask the loop to stop after the current step.

    A second signal aborts at once (KeyboardInterrupt). Handlers are only installed in the
    main thread (Python allows no other) and are restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is not None:
            self._restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting")
        self.received = signum
        name = signal.Signals(signum).name
        print(
            f"\nllamaforge: {name} received: finishing this step and saving a checkpoint "
            "(send it again to abort)",
            file=sys.stderr,
            flush=True,
        )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()


# ---------------------------------------------------------------- the loop


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _window(source: Iterator[Batch], n: int) -> list[Batch]:
    """The next `n` micro-batches (fewer only if a finite source runs out)."""
    out = []
    for _ in range(n):
        try:
            out.append(next(source))
        except StopIteration:
            break
    return out


class _Loop:
    """State of one `train` call; each method is one phase of a step."""

    def __init__(
        self,
        model: nn.Module,
        source: BatchStream,
        loss_fn: LossFn,
        cfg: TrainConfig,
        out_dir: Path,
        *,
        eval_fn: EvalFn | None,
        objects: Mapping[str, Stateful] | None,
        count_fn: CountFn,
        main: bool,
    ) -> None:
        self.model, self.source, self.loss_fn, self.cfg = model, source, loss_fn, cfg
        self.out_dir, self.eval_fn, self.objects = out_dir, eval_fn, objects or {}
        self.count_fn, self.main = count_fn, main
        self.device = _model_device(model)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.total_steps = cfg.max_steps or source.total_steps(cfg.epochs, cfg.optim.grad_accum)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.in_backward = getattr(self.optimizer, "in_backward", False)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        self.scaler = self._make_scaler()
        if self.in_backward and (self.scaler is not None or world_size() > 1):
            raise UserError(
                "optim.step_in_backward runs in one process without fp16's grad scaler "
                f"(precision resolved to {self.precision}, {world_size()} processes)"
            )
        self.graph: PackedGraphStep | None = None  # built at the first step (after a resume)
        self.graph_failed = False  # cuda_graph auto whose capture failed: eager from then on
        if cfg.cuda_graph is True and (
            loss_fn is not chunked_causal_lm_loss_fn or world_size() > 1
        ):
            raise UserError(
                "cuda_graph: true runs the causal-LM loss (stages pt and sft) in one process"
            )
        self.ckpt_dir = self.out_dir / CHECKPOINT_DIR
        # Loop state that checkpoints carry (see `_extra`).
        self.step, self.tokens_seen, self.skipped, self.bad_streak = 0, 0, 0, 0
        self.best_val: float | None = None
        self.evals_without_gain = 0
        self.result = TrainResult(step=0, stop_reason="completed", out_dir=self.out_dir)
        self._interval = [0.0, 0, time.perf_counter()]  # loss sum, tokens, start time
        self._inputs = 0  # real input tokens since the last record
        self._extras: dict[str, float] = {}  # loss metrics x units since the last record
        self.bar_postfix: dict[str, str] = {}
        self.logger = MetricsLogger(out_dir, enabled=main, tensorboard=cfg.logging.tensorboard)

    def _make_scaler(self) -> torch.amp.GradScaler | None:
        if self.precision != "fp16":
            return None
        if any(p.dtype == torch.float16 for p in self.params):
            raise ValueError(
                "precision fp16 needs float32 trainable weights (the grad scaler cannot "
                "unscale fp16 gradients); load the model in float32 or use precision bf16"
            )
        return torch.amp.GradScaler(self.device.type)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's precision context."""
        return autocast_context(self.precision, self.device)

    # -- checkpoints

    def _extra(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped,
            "bad_streak": self.bad_streak,
            "best_val_loss": self.best_val,
            "evals_without_gain": self.evals_without_gain,
            "total_steps": self.total_steps,
            "precision": self.precision,
            "micro_batches_per_step": self.cfg.optim.grad_accum * world_size(),
        }

    def resume(self) -> None:
        """Seed, then restore the latest (or named) checkpoint unless resume is 'never'."""
        seed_everything(self.cfg.seed)
        path = self._resume_path()
        if path is None:
            return
        # A sharded checkpoint is resharded to this job's world size (one process included);
        # a single-process one is broadcast and sharded when this job is distributed.
        sharded = is_sharded(path) or is_distributed()
        ckpt = (load_sharded_checkpoint if sharded else load_checkpoint)(
            path,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            objects=self.objects,
        )
        if ckpt.source_state is not None:
            self.source.load_state_dict(ckpt.source_state)
        self.step = ckpt.step
        extra = ckpt.extra
        self.tokens_seen, self.skipped = extra["tokens_seen"], extra["skipped_steps"]
        self.bad_streak, self.best_val = extra["bad_streak"], extra["best_val_loss"]
        self.evals_without_gain = extra["evals_without_gain"]
        self._warn_batch_change(extra.get("micro_batches_per_step"))
        if extra.get("total_steps", self.total_steps) != self.total_steps:
            warnings.warn(
                f"resuming a run planned for {extra['total_steps']} steps with "
                f"{self.total_steps}: the lr schedule changes shape from here",
                stacklevel=2,
            )
        if self.main:
            truncate_metrics(self.logger.path, self.step)
            print(f"llamaforge: resumed from {path} at step {self.step}", file=sys.stderr)

    def _warn_batch_change(self, before: int | None) -> None:
        now = self.cfg.optim.grad_accum * world_size()
        if before is not None and before != now:
            warnings.warn(
                f"resuming a run that drew {before} micro-batches per step with {now} "
                "(grad_accum x world size): the global batch changes from here; keep "
                "grad_accum x processes constant to continue the same run",
                stacklevel=3,
            )

    def _resume_path(self) -> Path | None:
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return None
        if resume == "auto":
            return latest_checkpoint(self.ckpt_dir)
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint.resume: no checkpoint folder at {path}")
        return path

    def save(self) -> None:
        """Write a checkpoint of the current step: sharded by every rank, else by the main one."""
        if self.result.checkpoint == self._ckpt_path():
            return
        state: dict[str, Any] = {
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "source_state": self.source.state_dict(),
            "extra": self._extra(),
            "objects": self.objects,
            "keep": self.cfg.checkpoint.keep,
        }
        if is_distributed():
            path = save_sharded_checkpoint(self.ckpt_dir, self.step, model=self.model, **state)
        elif self.main:
            path = save_checkpoint(self.ckpt_dir, self.step, trainable_state(self.model), **state)
        else:
            return
        self.result.checkpoint = path

    def _ckpt_path(self) -> Path:
        return self.ckpt_dir / f"checkpoint-{self.step:08d}"

    # -- one step

    def _graph_for(self, batch: Batch) -> PackedGraphStep | None:
        """The captured step if `cuda_graph` is on and the batch fits its shape."""
        mode = self.cfg.cuda_graph
        if mode is False or "doc_ids" not in batch or self.graph_failed:
            return None
        if mode == "auto" and not self._graph_auto:
            return None
        if self.graph is None:
            rows, width = batch["input_ids"].shape
            rows = getattr(self.source, "batch_size", rows)
            examples = getattr(self.source, "examples", None)
            labels = None
            if examples:  # the static shape holds every row and label count the source gives
                width = max(len(ex["input_ids"]) for ex in examples)
                labels = most_labels(examples, rows)
            self.graph = PackedGraphStep(
                self.model,
                self.optimizer,
                self.params,
                rows=rows,
                seq_len=width,
                max_grad_norm=self.cfg.optim.max_grad_norm,
                autocast_dtype=autocast_dtype(self.precision),
                labels=labels,
            )
        return self.graph if self.graph.fits(batch) else None

    @functools.cached_property
    def _graph_auto(self) -> bool:
        """Whether `cuda_graph: auto` captures this run's steps: on a GPU, one process, the
        causal-LM loss, one micro-batch a step, torch AdamW after the backward without a grad
        scaler, a frozen head (LoRA/QLoRA), and what has been measured captured: no
        activation checkpointing (the memory plan may have turned it on), no LoRA dropout."""
        model, cfg = self.model, self.cfg
        head = getattr(model, "lm_head", None)
        dropout = [m.p for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
        return (
            self.device.type == "cuda"
            and world_size() == 1
            and self.loss_fn is chunked_causal_lm_loss_fn
            and cfg.optim.grad_accum == 1
            and not cfg.activation_offload
            and not self.in_backward
            and self.scaler is None
            and type(self.optimizer) is torch.optim.AdamW
            and isinstance(head, nn.Linear)
            and not head.weight.requires_grad
            and not getattr(model, "gradient_checkpointing", False)
            and not dropout
        )

    def _graph_step(self, graph: PackedGraphStep, batch: Batch) -> bool:
        """One step through the captured graph; a non-finite norm stops the run
        (`NonFiniteStep`: the replayed update cannot be skipped)."""
        lr = float(self.scheduler.get_last_lr()[0])  # a tensor under the capturable AdamW
        loss_t, norm_t = graph(batch)
        self.scheduler.step()
        loss, norm = float(loss_t), float(norm_t)  # the step's one sync
        graph.check(norm, self.step + 1)
        tokens = self.count_fn(batch)
        inputs = int(batch["seq_lens"].sum()) if "seq_lens" in batch else 0
        self._after_step(WindowStats(loss=loss, tokens=tokens, inputs=inputs, extras={}), lr, norm)
        return True

    def train_step(self) -> bool:
        """Accumulate one window and apply it; False if the step was skipped."""
        window = _window(self.source, self.cfg.optim.grad_accum)
        if not window:
            raise RuntimeError("the batch source ran out before max_steps")
        graph = self._graph_for(window[0]) if len(window) == 1 else None
        if graph is not None:
            try:
                return self._graph_step(graph, window[0])
            except RuntimeError as e:  # CUDA errors included
                if graph.graph is not None or self.cfg.cuda_graph is True:
                    raise  # a replay's failure, or a capture the config requires
                # auto: a capture this run cannot make (nothing ran: capture only records)
                # leaves the step to the eager path from now on
                msg = f"cuda_graph: auto could not capture the step ({e}); eager steps"
                warnings.warn(msg, stacklevel=2)
                self.log({"kind": "event", "event": "cuda_graph_off", "reason": str(e)[:300]})
                self.graph, self.graph_failed = None, True
                self.optimizer.zero_grad(set_to_none=True)
        stats = accumulate_gradients(
            self.model,
            window,
            self.loss_fn,
            count_fn=self.count_fn,
            autocast=self.autocast,
            scaler=self.scaler,
            finite_first=self.in_backward,
        )
        if not math.isfinite(stats.loss):
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip("nonfinite_loss", stats.loss)
        lr = float(self.scheduler.get_last_lr()[0])  # a device tensor after a failed capture
        norm, applied = optimizer_step(
            self.optimizer,
            self.scheduler,
            self.params,
            max_grad_norm=self.cfg.optim.max_grad_norm,
            scaler=self.scaler,
        )
        if not applied and self.in_backward:
            raise NonFiniteLossError(
                f"a non-finite gradient (norm {norm}) was applied during the backward at step "
                f"{self.step + 1} (optim.step_in_backward applies each gradient before the "
                "total is known); the weights in memory are lost, the checkpoints on disk are "
                "not: resume from the last one with a lower optim.lr, or turn "
                "optim.step_in_backward off to skip such steps instead"
            )
        if not applied:
            return self._skip("fp16_overflow" if self.scaler else "nonfinite_grad", norm)
        self._after_step(stats, lr, norm)
        return True

    def _skip(self, reason: str, value: float) -> bool:
        """Record a skipped window; raise after too many non-finite ones in a row."""
        self.skipped += 1
        counts = reason != "fp16_overflow"  # the scaler recalibrates; that is not divergence
        self.bad_streak = self.bad_streak + 1 if counts else self.bad_streak
        self.log({"kind": "event", "event": "skip", "reason": reason, "value": str(value)})
        limit = self.cfg.optim.max_nonfinite_steps
        if counts and self.bad_streak >= limit:
            raise NonFiniteLossError(
                f"{reason.replace('_', ' ')} ({value}) in {self.bad_streak} windows in a row "
                f"after step {self.step}; none of them was applied. Lower optim.lr, use "
                f"precision bf16 instead of fp16, or check the data (optim.max_nonfinite_steps"
                f"={limit})"
            )
        return False

    def _after_step(self, stats: WindowStats, lr: float, norm: float) -> None:
        """Advance counters and log the step."""
        self.step += 1
        self.bad_streak = 0
        self.tokens_seen += stats.tokens
        self.result.losses.append(stats.loss)
        self._interval[0] += stats.loss * max(stats.tokens, 1)
        self._interval[1] += stats.tokens
        self._inputs += stats.inputs
        for k, v in stats.extras.items():
            self._extras[k] = self._extras.get(k, 0.0) + v * max(stats.tokens, 1)
        if self.step % self.cfg.logging.every == 0:
            self._log_train(lr, norm)

    def _log_train(self, lr: float, norm: float) -> None:
        """Log the interval since the last record; tokens are trainable (labelled) ones."""
        loss_sum, tokens, start = self._interval
        now = time.perf_counter()
        record = {
            "kind": "train",
            "loss": loss_sum / max(tokens, 1),
            "lr": lr,
            "grad_norm": norm,
            "tokens": tokens,
            "tokens_per_s": tokens / max(now - start, 1e-9),
            "input_tokens_per_s": self._inputs / max(now - start, 1e-9),
            "tokens_seen": self.tokens_seen,
            "epoch": round(self.source.progress, 4),
            "skipped_steps": self.skipped,
        }
        record |= {k: v / max(tokens, 1) for k, v in self._extras.items()}
        self._interval, self._inputs, self._extras = [0.0, 0, now], 0, {}
        self.log(record)
        self.bar_postfix = {"loss": f"{record['loss']:.4f}", "lr": f"{lr:.2e}"}
        self.bar_postfix["tok/s"] = f"{record['input_tokens_per_s']:.0f}"

    def log(self, record: dict[str, Any]) -> None:
        """Log a record stamped with the current step."""
        self.logger.log({"step": self.step, **record})

    # -- evaluation and stopping

    def evaluate(self) -> bool:
        """Run eval_fn; returns True when early stopping says stop."""
        self.model.eval()
        try:
            with torch.no_grad(), self.autocast():
                metrics = {k: float(v) for k, v in self.eval_fn(self.model).items()}
        finally:
            self.model.train()
        self.result.last_eval = metrics
        self.log({"kind": "eval", **metrics})
        return self._early_stop(metrics)

    def _early_stop(self, metrics: Mapping[str, float]) -> bool:
        patience = self.cfg.eval.patience
        if "val_loss" not in metrics:
            if patience is not None:
                raise ValueError("eval.patience needs eval_fn to return 'val_loss'")
            return False
        val = float(metrics["val_loss"])
        if self.best_val is None or val < self.best_val - self.cfg.eval.min_delta:
            self.best_val, self.evals_without_gain = val, 0
        else:
            self.evals_without_gain += 1
        return patience is not None and self.evals_without_gain >= patience

    def due(self, every: int | None) -> bool:
        """Whether a periodic action with period `every` falls on this step."""
        return every is not None and self.step % every == 0


def train(
    model: nn.Module,
    *,
    source: BatchStream,
    loss_fn: LossFn,
    cfg: TrainConfig,
    out_dir: str | Path,
    eval_fn: EvalFn | None = None,
    state: Mapping[str, Stateful] | None = None,
    count_fn: CountFn = count_label_tokens,
    is_main: bool | None = None,
) -> TrainResult:
    """Train `model` on micro-batches from `source`, minimising `loss_fn` (sum, count).

    Resumes from `out_dir/checkpoints` per cfg.checkpoint.resume; `state` holds extra
    objects (value heads, reference stats...) saved and restored with every checkpoint.
    Only the main process (`is_main`, default: rank 0) writes files.
    """
    validate(cfg)
    if cfg.activation_checkpointing:
        if not hasattr(model, "gradient_checkpointing"):
            raise ValueError(f"{type(model).__name__} has no gradient_checkpointing switch")
        model.gradient_checkpointing = True
        model.offload_activations = cfg.activation_offload
        if hasattr(model, "offload_layers"):
            model.offload_layers = cfg.activation_offload_layers
        if hasattr(model, "checkpoint_layers"):
            model.checkpoint_layers = cfg.activation_checkpointing_layers
        if hasattr(model, "checkpoint_keeps_attention"):
            model.checkpoint_keeps_attention = cfg.activation_checkpointing_keep_attention
        if hasattr(model, "set_mlp_chunk"):
            model.set_mlp_chunk(cfg.mlp_chunk_tokens)
    if cfg.embeddings_on_host:
        _embeddings_to_host(model)
    main = is_main_process() if is_main is None else is_main
    loop = _Loop(
        model,
        source,
        loss_fn,
        cfg,
        Path(out_dir),
        eval_fn=eval_fn,
        objects=state,
        count_fn=count_fn,
        main=main,
    )
    try:
        loop.resume()
        _run(loop)
    except BaseException as e:  # the run says how it ended (the dashboard reads this)
        event = "failed" if isinstance(e, Exception) else "aborted"
        loop.log({"kind": "event", "event": event, "error": f"{type(e).__name__}: {e}"[:2000]})
        raise
    finally:
        loop.logger.close()
        loop.result.step, loop.result.skipped_steps = loop.step, loop.skipped
        loop.result.best_val_loss = loop.best_val
    if main and cfg.logging.plot:
        plot_losses(read_metrics(loop.logger.path), loop.out_dir / "loss.png")
    return loop.result


def _run(loop: _Loop) -> None:
    """Steps until max_steps, early stopping or a stop signal; then eval and save."""
    cfg = loop.cfg
    if loop.step >= loop.total_steps:
        return
    loop.model.train()
    bar = tqdm(
        total=loop.total_steps,
        initial=loop.step,
        disable=not (cfg.logging.progress and loop.main),
        desc="train",
        dynamic_ncols=True,
    )
    evaluated_at = -1
    with StopSignals() as signals, bar, frozen_gc():
        while loop.step < loop.total_steps:
            if loop.train_step():
                bar.update(1)
                bar.set_postfix(loop.bar_postfix, refresh=False)
                if loop.eval_fn is not None and loop.due(cfg.eval.every):
                    evaluated_at = loop.step
                    if loop.evaluate():
                        loop.result.stop_reason = "early_stop"
                        loop.log({"kind": "event", "event": "early_stop"})
                        break
                if loop.due(cfg.checkpoint.every):
                    loop.save()
            if any_rank(signals.received is not None, loop.device):  # all ranks stop together
                loop.result.stop_reason = "signal"
                loop.log({"kind": "event", "event": "signal", "signal": signals.received})
                loop.save()
                return
        if loop.eval_fn is not None and evaluated_at != loop.step:
            loop.evaluate()
        loop.save()
