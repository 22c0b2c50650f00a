// The run's dashboard: one snapshot from api/history, then every new line of the run's files as a Server-Sent
// Event from api/events. Nothing here writes: the page only reads.
"use strict";

const mamo = window.mamo = { seq: 0, charts: {}, train: { step: [] }, evals: [], probes: {}, thumbnailSets: [], checkpoints: [],
  publishes: [], configChanges: [], kafka: {}, kafkaHistory: [], processHistory: [], deadLetters: { total: 0, by_reason: {}, latest: [] },
  start: null, starts: 0, state: null, lastTrain: null, lastLineAt: null, cluster: null };

const LOSS_TERMS = ["loss", "itc", "itm", "mlm", "mim", "mrm", "classify"];
const COLOURS = ["#1d2330", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];
const $ = id => document.getElementById(id);

function fmt(v, digits = 3) {
  if (v === null || v === undefined || v === "") return "–";
  if (typeof v === "string") return v;
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  return v.toFixed(digits).replace(/\.?0+$/, "") || "0";
}
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}
function duration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  s = Math.max(0, Math.round(s));
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60), sec = s % 60;
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + (d || h || m ? m + "m " : "") + sec + "s";
}
function time(iso) { return iso ? new Date(iso).toLocaleString() : "–"; }
function num(v) { return typeof v === "number" ? v : (typeof v === "string" && v !== "" && !isNaN(+v) ? +v : null); }
function cell(row, text, cls) { const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; return td; }
function fill(tbody, items, write) {
  tbody.replaceChildren();
  for (const item of items) write(tbody.insertRow(), item);
}

// ---- applying what the server sends ----

function applySnapshot(h) {
  mamo.seq = h.seq;
  $("run-dir").textContent = h.run_dir;
  mamo.train = h.train;
  mamo.evals = h.evals;
  mamo.probes = h.probes;
  mamo.thumbnailSets = h.thumbnail_sets;
  mamo.checkpoints = h.checkpoints;
  mamo.publishes = h.publishes;
  mamo.configChanges = h.config_changes || [];
  mamo.kafka = h.kafka;
  mamo.kafkaHistory = h.kafka_history;
  mamo.processHistory = h.process_history;
  mamo.deadLetters = h.dead_letters;
  mamo.start = h.start;
  mamo.starts = h.starts;
  mamo.state = h.state;
  mamo.lastTrain = h.last_train;
  mamo.trainPoints = h.train_points;
  mamo.cluster = h.cluster;
}

function clusterState() {
  return mamo.cluster || (mamo.cluster = { members: null, rounds: 0, round_seconds: { round: [], seconds: [] }, latest_rounds: [], recoveries: [] });
}

function applyEvent(e) {
  mamo.lastLineAt = e.time || mamo.lastLineAt;
  switch (e.kind) {
    case "train": {
      const t = mamo.train, n = t.step.length;
      t.step.push(e.step);
      for (const [k, v] of Object.entries(e)) {
        if (k === "kind" || k === "step" || k === "time" || num(v) === null) continue;
        if (!t[k]) t[k] = new Array(n).fill(null);
      }
      for (const k of Object.keys(t)) if (k !== "step") t[k].push(num(e[k]));
      mamo.lastTrain = e;
      mamo.trainPoints = (mamo.trainPoints || 0) + 1;
      break;
    }
    case "eval": mamo.evals.push(e); break;
    case "probe": mamo.probes[e.set] = e; if (!mamo.thumbnailSets.includes(e.set)) refreshThumbnailSets(); break;
    case "checkpoint": mamo.checkpoints.push(e); break;
    case "publish": mamo.publishes.push(e); break;
    case "config": mamo.configChanges.push(e); break;
    case "start": mamo.start = e; mamo.starts++; break;
    case "state": mamo.state = e; break;
    case "process": mamo.processHistory.push(e); break;
    case "kafka":
      mamo.kafkaHistory.push(e);
      for (const [p, v] of Object.entries(e.partitions || {})) mamo.kafka[p] = v;
      break;
    case "members": clusterState().members = e.members; break;
    case "round": {
      const c = clusterState();
      c.rounds++;
      c.round_seconds.round.push(e.round);
      c.round_seconds.seconds.push(num(e.seconds));
      c.latest_rounds.unshift(e);
      c.latest_rounds.length = Math.min(c.latest_rounds.length, 50);
      break;
    }
    case "recovery": clusterState().recoveries.push(e); break;
    case "recovered": {
      const open = clusterState().recoveries.filter(r => r.lost === e.lost && (r.seconds === undefined || r.seconds === null)).pop();
      if (open) open.seconds = e.seconds;
      break;
    }
    case "dead_letter": {
      const d = mamo.deadLetters, reason = reasonClass(e.reason || "unknown");
      d.total++;
      d.by_reason[reason] = (d.by_reason[reason] || 0) + 1;
      d.latest.unshift(e);
      d.latest.length = Math.min(d.latest.length, 20);
      break;
    }
  }
}

