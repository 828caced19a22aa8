"""Training runs on disk, read-only: find them, summarise them, read their metrics.

A run is a folder holding the resolved `config.yaml` and `metrics.jsonl` that every
`llamaforge train` writes. Its status comes from what the run wrote: a final `failed` /
`aborted` event (the loop logs one when it raises), a `signal` event (stopped by Ctrl-C or
SIGTERM, checkpoint saved), `eval.json` (written last by the recipe: finished), else running.
Runs are named by id `K/REL`: the K-th folder given to the UI, then the run's relative path.
Ids are only ever resolved inside those folders.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..train.metrics import METRICS_FILE

CONFIG_FILE = "config.yaml"
SKIP_DIRS = {"checkpoints", "tensorboard", "adapter", "model", "__pycache__"}
MAX_DEPTH = 4  # folders below a given root searched for runs
MAX_SAMPLES = 50


class RunNotFound(UserError):
    """A run id that names no run inside the UI's folders."""


class UnsafeRunPath(RunNotFound):
    """A run id with `..`, `.` or empty parts: refused before any file is looked at."""


def clean(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become None (browsers' JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def is_run(path: Path) -> bool:
    """Whether a folder holds a run's config and metrics."""
    return (path / CONFIG_FILE).is_file() and (path / METRICS_FILE).is_file()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def parse_records(data: bytes) -> list[dict[str, Any]]:
    """Records of whole JSONL lines (a line that is not a JSON object is skipped)."""
    out = []
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(clean(rec))
    return out


TAIL = 64  # bytes before an offset remembered to notice a file rewritten in place


def _read(path: Path, offset: int, tail: bytes = b"") -> tuple[list[dict], int, bool, bytes]:
    """`read_from` plus the last TAIL bytes read; a `tail` that no longer precedes `offset`
    (the file was rewritten, then grew past it again) also resets."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        reset = offset > size or offset < 0
        if not reset and tail:
            f.seek(offset - len(tail))
            reset = f.read(len(tail)) != tail
        start = 0 if reset else offset
        lead = min(start, TAIL)  # bytes read before `start`, for the next tail
        f.seek(start - lead)
        data = f.read(size - start + lead)
    end = max(data.rfind(b"\n") + 1, lead)  # a line still being written waits
    return parse_records(data[lead:end]), start - lead + end, reset, data[max(end - TAIL, 0) : end]


def read_from(path: Path, offset: int) -> tuple[list[dict[str, Any]], int, bool]:
    """(records after byte `offset`, the offset after the last whole line, reset).

    `reset` is True when the file is now shorter than `offset` (a resumed run trims its
    metrics): the records then start from the beginning.
    """
    records, end, reset, _ = _read(path, offset)
    return records, end, reset


class Tally:
    """What the runs table needs from a metrics file, folded record by record."""

    def __init__(self) -> None:
        self.offset, self.tail = 0, b""
        self.status, self.detail = "running", None
        self.step = self.loss = self.val_loss = None

    def add(self, records: list[dict[str, Any]]) -> None:
        """Fold more records in (in file order)."""
        for r in records:
            if r.get("kind") == "train":
                self.status, self.detail = "running", None  # a resumed run trains again
                self.step = r.get("step", self.step)
                self.loss = r["loss"] if r.get("loss") is not None else self.loss
            elif r.get("kind") == "eval" and r.get("val_loss") is not None:
                self.val_loss = r["val_loss"]
            elif r.get("event") in ("failed", "aborted"):
                self.status, self.detail = "failed", r.get("error")
            elif r.get("event") == "signal":
                self.status, self.detail = "stopped", f"signal {r.get('signal')}"
            elif r.get("event") == "early_stop":
                self.detail = "early stop"

    def state(self, finished: bool) -> tuple[str, str | None]:
        """(running | finished | stopped | failed, detail); `finished`: eval.json exists."""
        if self.status == "running" and finished:
            return "finished", self.detail
        return self.status, self.detail

    def update(self, path: Path) -> Tally:
        """This tally advanced over the lines appended to `path`, or a new one on a rewrite."""
        records, end, reset, tail = _read(path, self.offset, self.tail)
        t = Tally() if reset else self
        t.add(records)
        t.offset, t.tail = end, tail
        return t


def run_status(records: list[dict[str, Any]], finished: bool) -> tuple[str, str | None]:
    """(running | finished | stopped | failed, detail) from the run's own records."""
    t = Tally()
    t.add(records)
    return t.state(finished)


@dataclass
class Run:
    """One run folder: `rid` is its id, `path` its real location."""

    rid: str
    path: Path

    @property
    def name(self) -> str:
        """The run's path below its root folder (the root's own name for the root itself)."""
        return self.rid.split("/", 1)[1] if "/" in self.rid else self.path.name

    def config(self) -> tuple[dict[str, Any], str]:
        """(parsed config or {}, its text)."""
        text = (self.path / CONFIG_FILE).read_text(encoding="utf-8", errors="replace")
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            parsed = None
        return (parsed if isinstance(parsed, dict) else {}), text

    def evals(self) -> tuple[dict | None, dict | None]:
        """(held-out generation report before training, summary written at the end)."""
        before = _read_json(self.path / "eval_before.json")
        final = _read_json(self.path / "eval.json")
        return (
            before if isinstance(before, dict) else None,
            final if isinstance(final, dict) else None,
        )

    def summary(self, tally: Tally | None = None) -> dict[str, Any]:
        """What the runs table shows (`tally`: this run's metrics already folded)."""
        cfg, _ = self.config()
        t = tally or Tally().update(self.path / METRICS_FILE)
        before, final = self.evals()
        status, detail = t.state(final is not None)
        data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
        return clean(
            {
                "id": self.rid,
                "name": self.name,
                "stage": cfg.get("stage"),
                "method": cfg.get("method"),
                "model": cfg.get("model"),
                "data": data.get("path"),
                "status": status,
                "detail": detail,
                "step": t.step,
                "max_steps": cfg.get("max_steps"),
                "loss": t.loss,
                "val_loss": t.val_loss,
                "before": (before or {}).get("scores"),
                "after": (final or {}).get("after"),
                "updated": (self.path / METRICS_FILE).stat().st_mtime,
            }
        )

    def details(self) -> dict[str, Any]:
        """Summary, resolved config text and held-out samples before and after."""
        _, text = self.config()
        before, final = self.evals()
        after = (final or {}).get("samples_after")
        b_samples = (before or {}).get("samples") or []
        a_samples = (after.get("samples") if isinstance(after, dict) else None) or []
        rows = []
        for i in range(min(max(len(b_samples), len(a_samples)), MAX_SAMPLES)):
            b = b_samples[i] if i < len(b_samples) else {}
            a = a_samples[i] if i < len(a_samples) else {}
            rows.append(
                {
                    "reference": a.get("reference", b.get("reference")),
                    "before": b.get("prediction"),
                    "after": a.get("prediction"),
                }
            )
        return {**self.summary(), "config_text": text, "samples": clean(rows)}


class RunIndex:
    """The folders the UI was given, and the runs inside them."""

    def __init__(self, roots: list[str | os.PathLike]) -> None:
        self.roots: list[Path] = []
        for r in roots:
            p = Path(r)
            if not p.is_dir():
                raise UserError(f"RUNS_DIR {r}: no such folder")
            self.roots.append(p.resolve())
        self._tallies: dict[Path, Tally] = {}  # kept between polls: only new lines are read
        self._lock = threading.Lock()

    def summaries(self) -> list[dict[str, Any]]:
        """The table: every run's summary, its metrics read on from where the last poll left."""
        out = []
        with self._lock:
            old, self._tallies = self._tallies, {}
            for r in self.find():
                try:
                    t = old.get(r.path, Tally()).update(r.path / METRICS_FILE)
                    out.append(r.summary(t))
                except OSError as e:  # one unreadable (or vanished) run does not hide the rest
                    out.append(
                        {"id": r.rid, "name": r.name, "status": "unreadable", "detail": str(e)}
                    )
                    continue
                self._tallies[r.path] = t
        return out

    def find(self) -> list[Run]:
        """Every run under the roots (symlinks not followed, output folders not entered)."""
        runs = []
        for k, root in enumerate(self.roots):
            for dirpath, dirnames, _ in os.walk(root):
                here = Path(dirpath)
                rel = here.relative_to(root)
                if is_run(here):
                    runs.append(Run(f"{k}/{rel.as_posix()}" if rel.parts else str(k), here))
                    dirnames.clear()  # a run's sub-folders are its outputs
                    continue
                if len(rel.parts) >= MAX_DEPTH:
                    dirnames.clear()
                dirnames[:] = sorted(
                    d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")
                )
        return runs

    def get(self, rid: str) -> Run:
        """The run with id `rid`; anything outside the roots or not a run is RunNotFound."""
        head, _, rel = rid.partition("/")
        parts = rel.split("/") if rel else []
        if not head.isdigit() or int(head) >= len(self.roots):
            raise RunNotFound(f"run {rid!r}: no such run")
        if any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
            raise UnsafeRunPath(f"run {rid!r}: not a path inside the runs folders")
        root = self.roots[int(head)]
        path = root.joinpath(*parts).resolve()
        if not path.is_relative_to(root) or not is_run(path):
            raise RunNotFound(f"run {rid!r}: no such run")
        return Run(rid, path)
