"""Several processes through PyTorch's own engine: torchrun, FSDP2 (`fully_shard`) or DDP.

`init` joins the process group torchrun describes (NCCL on CUDA, gloo on the CPU, with a
timeout on every collective). `wrap` puts the model under FSDP2 or DDP behind a module
whose forward *is* the loss, so every way a loss touches the model (`hidden_states`, the
output head, an adapters-off reference pass) runs inside the engine's hooks:
  fsdp2  `fully_shard` per block, then at the root (embeddings, final norm, heads); mixed
         precision from the run's precision for full fine-tuning. QLoRA's 4-bit base is
         sharded too: its NF4 codes and block constants become frozen parameters (FSDP2
         shards parameters, not buffers), split along their flat dim 0 and all-gathered as
         bytes per block; non-float parameters are never cast by the precision policy.
  ddp    a replica per rank; gradients all-reduced in backward.
Both average gradients over ranks, so the loop multiplies each rank's loss by the world size
after dividing by the *global* unit count (`all_reduce_sum`).
"""

from __future__ import annotations

import inspect
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import ConfigError, DistributedConfig

LossFn = Callable[[nn.Module, dict[str, Tensor]], tuple]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    strategy: str  # "fsdp2" or "ddp"
    mesh: Any  # the 1-D DeviceMesh FSDP2 shards over

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that logs and writes outputs)."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher setting RANK/WORLD_SIZE) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_strategy(cfg: DistributedConfig) -> str:
    """'none', 'fsdp2' or 'ddp': `auto` is fsdp2 under torchrun and none alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.strategy == "auto":
        return "fsdp2" if launched_by_torchrun() else "none"
    if cfg.strategy == "none" and world > 1:
        raise ConfigError(
            f"key 'distributed.strategy': none, but torchrun started {world} processes "
            "(use fsdp2 or ddp, or launch one process)"
        )
    return cfg.strategy


def require_one_process(what: str) -> None:
    """Refuse a multi-process launch of something that only runs in one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if launched_by_torchrun() and world > 1:
        raise ConfigError(
            f"key 'stage': {what} runs in one process, but torchrun started {world}; "
            "launch it without torchrun"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init(cfg: DistributedConfig, device: torch.device) -> DistEnv | None:
    """Join (or, alone with a strategy set, create) the process group; None when single."""
    strategy = resolve_strategy(cfg)
    if strategy == "none":
        return None
    if not launched_by_torchrun():  # one process asked for fsdp2/ddp: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    return DistEnv(dist.get_rank(), world, local_rank, device, strategy, mesh)


def is_distributed() -> bool:
    """Whether this process is part of an initialised process group (of any size)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the job (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(values: Tensor) -> Tensor:
    """The element-wise sum over ranks (the tensor itself without a process group)."""
    if world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank (one small all-reduce; `flag` itself when alone)."""
    if world_size() == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([int(flag)], device=device)).item())


def barrier() -> None:
    """Wait for every rank (nothing to wait for alone)."""
    if is_distributed():
        dist.barrier()


# ---------------------------------------------------------------- wrapping


