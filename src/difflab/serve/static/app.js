// difflab explorer: plain JavaScript, no framework, talks only to the server that served it.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);
const state = { runs: [], run: null, processes: [], dataStart: 0, dataIndex: 0, monitor: null, jobs: {} };

// ---------------------------------------------------------------- talking to the server
function withToken(url) {
  return TOKEN ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN) : url;
}

async function api(path, body) {
  const opts = { headers: {} };
  if (TOKEN) opts.headers["X-Difflab-Token"] = TOKEN;
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data;
  try { data = await r.json(); } catch (e) { data = { error: `the server answered ${r.status}` }; }
  if (!r.ok) throw new Error(data.error || `the server answered ${r.status}`);
  return data;
}

// Start a job and call onEvent for each of its events; returns a handle with cancel().
async function runJob(kind, path, body, onEvent, onEnd) {
  if (state.jobs[kind]) state.jobs[kind].cancel();
  const { job } = await api(path, body);
  const es = new EventSource(withToken(`/api/jobs/${job}/events`));
  const handle = {
    id: job,
    cancel() { api(`/api/jobs/${job}/cancel`, {}).catch(() => {}); },
    close() { es.close(); if (state.jobs[kind] === handle) delete state.jobs[kind]; },
  };
  state.jobs[kind] = handle;
  es.onmessage = (m) => {
    const ev = JSON.parse(m.data);
    onEvent(ev);
    if (ev.type === "done" || ev.type === "error" || ev.type === "cancelled") { handle.close(); onEnd && onEnd(ev); }
  };
  return handle;
}

function showError(id, message) {
  const el = $(id);
  el.textContent = message || "";
  el.hidden = !message;
}

function formValues(form) {
  const out = {};
  for (const el of form.elements) {
    if (!el.name || el.closest("[hidden]")) continue;
    if (el.type === "number") out[el.name] = el.value === "" ? null : Number(el.value);
    else if (el.name === "label") { if (el.value !== "") out.label = Number(el.value); }
    else if (el.value !== "") out[el.name] = el.value;
  }
  return out;
}

function img(src, cls) {
  const el = document.createElement("img");
  if (src) el.src = src;
  if (cls) el.className = cls;
  return el;
}

// ---------------------------------------------------------------- runs
async function loadRuns() {
  const data = await api("/api/runs");
  state.runs = data.runs;
  state.processes = data.processes;
  const sel = $("run");
  sel.innerHTML = "";
  for (const r of state.runs) sel.append(new Option(r.damaged ? `${r.name} (damaged)` : r.name, r.name));
  const procSel = $("forward-process");
  procSel.innerHTML = "";
  for (const p of state.processes) procSel.append(new Option(p.name, p.name));
  procSel.value = "cosine";
  if (!state.runs.length) {
    showError("no-runs", "no runs in this folder yet: train one with difflab train --out RUNS/NAME");
    $("no-runs").hidden = false;
    return;
  }
  selectRun((state.runs.find((r) => !r.damaged) || state.runs[0]).name);
}

