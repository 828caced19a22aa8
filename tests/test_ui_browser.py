"""The web page in a real browser: Debian's chromium driven by Playwright (no browser download).

Two real tiny runs (SFT and DPO through `llamaforge train`), a run still being written, and
a run folder named with HTML; the page is served by `llamaforge ui` with a tiny model and a
LoRA adapter for the chat. Screenshots go to $LLAMAFORGE_ARTIFACTS (default out/artifacts).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from llamaforge.cli import build_parser
from llamaforge.train.metrics import MetricsLogger
from llamaforge.ui.launch import build_ui
from tests.serve_helpers import LiveServer, client, make_adapter, make_base
from tests.ui_helpers import records, train_run

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),  # in CI a missing browser fails below
    reason="no chromium on PATH (scripts/setup.sh installs Debian's with apt-get)",
)
ARTIFACTS = Path(os.environ.get("LLAMAFORGE_ARTIFACTS", Path(__file__).parents[1] / "out"))
HTML_NAME = "<img src=x onerror=alert(1)>"
MAX_TOKENS = 48  # the server's cap: asking for more is refused


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(url, runs root, throttle dict, engine) of a live `llamaforge ui` with a tiny model."""
    tmp = tmp_path_factory.mktemp("ui")
    base = make_base(tmp / "base")
    adapter = make_adapter(tmp / "topic", seed=5)
    root = tmp / "runs"
    train_run(root, base, "sft-a", "sft")
    train_run(root, base, "dpo-b", "dpo")
    weird = root / HTML_NAME
    weird.mkdir()
    for f in ("config.yaml", "metrics.jsonl"):
        shutil.copy(root / "sft-a" / f, weird / f)
    live = root / "live-c"
    live.mkdir()
    shutil.copy(root / "sft-a" / "config.yaml", live / "config.yaml")
    logger = MetricsLogger(live, tensorboard=False)
    for step in (1, 2, 3):
        logger.log({"step": step, "kind": "train", "loss": 5.0 - step, "lr": 0.01, "kl": step / 8})
    big = root / "big-d"  # a long run: 20,000 logged steps
    big.mkdir()
    shutil.copy(root / "sft-a" / "config.yaml", big / "config.yaml")
    rows = ({"step": i, "kind": "train", "loss": 3 + math.sin(i / 500)} for i in range(1, 20001))
    (big / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["ui", str(root), "--model", str(base), "--adapter", f"topic={adapter}"]
    argv += ["--template", "chatml", "--max-len", "128", "--max-tokens", str(MAX_TOKENS)]
    app, engine, _ = build_ui(build_parser().parse_args(argv))
    throttle = {"s": 0.0}  # seconds per engine step: a slow model, for streaming and stop
    step = engine.step

    def slow_step():
        time.sleep(throttle["s"])
        step()

    engine.step = slow_step
    before = snapshot(tmp)
    with LiveServer(app) as server:
        yield server.url, root, throttle, logger
    logger.close()
    after = snapshot(tmp)
    after.pop(str(live / "metrics.jsonl"))  # the only file written: by the test's own logger
    before.pop(str(live / "metrics.jsonl"))
    assert after == before  # the page and the chat wrote nothing


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    """Every file under `d` with its size and modification time."""
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for f in d.rglob("*") if f.is_file()}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI must run the browser tests: scripts/setup.sh did not install chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    expected = "Failed to load resource"  # the refused requests the tests make on purpose
    pg.on(
        "console", lambda m: m.type == "error" and expected not in m.text and errors.append(m.text)
    )
    pg.on("dialog", lambda d: errors.append(f"dialog: {d.message}") or d.dismiss())
    pg.set_default_timeout(15_000)
    yield pg
    ctx.close()
    assert errors == []  # no script error or CSP refusal, and no injected alert() ran


def shot(pg, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"ui-{name}.png"), full_page=True)


PLOT = """([title, label]) => {
  const slot = document.querySelector(`.chart-slot[data-chart="${title}"]`);
  const svg = slot.querySelector(".chart-box > svg");
  const path = [...svg.querySelectorAll("path.series")].find((p) => p.dataset.label === label);
  return { scale: { ...svg.dataset }, d: path ? path.getAttribute("d") : null };
}"""