// The same classes as the server's (RunFiles.Reason): the text before the first colon.
function reasonClass(r) {
  const i = r.indexOf(":"), head = (i > 0 ? r.slice(0, i) : r).trim().replace(/\d+/g, "N");
  return head.length > 0 && head.length <= 64 ? head : "other";
}

async function refreshThumbnailSets() {
  const h = await (await fetch("api/history?points=2")).json();
  mamo.thumbnailSets = h.thumbnail_sets;
  scheduleRender();
}

// ---- charts ----

// TensorBoard's smoothing: an exponential moving average, debiased at the start; gaps stay gaps.
function smooth(values, weight) {
  if (weight <= 0) return values;
  let last = 0, count = 0;
  return values.map(v => {
    if (v === null || !isFinite(v)) return null;
    last = last * weight + (1 - weight) * v;
    count++;
    return last / (1 - Math.pow(weight, count));
  });
}

function chart(name, element, series, data, { log = false, xLabel = "step", time = false } = {}) {
  const el = $(element);
  const key = name + (log ? ":log" : "") + ":" + series.join(",");
  const existing = mamo.charts[name];
  if (existing && existing._key === key) { existing.setData(data); return existing; }
  if (existing) existing.destroy();
  const opts = {
    width: Math.max(300, el.clientWidth - 4), height: el.classList.contains("small") ? 190 : 290,
    scales: { x: { time }, y: log ? { distr: 3 } : {} },
    axes: [{ label: xLabel }, { values: (u, ticks) => ticks.map(v => fmt(v)), size: 60 }],
    series: [{ label: xLabel }, ...series.map((s, i) => ({ label: s, stroke: COLOURS[i % COLOURS.length], width: 1.5, spanGaps: true }))],
  };
  const u = new uPlot(opts, data, el);
  u._key = key;
  mamo.charts[name] = u;
  return u;
}

function renderCharts() {
  const t = mamo.train, weight = +$("smoothing").value, log = $("log-scale").checked;
  const terms = LOSS_TERMS.filter(k => t[k]);
  const positive = v => (log && v !== null && v <= 0) ? null : v;
  chart("loss", "loss-chart", terms.map(k => k === "loss" ? "total" : k),
    [t.step, ...terms.map(k => smooth(t[k], weight).map(positive))], { log });
  chart("throughput", "throughput-chart", ["pairs/s"], [t.step, t.pairs_per_s || t.step.map(() => null)]);
  chart("lr", "lr-chart", ["learning rate"], [t.step, t.lr || t.step.map(() => null)]);
  const preq = Object.keys(t).filter(k => k.startsWith("preq_"));
  $("prequential-section").hidden = preq.length === 0;
  if (preq.length) chart("prequential", "prequential-chart", preq, [t.step, ...preq.map(k => t[k])]);
  $("train-points").textContent = mamo.trainPoints ? `${mamo.trainPoints} logged steps` + (t.step.length < mamo.trainPoints ? `, drawn as ${t.step.length} (min/max per bucket)` : "") : "";

  const k = $("recall-k").value, sets = [...new Set(mamo.evals.filter(e => num(e.ir1) !== null).map(e => e.set))];
  const steps = [...new Set(mamo.evals.filter(e => num(e.ir1) !== null).map(e => e.step))].sort((a, b) => a - b);
  const series = [], data = [steps];
  for (const set of sets) for (const dir of ["tr", "ir"]) {
    series.push(`${set} ${dir.toUpperCase()}@${k}`);
    data.push(steps.map(s => { const e = mamo.evals.find(e => e.set === set && e.step === s); return e ? num(e[dir + k]) : null; }));
  }
  chart("recall", "recall-chart", series, data);

  const ph = mamo.processHistory.filter(p => p.time);
  const pt = ph.map(p => Date.parse(p.time) / 1000);
  chart("read", "read-chart", ["samples read/s"], [pt, rate(ph, "samples_read")], { xLabel: "time", time: true });
  chart("process", "process-chart", ["RSS MiB", "GC heap MiB"],
    [pt, ph.map(p => num(p.rss_bytes) / 1048576), ph.map(p => num(p.gc_heap_bytes) / 1048576)], { xLabel: "time", time: true });

  const c = mamo.cluster;
  $("cluster-section").hidden = !c;
  if (c) chart("rounds", "round-chart", ["seconds"], [c.round_seconds.round, c.round_seconds.seconds], { xLabel: "round" });

  const partitions = Object.keys(mamo.kafka).sort();
  $("kafka-section").hidden = partitions.length === 0;
  if (partitions.length) {
    const kh = mamo.kafkaHistory.filter(x => x.time);
    chart("lag", "lag-chart", partitions.map(p => p + " lag"),
      [kh.map(x => Date.parse(x.time) / 1000), ...partitions.map(p => kh.map(x => x.partitions && x.partitions[p] ? num(x.partitions[p].lag) : null))],
      { xLabel: "time", time: true });
  }
}