function selectRun(name) {
  const run = state.runs.find((r) => r.name === name);
  state.run = run;
  $("run").value = name;
  if (run.damaged) { stopMonitor(); $("run-info").textContent = `damaged: ${run.error}`; return; }
  const cond = run.conditioning === "none" ? "unconditional" : `${run.conditioning}-conditional`;
  $("run-info").textContent = `${run.method} · ${cond} · ${run.shape.join("x")} · checkpoint step ${run.step}` +
    (run.training ? " · training now" : "");
  // the sample form starts from the run's own sampler, steps and guidance (what `difflab sample` draws)
  fillSamplers($("sample-form").elements.sampler, run.sampler || "");
  $("sample-form").elements.steps.value = run.sample_steps;
  $("sample-form").elements.guidance.value = run.guidance;
  for (const sel of document.querySelectorAll("select.samplers")) {
    if (sel !== $("sample-form").elements.sampler) fillSamplers(sel, sel.value || run.sampler || "ddim");
  }
  for (const sel of document.querySelectorAll("select.classes")) {
    sel.innerHTML = "";
    sel.append(new Option(run.conditioning === "class" ? "any (cycle)" : "none (null)", ""));
    run.class_names.forEach((c, i) => sel.append(new Option(`${i}: ${c}`, String(i))));
  }
  const show = (cls, on) => document.querySelectorAll(cls).forEach((el) => { el.hidden = !on; });
  show(".cond-only", run.conditioning !== "none");
  show(".class-only", run.conditioning !== "none" && run.class_names.length > 0);
  show(".text-only", run.conditioning === "text");
  for (const input of document.querySelectorAll("input[name=steps]")) input.max = run.max_steps;
  state.dataStart = 0;
  state.dataIndex = 0;
  if (run.kind === "run") loadData().catch((e) => showError("forward-error", e.message));
  api("/api/load", { run: run.name }).catch(() => {}); // load the weights now, not on the first click
  if (activePanel() === "monitor") startMonitor();
}

function fillSamplers(sel, value) {
  sel.innerHTML = "";
  const names = state.run.samplers.length ? state.run.samplers : ["default"];
  for (const s of names) sel.append(new Option(s, s));
  sel.value = names.includes(value) ? value : names[0];
}

// ---------------------------------------------------------------- sample
let path = { frames: [], index: 0, follow: true, timer: null };

function resetPath(index) {
  path.frames = [];
  path.follow = true;
  $("path-slider").max = 0;
  $("path-slider").value = 0;
  $("path-xt").removeAttribute("src");
  $("path-x0").removeAttribute("src");
  $("path-label").textContent = "";
  $("path-which").textContent = `sample ${index}`;
}

function showFrame(k) {
  const f = path.frames[k];
  if (!f) return;
  if (f.xt) $("path-xt").src = f.xt;
  $("path-x0").src = f.x0;
  $("path-slider").value = k;
  const sigma = f.sigma === null || f.sigma === undefined ? "" : `, σ = ${f.sigma.toPrecision(3)}`;
  $("path-label").textContent = `step ${f.i + 1} of ${path.frames.length}${sigma}`;
}

function onStep(ev) {
  path.frames.push(ev);
  $("path-slider").max = path.frames.length - 1;
  if (path.follow) showFrame(path.frames.length - 1);
}

async function startSample(e) {
  e.preventDefault();
  showError("sample-error", "");
  const body = { run: state.run.name, ...formValues($("sample-form")) };
  if (body.sampler === "default") delete body.sampler;
  const grid = $("sample-grid");
  grid.innerHTML = "";
  const cells = [];
  for (let i = 0; i < body.count; i++) {
    const cell = document.createElement("div");
    cell.className = "pending";
    grid.append(cell);
    cells.push(cell);
  }
  resetPath(body.seed !== undefined ? 0 : 0);
  const t0 = performance.now();
  let first = null, shown = 0;
  $("sample-status").textContent = "queued…";
  $("sample-cancel").disabled = false;
  state.lastSample = body;
  try {
    await runJob("sample", "/api/sample", body, (ev) => {
      if (ev.type === "running") $("sample-status").textContent = "sampling…";
      if (ev.type === "start") $("sample-status").textContent = `sampling ${ev.count} · ${ev.evaluations} network evaluations each · checkpoint step ${ev.checkpoint}`;
      if (ev.type === "step") onStep(ev);
      if (ev.type === "image") {
        if (first === null) first = (performance.now() - t0) / 1000;
        const el = img(ev.png);
        el.dataset.index = ev.index;
        el.title = `sample ${ev.index}: click for its denoising path`;
        el.addEventListener("click", () => replayPath(ev.index));
        cells[ev.index].replaceWith(el);
        cells[ev.index] = el;
        if (ev.index === 0) el.classList.add("chosen");
        shown++;
        $("sample-status").textContent = `${shown} of ${body.count} · first image after ${first.toFixed(2)} s`;
      }
      if (ev.type === "done") $("sample-status").textContent = `${shown} images · first after ${first.toFixed(2)} s · all in ${((performance.now() - t0) / 1000).toFixed(2)} s`;
      if (ev.type === "cancelled") $("sample-status").textContent = `cancelled after ${shown} of ${body.count} images`;
      if (ev.type === "error") showError("sample-error", ev.message);
    }, () => { $("sample-cancel").disabled = true; });
  } catch (err) {
    showError("sample-error", err.message);
    $("sample-status").textContent = "";
    $("sample-cancel").disabled = true;
  }
}

