"""The ready-made configs in configs/ validate, say how to run them, and their data script works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llamaforge.config import RunConfig, load_config
from llamaforge.data.pipeline import IGNORE, build_dataset
from llamaforge.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY_TOKENIZER = ROOT / "tests" / "fixtures" / "data" / "tiny_tokenizer" / "tokenizer.json"


def header(path: Path) -> list[str]:
    """The comment lines a config file starts with (without the leading '#')."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    for name in (
        "smollm2_full_sft_chitchat.yaml",
        "pt_plain_text.yaml",
        "alpaca_lora.yaml",
        "llama31_8b_qlora_sft.yaml",
        "llama2_7b_lora_chat.yaml",
    ):
        assert name in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.model and cfg.data.path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_has_header(path):
    lines = header(path)
    assert len(lines) >= 3, f"{path.name}: start with comment lines: what, how to run, data"
    text = "\n".join(lines)
    assert f"llamaforge train configs/{path.name}" in text or (
        f"configs/{path.name}" in text and "llamaforge " in text
    ), f"{path.name}: the header should give the command that runs it"
    assert "data" in text.lower(), f"{path.name}: the header should say where the data comes from"


def test_demo_config_validates():
    path = ROOT / "configs" / "demo.yaml"
    if not path.is_file():
        pytest.skip("configs/demo.yaml is not there")
    load_config(path)


def test_config_overrides_apply():
    cfg = load_config(
        ROOT / "configs" / "llama31_8b_qlora_sft.yaml",
        ["model=/somewhere/Llama-3.1-8B-Instruct", "optim.lr=1e-4", "max_steps=5"],
    )
    assert cfg.method == "qlora" and cfg.lora.r == 16 and cfg.lora.alpha == 32
    assert cfg.model == "/somewhere/Llama-3.1-8B-Instruct"
    assert cfg.optim.lr == 1e-4 and cfg.max_steps == 5


def test_make_alpaca_data(tmp_path):
    out = tmp_path / "chatterbot_alpaca.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_alpaca_data.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stdout
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert len(rows) > 1500
    for row in rows:
        assert set(row) == {"instruction", "input", "output"}
        assert row["instruction"].strip() and row["output"].strip() and row["input"] == ""

    tok = load_tokenizer(TINY_TOKENIZER)
    splits = build_dataset(str(out), tok, format="alpaca", cache_dir=str(tmp_path / "cache"))
    report = splits.report
    assert report.rows == len(rows)
    assert not report.skipped
    assert splits.train and splits.validation
    assert sum(report.examples.values()) == len(rows) - report.dropped_too_long
    # The prompt is masked, the answer is learned.
    example = splits.train[0]
    assert IGNORE in example["labels"]
    assert any(label != IGNORE for label in example["labels"])
