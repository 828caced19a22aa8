"""A bounded CPU load test: concurrent streaming clients for a fixed time, every answer whole."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from llamaforge.serve.launch import build
from tests.serve_helpers import LiveServer, client, make_adapter, make_base, serve_args

openai = pytest.importorskip("openai")

SECONDS = 3.0
CLIENTS = 8


def test_concurrent_streaming_load(tmp_path, caplog, capsys):
    base = make_base(tmp_path / "base")
    make_adapter(tmp_path / "a1", seed=1)
    make_adapter(tmp_path / "a2", seed=2, r=8)
    args = serve_args(
        base,
        "--adapter",
        f"a1={tmp_path / 'a1'}",
        "--adapter",
        f"a2={tmp_path / 'a2'}",
        "--max-batch",
        "6",
        "--prefill-chunk",
        "16",
    )
    app, engine, _ = build(args)
    models = ["base", "a1", "a2"]
    results: list[dict] = []
    problems: list[str] = []
    lock = threading.Lock()
    caplog.set_level(logging.WARNING, logger="llamaforge")

    def worker(k: int, api, stop_at: float) -> None:
        i = 0
        while time.monotonic() < stop_at:
            model = models[(k + i) % 3]
            t0 = time.perf_counter()
            first = None
            tokens = 0
            finish = usage = None
            try:
                stream = api.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": f"Count to {k + i}."}],
                    max_tokens=16,
                    temperature=0.7,
                    seed=k * 1000 + i,
                    logprobs=True,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for c in chunk.choices:
                        if c.logprobs and c.logprobs.content:
                            first = first or time.perf_counter()
                            tokens += len(c.logprobs.content)
                        finish = c.finish_reason or finish
            except openai.APIError as e:
                with lock:
                    problems.append(f"{model}: {e}")
                return
            done = time.perf_counter()
            whole = usage is not None and usage.completion_tokens == tokens and finish
            with lock:
                if not whole:
                    problems.append(f"{model}: {tokens} tokens, usage {usage}, finish {finish}")
                results.append(
                    {"latency": done - t0, "ttft": (first or done) - t0, "tokens": tokens}
                )
            i += 1

    with LiveServer(app) as live:
        apis = [client(live.url, key="unused") for _ in range(CLIENTS)]
        start = time.monotonic()
        stop_at = start + SECONDS
        threads = [
            threading.Thread(target=worker, args=(k, apis[k], stop_at)) for k in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        elapsed = time.monotonic() - start
    assert not problems, problems[:3]
    assert engine.finished["error"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(results) >= CLIENTS
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    toks = sum(r["tokens"] for r in results)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    with capsys.disabled():
        print(
            f"\nserve load ({CLIENTS} streaming clients, {SECONDS:.0f} s, tiny model, CPU): "
            f"{len(results)} requests, {toks} tokens, {toks / elapsed:.0f} tok/s, latency p50 "
            f"{pct(lat, 0.5) * 1e3:.0f} ms p99 {pct(lat, 0.99) * 1e3:.0f} ms, TTFT p99 "
            f"{pct(ttft, 0.99) * 1e3:.0f} ms"
        )