def plotted(pg, title: str, label: str) -> tuple[list[tuple[float, float]], float]:
    """The (step, value) points a chart's series draws, mapped back from its pixels, and the
    value of the 0.005 px that writing pixels with two decimals may move a point."""
    got = pg.evaluate(PLOT, [title, label])
    assert got["d"], (title, label)
    s = {k: float(v) for k, v in got["scale"].items()}
    pts = []
    for px, py in re.findall(r"[ML](-?[\d.]+),(-?[\d.]+)", got["d"]):
        x = s["x0"] + (float(px) - s["px0"]) / (s["px1"] - s["px0"]) * (s["x1"] - s["x0"])
        y = s["y0"] + (s["py0"] - float(py)) / (s["py0"] - s["py1"]) * (s["y1"] - s["y0"])
        pts.append((x, y))
    return pts, 0.0051 * (s["y1"] - s["y0"]) / (s["py0"] - s["py1"])


def assert_matches(drawn, expected):
    """Steps equal, values equal up to the chart's pixel rounding."""
    pts, tol = drawn
    assert len(pts) == len(expected) > 0
    for (x, y), (step, v) in zip(pts, expected, strict=True):
        assert round(x) == step and abs(x - step) < 1e-3
        assert abs(y - v) <= tol, (step, y, v)


def series(run: Path, kind: str, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records(run) if r["kind"] == kind and key in r]


def test_dashboard_lists_runs_and_draws_their_jsonl_values(site, page):
    url, root, _, _ = site
    page.goto(url + "/")
    page.wait_for_selector('#runs-table tr[data-run-id="0/sft-a"]')
    rows = page.locator("#runs-table tbody tr[data-run-id]")
    ids = sorted(rows.evaluate_all("rs => rs.map((r) => r.dataset.runId)"))
    assert ids == sorted(["0/sft-a", "0/dpo-b", "0/live-c", "0/big-d", f"0/{HTML_NAME}"])
    sft = page.locator('tr[data-run-id="0/sft-a"]')
    assert sft.locator(".status").text_content() == "finished"
    assert sft.locator(".stage").text_content() == "sft"
    assert sft.locator(".steps").text_content() == "4 / 4"
    last = series(root / "sft-a", "train", "loss")[-1][1]
    assert float(sft.locator(".loss").text_content()) == pytest.approx(last, rel=1e-4)
    assert "rouge_l" in sft.locator(".evals").text_content()
    assert page.locator('tr[data-run-id="0/dpo-b"] .stage').text_content() == "dpo"
    assert page.locator('tr[data-run-id="0/live-c"] .status').text_content() == "running"
    # a folder named with HTML is text, not markup
    weird = page.locator(f'tr[data-run-id="0/{HTML_NAME}"] .name a')
    assert weird.text_content() == HTML_NAME
    assert page.locator("#runs-table img").count() == 0
    shot(page, "dashboard")

    for rid in ("0/sft-a", "0/dpo-b"):
        page.locator(f'tr[data-run-id="{rid}"] input[type=checkbox]').check()
    page.click("#compare")
    page.wait_for_selector('.chart-slot[data-chart="Reward accuracy"] path.series')
    sft_dir, dpo_dir = root / "sft-a", root / "dpo-b"
    for title, label, run, kind, key in [
        ("Loss", "sft-a: train loss", sft_dir, "train", "loss"),
        ("Loss", "sft-a: val loss", sft_dir, "eval", "val_loss"),
        ("Loss", "dpo-b: train loss", dpo_dir, "train", "loss"),
        ("Learning rate", "sft-a: lr", sft_dir, "train", "lr"),
        ("Tokens / s", "dpo-b: trained tokens/s", dpo_dir, "train", "tokens_per_s"),
        ("Validation loss", "dpo-b: val loss", dpo_dir, "eval", "val_loss"),
        ("Reward accuracy", "dpo-b: train accuracy", dpo_dir, "train", "accuracy"),
        ("Rewards", "dpo-b: val chosen", dpo_dir, "eval", "val_reward_chosen"),
    ]:
        assert_matches(plotted(page, title, label), series(run, kind, key))
    assert page.locator('.chart-slot[data-chart="Reward accuracy"] path.series').count() == 2
    # hover: the read-out shows the values at the step under the pointer
    svg = page.locator('.chart-slot[data-chart="Loss"] .chart-box > svg')
    scale = svg.evaluate("s => ({ ...s.dataset })")
    box = svg.bounding_box()
    x = (float(scale["px0"]) + (float(scale["px1"]) - float(scale["px0"])) * 0.4) / 640
    page.mouse.move(box["x"] + box["width"] * x, box["y"] + box["height"] / 2)
    row = page.locator('.chart-tip .tip-row[data-label="sft-a: train loss"]')
    step = round(float(scale["x0"]) + 0.4 * (float(scale["x1"]) - float(scale["x0"])))
    assert float(row.get_attribute("data-value")) == dict(series(sft_dir, "train", "loss"))[step]
    shot(page, "runs")


