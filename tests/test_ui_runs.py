"""The web page's server side: run discovery, status, incremental metrics, path safety."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from llamaforge.cli import build_parser, main
from llamaforge.train.metrics import MetricsLogger
from llamaforge.ui import runs as runs_mod
from llamaforge.ui.app import create_ui_app
from llamaforge.ui.launch import build_ui
from llamaforge.ui.runs import RunIndex, RunNotFound, Tally, read_from, run_status
from tests.serve_helpers import LiveServer


def fake_run(d: Path, records: list[dict], *, finished: bool = False, stage: str = "sft") -> Path:
    """A run folder as `llamaforge train` lays it out (config, metrics, eval.json at the end)."""
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"model: tiny\nstage: {stage}\nmethod: lora\nmax_steps: 9\n")
    logger = MetricsLogger(d, tensorboard=False)
    for r in records:
        logger.log(r)
    logger.close()
    if finished:
        (d / "eval.json").write_text(json.dumps({"after": {"rouge_l": 0.5}, "samples_after": {}}))
    return d


def train(step: int, loss: float) -> dict:
    return {"step": step, "kind": "train", "loss": loss, "lr": 0.01}


def test_status_comes_from_what_the_run_wrote():
    steps = [train(1, 2.0), train(2, 1.5)]
    assert run_status(steps, finished=False) == ("running", None)
    assert run_status(steps, finished=True) == ("finished", None)
    stop = {"step": 2, "kind": "event", "event": "signal", "signal": 2}
    assert run_status([*steps, stop], finished=False) == ("stopped", "signal 2")
    # resumed after the stop: training again
    assert run_status([*steps, stop, train(3, 1.2)], finished=False)[0] == "running"
    fail = {"step": 2, "kind": "event", "event": "failed", "error": "NonFiniteLossError: x"}
    assert run_status([*steps, fail], finished=False) == ("failed", "NonFiniteLossError: x")
    early = {"step": 2, "kind": "event", "event": "early_stop"}
    assert run_status([*steps, early], finished=True) == ("finished", "early stop")


def test_read_from_returns_whole_new_lines_and_resets_when_trimmed(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(train(1, 2.0)) + "\n" + '{"step": 2, "kind": "tr')  # torn line
    recs, off, reset = read_from(path, 0)
    assert [r["step"] for r in recs] == [1] and not reset
    assert off == len(json.dumps(train(1, 2.0))) + 1
    with open(path, "a") as f:
        f.write('ain", "loss": NaN}\n')
    recs, off2, _ = read_from(path, off)
    assert recs == [{"step": 2, "kind": "train", "loss": None}]  # NaN is not JSON
    assert off2 == path.stat().st_size and read_from(path, off2)[0] == []
    path.write_text(json.dumps(train(1, 3.0)) + "\n")  # a resumed run trimmed the file
    recs, _, reset = read_from(path, off2)
    assert reset and [r["loss"] for r in recs] == [3.0]


def test_tally_reads_only_new_lines_and_notices_a_rewrite(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(train(i, 10.0 - i)) + "\n" for i in range(1, 6)]
    path.write_text("".join(lines[:3]))
    t = Tally().update(path)
    assert (t.step, t.loss, t.offset) == (3, 7.0, path.stat().st_size)
    with open(path, "a") as f:
        f.write(lines[3])
    t2 = t.update(path)
    assert t2 is t and (t.step, t.loss) == (4, 6.0)
    # a resumed run rewrote the file from step 2, then logged past the old offset again
    redo = [json.dumps({**train(i, 100.0 + i), "lr": 0.02}) + "\n" for i in range(3, 9)]
    path.write_text(lines[0] + lines[1] + "".join(redo))
    assert path.stat().st_size > t.offset
    t3 = t.update(path)
    assert t3 is not t and (t3.step, t3.loss) == (8, 108.0)
    assert run_status([train(1, 1.0)], finished=False) == t3.state(False)


def test_index_finds_runs_and_refuses_paths_outside(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    fake_run(root / "a", [train(1, 2.0)], finished=True)
    fake_run(root / "group" / "b", [train(1, 2.0), train(2, 1.0)])
    (root / "a" / "checkpoints").mkdir()
    fake_run(tmp_path / "outside", [train(1, 9.0)])
    (root / "link").symlink_to(tmp_path / "outside")
    index = RunIndex([root])
    runs = {r["id"]: r for r in index.summaries()}
    assert runs == {r["id"]: r for r in index.summaries()}  # a second poll reads nothing new
    assert runs == {r.rid: r.summary() for r in index.find()}
    assert set(runs) == {"0/a", "0/group/b"}  # symlinks are not followed
    assert runs["0/a"]["status"] == "finished" and runs["0/group/b"]["step"] == 2
    assert runs["0/group/b"]["loss"] == 1.0 and runs["0/group/b"]["max_steps"] == 9
    for bad in ["0/../outside", "0/link", "0/group/../../outside", "1/a", "x/a", "0//a", "0/."]:
        with pytest.raises(RunNotFound):
            index.get(bad)
    assert index.get("0/group/b").path == (root / "group" / "b").resolve()
    read = runs_mod._read

    def failing(path, *a):
        if path.parent.name == "a":  # e.g. removed between the listing and the read
            raise PermissionError(13, "Permission denied", str(path))
        return read(path, *a)

    monkeypatch.setattr(runs_mod, "_read", failing)
    runs = {r["id"]: r for r in index.summaries()}  # that run says so, the others still show
    assert runs["0/a"]["status"] == "unreadable" and runs["0/group/b"]["status"] == "running"


def _raw_get(port: int, target: str) -> tuple[int, bytes]:
    """GET exactly `target` (no client-side normalisation of ../)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]


