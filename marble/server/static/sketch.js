// marble's ControlNet panel: a sketch pad (flat shapes in the shapes world's palette on its white
// background, the control image the built-in ControlNet reads) or an uploaded image, sent as one
// sd-webui-controlnet unit in the A1111 request (app.js's payload calls controlUnit()), the same
// alwayson_scripts.controlnet.args any client sends. Uses app.js's $, api, showError and loadImage.
//
// Shapes are painted pixel by pixel, not with canvas paths: paths are anti-aliased, and a sketch
// whose edges blend into colours outside the palette is not what the ControlNet was trained on.
"use strict";

const sketch = {
  palette: {},          // name -> [r, g, b], from GET /api/sketch (marble.data.shapes.COLORS)
  background: [255, 255, 255],
  colour: null,         // the palette name in use
  tool: "brush",        // brush, rect, circle, eraser
  undo: [],             // ImageData before each edit (the last 30)
  upload: null,         // {dataURL} of an uploaded image, sent as is until drawn on
  models: [],
};
window.marbleSketch = sketch;   // read by the browser test

const UNDO_DEPTH = 30;

function padCanvas() { return $("cn-canvas"); }

function fillBackground() {
  const c = padCanvas();
  const ctx = c.getContext("2d");
  ctx.fillStyle = `rgb(${sketch.background.join(",")})`;
  ctx.fillRect(0, 0, c.width, c.height);
}

// the pad has the generation's size, so one sketch pixel is one control-image pixel
function sizePad() {
  const c = padCanvas();
  const w = Math.max(8, parseInt($("width").value, 10) || 64), h = Math.max(8, parseInt($("height").value, 10) || 64);
  if (c.width === w && c.height === h) return;
  const old = document.createElement("canvas");   // what was drawn, scaled to the new size
  old.width = c.width;
  old.height = c.height;
  const drawn = c.width > 0 && c.height > 0;      // a 0-size canvas cannot be drawn (the first show)
  if (drawn) old.getContext("2d").drawImage(c, 0, 0);
  c.width = w;
  c.height = h;
  fillBackground();
  const ctx = c.getContext("2d");
  ctx.imageSmoothingEnabled = false;    // keep flat colours flat
  if (drawn) ctx.drawImage(old, 0, 0, w, h);
  sketch.undo = [];
}

function pushUndo() {
  const c = padCanvas();
  sketch.undo.push(c.getContext("2d").getImageData(0, 0, c.width, c.height));
  if (sketch.undo.length > UNDO_DEPTH) sketch.undo.shift();
}

function undo() {
  const prev = sketch.undo.pop();
  if (prev) padCanvas().getContext("2d").putImageData(prev, 0, 0);
}

function clearPad() {
  pushUndo();
  fillBackground();
  sketch.upload = null;
  $("cn-file").value = "";
}

// paint every pixel whose centre `inside(x, y)` holds, in [r, g, b], within the box [x0, x1) × [y0, y1)
function paint(image, rgb, box, inside) {
  const { width, height, data } = image;
  const [x0, y0, x1, y1] = [Math.max(0, Math.floor(box[0])), Math.max(0, Math.floor(box[1])),
    Math.min(width, Math.ceil(box[2])), Math.min(height, Math.ceil(box[3]))];
  for (let y = y0; y < y1; y++) {
    for (let x = x0; x < x1; x++) {
      if (!inside(x + 0.5, y + 0.5)) continue;
      const i = (y * width + x) * 4;
      data[i] = rgb[0]; data[i + 1] = rgb[1]; data[i + 2] = rgb[2]; data[i + 3] = 255;
    }
  }
}

// a round brush along the segment a -> b: pixels within `r` of it
function paintStroke(image, rgb, a, b, r) {
  const [dx, dy] = [b[0] - a[0], b[1] - a[1]];
  const len2 = dx * dx + dy * dy;
  const box = [Math.min(a[0], b[0]) - r, Math.min(a[1], b[1]) - r, Math.max(a[0], b[0]) + r, Math.max(a[1], b[1]) + r];
  paint(image, rgb, box, (x, y) => {
    const t = len2 ? Math.max(0, Math.min(1, ((x - a[0]) * dx + (y - a[1]) * dy) / len2)) : 0;
    const [px, py] = [a[0] + t * dx - x, a[1] + t * dy - y];
    return px * px + py * py <= r * r;
  });
}

function paintShape(image, rgb, tool, a, b) {
  if (tool === "rect") {
    paint(image, rgb, [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])],
      () => true);
  } else {   // circle: centred where the drag began, through where it is now
    const r = Math.hypot(b[0] - a[0], b[1] - a[1]);
    paint(image, rgb, [a[0] - r, a[1] - r, a[0] + r, a[1] + r],
      (x, y) => (x - a[0]) ** 2 + (y - a[1]) ** 2 <= r * r);
  }
}

