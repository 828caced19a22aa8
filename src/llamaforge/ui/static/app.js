// The llamaforge page: runs dashboard (live by polling), run curves, chat over the OpenAI API.
// Every text from the server goes into the page through textContent, never as HTML.
"use strict";

const POLL_MS = 1000;
const CHARTS = [
  { title: "Loss", series: [["train", "loss", "train loss"], ["eval", "val_loss", "val loss"]] },
  { title: "Validation loss", series: [["eval", "val_loss", "val loss"]] },
  { title: "Learning rate", series: [["train", "lr", "lr"]] },
  { title: "Tokens / s", series: [["train", "tokens_per_s", "trained tokens/s"],
                                  ["train", "input_tokens_per_s", "input tokens/s"],
                                  ["train", "generation_tokens_per_s", "generated tokens/s"],
                                  ["train", "training_tokens_per_s", "trained tokens/s"]] },
  { title: "Reward", series: [["train", "reward_mean", "reward mean"],
                              ["train", "shaped_reward_mean", "reward - KL penalty"]] },
  { title: "Reward accuracy", series: [["train", "accuracy", "train accuracy"],
                                       ["eval", "val_accuracy", "val accuracy"]] },
  { title: "Reward margin", series: [["train", "margin", "train margin"],
                                     ["eval", "val_margin", "val margin"]] },
  { title: "Rewards", series: [["train", "reward_chosen", "chosen"],
                               ["train", "reward_rejected", "rejected"],
                               ["eval", "val_reward_chosen", "val chosen"],
                               ["eval", "val_reward_rejected", "val rejected"]] },
  { title: "KL", series: [["train", "kl", "kl"], ["eval", "val_kl", "val kl"]] },
  { title: "Entropy", series: [["train", "entropy", "entropy"]] },
  { title: "Log-probs", series: [["train", "logp_chosen", "chosen"],
                                 ["train", "logp_rejected", "rejected"]] },
  { title: "Validation perplexity", series: [["eval", "val_ppl", "val ppl"]] },
  { title: "Gradient norm", series: [["train", "grad_norm", "grad norm"]] },
];

const DASHES = ["", "6 3", "2 3", "8 3 2 3"];
const state = { info: null, view: null, timers: [], selected: new Set(), chat: null };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function apiKey() { return sessionStorage.getItem("llamaforge-key") || ""; }

function headers(extra) {
  const h = { ...(extra || {}) };
  if (apiKey()) h.Authorization = `Bearer ${apiKey()}`;
  return h;
}

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// The message of an error body in OpenAI's shape, else the status text.
async function errorOf(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON */ }
  return new HttpError(resp.status, message);
}

async function getJSON(path) {
  const resp = await fetch(path, { headers: headers(), cache: "no-store" });
  if (!resp.ok) throw await errorOf(resp);
  return resp.json();
}

function runPath(id) { return id.split("/").map(encodeURIComponent).join("/"); }

function every(ms, fn) {
  const tick = async () => {
    try { await fn(); } catch (e) { showBanner(e); }
  };
  state.timers.push(setInterval(tick, ms));
}

function stopTimers() {
  state.timers.forEach(clearInterval);
  state.timers = [];
}

function showBanner(err) {
  const b = document.getElementById("banner");
  if (!err) { b.hidden = true; return; }
  b.textContent = err.status === 401
    ? "The server wants an API key: enter it at the top right."
    : `Error: ${err.message}`;
  b.hidden = false;
}

function fmt(v) { return window.formatNumber(v); }

function ago(seconds) {
  if (typeof seconds !== "number") return "";
  const d = Math.max(0, Date.now() / 1000 - seconds);
  if (d < 90) return `${Math.round(d)} s ago`;
  if (d < 5400) return `${Math.round(d / 60)} min ago`;
  if (d < 129600) return `${Math.round(d / 3600)} h ago`;
  return `${Math.round(d / 86400)} d ago`;
}

function scoresText(before, after) {
  const keys = [...new Set([...Object.keys(before || {}), ...Object.keys(after || {})])];
  return keys.map((k) => {
    const b = before && k in before ? fmt(before[k]) : "–";
    const a = after && k in after ? fmt(after[k]) : "–";
    return `${k} ${b} → ${a}`;
  }).join("; ");
}

function badge(run) {
  return el("span", { class: `badge status-${run.status}`, title: run.detail || null,
                      text: run.status });
}

// ------------------------------------------------------------------ runs dashboard