async function replayPath(index) {
  const body = { ...state.lastSample, count: 1, first: index };
  for (const el of $("sample-grid").children) el.classList.toggle("chosen", el.dataset && el.dataset.index === String(index));
  resetPath(index);
  try {
    await runJob("path", "/api/sample", body, (ev) => {
      if (ev.type === "step") onStep(ev);
      if (ev.type === "error") showError("sample-error", ev.message);
    });
  } catch (err) { showError("sample-error", err.message); }
}

function togglePlay() {
  if (path.timer) { clearInterval(path.timer); path.timer = null; $("path-play").textContent = "Play"; return; }
  if (!path.frames.length) return;
  path.follow = false;
  let k = Number($("path-slider").value);
  if (k >= path.frames.length - 1) k = -1;
  $("path-play").textContent = "Pause";
  path.timer = setInterval(() => {
    k++;
    if (k >= path.frames.length) { togglePlay(); return; }
    showFrame(k);
  }, Math.max(60, 2000 / path.frames.length));
}

// ---------------------------------------------------------------- compare
const DEFAULT_COLUMNS = [["ddim", 10], ["dpmpp-2m", 10], ["heun", 10], ["ddpm", 50]];

function addColumn(sampler, steps) {
  const box = document.createElement("span");
  box.className = "colspec";
  const sel = document.createElement("select");
  sel.className = "samplers";
  fillSamplers(sel, sampler);
  const st = document.createElement("input");
  st.type = "number"; st.min = 1; st.value = steps; st.name = "steps"; st.max = state.run ? state.run.max_steps : 1000;
  const rm = document.createElement("button");
  rm.type = "button"; rm.textContent = "×"; rm.title = "remove";
  rm.addEventListener("click", () => box.remove());
  box.append(sel, st, rm);
  $("compare-columns").append(box);
}

async function startCompare(e) {
  e.preventDefault();
  showError("compare-error", "");
  const body = { run: state.run.name, ...formValues($("compare-form")) };
  body.columns = [...$("compare-columns").children].map((box) => {
    const s = box.querySelector("select").value;
    return { sampler: s === "default" ? null : s, steps: Number(box.querySelector("input").value) };
  });
  const out = $("compare-out");
  out.innerHTML = "";
  const cols = [];
  $("compare-cancel").disabled = false;
  try {
    await runJob("compare", "/api/compare", body, (ev) => {
      if (ev.type === "start") {
        ev.columns.forEach((c) => {
          const col = document.createElement("div");
          col.className = "col";
          const h = document.createElement("h3");
          h.textContent = `${c.sampler || "default"} · ${c.steps} steps`;
          const sub = document.createElement("div");
          sub.className = "muted";
          sub.textContent = `${c.evaluations} evaluations`;
          col.append(h, sub);
          for (let i = 0; i < ev.count; i++) { const p = document.createElement("div"); p.className = "pending"; col.append(p); }
          out.append(col);
          cols.push(col);
        });
      }
      if (ev.type === "image") {
        const col = cols[ev.column];
        col.children[2 + ev.index].replaceWith(img(ev.png));
      }
      if (ev.type === "column") {
        cols[ev.column].children[1].textContent = `${ev.evaluations} evaluations · ${ev.seconds.toFixed(2)} s`;
      }
      if (ev.type === "error") showError("compare-error", ev.message);
    }, () => { $("compare-cancel").disabled = true; });
  } catch (err) { showError("compare-error", err.message); $("compare-cancel").disabled = true; }
}

