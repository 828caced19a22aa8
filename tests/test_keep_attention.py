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
    """Counts the attention forward ops that run (SDPA's fused kernels, flash varlen)."""

    def __init__(self) -> None:
        super().__init__()
        self.forwards = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if ("attention" in name or "_varlen_attn" in name) and "backward" not in name:
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash varlen attention needs a GPU")
def test_packed_rows_keep_the_flash_varlen_outputs_on_the_gpu():
    """Packed rows go through flash varlen (torch_attn::_varlen_attn): kept and handed back
    in the recompute too, with the gradients of plain checkpointing (bf16)."""
    from llamaforge.kernels.attention import varlen_available

    if not varlen_available():
        pytest.skip("this torch has no flash varlen attention")
    model = random_model("tiny-llama3", seed=8).to("cuda", torch.bfloat16)
    model.train()
    model.gradient_checkpointing = True
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 64), generator=gen).cuda()
    doc_ids = torch.tensor([[0] * 40 + [1] * 24, [0] * 64]).cuda()
    positions = torch.cat([torch.arange(40), torch.arange(24)]).expand(2, 64).clone()
    positions[1] = torch.arange(64)
    assert model.varlen_usable(doc_ids)
    grads, counts = [], []
    for keep in (False, True):
        model.checkpoint_keeps_attention = keep
        model.zero_grad(set_to_none=True)
        with _CountAttention() as count:
            hidden = model.hidden_states(ids, positions=positions.cuda(), doc_ids=doc_ids)
            hidden.float().pow(2).mean().backward()
        counts.append(count.forwards)
        grads.append([p.grad.float() for p in model.parameters() if p.grad is not None])
    assert counts[1] < counts[0]  # the recompute ran no attention forward
    for g, w in zip(*grads, strict=True):
        torch.testing.assert_close(g, w, atol=0.02 * w.abs().max().item(), rtol=0.02)
