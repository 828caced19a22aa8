// Line charts in plain SVG: several series on linear axes, hover read-out, legend.
// The <svg> carries its axis domain and pixel range as data-* attributes, so what is drawn
// can be mapped back to values (the browser tests do exactly that).
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2",
                 "#db2777", "#65a30d", "#475569", "#ea580c"];

function svgEl(name, attrs) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

// Tick values covering [lo, hi] at a 1/2/5 x 10^k step, about `count` of them.
function niceTicks(lo, hi, count) {
  const span = hi - lo;
  const raw = span / Math.max(count, 1);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || 10 * mag;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) {
    ticks.push(Math.abs(t) < step * 1e-9 ? 0 : t);
  }
  return ticks;
}

function formatNumber(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(3);
  return String(Number(v.toPrecision(5)));
}

function minMax(values) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values) { if (v < lo) lo = v; if (v > hi) hi = v; }
  return [lo, hi];
}

// The domain [lo, hi] of some values, widened when flat so a line still has room.
function extent(values) {
  const [lo, hi] = minMax(values);
  if (!Number.isFinite(lo)) return [0, 1];
  if (lo === hi) { const d = Math.abs(lo) * 0.05 || 1; return [lo - d, hi + d]; }
  const pad = (hi - lo) * 0.05;
  return [lo - pad, hi + pad];
}

const MAX_DRAWN = 2000;  // more points than this are thinned per pixel column

// The points to draw: all when few, else per pixel column the first, lowest, highest and
// last (spikes stay visible); null values (gaps) are kept. The read-out uses every point.
function thin(points, sx) {
  if (points.length <= MAX_DRAWN) return points;
  const out = [];
  let col = null, bucket = [];
  const flush = () => {
    if (!bucket.length) return;
    let lo = bucket[0], hi = bucket[0];
    for (const p of bucket) { if (p[1] < lo[1]) lo = p; if (p[1] > hi[1]) hi = p; }
    const keep = new Set([bucket[0], lo, hi, bucket[bucket.length - 1]]);
    out.push(...[...keep].sort((a, b) => a[0] - b[0]));
    bucket = [];
  };
  for (const p of points) {
    if (p[1] === null || !Number.isFinite(p[1])) { flush(); out.push(p); col = null; continue; }
    const c = Math.round(sx(p[0]));
    if (c !== col) { flush(); col = c; }
    bucket.push(p);
  }
  flush();
  return out;
}

class LineChart {
  // `container` gets the chart; opts: {title, xLabel}.
  constructor(container, opts) {
    this.opts = opts || {};
    this.width = 640; this.height = 260;
    this.margin = { left: 62, right: 14, top: 12, bottom: 34 };
    this.root = document.createElement("figure");
    this.root.className = "chart";
    const caption = document.createElement("figcaption");
    caption.textContent = this.opts.title || "";
    this.box = document.createElement("div");
    this.box.className = "chart-box";
    this.svg = svgEl("svg", { viewBox: `0 0 ${this.width} ${this.height}`, role: "img" });
    this.svg.setAttribute("aria-label", this.opts.title || "chart");
    this.tip = document.createElement("div");
    this.tip.className = "chart-tip";
    this.tip.hidden = true;
    this.legend = document.createElement("div");
    this.legend.className = "chart-legend";
    this.box.append(this.svg, this.tip);
    this.root.append(caption, this.box, this.legend);
    container.append(this.root);
    this.series = [];
    this.svg.addEventListener("mousemove", (e) => this.hover(e));
    this.svg.addEventListener("mouseleave", () => this.unhover());
  }

  // series: [{label, points: [[x, y], ...], color?, dash?}]; y may be null (a gap).
  setSeries(series) {
    this.series = series.map((s, i) => ({
      ...s,
      color: s.color || PALETTE[i % PALETTE.length],
      dash: s.dash || "",
      points: s.points.filter((p) => Number.isFinite(p[0])),
    }));
    this.draw();
  }