// ---------------------------------------------------------------- forward process
async function loadData() {
  const data = await api(`/api/dataset?run=${encodeURIComponent(state.run.name)}&start=${state.dataStart}&n=16`);
  const strip = $("data-strip");
  strip.innerHTML = "";
  for (const d of data.images) {
    const el = img(d.png, d.index === state.dataIndex ? "chosen" : "");
    el.title = `image ${d.index}${d.label ? ": " + d.label : ""}`;
    el.addEventListener("click", () => { state.dataIndex = d.index; $("invert-form").elements.index.value = d.index; loadData(); });
    strip.append(el);
  }
  state.dataTotal = data.total;
  await loadForward();
}

let forwardAsked = 0;

async function loadForward() {
  showError("forward-error", "");
  const ticket = ++forwardAsked; // only the newest answer is shown: answers may arrive out of order
  try {
    const v = await api("/api/forward", { run: state.run.name, process: $("forward-process").value, index: state.dataIndex });
    if (ticket !== forwardAsked) return;
    state.forward = v;
    $("forward-about").textContent = v.about;
    $("forward-summary").textContent = v.summary;
    $("forward-x").src = v.frames[0];
    $("forward-index").textContent = `#${state.dataIndex}`;
    $("forward-curve-label").textContent = v.curve_label + (v.untouched.length ? " (dashed: measured in this image)" : "");
    const slider = $("forward-slider");
    slider.max = v.frames.length - 1;
    slider.value = Math.min(Number(slider.value), v.frames.length - 1);
    showForward();
  } catch (err) { if (ticket === forwardAsked) showError("forward-error", err.message); }
}

function showForward() {
  const v = state.forward;
  if (!v) return;
  const k = Number($("forward-slider").value);
  $("forward-z").src = v.frames[k];
  $("forward-t").textContent = `t = ${v.t[k].toFixed(3)} (frame ${k} of ${v.frames.length - 1})`;
  const u = $("forward-untouched");
  if (v.untouched.length) {
    u.textContent = `pixels never touched: ${(100 * v.untouched[k]).toFixed(1)}% in this image (expected ${(100 * v.curve[k]).toFixed(1)}%)`;
  } else u.textContent = "";
  plot($("forward-curve"), v.t, v.curve, { mark: v.t[k], second: v.untouched.length ? v.untouched : null, xlabel: "t" });
}

// A line plot in an <svg>: xs, ys arrays; opts.mark draws a vertical line, opts.second a dashed line.
function plot(svg, xs, ys, opts = {}) {
  const W = 420, H = 240, L = 46, R = 10, T = 10, B = 28;
  const finite = ys.filter((y) => Number.isFinite(y)).concat(opts.second || []);
  let lo = Math.min(...finite), hi = Math.max(...finite);
  if (!(hi > lo)) { lo -= 1; hi += 1; }
  const x0 = Math.min(...xs), x1 = Math.max(...xs) > x0 ? Math.max(...xs) : x0 + 1;
  const X = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const Y = (y) => T + (hi - y) / (hi - lo) * (H - T - B);
  const line = (vals) => vals.map((y, i) => (Number.isFinite(y) ? `${X(xs[i]).toFixed(1)},${Y(y).toFixed(1)}` : "")).filter(Boolean).join(" ");
  let s = `<line class="axis" x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}"/><line class="axis" x1="${L}" y1="${T}" x2="${L}" y2="${H - B}"/>`;
  for (let k = 0; k <= 4; k++) {
    const y = lo + (hi - lo) * k / 4;
    s += `<text x="${L - 4}" y="${Y(y) + 3}" text-anchor="end">${fmt(y)}</text>`;
    const x = x0 + (x1 - x0) * k / 4;
    s += `<text x="${X(x)}" y="${H - B + 14}" text-anchor="middle">${fmt(x)}</text>`;
  }
  if (opts.xlabel) s += `<text x="${W - R}" y="${H - 2}" text-anchor="end">${opts.xlabel}</text>`;
  s += `<polyline class="line" points="${line(ys)}"/>`;
  if (opts.second) s += `<polyline class="line2" points="${line(opts.second)}"/>`;
  if (opts.mark !== undefined) s += `<line class="mark" x1="${X(opts.mark)}" y1="${T}" x2="${X(opts.mark)}" y2="${H - B}"/>`;
  svg.innerHTML = s;
}