class LossModule(nn.Module):
    """A module whose forward is `loss_fn(model, batch)`: the unit FSDP2/DDP wrap."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, Tensor]) -> tuple:
        """(loss sum, unit count[, metric sums]) of the micro-batch."""
        return self.loss_fn(self.model, batch)


def nf4_as_parameters(model: nn.Module) -> int:
    """Re-register every NF4 weight's codes and block constants as frozen parameters.

    FSDP2 shards parameters only; as buffers the 4-bit base would be replicated on every
    rank. The 0-dim double-quantisation offset stays a (replicated, 4-byte) buffer.
    Returns how many tensors moved.
    """
    from ..adapters.nf4 import NF4Weight

    moved = 0
    for module in model.modules():
        if not isinstance(module, NF4Weight):
            continue
        for name in ("packed", "absmax", "absmax_scale"):
            t = module._buffers.get(name)
            if t is None or t.ndim == 0:
                continue
            del module._buffers[name]
            module.register_parameter(name, nn.Parameter(t, requires_grad=False))
            moved += 1
    return moved


def mixed_precision(precision: str, model: nn.Module) -> Any:
    """FSDP2's policy: bf16/fp16 gathers of fp32 trainable weights, fp32 gradient reduction.

    Frozen LoRA/QLoRA bases are already stored in the compute dtype and adapters stay fp32
    under autocast, exactly as in one process, so those runs get no casting policy.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_float = any(not p.requires_grad and p.is_floating_point() for p in model.parameters())
    if precision == "fp32" or frozen_float or any(p.dtype != torch.float32 for p in trainable):
        return MixedPrecisionPolicy()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def wrap(
    model: nn.Module,
    loss_fn: LossFn,
    env: DistEnv,
    *,
    precision: str,
    reshard_after_forward: bool = True,
) -> LossFn:
    """Shard (fsdp2) or replicate (ddp) `model` in place; returns the loss to train with.

    Call after the method made its parameters trainable, before the optimizer is built
    (FSDP2 replaces the parameters). Every rank starts from rank 0's weights: the other
    ranks may hold the model on the meta device (`meta_model`); rank 0's state dict is
    broadcast once and each rank keeps its shard (`set_model_state_dict`).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if precision == "fp16" and env.strategy == "fsdp2":
        raise ConfigError(
            "key 'precision': fp16 loss scaling decides overflow per rank while FSDP2 shards "
            "the gradients; use precision bf16 (or distributed.strategy ddp)"
        )
    root = LossModule(model, loss_fn)
    full = model.state_dict() if env.main else {}
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    if env.strategy == "ddp":
        set_model_state_dict(model, full, options=opts)
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        # Buffers (RoPE tables, NF4 codes) are equal on every rank: no per-forward broadcast.
        no_sync = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        sync = {"forward_sync_buffers" if no_sync else "broadcast_buffers": False}
        engine: nn.Module = DistributedDataParallel(root, device_ids=ids, **sync)
    elif env.strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        nf4_as_parameters(model)
        policy = mixed_precision(precision, model)
        kw = {"mesh": env.mesh, "mp_policy": policy}
        for block in getattr(model, "layers", []):
            fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
        engine = fully_shard(root, **kw)
        set_model_state_dict(model, full, options=opts)
    else:
        raise ValueError(f"unknown distributed strategy {env.strategy!r} (fsdp2, ddp)")
    del full

    def distributed_loss(_model: nn.Module, batch: dict[str, Tensor]) -> tuple:
        return engine(batch)

    if env.strategy == "ddp":  # the loop accumulates micro-batches without all-reducing
        distributed_loss.no_sync = engine.no_sync  # type: ignore[attr-defined]
    return distributed_loss


def meta_model(cfg: Any, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A Llama with no weights (meta device) for the ranks that receive rank 0's.

    Only the RoPE table (a non-persistent buffer no state dict carries) is real.
    """
    from ..model.llama import Llama

    with torch.device("meta"):
        model = Llama(cfg).to(dtype)
    model.inv_freq = torch.empty(cfg.head_dim // 2, device=device)
    model.reset_rope()
    return model


def load_for_rank(
    model_path: str, env: DistEnv | None, *, device: torch.device, dtype: torch.dtype
) -> tuple:
    """(model, tokenizer): rank 0 (or a single process) reads the weights; the other ranks
    of a job build a Hugging Face folder's model on the meta device, so N ranks never hold
    N copies in host memory. Other sources (.gguf, quantised folders) load on every rank.
    """
    from ..data.tokenizer import load_tokenizer
    from ..io.hf import is_reward_model, read_config
    from ..io.load import load_model, resolve_model_path

    if env is not None and not env.main:
        path = resolve_model_path(model_path)
        plain = path.is_dir() and not (path / "llamaforge_quant.json").is_file()
        if plain and not is_reward_model(path):
            model = meta_model(read_config(path), env.device, dtype)
            return model.eval(), load_tokenizer(path)
    return load_model(model_path, device=device, dtype=dtype)


def share_from_rank0(values: list[Any]) -> list[Any]:
    """Rank 0's values (e.g. examples it annotated) on every rank, as picklable objects."""
    if world_size() > 1:
        dist.broadcast_object_list(values, src=0)
    return values


def gather_trainable(model: nn.Module) -> dict[str, Tensor]:
    """Every trainable weight in full, on rank 0's CPU ({} on the others). A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    full = get_model_state_dict(model, options=opts)  # buffers come along: leave them out
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in full.items() if k in names}