def test_run_page_shows_config_and_samples(site, page):
    url, root, _, _ = site
    page.goto(url + "/#/runs/" + "0%2Fsft-a")
    detail = page.locator('.run-detail[data-run-id="0/sft-a"]')
    detail.locator("pre.config").wait_for()
    assert detail.locator("pre.config").text_content() == (root / "sft-a/config.yaml").read_text()
    final = json.loads((root / "sft-a" / "eval.json").read_text())["samples_after"]["samples"]
    cells = detail.locator("table.samples tbody tr").first.locator("td").all_text_contents()
    assert cells[0] == final[0]["reference"] and cells[2] == final[0]["prediction"]
    page.goto(url + "/#/runs/" + "0%2F" + HTML_NAME.replace("<", "%3C").replace(">", "%3E"))
    page.locator("#runs-title .run-name").wait_for()
    assert page.locator("#runs-title .run-name").text_content() == HTML_NAME
    assert page.locator("main img").count() == 0


def test_live_run_gains_a_step_without_reload(site, page):
    url, _, _, logger = site
    page.goto(url + "/#/runs/0%2Flive-c")
    page.wait_for_selector('.chart-slot[data-chart="Loss"] path.series')
    assert_matches(plotted(page, "Loss", "train loss"), [(1, 4), (2, 3), (3, 2)])
    assert_matches(plotted(page, "KL", "kl"), [(1, 0.125), (2, 0.25), (3, 0.375)])  # as PPO logs
    page.evaluate("window.__sameDocument = true")
    logger.log({"step": 4, "kind": "train", "loss": 1.25, "lr": 0.01})
    page.wait_for_function(
        """() => (document.querySelector('.chart-slot[data-chart="Loss"] path.series')
                 .getAttribute("d").match(/L/g) || []).length === 3"""
    )
    assert_matches(plotted(page, "Loss", "train loss"), [(1, 4), (2, 3), (3, 2), (4, 1.25)])
    assert page.evaluate("window.__sameDocument") is True  # no reload happened
    page.goto(url + "/#/")
    cell = page.locator('tr[data-run-id="0/live-c"] .steps')
    cell.wait_for()
    logger.log({"step": 5, "kind": "train", "loss": 1.0, "lr": 0.01})
    page.wait_for_function(
        """() => document.querySelector('tr[data-run-id="0/live-c"] .steps')
                 .textContent.startsWith("5 ")"""
    )
    assert page.evaluate("window.__sameDocument") is True


def _open_chat(pg, url: str, model: str, max_tokens: int, system: str = "") -> None:
    pg.goto(url + "/#/chat")
    pg.wait_for_selector(f'#chat-model option[value="{model}"]', state="attached")
    pg.select_option("#chat-model", model)
    pg.fill("#chat-temperature", "0")
    pg.fill("#chat-max-tokens", str(max_tokens))
    pg.fill("#chat-system", system)


WATCH = """() => {
  window.__seen = [];
  const log = document.getElementById("chat-log");
  new MutationObserver(() => {
    const m = log.querySelector(".msg-assistant.streaming .content");
    if (m && m.textContent) window.__seen.push(m.textContent);
  }).observe(log, { subtree: true, childList: true, characterData: true });
}"""


def test_chat_streams_an_answer_over_the_api_and_keeps_history(site, page):
    url, _, throttle, _ = site
    throttle["s"] = 0.05  # tokens arrive one by one, as from a real model
    try:
        _open_chat(page, url, "topic", 12, system="Answer briefly.")
        page.evaluate(WATCH)
        page.fill("#chat-input", "Hello there!")
        page.click("#chat-send")
        page.wait_for_selector(".msg-assistant[data-finish]")
        answer = page.locator(".msg-assistant .content").first.text_content()
        seen = page.evaluate("window.__seen")
        assert len(set(seen)) >= 3 and all(answer.startswith(s) for s in seen)  # streamed
        api = client(url, key="unused").chat.completions.create(
            model="topic",
            temperature=0,
            max_tokens=12,
            messages=[
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Hello there!"},
            ],
        )
        assert answer == api.choices[0].message.content  # the same greedy answer
        with page.expect_request("**/v1/chat/completions") as req:
            page.fill("#chat-input", "And then?")
            page.click("#chat-send")
        sent = json.loads(req.value.post_data)
        assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user"]
        assert sent["messages"][2]["content"] == answer and sent["model"] == "topic"
        page.wait_for_selector(".msg-assistant:nth-of-type(4)[data-finish]")
        shot(page, "chat")
    finally:
        throttle["s"] = 0.0


