// marble's web UI: a form that calls the server's A1111 routes, a mask painter, a progress poller
// and a gallery of /api/outputs. All text from the server goes through textContent, never HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];
let init = null;          // {dataURL, width, height} of the uploaded image
let maskPainted = false;
let polling = null;
let running = false;      // a generation is in flight: progress polls may write the status line

async function api(path, options = {}) {
  const res = await fetch(path, { credentials: "same-origin", ...options });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    const msg = (body.error && body.error.message) || body.detail || res.statusText;
    throw new Error(`${res.status}: ${typeof msg === "string" ? msg : JSON.stringify(msg)}`);
  }
  return body;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function numberOrNull(id, parse = Number) {
  const v = $(id).value.trim();
  return v === "" ? null : parse(v);
}

// ---- options ------------------------------------------------------------------------------
async function loadOptions() {
  models = await api("/api/models");
  $("model").replaceChildren(...models.map((m) => new Option(m.name, m.name)));
  const samplers = await api("/sdapi/v1/samplers");
  $("sampler").replaceChildren(...samplers.map((s) => new Option(s.name, s.name)));
  applyModelDefaults();
  $("status").textContent = `${models.length} model${models.length > 1 ? "s" : ""}: ${models.map((m) => m.name).join(", ")}`;
}

function currentModel() {
  return models.find((m) => m.name === $("model").value) || models[0];
}

function applyModelDefaults() {
  const m = currentModel();
  $("steps").value = m.default_steps;
  $("cfg").value = m.default_cfg;
  $("sampler").value = m.default_sampler;
  $("width").value = init ? init.width : m.default_width;
  $("height").value = init ? init.height : m.default_height;
  $("width").step = $("height").step = $("width").min = $("height").min = m.size_multiple;
}

// ---- img2img upload and the mask painter --------------------------------------------------
function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the file is not an image the browser can read"));
    img.src = src;
  });
}

async function onInitFile() {
  const file = $("init-file").files[0];
  if (!file) return clearInit();
  const dataURL = await new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.readAsDataURL(file);
  });
  let img;
  try { img = await loadImage(dataURL); } catch (e) { showError(e.message); return clearInit(); }
  const multiple = currentModel().size_multiple;
  init = { dataURL, width: img.naturalWidth, height: img.naturalHeight };
  for (const id of ["init-canvas", "mask-canvas"]) {
    $(id).width = img.naturalWidth;
    $(id).height = img.naturalHeight;
  }
  $("init-canvas").getContext("2d").drawImage(img, 0, 0);
  clearMask();
  // the server wants a multiple of the model's latent factor; the image is resized to this size
  $("width").value = Math.max(multiple, Math.floor(img.naturalWidth / multiple) * multiple);
  $("height").value = Math.max(multiple, Math.floor(img.naturalHeight / multiple) * multiple);
  $("init-controls").hidden = false;
  $("clear-init").hidden = false;
}

function clearInit() {
  init = null;
  $("init-file").value = "";
  $("init-controls").hidden = true;
  $("clear-init").hidden = true;
  clearMask();
}

function clearMask() {
  const c = $("mask-canvas");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  maskPainted = false;
}

function setupPainter() {
  const canvas = $("mask-canvas");
  let last = null;
  const point = (ev) => {
    const r = canvas.getBoundingClientRect();
    return [(ev.clientX - r.left) * canvas.width / r.width, (ev.clientY - r.top) * canvas.height / r.height];
  };
  const stroke = (from, to) => {
    const ctx = canvas.getContext("2d");
    ctx.strokeStyle = "#f00";  // shown in red; only the coverage (alpha) is sent
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.lineWidth = Number($("brush").value) * canvas.width / canvas.getBoundingClientRect().width;
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...to);
    ctx.stroke();
    maskPainted = true;
  };
  canvas.addEventListener("pointerdown", (ev) => { last = point(ev); stroke(last, last); canvas.setPointerCapture(ev.pointerId); });
  canvas.addEventListener("pointermove", (ev) => { if (last) { const p = point(ev); stroke(last, p); last = p; } });
  const end = () => { last = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

function maskDataURL() {
  // marble's (and A1111's) convention: white = repaint, black = keep; the painted coverage is the mask
  const src = $("mask-canvas");
  const painted = src.getContext("2d").getImageData(0, 0, src.width, src.height);
  const px = painted.data;
  for (let i = 0; i < px.length; i += 4) {
    px[i] = px[i + 1] = px[i + 2] = px[i + 3];
    px[i + 3] = 255;
  }
  const c = document.createElement("canvas");
  c.width = src.width;
  c.height = src.height;
  c.getContext("2d").putImageData(painted, 0, 0);
  return c.toDataURL("image/png");
}

// ---- generation ---------------------------------------------------------------------------
function payload() {
  const p = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    seed: numberOrNull("seed", (v) => parseInt(v, 10)) ?? -1,
    steps: numberOrNull("steps", (v) => parseInt(v, 10)),
    cfg_scale: numberOrNull("cfg", parseFloat),
    sampler_name: $("sampler").value,
    width: numberOrNull("width", (v) => parseInt(v, 10)),
    height: numberOrNull("height", (v) => parseInt(v, 10)),
    batch_size: numberOrNull("count", (v) => parseInt(v, 10)) ?? 1,
    n_iter: 1,
    override_settings: { sd_model_checkpoint: $("model").value },
  };
  for (const k of Object.keys(p)) if (p[k] === null || Number.isNaN(p[k])) delete p[k];
  if (init) {
    p.init_images = [init.dataURL];
    p.denoising_strength = Number($("strength").value);
    if (maskPainted) p.mask = maskDataURL();
  }
  const unit = controlUnit();   // sketch.js: the ControlNet panel's unit, or null when it is off
  if (unit) p.alwayson_scripts = { controlnet: { args: [unit] } };
  const regions = regionsStrength();   // sketch.js: colour words bound to the sketch, or null
  if (regions) p.regions = regions;
  return p;
}