function renderDashboard(view) {
  const compare = el("button", { id: "compare", type: "button", disabled: true,
                                 text: "Compare selected" });
  compare.addEventListener("click", () => {
    location.hash = `#/runs/${[...state.selected].map(encodeURIComponent).join(",")}`;
  });
  const count = el("span", { class: "muted", id: "runs-count" });
  const body = el("tbody");
  const head = el("tr", {}, el("th"), ...["run", "status", "stage", "method", "model", "steps",
    "last loss", "val loss", "eval before → after", "updated"].map((t) => el("th", { text: t })));
  const table = el("table", { id: "runs-table" }, el("thead", {}, head), body);
  view.append(el("div", { class: "toolbar" }, compare, count), table);

  const refresh = async () => {
    const { runs } = await getJSON("/ui/api/runs");
    showBanner(null);
    const roots = (state.info.roots || []).join(", ") || "no folder given";
    count.textContent = `${runs.length} run${runs.length === 1 ? "" : "s"} in ${roots}`;
    const ids = new Set(runs.map((r) => r.id));
    for (const id of [...state.selected]) if (!ids.has(id)) state.selected.delete(id);
    body.replaceChildren(...runs.map((r) => runRow(r, compare)));
    if (!runs.length) {
      body.append(el("tr", {}, el("td", { colspan: 11, class: "muted",
        text: "No runs yet: a run is a folder with config.yaml and metrics.jsonl." })));
    }
    compare.disabled = state.selected.size < 1;
  };
  refresh().catch(showBanner);
  every(2 * POLL_MS, refresh);
}

function runRow(r, compare) {
  const box = el("input", { type: "checkbox", "aria-label": `select ${r.name}` });
  box.checked = state.selected.has(r.id);
  box.addEventListener("change", () => {
    if (box.checked) state.selected.add(r.id); else state.selected.delete(r.id);
    compare.disabled = state.selected.size < 1;
  });
  const link = el("a", { href: `#/runs/${encodeURIComponent(r.id)}`, text: r.name });
  const steps = r.max_steps ? `${r.step ?? 0} / ${r.max_steps}` : `${r.step ?? 0}`;
  return el("tr", { "data-run-id": r.id },
    el("td", {}, box),
    el("td", { class: "name" }, link),
    el("td", { class: "status" }, badge(r)),
    el("td", { class: "stage", text: r.stage ?? "" }),
    el("td", { class: "method", text: r.method ?? "" }),
    el("td", { class: "model", text: r.model ?? "", title: r.model ?? null }),
    el("td", { class: "steps num", text: steps }),
    el("td", { class: "loss num", text: fmt(r.loss) }),
    el("td", { class: "val-loss num", text: fmt(r.val_loss) }),
    el("td", { class: "evals", text: scoresText(r.before, r.after) }),
    el("td", { class: "updated muted", text: ago(r.updated) }));
}

// ------------------------------------------------------------------ one or several runs

function seriesOf(records, kind, key) {
  const pts = [];
  for (const r of records) {
    if (r.kind === kind && key in r && typeof r.step === "number") pts.push([r.step, r[key]]);
  }
  return pts;
}

function renderRuns(view, ids) {
  const runs = ids.map((id) => ({ id, name: id, records: [], offset: 0, summary: null }));
  const title = el("h2", { id: "runs-title" });
  const grid = el("div", { class: "chart-grid" });
  const details = el("div", { id: "run-details" });
  view.append(el("p", {}, el("a", { href: "#/", text: "← all runs" })), title, grid, details);
  const slots = CHARTS.map((c) => {
    const slot = el("div", { class: "chart-slot", "data-chart": c.title, hidden: true });
    grid.append(slot);
    return { def: c, slot, chart: null };
  });

  // One run: a colour per curve. Several: a colour per run, a dash pattern per curve.
  const drawCharts = () => {
    for (const s of slots) {
      const series = [];
      runs.forEach((run, i) => {
        s.def.series.forEach(([kind, key, label], j) => {
          const points = seriesOf(run.records, kind, key);
          if (!points.length) return;
          const many = runs.length > 1;
          series.push({ label: many ? `${run.name}: ${label}` : label, points,
                        color: many ? window.PALETTE[i % window.PALETTE.length] : undefined,
                        dash: many ? DASHES[j % DASHES.length] : undefined });
        });
      });
      if (!series.length) continue;
      if (!s.chart) s.chart = new window.LineChart(s.slot, { title: s.def.title, xLabel: "step" });
      s.slot.hidden = false;
      s.chart.setSeries(series);
    }
  };

  const drawTitle = () => {
    title.replaceChildren();
    runs.forEach((run, i) => {
      if (i) title.append(el("span", { class: "muted", text: " vs " }));
      title.append(el("span", { class: "run-name", text: run.name }));
      if (run.summary) title.append(" ", badge(run.summary));
    });
  };

  const loadDetails = async () => {
    const got = await Promise.all(runs.map((r) => getJSON(`/ui/api/runs/${runPath(r.id)}`)));
    got.forEach((d, i) => { runs[i].summary = d; runs[i].name = d.name; });
    drawTitle();
    details.replaceChildren(...got.map((d) => runDetails(d, runs.length === 1)));
  };

  let polling = false;  // one read at a time: two from the same offset would add twice
  const poll = async () => {
    if (polling) return;
    polling = true;
    let changed = false;
    try {
      await Promise.all(runs.map(async (run) => {
        const m = await getJSON(`/ui/api/metrics/${runPath(run.id)}?offset=${run.offset}`);
        if (m.reset) run.records = [];
        if (m.reset || m.records.length) changed = true;
        for (const r of m.records) run.records.push(r);  // no spread: runs can be long
        run.offset = m.offset;
      }));
    } finally {
      polling = false;
    }
    if (changed) drawCharts();
    view.dataset.records = String(runs.reduce((n, r) => n + r.records.length, 0));
  };

  const refreshStatus = async () => {
    const got = await Promise.all(runs.map((r) => getJSON(`/ui/api/runs/${runPath(r.id)}`)));
    got.forEach((d, i) => { runs[i].summary = d; });
    drawTitle();
  };

  loadDetails().then(poll).catch(showBanner);
  every(POLL_MS, poll);
  every(3 * POLL_MS, refreshStatus);
}

