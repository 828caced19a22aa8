"""LoRA layers, injection, adapter switching, per-row adapters, merging and freezing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from llamaforge.adapters import (
    LoRALinear,
    NF4Linear,
    adapter_names,
    add_adapter,
    apply_freeze,
    apply_lora,
    disable_adapters,
    lora_modules,
    lora_state_dict,
    merge_lora,
    parameter_counts,
    row_adapters,
    set_adapter,
    trainable_parameters,
    unload_lora,
)
from llamaforge.model.llama import KVCache

from .helpers import random_model

EXACT = {"atol": 1e-5, "rtol": 0}


def _ids(b: int = 3, t: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def _perturb(model: nn.Module, adapter: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            if adapter in m.lora_A:
                for p in (m.lora_A[adapter], m.lora_B[adapter]):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _layer(r: int = 4, alpha: float = 8.0, **kw) -> tuple[nn.Linear, LoRALinear]:
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    lora = LoRALinear(lin)
    lora.add_adapter("a", r, alpha, **kw)
    with torch.no_grad():
        lora.lora_B["a"].normal_()
    return lin, lora


def test_forward_matches_explicit_formula():
    lin, lora = _layer()
    x = torch.randn(2, 5, 24)
    a, b = lora.lora_A["a"], lora.lora_B["a"]
    ref = x @ lin.weight.T + lin.bias + (x @ a.T @ b.T) * (8.0 / 4)
    torch.testing.assert_close(lora(x), ref, **EXACT)
    assert lora.weight is lin.weight and not lora.weight.requires_grad


def test_rslora_scaling():
    lin, lora = _layer(r=16, alpha=8.0, rslora=True)
    assert lora.scaling["a"] == 8.0 / math.sqrt(16)
    x = torch.randn(3, 24)
    delta = x @ lora.lora_A["a"].T @ lora.lora_B["a"].T * 2.0
    torch.testing.assert_close(lora(x), lin(x) + delta, **EXACT)


def test_dropout_only_in_training():
    lin, lora = _layer(dropout=0.5)
    x = torch.randn(8, 24)
    lora.train()
    torch.manual_seed(1)
    first = lora(x)
    assert not torch.allclose(first, lora(x))  # a fresh mask each call
    lora.eval()
    ref = lin(x) + x @ lora.lora_A["a"].T @ lora.lora_B["a"].T * 2.0
    torch.testing.assert_close(lora(x), ref, **EXACT)


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-smollm2"])
def test_fresh_adapter_is_identity_and_only_lora_trains(name):
    model = random_model(name)
    x = _ids()
    with torch.no_grad():
        base = model(x)
    apply_lora(model, r=4, alpha=8)
    with torch.no_grad():
        assert torch.equal(model(x), base)  # B starts at zero
    names = set(trainable_parameters(model))
    assert names and all(".lora_A.default" in n or ".lora_B.default" in n for n in names)
    assert len(names) == 2 * 7 * model.cfg.n_layers
    trainable, total = parameter_counts(model)
    assert trainable == sum(p.numel() for p in trainable_parameters(model).values())
    assert total == model.cfg.num_params() + trainable


def test_backward_reaches_only_lora():
    model = apply_lora(random_model("tiny-llama2"), r=4, alpha=8, targets=("q_proj", "v_proj"))
    _perturb(model, "default", 0)
    model(_ids()).logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n


def test_disable_adapters_gives_base_logits():
    model = random_model("tiny-llama3")
    x = _ids()
    with torch.no_grad():
        base = model(x)
    apply_lora(model, r=4, alpha=8)
    _perturb(model, "default", 0)
    with torch.no_grad():
        tuned = model(x)
        with disable_adapters(model):
            torch.testing.assert_close(model(x), base, atol=0, rtol=0)
        torch.testing.assert_close(model(x), tuned, atol=0, rtol=0)
    assert (tuned - base).abs().max() > 1e-2


def _two_adapters() -> nn.Module:
    model = apply_lora(random_model("tiny-llama3"), r=4, alpha=8, adapter_name="a")
    add_adapter(model, "b", r=2, alpha=4, targets=("q_proj", "down_proj"))
    _perturb(model, "a", 1)
    _perturb(model, "b", 2)
    return model


def test_rows_use_their_own_adapter():
    model = _two_adapters()
    assert adapter_names(model) == ["a", "b"]
    x = _ids(3)
    alone = []
    with torch.no_grad():
        for i, name in enumerate(["a", None, "b"]):
            set_adapter(model, name)
            alone.append(model(x[i : i + 1]))
        with row_adapters(model, ["a", None, "b"]):
            together = model(x)
        torch.testing.assert_close(together, torch.cat(alone), **EXACT)
        set_adapter(model, "a")
        assert all(m._rows is None for _, m in lora_modules(model))  # cleared on exit


def test_rows_with_kv_cache_decoding():
    model = _two_adapters()
    x = _ids(2, 6)
    names = ["b", "a"]
    with torch.no_grad(), row_adapters(model, names):
        cache = KVCache(model.cfg, 2, 8, dtype=torch.float32, device="cpu")
        model(x[:, :5], cache=cache)
        step = model(x[:, 5:], cache=cache)[:, -1]
        full = model(x)[:, -1]
    torch.testing.assert_close(step, full, **EXACT)
    with pytest.raises(ValueError, match="batch of 2 rows"), row_adapters(model, names):
        model(x[:1])
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        row_adapters(model, ["zz", None]).__enter__()


def test_merge_equals_unmerged_and_unload_restores_base():
    model = _two_adapters()
    x = _ids()
    with torch.no_grad():
        set_adapter(model, "b")
        with_b = model(x)
        with disable_adapters(model):
            base = model(x)
    merged = merge_lora(copy.deepcopy(model), "b")
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), with_b, **EXACT)
        torch.testing.assert_close(unload_lora(model)(x), base, atol=0, rtol=0)


def test_lora_on_tied_lm_head_unties_when_merged():
    model = apply_lora(random_model("tiny-smollm2"), r=2, alpha=2, targets=("lm_head",))
    _perturb(model, "default", 0)
    x = _ids()
    with torch.no_grad():
        ref = model(x)
    merge_lora(model)
    assert not model.cfg.tie_embeddings
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, **EXACT)


def test_qlora_quantises_block_linears_only():
    model = random_model("tiny-llama3")
    apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"), quantize_base=True)
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["layers.0.self_attn.q_proj"] is LoRALinear
    assert model.layers[0].self_attn.q_proj.nf4 is not None
    assert kinds["layers.1.mlp.up_proj"] is NF4Linear
    assert kinds["lm_head"] is nn.Linear and kinds["embed_tokens"] is nn.Embedding
    assert set(trainable_parameters(model)) == {
        f"layers.{i}.self_attn.{p}_proj.lora_{ab}.default"
        for i in range(2)
        for p in "qv"
        for ab in "AB"
    }


def test_qlora_merge_matches_unmerged():
    model = apply_lora(random_model("tiny-llama3"), r=4, alpha=8, quantize_base=True)
    _perturb(model, "default", 0)
    x = _ids()
    with torch.no_grad():
        ref = model(x)
        merged = merge_lora(model)
        assert not any(isinstance(m, NF4Linear | LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(x), ref, **EXACT)


def test_lora_state_dict_keys_load_back():
    model = apply_lora(random_model("tiny-llama2"), r=4, alpha=8, targets=("o_proj",))
    _perturb(model, "default", 0)
    sd = lora_state_dict(model)
    assert sorted(sd)[0] == "layers.0.self_attn.o_proj.lora_A.default"
    other = apply_lora(random_model("tiny-llama2"), r=4, alpha=8, targets=("o_proj",))
    result = other.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), atol=0, rtol=0)


def test_bad_targets_and_names_are_reported():
    model = random_model("tiny-llama2")
    with pytest.raises(ValueError, match=r"match no linear layer; .*'q_proj'"):
        apply_lora(model, r=2, alpha=2, targets=("c_attn",))
    apply_lora(model, r=2, alpha=2)
    with pytest.raises(ValueError, match="already exists"):
        add_adapter(model, "default", r=2, alpha=2)
    with pytest.raises(KeyError, match="no adapter named 'x'"):
        set_adapter(model, "x")


def _trainable_layers(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_trains_only_chosen_layers():
    model = apply_freeze(random_model("tiny-llama3"), train_layers=[-1])
    names = _trainable_layers(model)
    assert names and all(n.startswith("layers.1.") for n in names)
    assert len(names) == len(list(model.layers[1].parameters()))


def test_freeze_modules_narrow_and_extend():
    model = apply_freeze(
        random_model("tiny-smollm2"), train_layers=[0], train_modules=["mlp", "norm"]
    )
    names = _trainable_layers(model)
    assert names == {
        "layers.0.mlp.gate_proj.weight",
        "layers.0.mlp.up_proj.weight",
        "layers.0.mlp.down_proj.weight",
        "norm.weight",
    }
    model = apply_freeze(random_model("tiny-smollm2"), train_modules=["q_proj", "lm_head"])
    names = _trainable_layers(model)  # lm_head is tied: the embedding trains through it
    assert names == {"layers.0.self_attn.q_proj.weight", "layers.1.self_attn.q_proj.weight"} | {
        "embed_tokens.weight"
    }
    with pytest.raises(ValueError, match="out of range"):
        apply_freeze(model, train_layers=[2])
    with pytest.raises(ValueError, match=r"\['mlpx'\] match no module"):
        apply_freeze(model, train_modules=["mlpx"])


class _DownShapedMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts (T, ffn) x (ffn, dim) matmuls (mm, or addmm adding a delta): a down
    projection's forward, and the gate/up layers' input gradients in the backward."""

    def __init__(self, t: int, ffn: int, dim: int) -> None:
        super().__init__()
        self.shape, self.count = ((t, ffn), (ffn, dim)), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            self.count += (tuple(args[0].shape), tuple(args[1].shape)) == self.shape
        elif func is torch.ops.aten.addmm.default:  # the base matmul with the delta added
            self.count += (tuple(args[1].shape), tuple(args[2].shape)) == self.shape
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("quantize", [False, True])
def test_recompute_skips_the_frozen_down_projection(quantize):
    """A checkpointed block's recompute runs no base matmul of its last projection (nothing
    in the backward reads its output); the gradients are those without checkpointing."""
    grads, counts = [], []
    for checkpointing in (False, True):
        model = apply_lora(random_model("tiny-llama3"), r=4, alpha=4, quantize_base=quantize)
        _perturb(model, "default", 1)
        model.train().gradient_checkpointing = checkpointing
        x = _ids()
        loss = model(x).float().logsumexp(-1).mean()
        cfg = model.cfg
        with _DownShapedMatmuls(x.numel(), cfg.ffn_dim, cfg.dim) as seen:
            loss.backward()
        counts.append(seen.count)
        grads.append([p.grad for p in trainable_parameters(model).values()])
    assert counts[0] == counts[1] == 2 * model.cfg.n_layers  # gate and up input gradients
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