def test_http_routes_refuse_dot_dot_and_only_read(tmp_path):
    root = tmp_path / "runs"
    fake_run(root / "a", [train(1, 2.0), train(2, 1.5)])
    secret = fake_run(tmp_path / "secret", [train(1, 123.0)])
    app = create_ui_app(RunIndex([root]))
    for route in app.routes:  # nothing the page calls can write
        assert getattr(route, "methods", {"GET"}) <= {"GET", "HEAD"}, route
    with LiveServer(app) as live:
        status, body = _raw_get(live.port, "/ui/api/metrics/0/a?offset=0")
        assert status == 200 and [r["loss"] for r in json.loads(body)["records"]] == [2.0, 1.5]
        for target in [
            "/ui/api/metrics/0/../secret",
            "/ui/api/metrics/0/%2e%2e/secret",
            "/ui/api/runs/0/a/../../secret",
            "/ui/api/runs/0/..%2f..%2fsecret",
            f"/ui/api/runs/0/{secret}",
            "/ui/static/../app.py",
            "/ui/static/..%2fapp.py",
        ]:
            status, body = _raw_get(live.port, target)
            assert status == (400 if "/api/" in target else 404), (target, status)
            assert b"123.0" not in body and b"import" not in body, target
    assert sorted(p.name for p in (root / "a").iterdir()) == ["config.yaml", "metrics.jsonl"]


def test_api_key_guards_run_data_but_not_the_page(tmp_path):
    fake_run(tmp_path / "a", [train(1, 2.0)])
    client = TestClient(create_ui_app(RunIndex([tmp_path]), api_key="sk-ui"))
    assert client.get("/").status_code == 200
    assert "script-src 'self'" in client.get("/").headers["content-security-policy"]
    assert client.get("/ui/api/info").json()["auth"] is True
    assert client.get("/ui/api/runs").status_code == 401
    ok = client.get("/ui/api/runs", headers={"Authorization": "Bearer sk-ui"})
    assert [r["id"] for r in ok.json()["runs"]] == ["0/a"]


def test_run_details_pair_samples_before_and_after(tmp_path):
    d = fake_run(tmp_path / "a", [train(1, 2.0)], finished=True)
    before = {"scores": {"rouge_l": 0.1}, "samples": [{"reference": "r1", "prediction": "p0"}]}
    (d / "eval_before.json").write_text(json.dumps(before))
    after = {"scores": {"rouge_l": 0.5}, "samples": [{"reference": "r1", "prediction": "p1"}]}
    (d / "eval.json").write_text(json.dumps({"after": after["scores"], "samples_after": after}))
    got = TestClient(create_ui_app(RunIndex([tmp_path]))).get("/ui/api/runs/0/a").json()
    assert got["samples"] == [{"reference": "r1", "before": "p0", "after": "p1"}]
    assert got["before"] == {"rouge_l": 0.1} and got["after"] == {"rouge_l": 0.5}
    assert got["config_text"].startswith("model: tiny") and got["status"] == "finished"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["ui", str(tmp_path / "nope")]) == 2
    assert "RUNS_DIR" in capsys.readouterr().err
    assert main(["ui", str(tmp_path), "--adapter", f"x={tmp_path}"]) == 2
    assert "--adapter needs --model" in capsys.readouterr().err
    app, engine, model_id = build_ui(build_parser().parse_args(["ui", str(tmp_path)]))
    assert engine is None and model_id is None
    assert TestClient(app).get("/ui/api/info").json()["chat"] is False
    shutil.rmtree(tmp_path)
