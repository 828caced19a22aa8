"""`llamaforge serve` as its own process, and the real SmolLM2-135M behind the API."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from llamaforge.adapters import add_adapter, lora_modules
from llamaforge.io.peft import save_peft_adapter
from llamaforge.model.generate import SamplingParams, generate
from tests.serve_helpers import KEY, LiveServer, client, make_adapter, make_base

openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_process_answers_and_stops(tmp_path):
    base = make_base(tmp_path / "base")
    make_adapter(tmp_path / "one", seed=1)
    port = free_port()
    env = {**os.environ, "LLAMAFORGE_API_KEY": KEY}
    argv = [
        sys.executable,
        "-m",
        "llamaforge.cli",
        "serve",
        str(base),
        "--port",
        str(port),
        "--adapter",
        f"one={tmp_path / 'one'}",
        "--template",
        "chatml",
        "--max-len",
        "64",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.1)
        api = client(url)
        assert [m.id for m in api.models.list().data] == ["base", "one"]
        got = api.chat.completions.create(
            model="one", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
        )
        assert got.choices[0].finish_reason in ("stop", "length")
        assert 1 <= got.usage.completion_tokens <= 5
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
    finally:
        proc.terminate()
        proc.wait(30)
    err = proc.stderr.read()
    assert f"http://127.0.0.1:{port}/v1" in err and "Traceback" not in err


@pytest.mark.real
def test_real_smollm2_two_adapters_equal_one_at_a_time(smol_path, tmp_path):
    """SmolLM2-135M with two r8 adapters on all projections behind the API: greedy chat
    equals generate() with each adapter switched on alone; the adapters change the answer."""
    from llamaforge.adapters import set_adapter
    from llamaforge.data.templates import render_conversation
    from llamaforge.io.load import load_model
    from llamaforge.serve.launch import build
    from tests.serve_helpers import serve_args

    model, tok = load_model(smol_path, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    for name in ("left", "right"):
        add_adapter(model, name, r=8, alpha=16)
        with torch.no_grad():
            for _, m in lora_modules(model):
                m.lora_B[name].copy_(torch.randn(m.lora_B[name].shape, generator=g) * 0.02)
        save_peft_adapter(model, tmp_path / name, adapter_name=name)
    args = serve_args(
        smol_path,
        "--adapter",
        f"left={tmp_path / 'left'}",
        "--adapter",
        f"right={tmp_path / 'right'}",
        "--template",
        "auto",
    )
    app, _, model_id = build(args)
    question = [{"role": "user", "content": "Name three rivers in Europe."}]
    ids, _ = render_conversation(tok, question, "auto", add_generation_prompt=True)
    params = SamplingParams(max_new_tokens=24, stop_ids=sorted(tok.stop_ids))
    answers = {}
    with LiveServer(app) as live:
        api = client(live.url)
        for name in (model_id, "left", "right"):
            got = api.chat.completions.create(
                model=name, messages=question, max_tokens=24, temperature=0
            )
            set_adapter(model, None if name == model_id else name)
            want = tok.decode(generate(model, [ids], params)[0])
            assert got.choices[0].message.content == want
            assert got.usage.prompt_tokens == len(ids)
            answers[name] = want
    assert len(set(answers.values())) == 3
    assert "river" in answers[model_id].lower() or "Rhine" in answers[model_id]
