"""Resumable training checkpoints that never lose work.

A checkpoint is a folder `checkpoint-{step:08d}` holding
  model.safetensors   trainable parameters (all of them for a full fine-tune)
  optimizer.pt        optimizer, scheduler, grad-scaler and extra objects' state_dicts
  rng.pt              Python, NumPy, torch CPU and CUDA generator states
  trainer_state.json  step, batch-source position, loop state
It is written into a temporary folder, every file fsynced, then renamed into place: a
process killed mid-save leaves the previous checkpoint as the latest one. `.pt` files hold
only tensors and plain Python values, so they load with `torch.load(weights_only=True)`.

Under a process group (torchrun) checkpoints are *sharded*: every rank writes its shards of
the trainable weights and optimizer state with `torch.distributed.checkpoint` (DCP) into one
temporary folder, then rank 0 adds trainer_state.json and renames the folder into place.
DCP reshards on load, so such a checkpoint resumes at any world size, and in a single
process too (`load_sharded_checkpoint`).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import UserError

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"
NAME_RE = re.compile(r"checkpoint-(\d{8,})")
TMP_PREFIX = ".tmp-checkpoint-"


class Stateful(Protocol):
    """Anything with state_dict/load_state_dict (optimizers, schedulers, value heads...)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class Checkpoint:
    """What `load_checkpoint` hands back besides the objects it restored in place."""

    path: Path
    step: int
    source_state: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after `step` optimizer steps."""
    return f"checkpoint-{step:08d}"


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """Parameters with requires_grad, detached (tied weights appear once)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """Every generator's state as tensors and plain values (weights_only-loadable)."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
    }
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Put every generator back where `capture_rng` found it."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- saving


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path) -> None:
    """Atomically move the finished temporary folder to its final name."""
    old = None
    if final.exists():  # re-saving the same step: swap, then drop the old copy
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_files(
    tmp: Path,
    step: int,
    model_state: Mapping[str, Tensor],
    optim_state: dict[str, Any],
    rng_state: dict[str, Any],
    trainer_state: dict[str, Any],
) -> None:
    """Write and fsync every file of one checkpoint into `tmp`."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"step": str(step)})
    torch.save(optim_state, tmp / OPTIM_FILE)
    torch.save(rng_state, tmp / RNG_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
    for name in (MODEL_FILE, OPTIM_FILE, RNG_FILE, STATE_FILE):
        _fsync(tmp / name)
    _fsync(tmp)


def save_checkpoint(
    root: str | Path,
    step: int,
    model_state: Mapping[str, Tensor],
    *,
    optimizer: Stateful | None = None,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    source_state: dict[str, Any] | None = None,
    rng_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    objects: Mapping[str, Stateful] | None = None,
    keep: int | None = None,
) -> Path:
    """Write `root/checkpoint-{step:08d}` atomically, then keep only the newest `keep`.

    `extra` must be JSON-serialisable; `objects` are saved through their state_dicts.
    rng_state defaults to the generators' current state.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _check_json(extra)
    remove_stale_temporaries(root)
    optim_state = {
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "objects": {k: v.state_dict() for k, v in (objects or {}).items()},
    }
    trainer_state = {"step": step, "source": source_state, "extra": extra or {}}
    tmp = root / f"{TMP_PREFIX}{step:08d}-{os.getpid()}"
    tmp.mkdir()
    _write_files(tmp, step, model_state, optim_state, rng_state or capture_rng(), trainer_state)
    final = root / checkpoint_name(step)
    _commit(tmp, final)
    if keep is not None:
        prune_checkpoints(root, keep)
    return final


def _check_json(extra: dict[str, Any] | None) -> None:
    try:
        json.dumps(extra or {})
    except TypeError as e:
        raise TypeError(f"checkpoint extra state must be JSON-serialisable: {e}") from None


def remove_stale_temporaries(root: str | Path) -> None:
    """Delete half-written checkpoint folders left by a process killed mid-save."""
    for p in Path(root).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := NAME_RE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    for p in list_checkpoints(root)[:-keep]:
        shutil.rmtree(p)


# ---------------------------------------------------------------- loading


def load_model_state(model: nn.Module, path: str | Path) -> None:
    """Copy the checkpoint's weights into `model` in place; every trainable one must be there."""
    state = load_file(str(Path(path) / MODEL_FILE), device="cpu")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        names = ", ".join(result.unexpected_keys[:5])
        raise ValueError(f"{path}: checkpoint has weights the model lacks: {names}")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks trainable weights: {', '.join(missing[:5])}")
    for n, p in model.named_parameters():  # an exact resume keeps the trained dtype
        if p.requires_grad and state[n].dtype != p.dtype:
            raise UserError(
                f"{path}: checkpoint trains {n} in {state[n].dtype} but this run in {p.dtype}; "
                "resume with the precision and optim.master_dtype it was written with (full "
                "fine-tuning under bf16 keeps bf16 weights since optim.master_dtype: auto; "
                "optim.master_dtype: fp32 resumes a run with fp32 master weights)"
            )


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module | None = None,
    optimizer: Stateful | None = None,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    objects: Mapping[str, Stateful] | None = None,
    restore_rng_state: bool = True,
) -> Checkpoint:
    """Restore the given objects (and the RNGs) from a checkpoint folder, in place."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no {STATE_FILE})")
    if model is not None:
        load_model_state(model, path)
    optim_state = torch.load(path / OPTIM_FILE, map_location="cpu", weights_only=True)
    owners = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    _restore_states(path, optim_state, owners, objects)
    if restore_rng_state:
        restore_rng(torch.load(path / RNG_FILE, map_location="cpu", weights_only=True))
    return _read_meta(path)


def _restore_states(
    path: Path,
    states: Mapping[str, Any],
    owners: Mapping[str, Stateful | None],
    objects: Mapping[str, Stateful] | None,
) -> None:
    """load_state_dict of each given owner (optimizer, scheduler...) and extra object."""
    for key, obj in owners.items():
        if obj is not None and states[key] is not None:
            obj.load_state_dict(states[key])
    for name, obj in (objects or {}).items():
        if name not in states["objects"]:
            raise KeyError(f"{path}: checkpoint has no state for {name!r}")
        obj.load_state_dict(states["objects"][name])


def _read_meta(path: Path) -> Checkpoint:
    meta = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    return Checkpoint(path, int(meta["step"]), meta.get("source"), meta.get("extra", {}))


# ---------------------------------------------------------------- sharded (DCP)

SHARDED_MARKER = ".metadata"  # DCP's index of every shard


def is_sharded(path: str | Path) -> bool:
    """Whether a checkpoint folder was written by `save_sharded_checkpoint`."""
    return (Path(path) / SHARDED_MARKER).is_file()


class ShardedTrainState:
    """The Stateful that DCP saves and loads: weights, optimizer, the rest as one object.

    Trainable weights and optimizer state go through `get_state_dict` / `set_state_dict`
    (FQN-keyed, DTensor shards under FSDP2), so DCP can reshard them to another world size.
    Scheduler, grad scaler, extra objects and every rank's RNG state travel as one pickled
    object (identical on all ranks, so DCP stores it once).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        scheduler: Stateful | None = None,
        scaler: Stateful | None = None,
        objects: Mapping[str, Stateful] | None = None,
        rng: list[dict[str, Any]] | None = None,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.scheduler, self.scaler, self.objects = scheduler, scaler, dict(objects or {})
        self.rng = rng
        self.loaded_rng: list[dict[str, Any]] = []

    def _options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # Frozen weights (a LoRA base) are neither saved nor expected back; DCP itself
        # fails on a trainable one the checkpoint lacks.
        return StateDictOptions(ignore_frozen_params=True, strict=False)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        rest = {
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "objects": {k: v.state_dict() for k, v in self.objects.items()},
            "rng": self.rng,
        }
        buf = io.BytesIO()
        torch.save(rest, buf)
        buf.seek(0)
        return {"model": model_sd, "optim": optim_sd, "rest": buf}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=self._options(),
        )
        rest = state["rest"]
        if isinstance(rest, io.BytesIO):
            rest.seek(0)
            rest = torch.load(rest, map_location="cpu", weights_only=True)
        owners = {"scheduler": self.scheduler, "scaler": self.scaler}
        _restore_states(Path("<sharded checkpoint>"), rest, owners, self.objects)
        self.loaded_rng = rest["rng"] or []


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_sharded_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    source_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    objects: Mapping[str, Stateful] | None = None,
    keep: int | None = None,
) -> Path:
    """Write `root/checkpoint-{step:08d}` with DCP from every rank (a collective), atomically.

    All ranks must call it with the same step; `root` must be one folder they all see.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    rank, world = _rank_world()
    _check_json(extra)
    tmp = root / f"{TMP_PREFIX}{step:08d}-sharded"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(root)
    rng: list[Any] = [None] * world
    dist.all_gather_object(rng, capture_rng())  # also the barrier after the clean-up
    state = ShardedTrainState(
        model, optimizer, scheduler=scheduler, scaler=scaler, objects=objects, rng=rng
    )
    dcp.save({"train": state}, checkpoint_id=str(tmp))  # fsyncs every file it writes
    final = root / checkpoint_name(step)
    if rank == 0:
        meta = {"step": step, "source": source_state, "extra": extra or {}, "world_size": world}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _fsync(tmp / STATE_FILE)
        _fsync(tmp)
        _commit(tmp, final)
        if keep is not None:
            prune_checkpoints(root, keep)
    dist.barrier()
    return final


def load_sharded_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    objects: Mapping[str, Stateful] | None = None,
    restore_rng_state: bool = True,
) -> Checkpoint:
    """Restore a checkpoint in place into a sharded (or any distributed) run.

    A sharded checkpoint is resharded by DCP to this job's world size (or to one process);
    a rank the saving job did not have keeps its seeded RNG. A single-process checkpoint
    in a distributed job goes through `_load_single_into_sharded`.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no {STATE_FILE})")
    owners = {"scheduler": scheduler, "scaler": scaler}
    if not is_sharded(path):
        return _load_single_into_sharded(path, model, optimizer, owners, objects, restore_rng_state)
    state = ShardedTrainState(model, optimizer, scheduler=scheduler, scaler=scaler, objects=objects)
    dcp.load({"train": state}, checkpoint_id=str(path))
    rank, _ = _rank_world()
    if restore_rng_state and rank < len(state.loaded_rng):
        restore_rng(state.loaded_rng[rank])
    return _read_meta(path)


