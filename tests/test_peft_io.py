"""PEFT-format adapters and merged checkpoints against transformers + peft themselves."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from llamaforge.adapters import (
    add_adapter,
    apply_lora,
    disable_adapters,
    lora_modules,
    merge_lora,
    set_adapter,
    unload_lora,
)
from llamaforge.io.hf import save_hf
from llamaforge.io.peft import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterError,
    load_peft_adapter,
    save_peft_adapter,
)

from .helpers import random_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = {"atol": 1e-4, "rtol": 0}


def _ids(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 12), generator=g)


def _hf(path) -> torch.nn.Module:
    model = transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


def _perturb(model: torch.nn.Module, adapter: str = "default", seed: int = 0) -> None:
    """Random non-zero A and B, so the adapter really changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            if adapter in m.lora_A:
                for p in (m.lora_A[adapter], m.lora_B[adapter]):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-smollm2"])
def test_ours_to_peft_same_logits(tmp_path, name):
    model = random_model(name)
    save_hf(model, tmp_path / "base")
    apply_lora(model, r=4, alpha=8, rslora=(name == "tiny-smollm2"))
    _perturb(model)
    out = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="base")
    ref = peft.PeftModel.from_pretrained(_hf(tmp_path / "base"), str(out)).eval()
    x = _ids()
    with torch.no_grad():
        ours, theirs = model(x), ref(x).logits
        with disable_adapters(model):
            base = model(x)
    assert (ours - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(ours, theirs, **TOL)


def test_saved_config_is_peft_format(tmp_path):
    model = apply_lora(random_model("tiny-llama3"), r=4, alpha=16, dropout=0.05)
    save_peft_adapter(model, tmp_path / "a", base_model_name_or_path="meta-llama/x")
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    expect = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "lora_dropout": 0.05}
    assert {k: cfg[k] for k in expect} == expect
    assert cfg["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert cfg["base_model_name_or_path"] == "meta-llama/x" and not cfg["use_rslora"]
    loaded = peft.LoraConfig.from_pretrained(str(tmp_path / "a"))
    assert loaded.r == 4 and loaded.lora_alpha == 16
    keys = set(peft.utils.load_peft_weights(str(tmp_path / "a")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 7 * 2
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary folder left behind


def _peft_model(tmp_path, name: str, **lora_kwargs) -> tuple[torch.nn.Module, object]:
    """Our random base, the same weights in transformers, wrapped by peft with random LoRA."""
    model = random_model(name)
    save_hf(model, tmp_path / "base")
    config = peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **lora_kwargs)
    ref = peft.get_peft_model(_hf(tmp_path / "base"), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ref.save_pretrained(str(tmp_path / "peft"))
    return model, ref.eval()


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-smollm2"])
def test_peft_to_ours_same_logits(tmp_path, name):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model, ref = _peft_model(tmp_path, name, r=4, lora_alpha=8, target_modules=targets)
    loaded = load_peft_adapter(model, tmp_path / "peft")
    assert len(loaded) == 2 * 7
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, **TOL)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_patterns_and_layer_subset_round_trip(tmp_path):
    """rsLoRA, rank/alpha patterns and layers_to_transform survive peft -> ours -> peft."""
    model, ref = _peft_model(
        tmp_path,
        "tiny-llama3",
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        layers_to_transform=[1],
        rank_pattern={"v_proj": 6},
        alpha_pattern={"down_proj": 3},
    )
    load_peft_adapter(model, tmp_path / "peft", adapter_name="x")
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, **TOL)
    save_peft_adapter(model, tmp_path / "again", adapter_name="x")
    cfg = json.loads((tmp_path / "again" / CONFIG_NAME).read_text())
    assert cfg["layers_to_transform"] == [1] and cfg["use_rslora"]
    again = peft.PeftModel.from_pretrained(_hf(tmp_path / "base"), str(tmp_path / "again"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), again.eval()(x).logits, **TOL)


def test_second_adapter_saved_alone(tmp_path):
    model = random_model("tiny-llama2")
    save_hf(model, tmp_path / "base")
    apply_lora(model, r=4, alpha=8)
    add_adapter(model, "b", r=2, alpha=2, targets=("o_proj",))
    _perturb(model, "default", seed=1)
    _perturb(model, "b", seed=2)
    save_peft_adapter(model, tmp_path / "b", adapter_name="b")
    ref = peft.PeftModel.from_pretrained(_hf(tmp_path / "base"), str(tmp_path / "b")).eval()
    set_adapter(model, "b")
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, **TOL)


