"""End to end through the command line on a tiny model: train -> adapter -> merge -> load."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from llamaforge.cli import main
from llamaforge.io.hf import save_hf
from tests.helpers import random_model

FIX = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Hugging Face folder: random tiny-llama3 weights + the tiny fixture tokenizer."""
    d = tmp_path_factory.mktemp("base")
    save_hf(random_model("tiny-llama3", seed=3), d)
    shutil.copy(FIX / "tiny_tokenizer" / "tokenizer.json", d / "tokenizer.json")
    return d


def _config(tmp_path: Path, base: Path, method: str, **extra) -> Path:
    """The six keys a minimal config holds, plus a few settings to keep the run tiny."""
    raw = {
        "model": str(base),
        "method": method,
        "data": {"path": str(FIX / "alpaca.json"), "format": "alpaca", "cache_dir": str(tmp_path)},
        "output_dir": str(tmp_path / method),
        "max_steps": 3,
        **extra,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_train_then_merge_loads_in_transformers(tmp_path, base_dir, method, capsys):
    transformers = pytest.importorskip("transformers")
    from llamaforge.io.load import load_model
    from llamaforge.train.recipe import merge_adapter

    cfg = _config(tmp_path, base_dir, method, optim={"lr": 0.05, "batch_size": 2})
    assert main(["train", str(cfg), "logging.tensorboard=false"]) == 0
    summary = json.loads(capsys.readouterr().out)
    out = tmp_path / method
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    assert summary["steps"] == 3 and summary["after"] is not None
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file()

    merged_dir = tmp_path / "merged"
    assert main(["merge", str(base_dir), str(adapter), str(merged_dir)]) == 0
    ref = transformers.LlamaForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ours, _ = load_model(base_dir, device="cpu", dtype=torch.float32)
    ours = merge_adapter(ours, adapter)  # same path as the CLI, checked against transformers
    ids = torch.randint(0, 200, (1, 24))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max() < 1e-4
        base = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        assert (ref(ids).logits - base(ids).logits).abs().max() > 1e-4  # training did something


def test_full_method_saves_hf_folder(tmp_path, base_dir, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = _config(tmp_path, base_dir, "full", optim={"lr": 0.01, "batch_size": 4})
    assert main(["train", str(cfg), "logging.plot=false", "logging.tensorboard=false"]) == 0
    model_dir = tmp_path / "full" / "model"
    ref = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert ref.config.num_hidden_layers == 2
    assert (model_dir / "tokenizer.json").is_file()


def test_two_adapters_in_one_batched_generate(tmp_path, base_dir, capsys):
    for name, lr in (("a", 0.05), ("b", 0.08)):
        cfg = _config(tmp_path / name, base_dir, "lora", optim={"lr": lr, "batch_size": 2})
        assert main(["train", str(cfg), "logging.plot=false", "logging.tensorboard=false"]) == 0
    capsys.readouterr()
    adapters = [
        f"a={tmp_path / 'a' / 'lora' / 'adapter'}",
        f"b={tmp_path / 'b' / 'lora' / 'adapter'}",
    ]
    common = ["generate", str(base_dir), "--max-new-tokens", "6", "--prompt", "Add 1", "--prompt"]
    args = common + ["Add 1", "--prompt", "Add 1"]
    for a in adapters:
        args += ["--adapter", a]
    assert main(args + ["--row-adapters", "a,none,b"]) == 0
    rows = [json.loads(x)["completion"] for x in capsys.readouterr().out.splitlines()]
    alone = []
    for use in ("a", "none", "b"):
        single = common[:-1] + ["--adapter", adapters[0], "--adapter", adapters[1], "--use", use]
        assert main(single + ["--row-adapters", use]) == 0
        alone.append(json.loads(capsys.readouterr().out)["completion"])
    assert rows == alone


def test_bad_config_key_is_one_line_exit_2(tmp_path, base_dir, capsys):
    cfg = _config(tmp_path, base_dir, "lora")
    assert main(["train", str(cfg), "data.pth=x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "data.pth" in err and "data.path" in err


def test_missing_model_is_one_line_exit_2(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no such file or folder" in err


def test_chat_streams_and_keeps_history(base_dir, monkeypatch, capsys):
    lines = iter(["Add 1 and 1.", "/reset", "Add 2 and 2.", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    assert main(["chat", str(base_dir), "--template", "chatml", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("assistant> ") == 2


def test_perplexity_prints_one_json_line(base_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The sum is 2. The sum is 4. " * 20)
    assert main(["perplexity", str(base_dir), str(text), "--window", "32"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    res = json.loads(line)
    assert set(res) == {"tokens", "nll", "perplexity"} and res["tokens"] > 32
    assert abs(res["perplexity"] - math.exp(res["nll"])) < 1e-6 * res["perplexity"]


def test_eval_with_adapter(tmp_path, base_dir, capsys):
    cfg = _config(tmp_path, base_dir, "lora", optim={"lr": 0.05, "batch_size": 2})
    assert main(["train", str(cfg), "logging.plot=false", "logging.tensorboard=false"]) == 0
    capsys.readouterr()
    adapter = str(tmp_path / "lora" / "adapter")
    assert main(["eval", str(cfg), "data.val_size=0.2", "--adapter", adapter]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["adapter"] == adapter and math.isfinite(res["val_loss"]) and "exact_match" in res
