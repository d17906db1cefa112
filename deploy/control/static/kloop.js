// kloop's web UI: what changes live on the server-rendered pages (deploy/control/ui.py).
// Plain ES2020, no build step. The write token lives in localStorage and goes out as the
// Authorization header of this script's own requests, never as a cookie (no CSRF).
"use strict";

(() => {
  const TOKEN_KEY = "kloop.token";
  const RETRY_MS = 2000;
  const SERIES_POLL_MS = 5000;
  const TRAIN_LOG_POLL_MS = 2000;
  const MAX_LOG_LINES = 5000;
  const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d",
                   "#4d7c0f"];
  const RESUMABLE = ["interrupted", "failed", "cancelled"];

  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
  const enc = encodeURIComponent;
  const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

  // ---- the token and the API ---------------------------------------------------------------

  const token = () => localStorage.getItem(TOKEN_KEY) || "";

  function headers(extra = {}) {
    const h = { ...extra };
    const t = token();
    if (t) h.Authorization = `Bearer ${t}`;
    return h;
  }

  async function api(method, path, body) {
    const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
    if (body !== undefined) init.body = JSON.stringify(body);
    const resp = await fetch(path, init);
    let doc = null;
    try { doc = await resp.json(); } catch { doc = null; }
    if (!resp.ok) {
      const err = new Error((doc && doc.error) || `${resp.status} ${resp.statusText}`);
      err.status = resp.status;
      throw err;
    }
    return doc;
  }

  function say(text, kind = "info") {
    const m = $("#message");
    if (!m) return;
    m.textContent = text;
    m.dataset.kind = kind;
    m.hidden = !text;
  }

  function initToken() {
    const form = $("#token-box");
    if (!form) return;
    const input = $("#token");
    const state = $("#token-state");
    const show = () => {
      const set = Boolean(token());
      state.textContent = set ? "set" : "not set";
      state.dataset.set = String(set);
      input.value = "";
      input.placeholder = set ? "saved (paste to replace; empty to clear)" : "paste <home>/control.token";
    };
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const v = input.value.trim();
      if (v) localStorage.setItem(TOKEN_KEY, v); else localStorage.removeItem(TOKEN_KEY);
      show();
    });
    show();
  }

  // ---- Server-Sent Events over fetch (EventSource cannot send the Authorization header) -----

  async function stream(path, onEvent, signal) {
    const resp = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal });
    if (!resp.ok) {
      let msg = `${resp.status}`;
      try { msg = (await resp.json()).error || msg; } catch { /* not JSON */ }
      throw new Error(msg);
    }
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value;
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let kind = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) kind = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        onEvent(kind, data.length ? JSON.parse(data.join("\n")) : null);
      }
    }
  }

  // Watch until the stream says "end"; a dropped stream is opened again (from ``path()``,
  // which carries the offsets read so far). ``restart()`` watches again after an end.
  function keepWatching(path, onEvent) {
    let ended = false;
    let running = false;
    const loop = async () => {
      running = true;
      while (!ended) {
        try {
          await stream(path(), (kind, data) => {
            if (kind === "end") ended = true;
            onEvent(kind, data);
          });
        } catch (e) {
          console.warn("watch", path(), e);
        }
        if (!ended) await sleep(RETRY_MS);
      }
      running = false;
    };
    loop();
    return { restart() { ended = false; if (!running) loop(); }, ended: () => ended };
  }

  // ---- charts (uPlot) -----------------------------------------------------------------------

  class Chart {
    // opts: time (x is unix seconds), xLabel, wholeX (integer ticks), scaleOf(name) -> scale
    // key, stepped, yRange ([min, max] of the "y" scale), height
    constructor(el, opts = {}) {
      this.el = el;
      this.opts = opts;
      this.u = null;
      this.key = "";
      window.addEventListener("resize", () => {
        if (this.u) this.u.setSize({ width: this.width(), height: this.opts.height || 220 });
      });
    }

    width() { return Math.max(this.el.clientWidth || 0, 320); }

    // xs: numbers ascending; named: Map(name -> [y or null, ...]) aligned with xs
    update(xs, named) {
      this.el.dataset.points = String(xs.length);
      if (!window.uPlot || !xs.length) return;
      const names = [...named.keys()];
      const data = [xs, ...names.map((n) => named.get(n))];
      const key = names.join("\u0000");
      if (this.u && key === this.key) { this.u.setData(data); return; }
      if (this.u) this.u.destroy();
      this.key = key;
      this.u = new window.uPlot(this.options(names), data, this.el);
    }

    options(names) {
      const scaleOf = this.opts.scaleOf || (() => "y");
      const scales = [...new Set(names.map(scaleOf))];
      const stepped = this.opts.stepped && window.uPlot.paths && window.uPlot.paths.stepped
        ? window.uPlot.paths.stepped({ align: 1 }) : undefined;
      return {
        width: this.width(),
        height: this.opts.height || 220,
        scales: { x: { time: Boolean(this.opts.time) },
                  ...(this.opts.yRange ? { y: { range: this.opts.yRange } } : {}) },
        legend: { live: true },
        series: [
          { label: this.opts.xLabel || (this.opts.time ? "time" : "x") },
          ...names.map((n, i) => ({
            label: n, scale: scaleOf(n), stroke: PALETTE[i % PALETTE.length], width: 2,
            spanGaps: true, points: { show: true, size: 5 }, paths: stepped,
          })),
        ],
        axes: [this.opts.wholeX ? { incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] } : {}, ...scales.map((s, i) => ({ scale: s, side: i === 0 ? 3 : 1, label: s === "y" ? "" : s,
                                              grid: { show: i === 0 } }))],
      };
    }
  }

  // Points {x, name, y} to (xs, Map(name -> ys)) with nulls where a name has no point.
  function align(points, order) {
    const xs = [...new Set(points.map((p) => p.x))].sort((a, b) => a - b);
    const index = new Map(xs.map((x, i) => [x, i]));
    const names = order || [...new Set(points.map((p) => p.name))].sort();
    const named = new Map(names.map((n) => [n, xs.map(() => null)]));
    for (const p of points) if (named.has(p.name)) named.get(p.name)[index.get(p.x)] = p.y;
    return [xs, named];
  }

  // ---- small renderers (as ui.py writes them) -----------------------------------------------

  const fmtTime = (unix) => (unix ? `${new Date(unix * 1000).toISOString().replace("T", " ").slice(0, 19)}Z` : "—");

  function fmtNum(v) {
    if (v === null || v === undefined || v === "") return "—";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return String(v);
    return Number(v.toPrecision(4)).toString();
  }

  function fmtDuration(s) {
    s = s || 0;
    const r = Math.round(s);
    if (r < 10) return `${s.toFixed(1)} s`;
    if (r < 60) return `${r} s`;
    const m = Math.floor(r / 60);
    if (m < 60) return `${m} m ${String(r % 60).padStart(2, "0")} s`;
    return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} m`;
  }

  const fmtWeights = (w) => Object.entries(w || {}).sort((a, b) => Number(a[0]) - Number(b[0]))
    .map(([v, pct]) => `v${v} ${pct} %`).join(", ") || "—";

  function setText(sel, text) { const el = $(sel); if (el) el.textContent = text; }

  function el(tag, attrs = {}, text = "") {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text) e.textContent = text;
    return e;
  }

  function statusSpan(status) { return el("span", { class: "status", "data-status": status }, status); }

  // ---- the runs list ------------------------------------------------------------------------

  function runsPage() {
    const form = $("#new-run");
    if (!form) return;
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const f = new FormData(form);
      let config;
      let policy;
      try {
        config = JSON.parse(f.get("config") || "{}");
        policy = String(f.get("policy") || "").trim() ? JSON.parse(f.get("policy")) : undefined;
      } catch (err) {
        say(`config and policy must be JSON: ${err.message}`, "error");
        return;
      }
      const body = {
        spec: { task: String(f.get("task")).trim(), epochs: Number(f.get("epochs")), config },
        label: String(f.get("label") || ""),
      };
      if (policy !== undefined) body.policy = policy;
      const button = $("#new-run-submit");
      button.disabled = true;
      try {
        const run = await api("POST", "/api/v1/runs", body);
        window.location.href = `/runs/${enc(run.id)}`;
      } catch (err) {
        say(`the run was not started: ${err.message}`, "error");
        button.disabled = false;
      }
    });
  }

  // ---- a run --------------------------------------------------------------------------------

  function runPage(data) {
    let run = data.run;
    const id = run.id;
    const epochs = new Map(); // epoch -> {metric: value}
    for (const [name, [xs, ys]] of Object.entries(data.curves || {})) {
      xs.forEach((x, i) => { epochs.set(x, { ...(epochs.get(x) || {}), [name]: ys[i] }); });
    }
    const curve = new Chart($("#curve"), { xLabel: "epoch", wholeX: true, scaleOf: (n) => (n.endsWith("loss") ? "loss" : "metric") });
    const drawCurve = () => {
      const points = [];
      for (const [x, values] of epochs) for (const [name, y] of Object.entries(values)) points.push({ x, name, y });
      const names = [...new Set(points.map((p) => p.name))].sort((a, b) => (a === "train_loss" ? -1 : b === "train_loss" ? 1 : a.localeCompare(b)));
      const [xs, named] = align(points, names);
      curve.update(xs, named);
    };

    const pipelineLines = [];
    let source = "pipeline";
    let logOffset = 0;
    let progressOffset = 0;
    let trainOffset = 0;
    const logEl = $("#log");
    const renderLog = (lines) => {
      const atBottom = logEl.scrollTop + logEl.clientHeight >= logEl.scrollHeight - 8;
      logEl.textContent = lines.join("\n");
      logEl.dataset.lines = String(lines.length);
      if (atBottom) logEl.scrollTop = logEl.scrollHeight;
    };
    const push = (lines, more) => {
      lines.push(...more);
      if (lines.length > MAX_LOG_LINES) lines.splice(0, lines.length - MAX_LOG_LINES);
    };
    // Complete lines of a chunk, and the bytes of a partial last line (read again later).
    const complete = (text) => {
      const cut = text.lastIndexOf("\n");
      const tail = text.slice(cut + 1);
      return [cut < 0 ? [] : text.slice(0, cut).split("\n"), new TextEncoder().encode(tail).length];
    };

    const trainLines = [];
    let trainTimer = null;
    const pollTrain = async () => {
      try {
        const doc = await api("GET", `/api/v1/runs/${enc(id)}/logs?source=train&offset=${trainOffset}`);
        const [lines, partial] = complete(doc.text);
        trainOffset = doc.offset - partial;
        push(trainLines, lines);
        if (source === "train") renderLog(trainLines);
      } catch (e) { console.warn("training log", e); }
      if (source === "train" && run.status === "running") trainTimer = setTimeout(pollTrain, TRAIN_LOG_POLL_MS);
    };
    $$('input[name="log-source"]').forEach((radio) => radio.addEventListener("change", () => {
      source = radio.value;
      clearTimeout(trainTimer);
      if (source === "train") { renderLog(trainLines); pollTrain(); } else renderLog(pipelineLines);
    }));

    const showProgress = (p) => {
      if (!p) return;
      const f = (k) => $(`#progress [data-field="${k}"]`);
      f("epoch").textContent = p.epochs ? `${p.epoch}/${p.epochs}` : fmtNum(p.epoch);
      f("step").textContent = p.steps ? `${p.step}/${p.steps}` : fmtNum(p.step);
      for (const k of ["loss", "samples_per_s", "percent", "remaining_s"]) f(k).textContent = fmtNum(p[k]);
    };

    const showRun = (r) => {
      run = r;
      const status = $("#run-status");
      status.textContent = r.status;
      status.dataset.status = r.status;
      setText("#run-outcome", r.outcome || "—");
      setText("#run-version", r.version ? `v${r.version}` : "—");
      setText("#run-duration", fmtDuration(r.duration_s));
      if (r.has_primary_value) setText("#run-primary .value", fmtNum(r.primary_value));
      for (const st of r.steps) {
        const g = $(`#steps [data-step="${CSS.escape(st.name)}"]`);
        if (g) {
          g.dataset.status = st.status;
          g.dataset.attempts = String(st.attempts || 0);
          $(".sub", g).textContent = st.status + (st.attempts > 1 ? ` · ${st.attempts} attempts` : "");
          if (st.message) $("title", g).textContent = st.message;
        }
        const row = $(`#step-table [data-step-row="${CSS.escape(st.name)}"]`);
        if (row) {
          $('[data-col="status"]', row).replaceChildren(statusSpan(st.status));
          if (st.duration_s !== undefined) $('[data-col="duration"]', row).textContent = fmtDuration(st.duration_s);
          if (st.message !== undefined) $('[data-col="message"]', row).textContent = st.message;
        }
      }
      $("#cancel").disabled = r.status !== "running";
      $("#retry").disabled = !RESUMABLE.includes(r.status);
    };

    let watcher = null;
    const watch = () => keepWatching(
      () => `/api/v1/runs/${enc(id)}/watch?log_offset=${logOffset}&progress_offset=${progressOffset}`,
      (kind, d) => {
        if (kind === "log") {
          logOffset = d.offset;
          push(pipelineLines, [d.line]);
          if (source === "pipeline") renderLog(pipelineLines);
        } else if (kind === "progress") {
          progressOffset = d.offset;
          showProgress(d);
          for (const ev of d.events || []) {
            if (ev.event === "epoch" && Number.isInteger(ev.epoch)) {
              // as progress.curves folds them (server side): training loss, then held-out
              const values = { train_loss: ev.loss, ...(ev.held_out || {}) };
              for (const k of Object.keys(values)) if (typeof values[k] !== "number") delete values[k];
              epochs.set(ev.epoch, values);
            }
          }
          drawCurve();
        } else if (kind === "run") {
          showRun(d);
        } else if (kind === "end") {
          setText("#run-outcome", d.outcome || "—");
        }
      });

    const start = async () => {
      try {
        const doc = await api("GET", `/api/v1/runs/${enc(id)}/logs?source=pipeline`);
        const [lines, partial] = complete(doc.text);
        logOffset = doc.offset - partial;
        push(pipelineLines, lines);
        renderLog(pipelineLines);
      } catch (e) { say(`log: ${e.message}`, "error"); }
      watcher = watch(); // from where the log read ended: no line twice
    };

    for (const op of ["cancel", "retry"]) {
      $(`#${op}`).addEventListener("click", async () => {
        try {
          showRun(await api("POST", `/api/v1/runs/${enc(id)}/${op}`, {}));
          say(op === "cancel" ? "cancel requested" : "retrying from the step that did not finish");
          if (op === "retry" && watcher) watcher.restart();
        } catch (e) { say(`${op}: ${e.message}`, "error"); }
      });
    }

    showRun(run);
    showProgress(run.progress);
    drawCurve();
    start();
  }

  // ---- a rollout ----------------------------------------------------------------------------

  function rolloutPage(data) {
    let r = data.rollout;
    const id = r.id;
    const charts = {
      weights: new Chart($("#weights-chart"), { time: true, stepped: true, yRange: [0, 100] }),
      rate: new Chart($("#rate-chart"), { time: true }),
      error: new Chart($("#error-chart"), { time: true }),
      p99: new Chart($("#p99-chart"), { time: true }),
    };
    let series = [];
    let seriesTimer = null;

    const drawWeights = () => {
      const points = [];
      for (const ev of r.history) {
        for (const [v, w] of Object.entries(ev.weights || {})) points.push({ x: ev.at, name: `v${v}`, y: w });
      }
      for (const p of series) points.push({ x: p.at, name: `v${p.version}`, y: p.weight });
      const end = r.active ? Date.now() / 1000 : r.updated;
      for (const [v, w] of Object.entries(r.weights || {})) points.push({ x: end, name: `v${v}`, y: w });
      const [xs, named] = align(points);
      charts.weights.update(xs, named);
    };

    const drawSeries = () => {
      for (const [key, field] of [["rate", "requests_per_s"], ["error", "error_rate"], ["p99", "p99_ms"]]) {
        const points = series.filter((p) => typeof p[field] === "number")
          .map((p) => ({ x: p.at, name: `v${p.version}`, y: p[field] }));
        const [xs, named] = align(points);
        charts[key].update(xs, named);
      }
    };

    const loadSeries = async () => {
      clearTimeout(seriesTimer);
      const note = $("#series-note");
      try {
        const doc = await api("GET", `/api/v1/rollouts/${enc(id)}/series`);
        series = (doc && doc.points) || [];
        note.hidden = series.length > 0;
        note.textContent = "no traffic measured for this rollout yet";
      } catch (e) {
        series = [];
        note.hidden = false;
        note.textContent = e.status === 404 ? "this control plane keeps no traffic series" : `series: ${e.message}`;
      }
      drawSeries();
      drawWeights();
      if (r.active) seriesTimer = setTimeout(loadSeries, SERIES_POLL_MS);
    };

    const historyRow = (ev) => {
      const tr = el("tr", { "data-kind": ev.kind, "data-verdict": ev.verdict });
      tr.append(el("td", {}, fmtTime(ev.at)), el("td", {}, ev.kind), el("td", { class: "verdict" }, ev.verdict),
                el("td", {}, ev.message), el("td", {}, fmtWeights(ev.weights)),
                el("td", { class: "num" }, ev.count > 1 ? String(ev.count) : ""));
      return tr;
    };

    const renderGate = (gate) => {
      const box = $("#gate");
      box.dataset.verdict = gate ? gate.verdict : "";
      if (!gate) { box.replaceChildren(el("p", {}, "not evaluated yet")); return; }
      const ul = el("ul");
      for (const reason of gate.reasons) ul.append(el("li", {}, reason));
      box.replaceChildren(el("p", { class: "verdict" }, gate.verdict), ul);
    };

    const showRollout = (next) => {
      r = next;
      const phase = $("#phase");
      phase.textContent = r.phase;
      phase.dataset.phase = r.phase;
      $("#paused").hidden = !r.paused;
      setText("#weights", fmtWeights(r.weights));
      setText("#step", `${r.step + 1} of ${r.steps.length}`);
      setText("#reason", r.reason || "—");
      setText("#failed", String(r.failed_analyses));
      setText("#resource-version", r.resource_version);
      setText("#updated", fmtTime(r.updated));
      renderGate(r.gate);
      $("#history tbody").replaceChildren(...r.history.map(historyRow));
      $("#promote").disabled = !r.active;
      $("#abort").disabled = !r.active;
      $("#pause").disabled = !r.active || r.paused;
      $("#resume").disabled = !r.active || !r.paused;
      drawWeights();
    };

    for (const button of $$("#ops [data-op]")) {
      button.addEventListener("click", async () => {
        const op = button.dataset.op;
        button.disabled = true;
        try {
          // No resource_version: the ticker saves the rollout every round, so the version on
          // screen is soon stale; the operation applies to the current state, which refuses
          // it (409, with the reason) where it makes no sense.
          showRollout(await api("POST", `/api/v1/rollouts/${enc(id)}/${op}`, {}));
          say(`${op} requested`);
        } catch (e) {
          say(`${op}: ${e.message}`, "error");
          if (e.status === 409) {
            try { showRollout(await api("GET", `/api/v1/rollouts/${enc(id)}`)); } catch { /* the watch catches up */ }
          } else button.disabled = false;
        }
      });
    }

    keepWatching(() => `/api/v1/rollouts/${enc(id)}/watch`, (kind, d) => {
      if (kind === "rollout") {
        const was = r.active;
        showRollout(d);
        if (!was || !r.active) loadSeries();
      } else if (kind === "end") {
        loadSeries();
      }
    });
    showRollout(r);
    loadSeries();
  }

  // ---- models -------------------------------------------------------------------------------

  function modelsPage() {
    for (const button of $$("button[data-undo]")) {
      button.addEventListener("click", async () => {
        const model = button.dataset.model;
        const to = Number(button.dataset.undo);
        if (!window.confirm(`Undo ${model} to v${to}?`)) return;
        button.disabled = true;
        try {
          const r = await api("POST", `/api/v1/models/${enc(model)}/undo`, { to_version: to });
          window.location.href = `/rollouts/${enc(r.id)}`;
        } catch (e) {
          say(`undo: ${e.message}`, "error");
          button.disabled = false;
        }
      });
    }
  }

  // ---- compare ------------------------------------------------------------------------------

  function comparePage(data) {
    const curves = data.compare.curves || [];
    for (const box of $$(".compare-curve[data-metric]")) {
      const metric = box.dataset.metric;
      const points = [];
      for (const c of curves.filter((c) => c.metric === metric)) {
        c.x.forEach((x, i) => points.push({ x, name: c.run_id, y: c.y[i] }));
      }
      const [xs, named] = align(points);
      new Chart(box, { xLabel: "epoch", wholeX: true }).update(xs, named);
    }
  }

  // ---- start --------------------------------------------------------------------------------

  function pageData() {
    const island = $("#page-data");
    return island ? JSON.parse(island.textContent) : {};
  }

  document.addEventListener("DOMContentLoaded", () => {
    initToken();
    const pages = { runs: runsPage, run: runPage, rollout: rolloutPage, models: modelsPage, compare: comparePage };
    const page = pages[document.body.dataset.page];
    if (page) page(pageData());
  });
})();