function runDetails(d, open) {
  const facts = el("dl", { class: "facts" });
  for (const [k, v] of [["stage", d.stage], ["method", d.method], ["model", d.model],
    ["data", d.data], ["status", d.detail ? `${d.status} (${d.detail})` : d.status],
    ["steps", d.max_steps ? `${d.step ?? 0} / ${d.max_steps}` : d.step],
    ["eval before → after", scoresText(d.before, d.after) || "–"]]) {
    facts.append(el("dt", { text: k }), el("dd", { text: v ?? "–" }));
  }
  const config = el("pre", { class: "config", text: d.config_text });
  const samples = el("table", { class: "samples" },
    el("thead", {}, el("tr", {}, ...["reference", "before training", "after training"]
      .map((t) => el("th", { text: t })))),
    el("tbody", {}, ...d.samples.map((s) => el("tr", {},
      el("td", { text: s.reference ?? "" }),
      el("td", { text: s.before ?? "" }),
      el("td", { text: s.after ?? "" })))));
  return el("details", { class: "run-detail", "data-run-id": d.id, open },
    el("summary", { text: d.name }),
    facts,
    el("h3", { text: "Held-out samples" }),
    d.samples.length ? samples : el("p", { class: "muted", text: "No eval samples (yet)." }),
    el("h3", { text: "Resolved config" }),
    config);
}

// ------------------------------------------------------------------ chat