// Per-second rate of a counter between consecutive samples.
function rate(samples, key) {
  return samples.map((s, i) => {
    if (i === 0) return null;
    const p = samples[i - 1], dt = (Date.parse(s.time) - Date.parse(p.time)) / 1000;
    return dt > 0 && num(s[key]) !== null && num(p[key]) !== null ? (num(s[key]) - num(p[key])) / dt : null;
  });
}

// ---- tables and header ----

function renderHeader() {
  const s = mamo.start || {}, t = mamo.lastTrain || {}, st = mamo.state;
  $("preset").textContent = s.preset || "–";
  $("source").textContent = s.source || "–";
  $("step").textContent = t.step ?? "–";
  $("pps").textContent = fmt(num(t.pairs_per_s), 1);
  $("lr").textContent = fmt(num(t.lr));
  $("eta").textContent = num(t.eta_s) !== null ? duration(num(t.eta_s)) : "–";
  const state = st ? st.state : "unknown";
  const badge = $("state");
  badge.textContent = state + (st && st.reason ? ` (${st.reason})` : "");
  badge.className = "badge " + state;
  const end = state === "stopped" && st.time ? Date.parse(st.time) : Date.now();
  $("uptime").textContent = s.time ? duration((end - Date.parse(s.time)) / 1000) : "–";
  $("restarts").textContent = `${Math.max(0, mamo.starts - 1)} process, ${st ? st.restarts ?? 0 : 0} pipeline`;
  $("updated").textContent = mamo.lastLineAt ? "last line " + duration((Date.now() - Date.parse(mamo.lastLineAt)) / 1000) + " ago" : "";
}

