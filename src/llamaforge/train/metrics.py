"""Metrics sinks: JSONL, TensorBoard (optional) and a loss-curve PNG (optional).

Only the main process writes; other ranks get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def is_main_process() -> bool:
    """True on rank 0 of an initialised process group, and always without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return True


def _tensorboard_writer(log_dir: Path) -> Any | None:
    """A SummaryWriter, or None with a warning when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("tensorboard is not installed; skipping TensorBoard logs", stacklevel=3)
        return None
    return SummaryWriter(log_dir=str(log_dir))


class MetricsLogger:
    """Appends one JSON object per record to `out_dir/metrics.jsonl`, mirrors numbers to TB.

    Records carry "kind" ("train", "eval" or "event") and "step".
    """

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.path = self.out_dir / METRICS_FILE
        self.tensorboard = tensorboard
        self._file = None
        self._tb = None

    def _open(self) -> None:
        """Open the sinks on the first record (so a resumed run can trim the file first)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if self.tensorboard:
            self._tb = _tensorboard_writer(self.out_dir / "tensorboard")

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (flushed, so a crash loses nothing already logged)."""
        if not self.enabled:
            return
        if self._file is None:
            self._open()
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            kind, step = record.get("kind", "train"), int(record.get("step", 0))
            for key, value in record.items():
                if key not in ("kind", "step") and _is_number(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        """Close the files; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (a torn last line is ignored)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop records after `step` (a resumed run redoes those steps and logs them again)."""
    path = Path(path)
    if path.is_file():
        kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def plot_losses(records: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Draw train loss and val loss against step into a PNG; None if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed; skipping the loss plot", stacklevel=2)
        return None
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas attached to this figure only: no global backend state
    ax = fig.add_subplot()
    for points, label, style in ((train, "train", "-"), (val, "val", "o-")):
        points = [(s, v) for s, v in points if math.isfinite(v)]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))
    return Path(path)
