"""benchmarks/serve_throughput.py runs end to end on the CPU in its tiny mode."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_throughput.py"


def test_serve_throughput_tiny_matches_peft(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location("bench_serve_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path / "serve.json"
    report = module.main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text())["setup"]["preset"] == "tiny-llama3"
    assert len(report["runs"]) == 4
    for row in report["runs"]:
        # greedy fp32: the engine (gathered LoRA, continuous batching) == peft per adapter group
        assert row["same_outputs"] == 1.0
        for stack in ("llamaforge", "hf"):
            r = row[stack]
            assert r["output_tokens"] == row["concurrency"] * 8 and r["tok_s"] > 0
            assert r["ttft_p50_ms"] > 0 and r["itl_p99_ms"] >= r["itl_p50_ms"]
    assert set(report["goals"]) == {
        "b1_decode_fraction_of_bound",
        "x_hf_at_4",
        "2_adapters_over_1_at_4",
    }
    assert report["bound"]["b1_decode_tok_s"] > 0
