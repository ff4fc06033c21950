// The editing page: it speaks the public API only (/info, POST /edit as an async job,
// /jobs/{id}/events, /jobs/{id}/result, /attention/{id}), so whatever it does a client can do.
"use strict";

const $ = (id) => document.getElementById(id);
const page = {
  file: null,        // the chosen image (File or Blob)
  inputUrl: null,    // object URL of that image
  job: null,         // the 202 answer of the running job
  events: null,      // its EventSource
  outputUrl: null,
  seed: null,
  editId: null,
};

// An API error answer is JSON {"error": message, "error_type": kind}; show the message.
async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === "string") return `${response.status}: ${body.error}`;
  } catch (_) { /* not JSON: fall through */ }
  return `${response.status} ${response.statusText}: ${text.slice(0, 300)}`;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setStatus(text) {
  $("status").textContent = text;
}

async function loadInfo() {
  let info;
  try {
    const response = await fetch("/info");
    if (!response.ok) throw new Error(await errorMessage(response));
    info = await response.json();
  } catch (e) {
    showError(`Cannot read the server's settings (/info): ${e.message}`);
    return;
  }
  const m = info.model;
  const size = m.working_size ? `, works at ${m.working_size}x${m.working_size}` : "";
  $("model-line").textContent =
    `model ${m.model} on ${m.device} (${m.dtype})${size} · server ${info.version}`;
  const l = info.limits;
  const set = (id, attrs) => Object.assign($(id), attrs);
  set("steps", { max: l.max_steps, placeholder: `${l.default_steps}` });
  set("guidance_scale", { max: l.max_guidance_scale, placeholder: `${m.default_guidance_scale}` });
  set("image_guidance_scale", {
    max: l.max_image_guidance_scale, placeholder: `${m.default_image_guidance_scale}`,
  });
  $("instruction").maxLength = l.max_instruction_chars;
  $("scheduler").options[0].textContent = `model's default (${m.default_scheduler})`;
  const sizes = $("working_size").options;
  sizes[0].textContent = `server's default (${l.working_size})`;
  sizes[1].textContent = m.working_size
    ? `the model's (about ${m.working_size}x${m.working_size})`
    : "the model's (it records none: the picture's own)";
  const adapters = $("adapter");
  adapters.options[0].textContent = `server's default (${info.default_adapter ?? "none"})`;
  for (const name of info.adapters) adapters.add(new Option(name, name));
  $("limits").textContent =
    `Limits: steps 1–${l.max_steps} (default ${l.default_steps}), guidance 0–${l.max_guidance_scale}, ` +
    `image guidance 0–${l.max_image_guidance_scale}, at most ${l.max_pixels} pixels and ` +
    `${l.max_body_bytes} bytes per image, ${l.max_instruction_chars} characters of instruction.`;
}

function chooseImage(file) {
  if (!file) return;
  page.file = file;
  if (page.inputUrl) URL.revokeObjectURL(page.inputUrl);
  page.inputUrl = URL.createObjectURL(file);
  const picked = $("picked");
  picked.src = page.inputUrl;
  picked.alt = `chosen image: ${file.name || "pasted image"}`;
  picked.hidden = false;
  $("drop-text").textContent = `${file.name || "pasted image"} (${file.size} bytes). Choose, drop or paste another to replace it.`;
  clearError();
}

function formFields() {
  const form = new FormData();
  form.append("image", page.file, page.file.name || "pasted.png");
  form.append("instruction", $("instruction").value);
  for (const id of ["steps", "guidance_scale", "image_guidance_scale", "seed", "scheduler", "adapter", "output_format", "working_size"]) {
    const value = $(id).value.trim();
    if (value !== "") form.append(id, value);
  }
  return form;
}

function running(on) {
  $("submit").disabled = on;
  $("cancel").disabled = !on;
  $("edit-form").setAttribute("aria-busy", on ? "true" : "false");
}

async function submitEdit(event) {
  event.preventDefault();
  if (page.job) return;
  clearError();
  if (!page.file) {
    showError("Choose an image first (file picker, drag and drop, or paste).");
    $("image").focus();
    return;
  }
  if ($("instruction").value.trim() === "") {
    showError("Type an instruction, e.g. “colour the square orange”.");
    $("instruction").focus();
    return;
  }
  running(true);
  $("progress").hidden = true;
  setStatus("Sending…");
  let response;
  try {
    response = await fetch("/edit", {
      method: "POST",
      headers: { Prefer: "respond-async" },
      body: formFields(),
    });
  } catch (e) {
    running(false);
    setStatus("");
    showError(`The request failed: ${e.message}`);
    return;
  }
  if (!response.ok) {
    running(false);
    setStatus("");
    showError(await errorMessage(response));
    return;
  }
  page.job = await response.json();
  const progress = $("progress");
  progress.hidden = false;
  progress.removeAttribute("value");
  setStatus("Queued");
  follow(page.job);
}

// Progress from the job's server-sent events; every event carries the job's status JSON.
function follow(job) {
  const events = new EventSource(job.events_url);
  page.events = events;
  for (const kind of ["queued", "running", "done", "failed", "cancelled"]) {
    events.addEventListener(kind, (e) => onStatus(JSON.parse(e.data)));
  }
  events.onerror = async () => {
    // The stream ends after the final event; anything else: ask once where the job is.
    if (page.job !== job) return;
    const response = await fetch(job.status_url);
    if (response.ok) onStatus(await response.json());
    else { showError(await errorMessage(response)); finishJob(); }
  };
}