def _load_single_into_sharded(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    owners: Mapping[str, Stateful | None],
    objects: Mapping[str, Stateful] | None,
    restore_rng_state: bool,
) -> Checkpoint:
    """Resume a single-process checkpoint in a distributed (FSDP2/DDP) job (a collective).

    Rank 0 reads the weights and optimizer state; `set_model_state_dict` and
    `set_optimizer_state_dict` broadcast and shard them. The optimizer's integer parameter
    ids become names in the order both runs build the optimizer in. Rank 0 continues the
    single run's RNG; the other ranks keep their seeded one.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    main = _rank_world()[0] == 0
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, load_file(str(path / MODEL_FILE)) if main else {}, options=opts)
    states = torch.load(path / OPTIM_FILE, map_location="cpu", weights_only=True)
    optim: dict[str, Any] = {}
    if main:
        fqn = {id(p): n for n, p in model.named_parameters()}
        names = [fqn[id(p)] for g in optimizer.param_groups for p in g["params"]]
        saved = states["optimizer"]
        optim = {
            "state": {names[i]: v for i, v in saved["state"].items()},
            "param_groups": [
                {**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]
            ],
        }
    set_optimizer_state_dict(model, optimizer, optim, options=opts)
    _restore_states(path, states, owners, objects)
    if restore_rng_state and main:
        restore_rng(torch.load(path / RNG_FILE, map_location="cpu", weights_only=True))
    return _read_meta(path)