async function pollProgress() {
  if (polling) return;
  polling = api(`/sdapi/v1/progress?model=${encodeURIComponent($("model").value)}`)
    .then((p) => {
      if (!running) return;   // a poll that answers after the result must not overwrite it
      $("progress").value = p.progress;
      const s = p.state;
      $("progress-text").textContent = s.sampling_steps
        ? `step ${s.sampling_step} of ${s.sampling_steps}, about ${p.eta_relative.toFixed(1)} s left`
        : (s.job_count ? "waiting in the queue" : "");
      if (p.current_image) {
        $("preview").src = "data:image/png;base64," + p.current_image;
        $("preview").hidden = false;
      }
    })
    .catch(() => {})
    .finally(() => { polling = null; });
}

async function generate(ev) {
  ev.preventDefault();
  showError("");
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("progress").value = 0;
  $("results").replaceChildren();
  running = true;
  const timer = setInterval(pollProgress, 300);
  try {
    const route = init ? "/sdapi/v1/img2img" : "/sdapi/v1/txt2img";
    const r = await api(route, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload()) });
    running = false;
    const info = JSON.parse(r.info);
    if (info.interrupted) showError("interrupted");
    r.images.forEach((b64, i) => {
      const img = new Image();
      img.src = "data:image/png;base64," + b64;
      img.alt = img.title = info.infotexts[i] || "";
      $("results").append(img);
    });
    $("progress").value = 1;
    $("progress-text").textContent = `done: seeds ${info.all_seeds.join(", ")}`;
    await loadGallery();
  } catch (e) {
    showError(e.message);
  } finally {
    running = false;
    clearInterval(timer);
    $("generate").disabled = false;
    $("interrupt").disabled = true;
    $("preview").hidden = true;
  }
}

// ---- gallery ------------------------------------------------------------------------------
function useParameters(r) {
  $("prompt").value = r.prompt;
  $("negative").value = r.negative_prompt || "";
  $("seed").value = r.seed;
  $("steps").value = r.steps;
  $("cfg").value = r.cfg;
  $("sampler").value = r.sampler;
  $("width").value = r.width;
  $("height").value = r.height;
  $("count").value = 1;
  if (models.some((m) => m.name === r.model_name)) $("model").value = r.model_name;
  if (r.strength != null) {
    $("strength").value = r.strength;
    $("strength-value").textContent = r.strength;
  }
  window.scrollTo(0, 0);
}

async function loadGallery() {
  const g = await api("/api/outputs?limit=48");
  $("gallery").replaceChildren(...g.items.map((item) => {
    const fig = document.createElement("figure");
    fig.className = "output";
    fig.dataset.name = item.name;
    const img = new Image();
    img.src = item.url;
    img.loading = "lazy";
    img.alt = item.parameters;
    const pre = document.createElement("pre");
    pre.textContent = item.parameters;
    const use = document.createElement("button");
    use.type = "button";
    use.className = "use";
    use.textContent = "Use these parameters";
    use.disabled = !item.record;
    use.addEventListener("click", () => useParameters(item.record));
    const cap = document.createElement("figcaption");
    cap.append(pre, use);
    fig.append(img, cap);
    return fig;
  }));
}

// ---- wiring -------------------------------------------------------------------------------
$("form").addEventListener("submit", generate);
$("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", { method: "POST" }).catch(() => {}));
$("model").addEventListener("change", applyModelDefaults);
$("init-file").addEventListener("change", onInitFile);
$("clear-init").addEventListener("click", clearInit);
$("clear-mask").addEventListener("click", clearMask);
$("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
setupPainter();
loadOptions().then(loadGallery).catch((e) => showError(e.message));
