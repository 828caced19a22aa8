"""Same math as transformers + peft: loss and gradients on the same weights and batch.

CPU, fp32. llamaforge's training loss (`chunked_causal_lm_loss_fn`: summed NLL / count) must
equal transformers' mean loss (labels shifted inside the model, -100 ignored), and the
gradient of every trainable parameter must equal peft's (LoRA) or transformers' (full
fine-tune), also with llamaforge's activation checkpointing on. The GPU/bf16 counterpart
is `benchmarks/same_math.py`.
"""

from __future__ import annotations

import pytest
import torch

from llamaforge.adapters import apply_lora, lora_modules
from llamaforge.io.hf import ours_to_hf, save_hf
from llamaforge.io.peft import hf_module_name
from llamaforge.losses import chunked_causal_lm_loss_fn

from .helpers import random_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 8, 16
GRAD_RTOL = 1e-5  # max |ours - theirs| per tensor, relative to that tensor's largest |grad|
LOSS_TOL = 1e-5


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    """Two rows of 20 tokens: a prompt without loss, a hole, and right padding."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (2, 20), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100  # prompt
    labels[1, 4] = -100  # a masked token mid-row
    ids[1, 15:] = 0  # right padding: pad id, no loss
    labels[1, 15:] = -100
    return {"input_ids": ids, "labels": labels}


def _reference(ours: torch.nn.Module, tmp_path) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with our weights (through our HF exporter)."""
    save_hf(ours, tmp_path / "base")
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    return ref.eval()


def _lora_pair(tmp_path, name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our model with LoRA and peft's on the same base, with equal random non-zero A and B."""
    ours = random_model(name)
    ref = _reference(ours, tmp_path)
    apply_lora(ours, r=RANK, alpha=ALPHA, targets=TARGETS)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    ref = peft.get_peft_model(ref, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mname, m in lora_modules(ours):
            theirs = ref.base_model.model.get_submodule(hf_module_name(mname))
            for part in ("lora_A", "lora_B"):
                value = torch.randn(getattr(m, part)["default"].shape, generator=g) * 0.1
                getattr(m, part)["default"].copy_(value)
                getattr(theirs, part)["default"].weight.copy_(value)
    return ours, ref


def _losses(ours, ref, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward both losses; chunk size 7 so the chunked loss really has several chunks."""
    loss_sum, count = chunked_causal_lm_loss_fn(ours, batch, chunk_size=7)
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum())
    loss = loss_sum / count
    loss.backward()
    ref_loss = ref(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    ref_loss.backward()
    return loss.detach(), ref_loss.detach()


def _assert_grads_equal(pairs: list[tuple[str, torch.Tensor | None, torch.Tensor | None]]):
    assert pairs
    for name, a, b in pairs:
        assert a is not None and b is not None, f"{name}: missing gradient"
        scale = b.abs().max().item()
        assert scale > 0, f"{name}: zero gradient (the comparison would be trivial)"
        err = (a - b).abs().max().item()
        assert err <= GRAD_RTOL * scale, f"{name}: max |diff| {err:.3g} vs grad scale {scale:.3g}"


def _lora_grad_pairs(ours, ref) -> list[tuple[str, torch.Tensor | None, torch.Tensor | None]]:
    pairs = []
    for mname, m in lora_modules(ours):
        theirs = ref.base_model.model.get_submodule(hf_module_name(mname))
        for part in ("lora_A", "lora_B"):
            ours_p, ref_p = getattr(m, part)["default"], getattr(theirs, part)["default"].weight
            pairs.append((f"{mname}.{part}", ours_p.grad, ref_p.grad))
    trainable = [p for p in ours.parameters() if p.requires_grad]
    ref_trainable = [p for p in ref.parameters() if p.requires_grad]
    assert len(pairs) == len(trainable) == len(ref_trainable) == 2 * 7 * ours.cfg.n_layers
    return pairs


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-smollm2"])
def test_lora_loss_and_grads_match_peft(tmp_path, name):
    ours, ref = _lora_pair(tmp_path, name)
    batch = _batch(ours.cfg.vocab_size)
    loss, ref_loss = _losses(ours, ref, batch)
    assert abs(loss.item() - ref_loss.item()) <= LOSS_TOL
    _assert_grads_equal(_lora_grad_pairs(ours, ref))


@pytest.mark.parametrize("fused", [False, True])
def test_lora_grads_match_with_activation_checkpointing(tmp_path, monkeypatch, fused):
    """Also through the fused LoRA layers (the GPU default, forced here on the CPU): q/k/v
    and gate/up as one node each, hand-derived backward, inside the recompute."""
    import llamaforge.adapters.lora as lora_mod

    groups = []
    if fused:
        real = lora_mod.fused_lora_group
        monkeypatch.setattr(lora_mod, "fusable_device", lambda x: True)
        monkeypatch.setattr(lora_mod, "fused_lora_group", lambda *a: groups.append(1) or real(*a))
    ours, ref = _lora_pair(tmp_path, "tiny-llama3")
    ours.gradient_checkpointing = True
    ours.train()
    calls = []
    ours.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    loss, ref_loss = _losses(ours, ref, _batch(ours.cfg.vocab_size))
    assert len(calls) == 2  # forward, then recomputed in backward: checkpointing was on
    assert len(groups) == (2 * 2 * ours.cfg.n_layers if fused else 0)  # 2 groups, 2 passes
    assert abs(loss.item() - ref_loss.item()) <= LOSS_TOL
    _assert_grads_equal(_lora_grad_pairs(ours, ref))


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-smollm2"])  # untied and tied embeddings
def test_full_finetune_grads_match_transformers(tmp_path, name):
    ours = random_model(name)
    ref = _reference(ours, tmp_path)
    ours.requires_grad_(True)
    ref.requires_grad_(True)
    loss, ref_loss = _losses(ours, ref, _batch(ours.cfg.vocab_size))
    assert abs(loss.item() - ref_loss.item()) <= LOSS_TOL
    theirs = dict(ref.named_parameters())
    pairs = [(n, p.grad, theirs[ours_to_hf(n)].grad) for n, p in ours.named_parameters()]
    assert {ours_to_hf(n) for n, _, _ in pairs} == set(theirs)
    _assert_grads_equal(pairs)