def test_merged_checkpoint_loads_in_transformers(tmp_path):
    model = apply_lora(random_model("tiny-llama3"), r=4, alpha=8)
    _perturb(model)
    x = _ids()
    with torch.no_grad():
        unmerged = model(x)
    merge_lora(model)
    assert not any(True for _ in lora_modules(model))
    save_hf(model, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(_hf(tmp_path / "merged")(x).logits, unmerged, **TOL)


def test_qlora_merge_dequantises(tmp_path):
    model = apply_lora(random_model("tiny-smollm2"), r=4, alpha=8, quantize_base=True)
    _perturb(model)
    x = _ids()
    with torch.no_grad():
        unmerged = model(x)
    merge_lora(model)
    save_hf(model, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(_hf(tmp_path / "merged")(x).logits, unmerged, **TOL)


def test_qlora_adapter_loads_in_peft_on_dequantised_base(tmp_path):
    """An adapter trained over NF4 weights is an ordinary PEFT adapter for the same base."""
    model = apply_lora(random_model("tiny-llama3"), r=4, alpha=8, quantize_base=True)
    _perturb(model)
    save_peft_adapter(model, tmp_path / "adapter")
    save_hf(merge_lora(unload_lora(copy.deepcopy(model))), tmp_path / "deq")  # dequantised base
    ref = peft.PeftModel.from_pretrained(_hf(tmp_path / "deq"), str(tmp_path / "adapter"))
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.eval()(x).logits, **TOL)


def _write_adapter(tmp_path, **config_overrides) -> object:
    model = apply_lora(random_model("tiny-llama3"), r=4, alpha=8)
    out = save_peft_adapter(model, tmp_path / "ad")
    cfg = json.loads((out / CONFIG_NAME).read_text())
    cfg.update(config_overrides)
    (out / CONFIG_NAME).write_text(json.dumps(cfg))
    return out


def test_shape_mismatch_names_file_and_key(tmp_path):
    out = _write_adapter(tmp_path)
    model = random_model("tiny-llama2")  # no GQA: k_proj is 64 wide, not 32
    with pytest.raises(AdapterError, match=rf"{WEIGHTS_NAME}:.*k_proj\.lora_B\.weight: shape"):
        load_peft_adapter(model, out)
    assert not any(True for _ in lora_modules(model))  # nothing was changed


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"use_dora": True}, "use_dora=True is not supported"),
        ({"target_modules": ["c_attn"]}, r"target_modules \['c_attn'\] match no linear"),
        ({"target_modules": ["q_proj"]}, "down_proj is not targeted"),
        ({"r": 8}, r"shape \(4, \d+\), expected \(8, \d+\)"),
        ({"peft_type": "IA3"}, "only LORA"),
    ],
)
def test_config_errors_are_clear(tmp_path, override, message):
    out = _write_adapter(tmp_path, **override)
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(random_model("tiny-llama3"), out)


def test_save_replaces_atomically_and_keeps_other_files(tmp_path):
    model = apply_lora(random_model("tiny-llama2"), r=2, alpha=2)
    out = save_peft_adapter(model, tmp_path / "ad")
    (out / "README.md").write_text("notes")
    _perturb(model)
    save_peft_adapter(model, out)
    assert (out / "README.md").read_text() == "notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    fresh = random_model("tiny-llama2")
    load_peft_adapter(fresh, out)
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
