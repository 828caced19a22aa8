"""Long-context memory savers: the feed-forward over sequence slices changes no number."""

from __future__ import annotations

import pytest
import torch

from llamaforge.config import ConfigError, config_from_dict
from llamaforge.model.llama import MLP

from .helpers import random_model


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
    )
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_mlp_slices_match_whole_sequence(checkpointing):
    model = random_model("tiny-llama3").train()
    model.gradient_checkpointing = checkpointing
    ids = torch.randint(
        0, model.cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0)
    )
    ref_loss, ref_grads = loss_and_grads(model, ids)
    model.set_mlp_chunk(8)  # 2 x 21 tokens > 8: slices of 4 positions, the last one shorter
    assert all(m.chunk_tokens == 8 for m in model.modules() if isinstance(m, MLP))
    loss, grads = loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-6, msg=k)


def test_mlp_slices_without_grad_and_short_batches_untouched():
    model = random_model("tiny-llama3")
    ids = torch.randint(
        0, model.cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ref = model(ids)
        model.set_mlp_chunk(7)
        torch.testing.assert_close(model(ids), ref, rtol=1e-6, atol=1e-6)
    calls = []
    mlp = model.layers[0].mlp
    mlp.register_forward_hook(lambda *_: calls.append(1))
    orig = mlp._swiglu_mlp
    mlp._swiglu_mlp = lambda x: (calls.append(x.shape[1]), orig(x))[1]
    with torch.no_grad():
        model(ids[:, :7])  # 7 tokens: not sliced
    assert calls[0] == 7
    with pytest.raises(ValueError, match="positive"):
        model.set_mlp_chunk(0)


def test_mlp_chunk_is_a_checked_config_key():
    raw = {"model": "m", "data": {"path": "d.jsonl"}}
    assert config_from_dict(raw).mlp_chunk_tokens == 16384
    assert config_from_dict(raw, ["mlp_chunk_tokens=4096"]).train_config().mlp_chunk_tokens == 4096
    with pytest.raises(ConfigError, match="mlp_chunk_tokens"):
        config_from_dict(raw, ["mlp_chunk_tokens=0"])


def test_offload_pins_only_where_power_of_two_rounding_wastes_little():
    from llamaforge.model.offload import pinned_size, use_pinned

    assert pinned_size(2**31) == 2**31 and pinned_size(2**31 + 1) == 2**32
    layer_262k, layer_350k = 262144 * 4096 * 2, 350000 * 4096 * 2  # Llama-3.1-8B layer inputs
    assert use_pinned(layer_262k) and use_pinned(7 * 2**28)  # exact; 1.14x
    assert not use_pinned(layer_350k)  # 2.87 GB would take 4 GiB pinned


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading moves CUDA tensors")
@pytest.mark.parametrize("t,layers", [(2048, None), (3000, None), (2048, 1)])
def test_offloaded_checkpoints_give_the_same_gradients(t, layers):
    """A pinned and a pageable layer input, and the inputs of the first block only."""
    model = random_model("tiny-llama3", dim=256, n_heads=4, n_kv_heads=2).cuda().train()
    model.gradient_checkpointing = True
    ids = torch.randint(0, model.cfg.vocab_size, (1, t), device="cuda")
    ref_loss, ref_grads = loss_and_grads(model, ids)
    model.offload_activations, model.offload_layers = True, layers
    loss, grads = loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, msg=k)


@pytest.mark.parametrize("n", [0, 1])
def test_checkpointing_only_the_first_blocks_changes_no_gradient(n):
    model = random_model("tiny-llama3").train()
    ids = torch.randint(
        0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2)
    )
    ref_loss, ref_grads = loss_and_grads(model, ids)
    model.gradient_checkpointing, model.checkpoint_layers = True, n
    seen = []
    inner = model._checkpointed
    model._checkpointed = lambda layer, *a: (seen.append(layer), inner(layer, *a))[1]
    loss, grads = loss_and_grads(model, ids)
    assert seen == list(model.layers[:n])
    torch.testing.assert_close(loss, ref_loss)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, msg=k)


def test_offload_layers_say_which_checkpointed_blocks_offload():
    model = random_model("tiny-llama3")
    n = len(model.layers)
    assert not any(model.offloads(i) for i in range(n))  # offload off
    model.offload_activations = True
    assert all(model.offloads(i) for i in range(n))  # every block (None)
    model.offload_layers = 1
    assert [model.offloads(i) for i in range(n)] == [True] + [False] * (n - 1)
    raw = {"model": "m", "data": {"path": "d.jsonl"}}
    on = ["activation_checkpointing=true", "activation_offload=true"]
    got = config_from_dict(raw, [*on, "activation_offload_layers=3"]).train_config()
    assert got.activation_offload_layers == 3
    with pytest.raises(ConfigError, match="activation_offload_layers.*needs 'activation_offload"):
        config_from_dict(raw, ["activation_checkpointing=true", "activation_offload_layers=3"])
    with pytest.raises(ConfigError, match="and key .memory_budget_gb. both set"):
        config_from_dict(raw, [*on, "activation_offload_layers=3", "memory_budget_gb=20"])


def test_checkpointed_layers_key_needs_checkpointing():
    raw = {"model": "m", "data": {"path": "d.jsonl"}}
    on = ["activation_checkpointing=true", "activation_checkpointing_layers=8"]
    assert config_from_dict(raw, on).train_config().activation_checkpointing_layers == 8
    with pytest.raises(ConfigError, match="activation_checkpointing_layers"):
        config_from_dict(raw, ["activation_checkpointing_layers=8"])
    with pytest.raises(ConfigError, match="activation_checkpointing_layers"):
        config_from_dict(
            raw, ["activation_checkpointing=true", "activation_checkpointing_layers=-1"]
        )