def test_stop_button_ends_the_stream_and_frees_the_row(site, page):
    url, _, throttle, _ = site
    throttle["s"] = 0.15
    try:
        _open_chat(page, url, "base", MAX_TOKENS)
        page.fill("#chat-input", "Tell me a long story.")
        page.click("#chat-send")
        page.wait_for_function(
            "() => (document.querySelector('.msg-assistant .content') || {}).textContent"
        )
        page.click("#chat-stop")
        page.wait_for_selector('.msg-assistant[data-finish="stopped"]')
        assert page.locator("#chat-send").is_enabled()
        assert page.locator("#chat-error").is_hidden()
        deadline = time.monotonic() + 5
        while json.load(urllib.request.urlopen(url + "/health"))["running"]:
            assert time.monotonic() < deadline, "the stopped request still holds a row"
            time.sleep(0.05)
    finally:
        throttle["s"] = 0.0


def test_refused_request_shows_the_servers_error(site, page):
    url, _, _, _ = site
    _open_chat(page, url, "base", MAX_TOKENS + 100)
    page.fill("#chat-input", "Hi")
    page.click("#chat-send")
    error = page.locator("#chat-error")
    error.wait_for()
    assert error.text_content() == f"400: max_tokens must be at most {MAX_TOKENS}"
    assert page.locator(".msg-assistant").count() == 0
    assert page.locator(".msg-user.failed").count() == 1


def test_a_server_with_a_key_asks_for_it(site, page):
    from llamaforge.ui.app import create_ui_app
    from llamaforge.ui.runs import RunIndex

    _, root, _, _ = site
    with LiveServer(create_ui_app(RunIndex([root]), api_key="sk-ui")) as keyed:
        page.goto(keyed.url + "/")
        banner = page.locator("#banner")
        banner.wait_for()
        assert "API key" in banner.text_content()
        assert page.locator("#runs-table tbody tr[data-run-id]").count() == 0
        page.fill("#api-key", "sk-ui")
        page.press("#api-key", "Enter")
        page.wait_for_selector('#runs-table tr[data-run-id="0/sft-a"]')
        assert banner.is_hidden()


THIN = """() => {
  const host = document.createElement("div");
  document.body.append(host);
  const chart = new window.LineChart(host, { title: "big" });
  const points = [];
  for (let i = 0; i < 20000; i++) points.push([i, i === 12345 ? 50 : Math.sin(i / 300)]);
  points[15000] = [15000, null];  // a gap
  chart.setSeries([{ label: "y", points }]);
  const d = host.querySelector("path.series").getAttribute("d");
  host.remove();
  return { scale: { ...chart.svg.dataset }, d };
}"""


def test_long_runs_are_thinned_per_pixel_but_keep_spikes_and_gaps(site, page):
    url, _, _, _ = site
    page.goto(url + "/")
    page.wait_for_selector("#runs-table tr[data-run-id]")
    got = page.evaluate(THIN)
    s = {k: float(v) for k, v in got["scale"].items()}
    moves = re.findall(r"([ML])(-?[\d.]+),(-?[\d.]+)", got["d"])
    assert len(moves) <= 4 * (s["px1"] - s["px0"] + 1) < 20000  # at most 4 per pixel column
    assert [m[0] for m in moves].count("M") == 2  # the gap splits the line
    top = min(float(py) for _, _, py in moves)  # the spike is drawn at its height
    assert s["y0"] + (s["py0"] - top) / (s["py0"] - s["py1"]) * (s["y1"] - s["y0"]) == (
        pytest.approx(50, abs=0.01)
    )


def test_a_long_run_loads_once_and_is_drawn_thinned(site, page):
    url, root, _, _ = site
    held = []

    def slow_first(route):  # the first read takes 2.5 s: polls fall due meanwhile
        if not held:
            held.append(route.request.url)
            time.sleep(2.5)
        route.continue_()

    page.route("**/ui/api/metrics/**", slow_first)
    page.goto(url + "/#/runs/0%2Fbig-d")
    path = page.locator('.chart-slot[data-chart="Loss"] path.series')
    path.wait_for()
    page.wait_for_timeout(1500)  # more polls: nothing was added twice
    assert path.get_attribute("data-points") == "20000"
    assert path.get_attribute("d").count("L") < 20000
    assert page.locator("#runs-title .badge").text_content() == "running"