function renderChat(view) {
  if (!state.info.chat) {
    view.append(el("p", { class: "notice", id: "chat-off",
      text: "No model is loaded: start the page with `llamaforge ui RUNS_DIR --model MODEL " +
            "[--adapter NAME=DIR]` to chat." }));
    return;
  }
  const chat = state.chat || (state.chat = { history: [], controller: null });
  const model = el("select", { id: "chat-model" });
  const system = el("textarea", { id: "chat-system", rows: 3,
                                  placeholder: "System prompt (optional)" });
  const num = (id, value, min, max, step) =>
    el("input", { id, type: "number", value, min, max, step });
  const temperature = num("chat-temperature", 0.7, 0, 2, 0.05);
  const topP = num("chat-top-p", 1, 0.01, 1, 0.01);
  const maxTokens = num("chat-max-tokens", 256, 1, 100000, 1);
  const label = (text, input) => el("label", {}, el("span", { text }), input);
  const settings = el("aside", { class: "chat-settings" },
    label("Model (base or adapter)", model), label("System prompt", system),
    label("Temperature", temperature), label("Top-p", topP), label("Max tokens", maxTokens));
  const log = el("div", { id: "chat-log", "aria-live": "polite" });
  const error = el("div", { id: "chat-error", role: "alert", hidden: true });
  const input = el("textarea", { id: "chat-input", rows: 3, placeholder: "Message" });
  const send = el("button", { id: "chat-send", type: "submit", text: "Send" });
  const stop = el("button", { id: "chat-stop", type: "button", text: "Stop", disabled: true });
  const clear = el("button", { id: "chat-clear", type: "button", text: "Clear" });
  const form = el("form", { id: "chat-form" }, input,
    el("div", { class: "chat-buttons" }, send, stop, clear));
  view.append(el("div", { class: "chat" }, settings,
    el("div", { class: "chat-main" }, log, error, form)));

  const bubble = (role, text) => {
    const content = el("div", { class: "content", text });
    const node = el("div", { class: `msg msg-${role}` }, el("div", { class: "role", text: role }),
      content);
    log.append(node);
    log.scrollTop = log.scrollHeight;
    return { node, content };
  };
  chat.history.forEach((m) => bubble(m.role, m.content));

  getJSON("/v1/models").then((body) => {
    model.replaceChildren(...body.data.map((m) => el("option", { value: m.id,
      text: m.parent ? `${m.id} (adapter of ${m.parent})` : `${m.id} (base)` })));
  }).catch((e) => showError(e.message));

  function showError(message) {
    error.textContent = message;
    error.hidden = !message;
  }
  const busy = (on) => { send.disabled = on; stop.disabled = !on; };

  clear.addEventListener("click", () => {
    if (chat.controller) chat.controller.abort();
    chat.history = [];
    log.replaceChildren();
    showError("");
  });
  stop.addEventListener("click", () => { if (chat.controller) chat.controller.abort(); });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); form.requestSubmit(); }
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text || chat.controller) return;
    showError("");
    input.value = "";
    const user = bubble("user", text);
    const hist = chat.history;  // Clear swaps in a new one; a late answer goes to the old
    const messages = [...hist, { role: "user", content: text }];
    if (system.value.trim()) messages.unshift({ role: "system", content: system.value.trim() });
    const body = {
      model: model.value, messages, stream: true, stream_options: { include_usage: true },
      temperature: Number(temperature.value), top_p: Number(topP.value),
      max_tokens: Number(maxTokens.value),
    };
    chat.controller = new AbortController();
    busy(true);
    const answer = bubble("assistant", "");
    answer.node.classList.add("streaming");
    let reply = "";
    try {
      const finish = await streamChat(body, chat.controller.signal, (piece) => {
        reply += piece;
        answer.content.textContent = reply;
        log.scrollTop = log.scrollHeight;
      }, (usage, finish) => {
        const cut = finish === "length" ? ", cut at max tokens" : "";
        answer.node.append(el("div", { class: "usage muted",
          text: `${usage.completion_tokens} tokens (prompt ${usage.prompt_tokens})${cut}` }));
      });
      answer.node.dataset.finish = finish || "";
      hist.push({ role: "user", content: text }, { role: "assistant", content: reply });
    } catch (err) {
      if (err.name === "AbortError") {
        answer.node.classList.add("stopped");
        answer.node.dataset.finish = "stopped";
        answer.node.append(el("div", { class: "usage muted", text: "stopped" }));
        hist.push({ role: "user", content: text }, { role: "assistant", content: reply });
      } else {
        answer.node.remove();
        user.node.classList.add("failed");
        showError(err.status ? `${err.status}: ${err.message}` : err.message);
      }
    } finally {
      answer.node.classList.remove("streaming");
      chat.controller = null;
      busy(false);
    }
  });
}

// POST a streaming chat completion; `onText` gets each piece. Returns the finish reason.
async function streamChat(body, signal, onText, onUsage) {
  let resp;
  try {
    resp = await fetch("/v1/chat/completions", {
      method: "POST", signal, body: JSON.stringify(body),
      headers: headers({ "Content-Type": "application/json" }),
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new Error(`could not reach the server (${e.message})`);
  }
  if (!resp.ok) throw await errorOf(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", finish = null;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new HttpError(0, chunk.error.message);
        for (const c of chunk.choices || []) {
          if (c.delta && c.delta.content) onText(c.delta.content);
          if (c.finish_reason) finish = c.finish_reason;
        }
        if (chunk.usage) onUsage(chunk.usage, finish);
      }
    }
  }
  return finish;
}

// ------------------------------------------------------------------ routing

function route() {
  stopTimers();
  showBanner(null);
  const view = document.getElementById("view");
  view.replaceChildren();
  const hash = location.hash || "#/";
  document.querySelectorAll("nav a").forEach((a) => {
    a.classList.toggle("active", (a.getAttribute("href") === "#/chat") === (hash === "#/chat"));
  });
  if (hash === "#/chat") {
    view.dataset.view = "chat";
    renderChat(view);
  } else if (hash.startsWith("#/runs/")) {
    view.dataset.view = "runs";
    const ids = hash.slice(7).split(",").filter(Boolean).map(decodeURIComponent);
    renderRuns(view, ids);
  } else {
    view.dataset.view = "dashboard";
    renderDashboard(view);
  }
}

async function start() {
  state.info = await getJSON("/ui/api/info");
  const key = document.getElementById("api-key");
  key.hidden = !state.info.auth;
  key.value = apiKey();
  key.addEventListener("change", () => {
    sessionStorage.setItem("llamaforge-key", key.value.trim());
    route();
  });
  window.addEventListener("hashchange", route);
  route();
}

start().catch(showBanner);
