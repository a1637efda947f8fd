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
    if (el.type === "number" || el.type === "range") out[el.name] = el.value === "" ? null : Number(el.value);
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
  // the forward panel opens on the run's own process where it has one
  if (run.forward_process && state.processes.some((p) => p.name === run.forward_process)) {
    $("forward-process").value = run.forward_process;
  }
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
  $("edit-form").elements.steps.value = run.sample_steps;
  $("fewstep-samplers").innerHTML = "";
  addFewstepSampler("");
  editReset();
  if (run.kind === "run") editUseIndex();
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

// ---------------------------------------------------------------- a denoising path, step by step
// The frames of one sample's path in the elements PREFIX-xt, -x0, -slider, -label, -which and -play.
function makePath(prefix) {
  const el = (name) => $(`${prefix}-${name}`);
  const p = { frames: [], follow: true, timer: null };
  p.reset = (which) => {
    p.frames = [];
    p.follow = true;
    el("slider").max = 0;
    el("slider").value = 0;
    el("xt").removeAttribute("src");
    el("x0").removeAttribute("src");
    el("label").textContent = "";
    el("which").textContent = which;
  };
  p.show = (k) => {
    const f = p.frames[k];
    if (!f) return;
    if (f.xt) el("xt").src = f.xt; else el("xt").removeAttribute("src");
    el("x0").src = f.x0;
    el("slider").value = k;
    const sigma = f.sigma === null || f.sigma === undefined ? "" : `, σ = ${f.sigma.toPrecision(3)}`;
    // the planned steps while they stream in (a part-1 method plans its own: then the frames seen)
    el("label").textContent = `step ${k + 1} of ${Math.max(f.steps || 0, p.frames.length)}${sigma}`;
  };
  p.step = (ev) => {
    p.frames.push(ev);
    el("slider").max = p.frames.length - 1;
    if (p.follow) p.show(p.frames.length - 1);
  };
  p.toggle = () => {
    if (p.timer) { clearInterval(p.timer); p.timer = null; el("play").textContent = "Play"; return; }
    if (!p.frames.length) return;
    p.follow = false;
    let k = Number(el("slider").value);
    if (k >= p.frames.length - 1) k = -1;
    el("play").textContent = "Pause";
    p.timer = setInterval(() => {
      k++;
      if (k >= p.frames.length) { p.toggle(); return; }
      p.show(k);
    }, Math.max(60, 2000 / p.frames.length));
  };
  el("slider").addEventListener("input", (e) => { p.follow = false; p.show(Number(e.target.value)); });
  el("play").addEventListener("click", p.toggle);
  return p;
}