  draw() {
    const { width: W, height: H, margin: m } = this;
    const px0 = m.left, px1 = W - m.right, py0 = H - m.bottom, py1 = m.top;
    const xs = [], ys = [];
    for (const s of this.series) {
      for (const [x, y] of s.points) {
        xs.push(x);
        if (y !== null && Number.isFinite(y)) ys.push(y);
      }
    }
    let [x0, x1] = xs.length ? minMax(xs) : [0, 1];
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    const [y0, y1] = extent(ys);
    this.scale = { x0, x1, y0, y1, px0, px1, py0, py1 };
    const sx = (x) => px0 + ((x - x0) / (x1 - x0)) * (px1 - px0);
    const sy = (y) => py0 - ((y - y0) / (y1 - y0)) * (py0 - py1);
    this.sx = sx; this.sy = sy;
    const svg = this.svg;
    svg.replaceChildren();
    Object.entries({ x0, x1, y0, y1, px0, px1, py0, py1 }).forEach(([k, v]) => {
      svg.dataset[k] = String(v);
    });
    const grid = svgEl("g", { class: "grid" });
    for (const t of niceTicks(y0, y1, 5)) {
      const y = sy(t);
      grid.append(svgEl("line", { x1: px0, x2: px1, y1: y, y2: y }));
      const label = svgEl("text", { x: px0 - 6, y: y + 4, "text-anchor": "end" });
      label.textContent = formatNumber(t);
      grid.append(label);
    }
    for (const t of niceTicks(x0, x1, 6)) {
      const x = sx(t);
      grid.append(svgEl("line", { x1: x, x2: x, y1: py0, y2: py0 + 4 }));
      const label = svgEl("text", { x, y: py0 + 18, "text-anchor": "middle" });
      label.textContent = formatNumber(t);
      grid.append(label);
    }
    const axis = svgEl("path", { class: "axis", d: `M${px0},${py1}V${py0}H${px1}` });
    const xl = svgEl("text", { class: "axis-label", x: px1, y: H - 2, "text-anchor": "end" });
    xl.textContent = this.opts.xLabel || "step";
    svg.append(grid, axis, xl);
    for (const s of this.series) {
      let d = "";
      let pen = false;
      const drawn = thin(s.points, sx);
      for (const [x, y] of drawn) {
        if (y === null || !Number.isFinite(y)) { pen = false; continue; }
        d += `${pen ? "L" : "M"}${sx(x).toFixed(2)},${sy(y).toFixed(2)}`;
        pen = true;
      }
      const path = svgEl("path", { class: "series", d, stroke: s.color });
      if (s.dash) path.setAttribute("stroke-dasharray", s.dash);
      path.dataset.label = s.label;
      path.dataset.points = String(s.points.length);  // drawn: fewer when thinned
      svg.append(path);
      const finite = s.points.filter((p) => p[1] !== null && Number.isFinite(p[1]));
      if (finite.length <= 60) {  // markers where few points would otherwise hide
        const g = svgEl("g", { class: "markers", fill: s.color });
        for (const [x, y] of finite) {
          g.append(svgEl("circle", { cx: sx(x).toFixed(2), cy: sy(y).toFixed(2), r: 2.5 }));
        }
        svg.append(g);
      }
    }
    this.guide = svgEl("line", { class: "guide", y1: py1, y2: py0, visibility: "hidden" });
    this.dots = svgEl("g", { class: "hover-dots" });
    svg.append(this.guide, this.dots);
    this.drawLegend();
  }

  drawLegend() {
    this.legend.replaceChildren();
    for (const s of this.series) {
      const item = document.createElement("span");
      item.className = "legend-item";
      const swatch = svgEl("svg", { width: 22, height: 10, viewBox: "0 0 22 10" });
      const line = svgEl("line", { x1: 1, x2: 21, y1: 5, y2: 5, stroke: s.color,
                                   "stroke-width": 2.5 });
      if (s.dash) line.setAttribute("stroke-dasharray", s.dash);
      swatch.append(line);
      const text = document.createElement("span");
      text.textContent = s.label;
      item.append(swatch, text);
      this.legend.append(item);
    }
  }

  // The point of `s` nearest to x (by step), or null.
  nearest(s, x) {
    let best = null, dist = Infinity;
    for (const p of s.points) {
      if (p[1] === null) continue;
      const dd = Math.abs(p[0] - x);
      if (dd < dist) { dist = dd; best = p; }
    }
    return best;
  }

  hover(event) {
    if (!this.scale || !this.series.length) return;
    const rect = this.svg.getBoundingClientRect();
    const vx = ((event.clientX - rect.left) / rect.width) * this.width;
    const { x0, x1, px0, px1 } = this.scale;
    const x = x0 + ((vx - px0) / (px1 - px0)) * (x1 - x0);
    let anchor = null, adist = Infinity;
    const hits = [];
    for (const s of this.series) {
      const p = this.nearest(s, x);
      if (!p) continue;
      hits.push([s, p]);
      if (Math.abs(p[0] - x) < adist) { adist = Math.abs(p[0] - x); anchor = p[0]; }
    }
    if (anchor === null) return this.unhover();
    this.dots.replaceChildren();
    this.tip.replaceChildren();
    const head = document.createElement("div");
    head.className = "tip-head";
    head.textContent = `${this.opts.xLabel || "step"} ${formatNumber(anchor)}`;
    this.tip.append(head);
    for (const [s, p] of hits) {
      const row = document.createElement("div");
      row.className = "tip-row";
      row.dataset.label = s.label;
      row.dataset.value = String(p[1]);
      const sw = document.createElement("i");
      sw.style.background = s.color;
      const t = document.createElement("span");
      const at = p[0] === anchor ? "" : ` (${this.opts.xLabel || "step"} ${p[0]})`;
      t.textContent = `${s.label}: ${formatNumber(p[1])}${at}`;
      row.append(sw, t);
      this.tip.append(row);
      this.dots.append(svgEl("circle", { cx: this.sx(p[0]), cy: this.sy(p[1]), r: 4,
                                          fill: s.color }));
    }
    const gx = this.sx(anchor);
    this.guide.setAttribute("x1", gx);
    this.guide.setAttribute("x2", gx);
    this.guide.setAttribute("visibility", "visible");
    this.tip.hidden = false;
    const frac = (gx / this.width) * rect.width;
    this.tip.style.left = frac > rect.width / 2 ? "" : `${frac + 12}px`;
    this.tip.style.right = frac > rect.width / 2 ? `${rect.width - frac + 12}px` : "";
  }

  unhover() {
    this.tip.hidden = true;
    if (this.guide) this.guide.setAttribute("visibility", "hidden");
    if (this.dots) this.dots.replaceChildren();
  }
}

window.LineChart = LineChart;
window.formatNumber = formatNumber;
window.PALETTE = PALETTE;
window.MAX_DRAWN = MAX_DRAWN;
