// bgremover page: pick an image, POST it to /remove with the chosen options, show and offer the PNG.
// Plain browser JavaScript, no build step and no libraries; every option change re-runs the last image.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, model: null, controller: null, originalUrl: null, resultUrl: null, timer: 0 };

function kb(bytes) {
  if (bytes < 1024 * 1024) return `${Math.max(1, Math.round(bytes / 1024))} KB`;
  return `${Number((bytes / 1048576).toFixed(1))} MB`;  // 20 MB, 2.5 MB
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setDownload(url, name) {
  const a = $("download");
  if (url) {
    a.href = url;
    a.download = name;
    a.classList.remove("disabled");
    a.removeAttribute("aria-disabled");
  } else {
    a.removeAttribute("href");
    a.classList.add("disabled");
    a.setAttribute("aria-disabled", "true");
  }
}

function clearResult() {
  if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
  state.resultUrl = null;
  $("result").hidden = true;
  $("result").removeAttribute("src");
  $("result-info").textContent = "";
  setDownload(null);
}

function selectedClasses() {
  return [...document.querySelectorAll("#classes input:checked")].map((box) => box.value);
}

function setClasses(names) {
  const wanted = new Set(names);
  document.querySelectorAll("#classes input").forEach((box) => { box.checked = wanted.has(box.value); });
}

function options() {
  const params = new URLSearchParams();
  params.set("classes", selectedClasses().join(","));
  if ($("refine").checked) params.set("refine", "1");
  if ($("use-threshold").checked) params.set("threshold", $("threshold").value);
  const mode = document.querySelector("input[name=mode]:checked").value;
  if (mode === "mask") params.set("mask_only", "1");
  if (mode === "color") {
    const hex = $("bg-color").value;  // #rrggbb -> R,G,B (a '#' would need escaping in a URL)
    params.set("bg_color", [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)).join(","));
  }
  return { params, mode };
}

// Drops the request in flight, whose answer would otherwise land after what replaced it (a file over the size
// limit, no class ticked), and stops its spinner: the aborted run leaves both to whoever replaced it.
function stopRun() {
  if (state.controller) state.controller.abort();
  state.controller = null;
  $("spinner").hidden = true;
  $("result-stage").classList.remove("busy");
}

async function run() {
  if (!state.file) return;
  stopRun();  // a newer option set replaces the request in flight
  const { params, mode } = options();
  if (!selectedClasses().length) {
    clearResult();
    showError("Pick at least one class to keep.");
    return;
  }
  // checked here, not only when the file is picked: an option changed after a refused file sent it anyway
  const limit = state.model && state.model.limits && state.model.limits.max_bytes;
  if (limit && state.file.size > limit) {
    clearResult();
    showError(`“${state.file.name}” is ${kb(state.file.size)}; this server accepts up to ${kb(limit)}.`);
    return;
  }
  showError("");  // an earlier file's or option's error, shown beside this one's spinner, read as this one's
  const controller = new AbortController();
  state.controller = controller;
  const body = new FormData();
  body.append("file", state.file, state.file.name || "image");
  $("spinner").hidden = false;
  $("result-stage").classList.add("busy");
  const started = performance.now();
  try {
    const response = await fetch(`/remove?${params}`, { method: "POST", body, signal: controller.signal });
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try { message = (await response.json()).error || message; } catch (_) { /* not JSON: keep the status */ }
      throw new Error(message);
    }
    const blob = await response.blob();
    const ms = Math.round(performance.now() - started);
    clearResult();
    state.resultUrl = URL.createObjectURL(blob);
    const img = $("result");
    img.onload = () => {
      $("result-info").textContent = `${img.naturalWidth}×${img.naturalHeight} · ${kb(blob.size)} · ${ms} ms`;
    };
    img.src = state.resultUrl;
    img.hidden = false;
    const stem = (state.file.name || "image").replace(/\.[^.]*$/, "") || "image";
    setDownload(state.resultUrl, `${stem}.${mode === "mask" ? "mask" : "nobg"}.png`);
  } catch (err) {
    if (err.name === "AbortError") return;
    clearResult();
    showError(`Could not cut out “${state.file.name || "the image"}”: ${err.message}`);
  } finally {
    if (state.controller === controller) {
      state.controller = null;
      $("spinner").hidden = true;
      $("result-stage").classList.remove("busy");
    }
  }
}

function rerunSoon() {
  clearTimeout(state.timer);
  state.timer = setTimeout(run, 120);
}

function useFile(file) {
  if (!file) return;
  clearTimeout(state.timer);  // an option change just before is run below with this file, or not at all
  stopRun();
  state.file = file;
  if (state.originalUrl) URL.revokeObjectURL(state.originalUrl);
  state.originalUrl = URL.createObjectURL(file);
  const img = $("original");
  $("empty").hidden = true;
  img.hidden = false;
  $("original-info").textContent = kb(file.size);
  img.onload = () => { $("original-info").textContent = `${img.naturalWidth}×${img.naturalHeight} · ${kb(file.size)}`; };
  img.onerror = () => { img.hidden = true; $("original-info").textContent = `${kb(file.size)} · no preview`; };
  img.src = state.originalUrl;
  clearResult();
  run();
}

async function loadModel() {
  try {
    const response = await fetch("/model");
    if (!response.ok) throw new Error(`${response.status}`);
    const model = await response.json();
    state.model = model;
    const miou = typeof model.test_mIoU === "number" ? ` · test mIoU ${(model.test_mIoU * 100).toFixed(1)} %` : "";
    $("model-info").innerHTML = "";
    const net = document.createElement("b");
    net.textContent = model.net || model.model_file || "model";
    $("model-info").append(net, `${miou} · ${model.classes.length} classes`);
    const box = $("classes");
    box.textContent = "";
    for (const name of model.classes) {
      const label = document.createElement("label");
      label.className = "check";
      const input = document.createElement("input");
      input.type = "checkbox";
      input.value = name;
      input.addEventListener("change", rerunSoon);
      label.append(input, ` ${name}`);
      box.append(label);
    }
    setClasses(model.default_foreground || []);
    if (model.limits) $("drop-limit").textContent = `up to ${kb(model.limits.max_bytes)} · or paste with Ctrl+V`;
  } catch (err) {
    $("model-info").textContent = "model unavailable";
    showError(`Cannot read the model description (GET /model): ${err.message}`);
  }
}

function wire() {
  document.querySelectorAll(".origin").forEach((el) => { el.textContent = location.origin; });
  $("file").addEventListener("change", (e) => { useFile(e.target.files[0]); e.target.value = ""; });
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) {
    window.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    window.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  window.addEventListener("drop", (e) => useFile(e.dataTransfer.files[0]));
  window.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData ? e.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
    if (file) useFile(file);
  });
  $("cls-default").addEventListener("click", () => { setClasses((state.model || {}).default_foreground || []); rerunSoon(); });
  $("cls-none").addEventListener("click", () => { setClasses([]); rerunSoon(); });
  $("refine").addEventListener("change", rerunSoon);
  $("use-threshold").addEventListener("change", () => { $("threshold").disabled = !$("use-threshold").checked; rerunSoon(); });
  $("threshold").addEventListener("input", () => { $("threshold-value").textContent = Number($("threshold").value).toFixed(2); });
  $("threshold").addEventListener("change", rerunSoon);
  document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", rerunSoon));
  $("bg-color").addEventListener("change", () => { document.querySelector("input[name=mode][value=color]").checked = true; rerunSoon(); });
  setDownload(null);
  loadModel();
}

wire();