function fmt(v) {
  const a = Math.abs(v);
  if (a >= 1000) return v.toExponential(0);
  if (a >= 10 || v === 0) return v.toFixed(0);
  return v.toPrecision(2);
}

// ---------------------------------------------------------------- interpolate
async function startInterpolate(e) {
  e.preventDefault();
  showError("interp-error", "");
  const body = { run: state.run.name, ...formValues($("interp-form")) };
  const strip = $("interp-strip");
  strip.innerHTML = "";
  const cells = [];
  for (let i = 0; i < body.n; i++) {
    const f = document.createElement("figure");
    f.append(img(null), Object.assign(document.createElement("figcaption"), { textContent: "" }));
    strip.append(f);
    cells.push(f);
  }
  $("interp-cancel").disabled = false;
  try {
    await runJob("interpolate", "/api/interpolate", body, (ev) => {
      if (ev.type === "image") {
        cells[ev.index].querySelector("img").src = ev.png;
        cells[ev.index].querySelector("figcaption").textContent = `t = ${ev.t.toFixed(2)}`;
      }
      if (ev.type === "error") showError("interp-error", ev.message);
    }, () => { $("interp-cancel").disabled = true; });
  } catch (err) { showError("interp-error", err.message); $("interp-cancel").disabled = true; }
}

// ---------------------------------------------------------------- invert
async function startInvert(body) {
  showError("invert-error", "");
  for (const id of ["invert-original", "invert-latent", "invert-recon"]) $(id).removeAttribute("src");
  $("invert-psnr").textContent = "inverting…";
  $("invert-latent-info").textContent = "";
  $("invert-cancel").disabled = false;
  try {
    await runJob("invert", "/api/invert", { run: state.run.name, steps: Number($("invert-form").elements.steps.value), ...body }, (ev) => {
      if (ev.type === "start") $("invert-original").src = ev.original;
      if (ev.type === "latent") {
        $("invert-latent").src = ev.png;
        $("invert-latent-info").textContent = `(mean ${ev.mean.toFixed(2)}, std ${ev.std.toFixed(2)})`;
        $("invert-psnr").textContent = "reconstructing…";
      }
      if (ev.type === "reconstruction") {
        $("invert-recon").src = ev.png;
        const db = ev.psnr === null ? "exact" : `${ev.psnr.toFixed(2)} dB`;
        $("invert-psnr").textContent = `reconstruction error: PSNR ${db} (MSE ${ev.mse.toFixed(2)}, ${ev.steps} DDIM steps each way)`;
      }
      if (ev.type === "cancelled") $("invert-psnr").textContent = "cancelled";
      if (ev.type === "error") { showError("invert-error", ev.message); $("invert-psnr").textContent = ""; }
    }, () => { $("invert-cancel").disabled = true; });
  } catch (err) { showError("invert-error", err.message); $("invert-psnr").textContent = ""; $("invert-cancel").disabled = true; }
}

const MAX_UPLOAD = 4 << 20;

function invertFile(file) {
  if (!file) return;
  if (file.size > MAX_UPLOAD) { showError("invert-error", `the image is ${(file.size / 2 ** 20).toFixed(1)} MiB; the limit is 4 MiB`); return; }
  const reader = new FileReader();
  reader.onload = () => startInvert({ image: reader.result });
  reader.readAsDataURL(file);
}

