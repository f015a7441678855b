// dmrstream live page: polls /api/series and draws self-written SVG line charts (no library).
"use strict";

const COLORS = ["#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176", "#4db6ac", "#f06292",
                "#9575cd", "#a1887f", "#90a4ae", "#aed581"];
const SVGNS = "http://www.w3.org/2000/svg";
const state = { since: 0, points: [], info: null, interval: 2000 };
window.dmr = state;  // for people (and tests) poking at the page

function el(tag, attrs, parent) {
  const e = document.createElementNS(SVGNS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}

function fmt(v, digits) {
  if (v === null || v === undefined || !isFinite(v)) return "-";
  const a = Math.abs(v);
  if (digits !== undefined) return v.toFixed(digits);
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(1) + "k";
  if (a >= 100) return v.toFixed(0);
  if (a >= 1) return v.toFixed(1);
  return v.toFixed(3);
}

function clock(t) {
  const d = new Date(t * 1000);
  return d.toTimeString().slice(0, 8);
}

// series: {name: [[t, v], ...]}; opts: {min, max, refs: [{label, value}], step, digits}
function lineChart(svg, series, opts) {
  opts = opts || {};
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = svg.clientWidth || 600, H = svg.clientHeight || 200;
  const names = Object.keys(series).filter(n => series[n].length > 0);
  // Legend rows first (they set the bottom margin): entries wrap onto as many rows as needed.
  const legendPos = [];
  let lx = 48, rows = 1;
  names.forEach(name => {
    const last = series[name][series[name].length - 1][1];
    const text = `${name} ${fmt(last, opts.digits)}`, w = 24 + 6.5 * text.length;
    if (lx + w > W - 10 && lx > 48) { lx = 48; rows++; }
    legendPos.push([lx, rows, text]);
    lx += w;
  });
  const L = 48, R = 10, T = 10, B = 22 + 16 * rows;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  let t0 = Infinity, t1 = -Infinity, y0 = Infinity, y1 = -Infinity, n = 0;
  for (const name of names) for (const [t, v] of series[name]) {
    t0 = Math.min(t0, t); t1 = Math.max(t1, t); y0 = Math.min(y0, v); y1 = Math.max(y1, v); n++;
  }
  for (const r of opts.refs || []) { y0 = Math.min(y0, r.value); y1 = Math.max(y1, r.value); }
  svg.setAttribute("data-points", String(n));
  if (n === 0) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, svg).textContent = "waiting for data...";
    return;
  }
  if (opts.min !== undefined) y0 = Math.min(y0, opts.min);
  if (opts.max !== undefined) y1 = Math.max(y1, opts.max);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  if (opts.min !== undefined && y0 < opts.min) y0 = opts.min;
  if (opts.floor !== undefined) y0 = Math.max(y0, opts.floor);
  if (opts.ceil !== undefined) y1 = Math.min(y1, opts.ceil);
  if (t1 - t0 < 1) t0 = t1 - 1;
  const X = t => L + (t - t0) / (t1 - t0) * (W - L - R);
  const Y = v => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = y0 + (y1 - y0) * i / 4, y = Y(v);
    el("line", { x1: L, x2: W - R, y1: y, y2: y, class: "gridline" }, svg);
    el("text", { x: L - 6, y: y + 4, "text-anchor": "end" }, svg).textContent = fmt(v, opts.digits);
  }
  for (let i = 0; i <= 4; i++) {
    const t = t0 + (t1 - t0) * i / 4;
    el("text", { x: X(t), y: H - B + 14, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle" }, svg)
      .textContent = clock(t);
  }
  (opts.refs || []).forEach(r => {
    el("line", { x1: L, x2: W - R, y1: Y(r.value), y2: Y(r.value), stroke: "#8a96a3", "stroke-dasharray": "5 4" }, svg);
    el("text", { x: W - R - 4, y: Y(r.value) - 4, "text-anchor": "end" }, svg).textContent = `${r.label} ${fmt(r.value, 3)}`;
  });
  const legend = el("g", { class: "legend" }, svg);
  names.forEach((name, i) => {
    const color = COLORS[i % COLORS.length], pts = series[name];
    let d = "";
    pts.forEach(([t, v], j) => {
      const x = X(t).toFixed(1), y = Y(v).toFixed(1);
      if (j === 0) d += `M${x},${y}`;
      else if (opts.step) d += `H${x}V${y}`;
      else d += `L${x},${y}`;
    });
    el("path", { d, fill: "none", stroke: color, "stroke-width": opts.width || 2, "data-series": name }, svg);
    const [lt, lv] = pts[pts.length - 1];
    el("circle", { cx: X(lt), cy: Y(lv), r: 3, fill: color }, svg);
    const [px, row, text] = legendPos[i], py = H - B + 14 + 16 * row;
    el("rect", { x: px, y: py - 9, width: 10, height: 10, fill: color }, legend);
    el("text", { x: px + 14, y: py }, legend).textContent = text;
  });
}

function seriesOf(group, filter) {
  const out = {};
  for (const p of state.points) {
    const g = p[group] || {};
    for (const k in g) {
      if (filter && !filter(k)) continue;
      const v = g[k];
      if (v === null || !isFinite(v)) continue;
      (out[k] = out[k] || []).push([p.t, v]);
    }
  }
  return out;
}

function last(group, key) {
  for (let i = state.points.length - 1; i >= 0; i--) {
    const g = state.points[i][group] || {};
    if (g[key] !== undefined && g[key] !== null) return g[key];
  }
  return null;
}

function render() {
  const info = state.info || {};
  const ref = info.reference || {};
  const refs = Object.keys(ref).map(k => ({ label: k, value: ref[k] }));
  // Headline: AUC over time. Serving AUC keeps the newest few versions readable.
  const auc = seriesOf("auc");
  const serving = Object.keys(auc).filter(k => k.startsWith("serving v"))
    .sort((a, b) => parseInt(b.slice(9)) - parseInt(a.slice(9)));
  serving.slice(6).forEach(k => delete auc[k]);
  lineChart(document.getElementById("auc-chart"), auc, { refs, digits: 3, floor: 0, ceil: 1, width: 2.5 });
  lineChart(document.getElementById("throughput-chart"), seriesOf("throughput"), { min: 0 });
  lineChart(document.getElementById("lag-chart"), seriesOf("lag"), { min: 0 });
  lineChart(document.getElementById("version-chart"), seriesOf("version"), { step: true, digits: 0 });
  lineChart(document.getElementById("freshness-chart"), seriesOf("freshness"), { min: 0 });
  lineChart(document.getElementById("quality-chart"), seriesOf("quality"), { min: 0, digits: 3 });

  const set = (id, v) => { document.getElementById(id).textContent = v; };
  set("tile-auc", fmt(last("auc", "trainer (window)"), 4));
  set("tile-auc-cum", fmt(last("auc", "trainer (cumulative)"), 4));
  set("tile-serving", serving.length ? fmt(last("auc", serving[0]), 4) + " (" + serving[0].slice(8) + ")" : "-");
  const v = last("version", "scorer") !== null ? last("version", "scorer") : last("version", "trainer");
  set("tile-version", v === null ? "-" : "v" + v);
  set("tile-sps", fmt(last("throughput", "trainer samples")));
  const lp = state.points[state.points.length - 1] || {};
  let eps = null;
  for (const k in (lp.throughput || {})) if (k.startsWith("in ")) eps = (eps || 0) + lp.throughput[k];
  set("tile-eps", fmt(eps));
  const fr = last("freshness", "scorer") !== null ? last("freshness", "scorer") : last("freshness", "latest published");
  set("tile-fresh", fr === null ? "-" : fmt(fr) + " s");
  let lag = null;
  for (const k in (lp.lag || {})) lag = (lag || 0) + lp.lag[k];
  set("tile-lag", fmt(lag));

  const targets = document.getElementById("targets");
  targets.innerHTML = "";
  for (const t of info.targets || []) {
    const s = document.createElement("span");
    s.className = t.up ? "up" : "down";
    s.textContent = t.name + (t.up ? " up" : " down");
    s.title = t.url;
    targets.appendChild(s);
  }
  const tbody = document.querySelector("#versions tbody");
  tbody.innerHTML = "";
  for (const m of (info.versions || []).slice(-10).reverse()) {
    const tr = document.createElement("tr");
    for (const c of ["v" + m.version, m.kind, fmt(m.samples_seen), fmt(m.auc_window, 4),
                     clock(m.created_at / 1000)]) {
      const td = document.createElement("td"); td.textContent = c; tr.appendChild(td);
    }
    tbody.appendChild(tr);
  }
  set("updated", state.points.length ? "updated " + clock(lp.t) : "");
}

async function poll() {
  try {
    const r = await fetch("/api/series?since=" + state.since, { cache: "no-store" });
    const data = await r.json();
    state.info = data;
    state.interval = Math.max(500, (data.interval_s || 2) * 1000);
    for (const p of data.points) state.points.push(p);
    if (state.points.length > 3600) state.points.splice(0, state.points.length - 3600);
    if (data.points.length) state.since = data.points[data.points.length - 1].t;
    render();
  } catch (e) {
    document.getElementById("updated").textContent = "page server unreachable: " + e;
  }
  setTimeout(poll, state.interval);
}

window.addEventListener("resize", render);
poll();
