"""Real tiny runs for the web page's tests: SFT and DPO through `llamaforge train`."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from llamaforge.cli import main

FIX = Path(__file__).parent / "fixtures" / "data"


def train_run(root: Path, base: Path, name: str, stage: str, **extra) -> Path:
    """Train a few LoRA steps on the tiny base into `root/name` and return that folder."""
    data = {"path": str(FIX / "alpaca.json"), "format": "alpaca"}
    if stage == "dpo":
        data = {"path": str(FIX / "preference.jsonl"), "format": "preference"}
    raw = {
        "model": str(base),
        "stage": stage,
        "method": "lora",
        "data": {**data, "template": "chatml", "val_size": 0.25, "cache_dir": str(root / ".c")},
        "output_dir": str(root / name),
        "max_steps": 4,
        "eval": {"every": 2, "generate": {"max_examples": 3, "max_new_tokens": 4}},
        "optim": {"lr": 0.01, "batch_size": 2},
        "logging": {"tensorboard": False, "progress": False, "plot": False},
        **extra,
    }
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / f".{name}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg)]) == 0
    return root / name


def records(run: Path) -> list[dict]:
    """The run's metrics.jsonl records."""
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