function setupSketchPad() {
  const canvas = padCanvas();
  let start = null, last = null, before = null;
  const point = (ev) => {
    const r = canvas.getBoundingClientRect();
    return [(ev.clientX - r.left) * canvas.width / r.width, (ev.clientY - r.top) * canvas.height / r.height];
  };
  const colour = () => (sketch.tool === "eraser" ? sketch.background : sketch.palette[sketch.colour]);
  const radius = () => Number($("cn-brush").value) * canvas.width / canvas.getBoundingClientRect().width / 2;
  const draw = (p) => {
    const ctx = canvas.getContext("2d");
    if (sketch.tool === "brush" || sketch.tool === "eraser") {
      const image = ctx.getImageData(0, 0, canvas.width, canvas.height);
      paintStroke(image, colour(), last, p, radius());
      ctx.putImageData(image, 0, 0);
    } else {                               // a shape follows the pointer: redraw it over the state before
      const image = new ImageData(new Uint8ClampedArray(before.data), before.width, before.height);
      paintShape(image, colour(), sketch.tool, start, p);
      ctx.putImageData(image, 0, 0);
    }
    last = p;
  };
  canvas.addEventListener("pointerdown", (ev) => {
    pushUndo();
    before = sketch.undo[sketch.undo.length - 1];
    sketch.upload = null;                  // drawn on: the canvas is the control image now
    start = last = point(ev);
    draw(start);
    canvas.setPointerCapture(ev.pointerId);
  });
  canvas.addEventListener("pointermove", (ev) => { if (start) draw(point(ev)); });
  const end = () => { start = last = before = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

async function onControlFile() {
  const file = $("cn-file").files[0];
  if (!file) return;
  const dataURL = await new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.readAsDataURL(file);
  });
  let img;
  try { img = await loadImage(dataURL); } catch (e) { showError(e.message); return; }
  pushUndo();
  fillBackground();
  const c = padCanvas();
  c.getContext("2d").drawImage(img, 0, 0, c.width, c.height);   // shown at the pad's size...
  sketch.upload = { dataURL };                                   // ...sent as uploaded
}

function showPanel() {
  $("cn-body").hidden = !$("cn-enable").checked;
  if ($("cn-enable").checked) sizePad();
}

function controlUnit() {
  if (!$("cn-enable").checked || !sketch.models.length) return null;
  const dataURL = sketch.upload ? sketch.upload.dataURL : padCanvas().toDataURL("image/png");
  return {
    enabled: true,
    module: $("cn-module").value,
    model: $("cn-model").value,
    weight: Number($("cn-weight").value),
    image: dataURL.slice(dataURL.indexOf(",") + 1),   // plain base64, as the extension's clients send
    resize_mode: "Crop and Resize",
    guidance_start: Number($("cn-start").value),
    guidance_end: Number($("cn-end").value),
    control_mode: $("cn-mode").value,
    pixel_perfect: false,
  };
}

// The strength binding the prompt's colour words to the sketch's colours (marble's `regions`), or
// null when the panel is off or it is 0.
function regionsStrength() {
  if (!controlUnit()) return null;
  const v = Number($("cn-regions").value);
  return v > 0 ? v : null;
}

async function loadControlOptions() {
  const [info, models, modules] = await Promise.all([api("/api/sketch"), api("/controlnet/model_list"),
    api("/controlnet/module_list")]);
  sketch.palette = info.palette;
  sketch.background = info.background;
  sketch.models = models.model_list;
  $("cn-palette").replaceChildren(...Object.entries(info.palette).map(([name, rgb]) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "swatch";
    b.dataset.colour = name;
    b.title = b.ariaLabel = name;
    b.style.background = `rgb(${rgb.join(",")})`;
    b.addEventListener("click", () => pickColour(name));
    return b;
  }));
  pickColour(Object.keys(info.palette)[0]);
  const usable = modules.module_list.filter((m) => (modules.module_detail[m] || {}).available !== false);
  $("cn-module").replaceChildren(...usable.map((m) => new Option(m, m)));
  $("cn-module").value = "none";           // a sketch is already a control map
  $("cn-model").replaceChildren(...sketch.models.map((m) => new Option(m, m)));
  const none = sketch.models.length === 0;
  $("cn-empty").hidden = !none;
  $("cn-empty").textContent = none ? `no ControlNet models in ${info.controlnet_dir}` : "";
  $("cn-enable").disabled = none;
  if (none) $("cn-enable").checked = false;
  const c = padCanvas();
  c.width = c.height = 0;                  // sized (and painted white) on first show
  showPanel();
}

function pickColour(name) {
  sketch.colour = name;
  if (sketch.tool === "eraser") pickTool("brush");
  for (const b of $("cn-palette").children) b.classList.toggle("chosen", b.dataset.colour === name);
}

function pickTool(tool) {
  sketch.tool = tool;
  for (const b of document.querySelectorAll("#cn-tools button")) b.classList.toggle("chosen", b.dataset.tool === tool);
}

// ---- wiring -------------------------------------------------------------------------------
$("cn-enable").addEventListener("change", showPanel);
$("cn-file").addEventListener("change", onControlFile);
$("cn-undo").addEventListener("click", undo);
$("cn-clear").addEventListener("click", clearPad);
for (const b of document.querySelectorAll("#cn-tools button")) b.addEventListener("click", () => pickTool(b.dataset.tool));
for (const id of ["width", "height"]) $(id).addEventListener("change", () => { if ($("cn-enable").checked) sizePad(); });
$("cn-weight").addEventListener("input", () => { $("cn-weight-value").textContent = $("cn-weight").value; });
setupSketchPad();
loadControlOptions().catch((e) => showError(e.message));