// ---------------------------------------------------------------- sample
let path = null;

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
  path.reset("sample 0");
  const t0 = performance.now();
  let first = null, shown = 0;
  $("sample-status").textContent = "queued…";
  $("sample-cancel").disabled = false;
  state.lastSample = body;
  try {
    await runJob("sample", "/api/sample", body, (ev) => {
      if (ev.type === "running") $("sample-status").textContent = "sampling…";
      if (ev.type === "start") $("sample-status").textContent = `sampling ${ev.count} · ${ev.evaluations} network evaluations each · checkpoint step ${ev.checkpoint}`;
      if (ev.type === "step") path.step(ev);
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
  path.reset(`sample ${index}`);
  try {
    await runJob("path", "/api/sample", body, (ev) => {
      if (ev.type === "step") path.step(ev);
      if (ev.type === "error") showError("sample-error", ev.message);
    });
  } catch (err) { showError("sample-error", err.message); }
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
  const run = state.run;
  if (run.damaged) return;
  const data = await api(`/api/dataset?run=${encodeURIComponent(run.name)}&start=${state.dataStart}&n=16`);
  if (state.run !== run) return; // another run was chosen while this one's images came
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
  if (state.run.damaged) return; // nothing to ask of a run that cannot be loaded
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
    const form = $("invert-form").elements;
    const how = { steps: Number(form.steps.value), spacing: form.spacing.value, refine: Number(form.refine.value) };
    await runJob("invert", "/api/invert", { run: state.run.name, ...how, ...body }, (ev) => {
      if (ev.type === "start") $("invert-original").src = ev.original;
      if (ev.type === "latent") {
        $("invert-latent").src = ev.png;
        $("invert-latent-info").textContent = `(mean ${ev.mean.toFixed(2)}, std ${ev.std.toFixed(2)})`;
        $("invert-psnr").textContent = "reconstructing…";
      }
      if (ev.type === "reconstruction") {
        $("invert-recon").src = ev.png;
        const db = ev.psnr === null ? "exact" : `${ev.psnr.toFixed(2)} dB`;
        $("invert-psnr").textContent = `reconstruction error: PSNR ${db} (MSE ${ev.mse.toFixed(2)}, ${ev.steps} DDIM steps each way on the ${ev.spacing} grid${ev.refine ? `, ${ev.refine} refinements a step` : ""})`;
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

// ---------------------------------------------------------------- edit
// The image being edited at the run's size (an offscreen canvas), the painted mask (1: repaint) over it, and
// what the request sends for it: a dataset index or the uploaded file (the server fits it as drawn here).
const edit = { canvas: null, mask: null, w: 0, h: 0, source: null, painting: false, path: null };

function editReset() {
  const [, h, w] = state.run.shape;
  edit.w = w; edit.h = h;
  edit.canvas = document.createElement("canvas");
  edit.canvas.width = w; edit.canvas.height = h;
  edit.mask = new Uint8Array(w * h);
  edit.source = null;
  $("edit-source").textContent = "";
  $("edit-grid").innerHTML = "";
  $("edit-status").textContent = "";
  editDraw();
}

function editDraw() {
  const view = $("edit-canvas"), ctx = view.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.fillStyle = "#e9ecf2";
  ctx.fillRect(0, 0, view.width, view.height);
  if (edit.source) ctx.drawImage(edit.canvas, 0, 0, view.width, view.height);
  const sx = view.width / edit.w, sy = view.height / edit.h;
  ctx.fillStyle = "rgba(217, 45, 32, 0.55)";
  for (let y = 0; y < edit.h; y++) {
    for (let x = 0; x < edit.w; x++) if (edit.mask[y * edit.w + x]) ctx.fillRect(x * sx, y * sy, sx, sy);
  }
}

// Draw image element `im` onto the run-sized canvas: the shorter side fitted, the centre kept.
function editSetImage(im, source, label) {
  const ctx = edit.canvas.getContext("2d");
  const side = Math.min(im.naturalWidth, im.naturalHeight);
  ctx.clearRect(0, 0, edit.w, edit.h);
  ctx.drawImage(im, (im.naturalWidth - side) / 2, (im.naturalHeight - side) / 2, side, side, 0, 0, edit.w, edit.h);
  edit.source = source;
  $("edit-source").textContent = label;
  editDraw();
}

async function editUseIndex() {
  showError("edit-error", "");
  try {
    const want = Number($("edit-index").value), run = state.run;
    const data = await api(`/api/dataset?run=${encodeURIComponent(run.name)}&start=${want}&n=1`);
    if (state.run !== run) return; // another run was chosen meanwhile
    const d = data.images[0];
    $("edit-index").value = d.index;
    const im = new Image();
    im.onload = () => editSetImage(im, { index: d.index }, `dataset image ${d.index}${d.label ? " (class " + d.label + ")" : ""}`);
    im.src = d.png;
  } catch (err) { showError("edit-error", err.message); }
}

function editFile(file) {
  if (!file) return;
  if (file.size > MAX_UPLOAD) { showError("edit-error", `the image is ${(file.size / 2 ** 20).toFixed(1)} MiB; the limit is 4 MiB`); return; }
  showError("edit-error", "");
  const reader = new FileReader();
  reader.onload = () => {
    const im = new Image();
    im.onload = () => editSetImage(im, { image: reader.result }, `upload ${file.name}`);
    im.onerror = () => showError("edit-error", "the browser cannot show this file as an image");
    im.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function editPaint(e) {
  const view = $("edit-canvas"), r = view.getBoundingClientRect();
  const cx = Math.floor((e.clientX - r.left) / r.width * edit.w), cy = Math.floor((e.clientY - r.top) / r.height * edit.h);
  const rad = Number($("edit-brush").value), value = e.shiftKey ? 0 : 1;
  for (let y = cy - rad; y <= cy + rad; y++) {
    for (let x = cx - rad; x <= cx + rad; x++) if (x >= 0 && y >= 0 && x < edit.w && y < edit.h) edit.mask[y * edit.w + x] = value;
  }
  editDraw();
}

// The painted mask as a PNG of the run's size (white: repaint), or null when nothing is painted.
function editMaskUrl() {
  if (!edit.mask.some((v) => v)) return null;
  const c = document.createElement("canvas");
  c.width = edit.w; c.height = edit.h;
  const ctx = c.getContext("2d"), px = ctx.createImageData(edit.w, edit.h);
  edit.mask.forEach((v, i) => { px.data.fill(v ? 255 : 0, 4 * i, 4 * i + 3); px.data[4 * i + 3] = 255; });
  ctx.putImageData(px, 0, 0);
  return c.toDataURL("image/png");
}

async function startEdit(e) {
  e.preventDefault();
  showError("edit-error", "");
  if (!edit.source) { showError("edit-error", "choose a dataset image or upload one first"); return; }
  const body = { run: state.run.name, ...formValues($("edit-form")), ...edit.source };
  if (body.sampler === "default") delete body.sampler;
  const mask = editMaskUrl();
  if (mask) body.mask = mask; else { delete body.jump_length; delete body.resample; }
  const grid = $("edit-grid");
  grid.innerHTML = "";
  const cells = [];
  for (let i = 0; i < body.count; i++) {
    const cell = document.createElement("div");
    cell.className = "pending";
    grid.append(cell);
    cells.push(cell);
  }
  edit.path.reset("edit 0");
  const t0 = performance.now();
  let shown = 0;
  $("edit-status").textContent = "queued…";
  $("edit-cancel").disabled = false;
  edit.last = body;
  try {
    await runJob("edit", "/api/edit", body, (ev) => {
      if (ev.type === "start") {
        $("edit-status").textContent = ev.method === "repaint" ? `RePaint: ${ev.count} edits · checkpoint step ${ev.checkpoint}`
          : ev.steps ? `SDEdit: ${ev.count} edits · ${ev.steps} steps each · checkpoint step ${ev.checkpoint}`
          : "strength × steps rounds to 0 steps: the image comes back unchanged (raise the strength or the steps)";
      }
      if (ev.type === "step") edit.path.step(ev);
      if (ev.type === "image") {
        const el = img(ev.png);
        el.dataset.index = ev.index;
        el.title = `edit ${ev.index}: click for its path`;
        el.addEventListener("click", () => replayEdit(ev.index));
        cells[ev.index].replaceWith(el);
        cells[ev.index] = el;
        if (ev.index === 0) el.classList.add("chosen");
        shown++;
      }
      if (ev.type === "done") {
        const walk = body.mask ? ` · ${edit.path.frames.length} sampler steps each, the jumps back included` : "";
        $("edit-status").textContent += `${walk} · ${shown} edits in ${((performance.now() - t0) / 1000).toFixed(2)} s`;
      }
      if (ev.type === "cancelled") $("edit-status").textContent = `cancelled after ${shown} of ${body.count} edits`;
      if (ev.type === "error") showError("edit-error", ev.message);
    }, () => { $("edit-cancel").disabled = true; });
  } catch (err) {
    showError("edit-error", err.message);
    $("edit-status").textContent = "";
    $("edit-cancel").disabled = true;
  }
}

// Edit k alone is edit k of the whole request (its seed is (seed, k)): its path, drawn again.
async function replayEdit(index) {
  const body = { ...edit.last, count: 1, first: index };
  for (const el of $("edit-grid").children) el.classList.toggle("chosen", el.dataset && el.dataset.index === String(index));
  edit.path.reset(`edit ${index}`);
  try {
    await runJob("edit-path", "/api/edit", body, (ev) => {
      if (ev.type === "step") edit.path.step(ev);
      if (ev.type === "error") showError("edit-error", ev.message);
    });
  } catch (err) { showError("edit-error", err.message); }
}

// ---------------------------------------------------------------- few steps
function addFewstepSampler(value) {
  const box = document.createElement("span");
  box.className = "colspec";
  const sel = document.createElement("select");
  sel.append(new Option(`the run's own${state.run.sampler ? " (" + state.run.sampler + ")" : ""}`, ""));
  for (const s of state.run.samplers) sel.append(new Option(s, s));
  sel.value = value;
  const rm = document.createElement("button");
  rm.type = "button"; rm.textContent = "×"; rm.title = "remove";
  rm.addEventListener("click", () => box.remove());
  box.append(sel, rm);
  $("fewstep-samplers").append(box);
}

async function startFewstep(e) {
  e.preventDefault();
  showError("fewstep-error", "");
  const body = { run: state.run.name, ...formValues($("fewstep-form")) };
  body.budgets = String(body.budgets || "").split(",").filter((t) => t.trim() !== "").map(Number);
  body.samplers = [...$("fewstep-samplers").querySelectorAll("select")].map((sel) => sel.value || null);
  const table = $("fewstep-out");
  table.innerHTML = "";
  let budgets = [];
  $("fewstep-cancel").disabled = false;
  try {
    await runJob("fewstep", "/api/fewstep", body, (ev) => {
      if (ev.type === "start") {
        budgets = ev.budgets;
        const head = table.insertRow();
        head.append(document.createElement("th"));
        for (const b of ev.budgets) head.append(Object.assign(document.createElement("th"), { textContent: `${b} evaluation${b > 1 ? "s" : ""}` }));
        ev.rows.forEach((name, r) => {
          const row = table.insertRow();
          const own = body.samplers[r] === null ? " (the run's own)" : "";
          row.append(Object.assign(document.createElement("th"), { textContent: (name || "its own algorithm") + own }));
          for (let c = 0; c < ev.budgets.length; c++) {
            const td = row.insertCell();
            const cell = document.createElement("div");
            cell.className = "cell";
            for (let i = 0; i < ev.count; i++) { const p = document.createElement("div"); p.className = "pending"; cell.append(p); }
            td.append(cell, Object.assign(document.createElement("div"), { className: "note", textContent: "…" }));
          }
        });
      }
      if (ev.type === "cell") {
        const td = table.rows[1 + ev.row].cells[1 + ev.column];
        const note = td.querySelector(".note");
        if (ev.needs !== undefined) {
          td.querySelector(".cell").innerHTML = "";
          note.textContent = `one step needs ${ev.needs} evaluations`;
          return;
        }
        td.querySelector(".cell").replaceChildren(...ev.images.map((png) => img(png)));
        note.textContent = `${ev.steps} step${ev.steps > 1 ? "s" : ""} · ${ev.evaluations} evaluation${ev.evaluations > 1 ? "s" : ""} · ` +
          (ev.same_as !== undefined ? `the images of ${budgets[ev.same_as]}` : `${ev.seconds.toFixed(2)} s`);
      }
      if (ev.type === "error") showError("fewstep-error", ev.message);
    }, () => { $("fewstep-cancel").disabled = true; });
  } catch (err) { showError("fewstep-error", err.message); $("fewstep-cancel").disabled = true; }
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
  path = makePath("path");
  edit.path = makePath("edit-path");
  $("edit-form").addEventListener("submit", startEdit);
  $("edit-cancel").addEventListener("click", () => state.jobs.edit && state.jobs.edit.cancel());
  $("edit-strength").addEventListener("input", (e) => { $("edit-strength-value").textContent = Number(e.target.value).toFixed(2); });
  $("edit-use-index").addEventListener("click", editUseIndex);
  $("edit-file").addEventListener("change", (e) => editFile(e.target.files[0]));
  $("edit-clear").addEventListener("click", () => { edit.mask.fill(0); editDraw(); });
  const paint = $("edit-canvas");
  paint.addEventListener("pointerdown", (e) => { edit.painting = true; paint.setPointerCapture(e.pointerId); editPaint(e); });
  paint.addEventListener("pointermove", (e) => { if (edit.painting) editPaint(e); });
  paint.addEventListener("pointerup", () => { edit.painting = false; });
  $("fewstep-form").addEventListener("submit", startFewstep);
  $("fewstep-add").addEventListener("click", () => addFewstepSampler(state.run.samplers[0] || ""));
  $("fewstep-cancel").addEventListener("click", () => state.jobs.fewstep && state.jobs.fewstep.cancel());
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