function finishJob() {
  if (page.events) page.events.close();
  page.events = null;
  page.job = null;
  running(false);
}

function onStatus(status) {
  if (!page.job || status.id !== page.job.id) return;
  const progress = $("progress");
  switch (status.status) {
    case "queued":
      progress.removeAttribute("value");
      setStatus(status.position ? `Queued, ${status.position} ahead` : "Queued, next");
      break;
    case "running":
      if (status.total_steps) {
        progress.max = status.total_steps;
        progress.value = status.step ?? 0;
        setStatus(`Step ${status.step ?? 0} of ${status.total_steps}`);
      }
      break;
    case "done": {
      const job = page.job;
      finishJob();
      progress.value = progress.max;
      setStatus("Done");
      showResult(job);
      break;
    }
    case "failed":
      finishJob();
      progress.hidden = true;
      setStatus("Failed");
      showError(status.error ? `${status.error.error}` : "The edit failed.");
      break;
    case "cancelled":
      finishJob();
      progress.hidden = true;
      setStatus("Cancelled");
      break;
  }
}

async function cancelJob() {
  const job = page.job;
  if (!job) return;
  const response = await fetch(job.status_url, { method: "DELETE" });
  if (!response.ok) {
    showError(await errorMessage(response));
    return;
  }
  onStatus(await response.json());
}

async function showResult(job) {
  const response = await fetch(job.result_url);
  if (!response.ok) {
    showError(await errorMessage(response));
    return;
  }
  const blob = await response.blob();
  const h = response.headers;
  if (page.outputUrl) URL.revokeObjectURL(page.outputUrl);
  page.outputUrl = URL.createObjectURL(blob);
  page.seed = h.get("x-seed");
  page.editId = h.get("x-edit-id") || job.id;
  for (const id of ["output", "compare-after"]) $(id).src = page.outputUrl;
  for (const id of ["input-view", "compare-before"]) $(id).src = page.inputUrl;
  const format = (blob.type.split("/")[1] || "png").replace("jpeg", "jpg");
  const download = $("download");
  download.href = page.outputUrl;
  download.download = `rl4pix-seed-${page.seed}.${format}`;
  const ran = h.get("x-working-size");
  $("meta").textContent = [
    `seed ${page.seed}`,
    `adapter ${h.get("x-adapter")}`,
    ran ? `ran at ${ran}` : null,
    `${h.get("x-inference-ms")} ms`,
  ].filter(Boolean).join(" · ");
  $("result").hidden = false;
  await loadWords(page.editId);
}

async function loadWords(editId) {
  const box = $("words");
  box.replaceChildren();
  $("overlay").hidden = true;
  const response = await fetch(`/attention/${editId}/tokens`);
  if (!response.ok) {
    // Capture off (--attention-cache 0) is a setting, not a failure of the edit.
    $("attention").hidden = true;
    if (response.status !== 404) showError(await errorMessage(response));
    return;
  }
  const tokens = await response.json();
  const buttons = [wordButton(editId, null, "whole instruction")];
  for (const w of tokens.words) buttons.push(wordButton(editId, w.word, w.word));
  box.replaceChildren(...buttons);
  $("attention").hidden = false;
  await showOverlay(editId, null, buttons[0]);
}

function wordButton(editId, word, label) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  button.dataset.word = word ?? "";
  button.setAttribute("aria-pressed", "false");
  button.addEventListener("click", () => showOverlay(editId, word, button));
  return button;
}

async function showOverlay(editId, word, button) {
  const query = word === null ? "" : `&word=${encodeURIComponent(word)}`;
  const response = await fetch(`/attention/${editId}?opacity=1${query}`);
  if (!response.ok) {
    showError(await errorMessage(response));
    return;
  }
  const overlay = $("overlay");
  if (overlay.dataset.url) URL.revokeObjectURL(overlay.dataset.url);
  overlay.dataset.url = URL.createObjectURL(await response.blob());
  overlay.src = overlay.dataset.url;
  overlay.dataset.word = word ?? "";
  overlay.style.opacity = $("opacity").value;
  overlay.hidden = false;
  $("overlay-label").textContent = word === null ? "(attention: whole instruction)" : `(attention: “${word}”)`;
  for (const b of $("words").children) b.setAttribute("aria-pressed", String(b === button));
}

function setupDrop() {
  const drop = $("drop");
  for (const kind of ["dragenter", "dragover"]) {
    drop.addEventListener(kind, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const kind of ["dragleave", "drop"]) {
    drop.addEventListener(kind, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (file) chooseImage(file);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData?.items || [])].find((i) => i.kind === "file");
    if (!item) return; // pasted text goes where the cursor is
    e.preventDefault();
    chooseImage(item.getAsFile());
  });
}

function setup() {
  $("image").addEventListener("change", (e) => {
    chooseImage(e.target.files[0]);
    // Cleared so that choosing the same file again (after a drop or paste) counts as a choice.
    e.target.value = "";
  });
  $("edit-form").addEventListener("submit", submitEdit);
  $("cancel").addEventListener("click", cancelJob);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && page.job) cancelJob();
  });
  $("opacity").addEventListener("input", (e) => { $("overlay").style.opacity = e.target.value; });
  const compare = () => { $("compare-after").style.clipPath = `inset(0 0 0 ${$("compare").value}%)`; };
  $("compare").addEventListener("input", compare);
  compare();
  $("reuse-seed").addEventListener("click", () => {
    $("seed").value = page.seed ?? "";
    $("advanced").open = true;
    $("seed").focus();
  });
  setupDrop();
  loadInfo();
}

setup();