// ---------------------------------------------------------------- training monitor
function startMonitor() {
  stopMonitor();
  if (!state.run || state.run.kind !== "run") { $("monitor-state").textContent = "no training log for this model"; return; }
  const rows = [], evals = [];
  const es = new EventSource(withToken(`/api/monitor?run=${encodeURIComponent(state.run.name)}`));
  state.monitor = es;
  es.onmessage = (m) => {
    const ev = JSON.parse(m.data);
    rows.push(...ev.rows);
    evals.push(...(ev.evals || []));
    const last = evals[evals.length - 1];  // [step, "kid" or "fid", value] (--eval-every)
    $("monitor-state").textContent = (ev.training ? "training now" : "not training (the log has not changed for 2 minutes)") +
      ` · latest checkpoint step ${ev.step}` + (rows.length ? ` · last logged loss ${rows[rows.length - 1][1].toPrecision(4)} at step ${rows[rows.length - 1][0]}` : "") +
      (last ? ` · ${last[1].toUpperCase()} ${last[1] === "kid" ? (last[2] * 1e3).toPrecision(3) + " x 1e-3" : last[2].toPrecision(4)} at step ${last[0]}` : "");
    if (ev.rows.length && rows.length) plot($("monitor-loss"), rows.map((r) => r[0]), rows.map((r) => Math.log10(r[1])), { xlabel: "step (loss on a log10 scale)" });
    const shown = evals.filter((e) => e[1] === (last && last[1]));
    $("monitor-eval-box").hidden = !shown.length;
    if ((ev.evals || []).length && shown.length) plot($("monitor-eval"), shown.map((e) => e[0]), shown.map((e) => e[2]), { xlabel: `step (${last[1].toUpperCase()} of the EMA's samples)` });
    if (ev.grid) { $("monitor-grid").src = ev.grid.png; $("monitor-grid-name").textContent = ev.grid.name; }
  };
}

function stopMonitor() {
  if (state.monitor) { state.monitor.close(); state.monitor = null; }
}

// ---------------------------------------------------------------- wiring
function activePanel() { return document.querySelector(".panel.active").id; }

function showPanel(name) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.panel === name);
  for (const p of document.querySelectorAll(".panel")) p.classList.toggle("active", p.id === name);
  if (name === "monitor") startMonitor(); else stopMonitor();
}

window.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showPanel(b.dataset.panel));
  $("run").addEventListener("change", (e) => selectRun(e.target.value));
  $("sample-form").addEventListener("submit", startSample);
  $("sample-cancel").addEventListener("click", () => state.jobs.sample && state.jobs.sample.cancel());
  $("path-slider").addEventListener("input", (e) => { path.follow = false; showFrame(Number(e.target.value)); });
  $("path-play").addEventListener("click", togglePlay);
  $("compare-form").addEventListener("submit", startCompare);
  $("compare-add").addEventListener("click", () => addColumn("ddim", 25));
  $("compare-cancel").addEventListener("click", () => state.jobs.compare && state.jobs.compare.cancel());
  $("forward-process").addEventListener("change", loadForward);
  $("forward-slider").addEventListener("input", showForward);
  $("data-prev").addEventListener("click", () => { state.dataStart = Math.max(0, state.dataStart - 16); loadData(); });
  $("data-next").addEventListener("click", () => { state.dataStart = Math.min((state.dataTotal || 16) - 1, state.dataStart + 16); loadData(); });
  $("interp-form").addEventListener("submit", startInterpolate);
  $("interp-cancel").addEventListener("click", () => state.jobs.interpolate && state.jobs.interpolate.cancel());
  $("invert-form").addEventListener("submit", (e) => { e.preventDefault(); startInvert({ index: Number($("invert-form").elements.index.value) }); });
  $("invert-file").addEventListener("change", (e) => invertFile(e.target.files[0]));
  $("invert-cancel").addEventListener("click", () => state.jobs.invert && state.jobs.invert.cancel());
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); invertFile(e.dataTransfer.files[0]); });
  loadRuns().then(() => { for (const [s, n] of DEFAULT_COLUMNS) addColumn(s, n); })
    .catch((err) => showError("no-runs", err.message));
});
