"""`activation_checkpointing_keep_attention`: checkpointed blocks keep the fused attention
kernel's outputs (the checkpoint's context hooks), so the recompute skips its forward."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llamaforge.config import ConfigError, config_from_dict
from llamaforge.train.memory_plan import block_costs
from tests.helpers import random_model


class _CountAttention(TorchDispatchMode):
    """Counts the attention forward ops that run (SDPA's fused kernels on the CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.forwards = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "attention" in name and "backward" not in name:
            self.forwards += 1
        return func(*args, **(kwargs or {}))


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    with _CountAttention() as count:
        model(ids).float().logsumexp(-1).mean().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return count.forwards, grads


@pytest.mark.parametrize("mlp_slices", [None, 16])
def test_the_recompute_skips_the_attention_forward_with_the_same_gradients(mlp_slices):
    model = random_model("tiny-llama3", seed=5)
    model.train()
    model.gradient_checkpointing = True
    model.set_mlp_chunk(mlp_slices)  # slices: checkpoints nested inside the block's
    ids = torch.randint(
        0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0)
    )
    n_plain, want = _step(model, ids)
    model.checkpoint_keeps_attention = True
    n_keep, got = _step(model, ids)
    layers = model.cfg.n_layers
    assert n_plain == 2 * layers and n_keep == layers  # forward + recompute, forward only
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_the_memory_plan_counts_the_kept_attention_outputs():
    model = random_model("tiny-llama3", seed=6)
    _, plain = block_costs(model, rows=2, tokens=64)
    model.checkpoint_keeps_attention = True
    _, kept = block_costs(model, rows=2, tokens=64)
    heads, head_dim = model.cfg.n_heads, model.cfg.head_dim
    assert kept - plain == 2 * 64 * heads * (head_dim * model.dtype.itemsize + 4)


def test_the_key_needs_checkpointed_blocks():
    raw = {"model": "tiny-llama3", "data": {"path": "x.jsonl"}, "memory_budget_gb": None}
    with pytest.raises(ConfigError, match="activation_checkpointing_keep_attention"):
        config_from_dict(raw, ["activation_checkpointing_keep_attention=true"])
    cfg = config_from_dict(
        raw, ["activation_checkpointing=true", "activation_checkpointing_keep_attention=true"]
    )
    assert cfg.train_config().activation_checkpointing_keep_attention
    with pytest.raises(ConfigError, match="activation_offload"):
        config_from_dict(
            raw,
            ["activation_checkpointing=true", "activation_offload=true",
             "activation_checkpointing_keep_attention=true"],
        )  # fmt: skip
    budget = config_from_dict(
        {**raw, "memory_budget_gb": "auto"}, ["activation_checkpointing_keep_attention=true"]
    )
    assert budget.activation_checkpointing_keep_attention


def test_no_block_is_checkpointed_where_no_graph_is_recorded(monkeypatch):
    """Under no_grad (DPO's reference pass, rollouts) checkpointing would only add calls."""
    model = random_model("tiny-llama3", seed=7)
    model.train()
    model.gradient_checkpointing = model.checkpoint_keeps_attention = True
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12))
    want = model.hidden_states(ids).detach()

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint called under no_grad")

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", refuse)
    with torch.no_grad():
        torch.testing.assert_close(model.hidden_states(ids), want, rtol=0, atol=0)
