"""`llamaforge serve` through the real openai client on a live localhost server (tiny model)."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from llamaforge.cli import main
from llamaforge.data.templates import render_conversation
from llamaforge.serve.launch import build
from tests.serve_helpers import KEY, LiveServer, client, make_adapter, make_base, serve_args

openai = pytest.importorskip("openai")

MODELS = ("base", "alpha", "beta")  # "base" is the base folder's name below
CHAT = "Add 1 and 1."
TEXT = "The sum of"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    base = make_base(d / "base")
    root = d / "root"
    make_adapter(root / "alpha", seed=1)
    make_adapter(root / "beta", seed=2, r=8, targets=("q_proj", "k_proj", "o_proj", "up_proj"))
    make_adapter(root / "gamma", seed=3)
    make_adapter(d / "outside", seed=4)  # a valid adapter that no request may reach
    (root / "link").symlink_to(d / "outside")
    args = serve_args(
        base,
        "--adapter",
        f"alpha={root / 'alpha'}",
        "--adapter",
        f"beta={root / 'beta'}",
        "--api-key",
        KEY,
        "--adapter-root",
        str(root),
        "--enable-admin",
        "--max-loras",
        "3",
        "--max-tokens",
        "64",
    )
    app, engine, model_id = build(args)
    assert model_id == "base"
    with LiveServer(app) as live:
        yield {"url": live.url, "engine": engine, "base": base, "root": root, "dir": d}


@pytest.fixture(scope="module")
def api(setup):
    return client(setup["url"])


def cli_generate(capsys, setup, model: str, prompt: str, chat: bool, n: int = 12) -> str:
    """What `llamaforge generate` prints for this model (base or adapter), greedy."""
    root = setup["root"]
    argv = [
        "generate",
        str(setup["base"]),
        "--prompt",
        prompt,
        "--max-new-tokens",
        str(n),
        "--adapter",
        f"alpha={root / 'alpha'}",
        "--adapter",
        f"beta={root / 'beta'}",
        "--use",
        "none" if model == "base" else model,
    ]
    if chat:
        argv += ["--chat", "--template", "chatml"]
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


def chat(api, model, content=CHAT, **kw):
    kw.setdefault("max_tokens", 12)
    return api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0, **kw
    )


def test_lists_the_base_and_each_adapter(api):
    cards = {m.id: m for m in api.models.list().data}
    assert set(cards) == {"base", "alpha", "beta"}
    assert cards["alpha"].parent == "base" and cards["beta"].parent == "base"
    assert cards["base"].parent is None


@pytest.mark.parametrize("model", MODELS)
def test_greedy_chat_and_completion_equal_the_cli(api, setup, capsys, model):
    got = chat(api, model)
    assert got.choices[0].message.content == cli_generate(capsys, setup, model, CHAT, True)
    comp = api.completions.create(model=model, prompt=TEXT, max_tokens=12, temperature=0)
    assert comp.choices[0].text == cli_generate(capsys, setup, model, TEXT, False)


def test_adapters_change_the_answer(api):
    texts = {m: chat(api, m).choices[0].message.content for m in MODELS}
    assert len(set(texts.values())) == 3


def test_streaming_assembles_to_the_same_text_with_usage(api, setup):
    for model in MODELS:
        whole = chat(api, model)
        stream = chat(api, model, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        finals = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finals[-1] == whole.choices[0].finish_reason and not any(finals[:-1])
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        assert all(c.usage is None for c in chunks[:-1])
    raw = httpx.post(
        f"{setup['url']}/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "alpha", "prompt": TEXT, "max_tokens": 5, "stream": True, "temperature": 0},
        timeout=30,
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    pieces = [json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]]
    whole = api.completions.create(model="alpha", prompt=TEXT, max_tokens=5, temperature=0)
    assert "".join(pieces) == whole.choices[0].text


def test_usage_counts_and_logprobs(api, setup):
    from llamaforge.data.tokenizer import load_tokenizer

    tok = load_tokenizer(setup["base"])
    got = chat(api, "beta", max_tokens=9, logprobs=True, top_logprobs=3)
    ids, _ = render_conversation(
        tok, [{"role": "user", "content": CHAT}], "chatml", add_generation_prompt=True
    )
    u = got.usage
    assert u.prompt_tokens == len(ids)
    content = got.choices[0].logprobs.content
    assert u.completion_tokens == len(content) and u.total_tokens == len(ids) + len(content)
    assert got.choices[0].finish_reason in ("stop", "length")
    for item in content:  # greedy: the chosen token is the most likely one
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)
    comp = api.completions.create(
        model="base", prompt=TEXT, max_tokens=6, temperature=0, logprobs=2
    )
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == comp.usage.completion_tokens
    assert "".join(lp.tokens) == comp.choices[0].text and lp.text_offset[0] == 0
    assert comp.usage.prompt_tokens == len(tok.encode(TEXT, bos=tok.add_bos))


def test_n_seed_and_stop(api):
    kw = {"model": "alpha", "messages": [{"role": "user", "content": CHAT}], "max_tokens": 16}
    a = api.chat.completions.create(n=3, temperature=1.0, seed=7, **kw)
    b = api.chat.completions.create(n=3, temperature=1.0, seed=7, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert len({c.message.content for c in a.choices}) > 1  # each choice its own seed
    whole = chat(api, "alpha", max_tokens=16).choices[0].message.content
    stop = whole[4:6]
    cut = chat(api, "alpha", max_tokens=16, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.message.content
    assert whole.startswith(cut.message.content)


def solo(api, kind: str, model: str, i: int) -> str:
    """One request of the concurrency mix, alone or under load."""
    if kind == "chat":
        return (
            chat(api, model, content=f"Add {i} and {i}.", max_tokens=10).choices[0].message.content
        )
    if kind == "stream":
        s = chat(api, model, content=f"Add {i} and 1.", max_tokens=10, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in s if c.choices)
    c = api.completions.create(model=model, prompt=f"{TEXT} {i}", max_tokens=10, temperature=0)
    return c.choices[0].text


def test_32_concurrent_mixed_requests_equal_their_solo_results(api):
    jobs = [(("chat", "stream", "completion")[i % 3], MODELS[i % 3], i) for i in range(32)]
    alone = [solo(api, *j) for j in jobs]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda j: solo(api, *j), jobs))
    assert together == alone


def test_disconnect_mid_stream_frees_the_row_and_spares_others(api, setup):
    engine = setup["engine"]
    want = solo(api, "stream", "beta", 5)
    body = {
        "model": "alpha",
        "messages": [{"role": "user", "content": CHAT}],
        "stream": True,
        "max_tokens": 64,
        "temperature": 0,
    }
    other: dict[str, str] = {}
    t = threading.Thread(target=lambda: other.update(text=solo(api, "stream", "beta", 5)))
    cancelled = engine.finished["cancelled"]
    headers = {"Authorization": f"Bearer {KEY}"}

    def wait_for(cond):
        deadline = time.monotonic() + 10
        while not cond():
            assert time.monotonic() < deadline
            time.sleep(0.002)

    engine._step_lock.acquire()  # the test thread runs the engine's steps until the client goes
    try:
        with httpx.Client(timeout=30) as http:
            with http.stream(
                "POST", f"{setup['url']}/v1/chat/completions", json=body, headers=headers
            ) as resp:
                lines = (x for x in resp.iter_lines() if x)
                assert next(lines).startswith("data: ")  # the role chunk
                wait_for(lambda: engine.load["queued"] == 1)
                for _ in range(3):
                    engine.step()
                t.start()
                wait_for(lambda: engine.load["queued"] == 1)
                engine.step()  # both rows are in the batch now
                assert engine.load == {"running": 2, "queued": 0}
                assert "content" in next(lines)  # tokens have been streamed
        wait_for(lambda: any(r.cancelled for r in engine._active))
        gone = [r for r in engine._active if r.cancelled]
        assert len(gone) == 1 and gone[0].adapter == "alpha" and len(gone[0].output) < 64
        engine.step()
        assert gone[0].finish_reason == "cancelled" and engine.load["running"] == 1
    finally:
        engine._step_lock.release()
    t.join(30)
    assert other["text"] == want  # the other stream, in the same batch, is untouched
    assert engine.finished["cancelled"] == cancelled + 1
    wait_for(lambda: engine.load == {"running": 0, "queued": 0})


def test_bad_input_gets_clear_errors_and_the_server_keeps_serving(api, setup):
    url, headers = setup["url"], {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(openai.NotFoundError) as e:
        chat(api, "nope")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    for bad in ("../outside", str(setup["dir"] / "outside"), "link", "/etc/passwd", "gamma"):
        with pytest.raises(openai.NotFoundError):
            chat(api, bad)  # names only; nothing is loaded or read for a request
    assert set(setup["engine"].adapters) == {"alpha", "beta"}
    r = httpx.post(f"{url}/v1/chat/completions", headers=headers, content=b"{not json", timeout=9)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as e:
        chat(api, "base", content="x " * 400)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        chat(api, "base", max_tokens=65)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        chat(api, "base", stop=["a", "b", "c", "d", "e"])
    with pytest.raises(openai.BadRequestError):
        chat(api, "base", n=9)
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="base", messages=[], max_tokens=2)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.AuthenticationError):
        chat(client(url, key="sk-wrong"), "base")
    r = httpx.get(f"{url}/v1/models", timeout=9)
    assert r.status_code == 401
    assert "Traceback" not in r.text
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="alpha", prompt="x " * 400, max_tokens=2)
    assert e.value.body["param"] == "prompt"
    assert chat(api, "base").choices[0].message.content  # still serving


def test_admin_loads_by_name_inside_the_root_only(api, setup):
    url, headers = setup["url"], {"Authorization": f"Bearer {KEY}"}
    engine = setup["engine"]
    for bad in ("../outside", "link", str(setup["dir"] / "outside"), "a/b", "..", "missing"):
        r = httpx.post(f"{url}/v1/admin/adapters", json={"name": bad}, headers=headers, timeout=9)
        assert r.status_code == 400, bad
        assert "Traceback" not in r.text
    assert set(engine.adapters) == {"alpha", "beta"}
    r = httpx.post(f"{url}/v1/admin/adapters", json={"name": "gamma"}, timeout=9)
    assert r.status_code == 401
    r = httpx.post(f"{url}/v1/admin/adapters", json={"name": "gamma"}, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert "gamma" in {m.id for m in api.models.list().data}
    assert chat(api, "gamma").choices[0].message.content
    r = httpx.delete(f"{url}/v1/admin/adapters/gamma", headers=headers, timeout=30)
    assert r.status_code == 200 and "gamma" not in engine.adapters
    with pytest.raises(openai.NotFoundError):
        chat(api, "gamma")


def test_health_and_unknown_route(setup):
    r = httpx.get(f"{setup['url']}/health", timeout=9)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = httpx.get(f"{setup['url']}/v1/nothing", timeout=9)
    assert r.status_code == 404 and "error" in r.json()


def test_serve_cli_refuses_bad_adapters(tmp_path, setup, capsys):
    base = str(setup["base"])
    bin_only = tmp_path / "binonly"
    make_adapter(bin_only, seed=5)
    os.rename(bin_only / "adapter_model.safetensors", bin_only / "adapter_model.bin")
    cases = [
        (["--adapter", f"../x={setup['root'] / 'alpha'}"], "not allowed"),
        (["--adapter", f"ok={bin_only}"], "safetensors only"),
        (["--adapter", f"ok={setup['root'] / 'beta'}", "--max-lora-rank", "4"], "rank 8 > "),
        (["--enable-admin"], "--api-key"),
    ]
    for extra, message in cases:
        assert main(["serve", base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