function renderTables() {
  const latest = {};
  for (const e of mamo.evals) latest[e.set] = e;
  fill($("eval-table").tBodies[0], Object.values(latest), (r, e) => {
    cell(r, e.set); cell(r, e.step, "num");
    for (const k of ["tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "r_mean", "chance"]) cell(r, fmt(num(e[k]), 1), "num");
    cell(r, num(e.accuracy) !== null ? (100 * num(e.accuracy)).toFixed(1) + "%" : "–", "num");
  });

  const probeSets = Object.values(mamo.probes);
  if (probeSets.length) {
    const box = $("probes");
    box.replaceChildren();
    $("probe-step").textContent = "at step " + probeSets.map(p => `${p.step} (${p.set})`).join(", ");
    for (const p of probeSets) {
      const setIndex = mamo.thumbnailSets.indexOf(p.set);
      for (const probe of p.probes) {
        const row = document.createElement("div");
        row.className = "probe";
        const caption = document.createElement("span");
        caption.className = "caption";
        caption.textContent = `“${probe.caption}” (${p.set})`;
        row.append(caption);
        for (const hit of probe.top) {
          const img = document.createElement("img");
          img.alt = hit.id;
          img.title = `${hit.id} score ${fmt(hit.score)}`;
          if (setIndex >= 0) img.src = `api/thumbnail/${setIndex}/${hit.image}`;
          if (hit.image === probe.truth) img.className = "truth";
          row.append(img);
        }
        box.append(row);
      }
    }
  }

  const d = mamo.deadLetters;
  $("dead-letter-total").textContent = `(${d.total})`;
  fill($("dead-letter-reasons").tBodies[0], Object.entries(d.by_reason).sort((a, b) => b[1] - a[1]), (r, [reason, n]) => { cell(r, reason); cell(r, n, "num"); });
  fill($("dead-letters").tBodies[0], d.latest, (r, e) => { cell(r, time(e.time)); cell(r, e.reason); cell(r, e.location); });

  fill($("kafka-table").tBodies[0], Object.keys(mamo.kafka).sort(), (r, p) => {
    const k = mamo.kafka[p];
    cell(r, p); cell(r, k.position ?? "–", "num"); cell(r, k.end ?? "–", "num"); cell(r, k.lag ?? "–", "num"); cell(r, k.committed ?? "–", "num");
  });
  const c = mamo.cluster;
  if (c) {
    $("cluster-rounds").textContent = `(${c.rounds} rounds)`;
    fill($("cluster-members").tBodies[0], c.members || [], (r, m) => { cell(r, m.name); cell(r, m.address); cell(r, (m.roles || []).join(", ")); cell(r, m.status); });
    fill($("cluster-recoveries").tBodies[0], c.recoveries.slice(-20).reverse(), (r, x) => {
      cell(r, x.lost); cell(r, x.address); cell(r, time(x.time)); cell(r, num(x.seconds) !== null ? fmt(num(x.seconds), 1) + " s" : "recovering", "num");
    });
    fill($("cluster-latest").tBodies[0], c.latest_rounds.slice(0, 10), (r, x) => {
      cell(r, x.round, "num"); cell(r, time(x.time)); cell(r, (x.participants || []).join(", ")); cell(r, fmt(num(x.seconds), 2), "num");
    });
  }
  fill($("checkpoints").tBodies[0], mamo.checkpoints.slice(-50).reverse(), (r, c) => {
    cell(r, c.step, "num"); cell(r, time(c.time)); cell(r, bytes(num(c.bytes)), "num");
    cell(r, Object.entries(c.offsets || {}).map(([p, o]) => `${p}@${o}`).join(" ") || "–");
  });
  const step = mamo.lastTrain ? mamo.lastTrain.step : null;
  fill($("embeddings").tBodies[0], mamo.publishes.slice(-50).reverse(), (r, p) => {
    cell(r, p.version); cell(r, time(p.time)); cell(r, p.records, "num"); cell(r, step !== null ? Math.max(0, step - p.step) : "–", "num"); cell(r, p.output || "");
  });
  $("config-section").hidden = mamo.configChanges.length === 0;
  fill($("config-changes").tBodies[0], mamo.configChanges.flatMap(e => (e.changes || []).map(c => ({ ...c, time: e.time }))).slice(-50).reverse(), (r, c) => {
    cell(r, time(c.time)); cell(r, c.key); cell(r, c.was ?? "unset"); cell(r, c.now ?? "unset");
  });
  const proc = mamo.processHistory[mamo.processHistory.length - 1];
  $("process").replaceChildren(...(proc ? [
    ["RSS", bytes(num(proc.rss_bytes))], ["CPU", duration(num(proc.cpu_s))], ["GC heap", bytes(num(proc.gc_heap_bytes))],
    ["GC collections (gen 0/1/2)", (proc.gc || []).join(" / ")], ["threads", proc.threads ?? "–"],
  ] : []).map(([label, value]) => { const div = document.createElement("div"); div.innerHTML = `<span class="label"></span><span></span>`; div.children[0].textContent = label; div.children[1].textContent = value; return div; }));
}

let pending = false;
function scheduleRender() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => { pending = false; renderHeader(); renderTables(); renderCharts(); });
}

async function main() {
  applySnapshot(await (await fetch("api/history")).json());
  scheduleRender();
  for (const id of ["smoothing", "log-scale", "recall-k"]) $(id).addEventListener("input", () => {
    $("smoothing-value").textContent = (+$("smoothing").value).toFixed(2);
    scheduleRender();
  });
  const events = new EventSource("api/events?after=" + mamo.seq);
  events.onmessage = m => {
    const seq = +m.lastEventId;
    if (seq && seq <= mamo.seq) return;
    mamo.seq = seq || mamo.seq;
    applyEvent(JSON.parse(m.data));
    scheduleRender();
  };
  setInterval(renderHeader, 1000);   // uptime and "last line" age move without events
  window.addEventListener("resize", () => { for (const c of Object.values(mamo.charts)) c.destroy(); mamo.charts = {}; scheduleRender(); });
}

main();
