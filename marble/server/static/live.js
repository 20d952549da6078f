// marble's live mode: every change of the prompt or settings asks for an image (debounced: at once
// after a pause, else when the typing pauses), over one Server-Sent Events stream (/api/live/stream). Requests carry a growing `seq`;
// the server cancels older ones ("latest wins") and the page draws an image only if its seq is
// newer than the one shown, so an older image never replaces a newer one. Uses app.js's $, api,
// showError, numberOrNull and loadGallery.
"use strict";

const live = {
  on: false,
  source: null,        // the EventSource
  stream: null,        // the server's id for it
  settings: null,      // GET /api/live
  seq: -1,             // the newest request sent
  shownSeq: -1,        // the newest image drawn
  timer: null,
  lastChange: -Infinity,   // performance.now() of the last change
  sent: new Map(),     // seq -> performance.now() when its request left
  pendingKeys: [],     // times of changes not yet answered by an image
  latencies: [],       // ms from a change to the first image that includes it (the last 500)
  shown: [],           // {seq, at, prompt} of every image drawn, in order
  stale: [],           // seqs that arrived after a newer one was drawn (never drawn; should stay empty)
};
window.marbleLive = live;   // read by the browser test and benchmarks/live_latency.py

async function startLive() {
  live.settings = await api("/api/live");
  const s = live.settings;
  // the live settings go into the form, so what is shown is what is sent
  $("steps").value = s.steps;
  $("cfg").value = s.cfg;
  $("sampler").value = s.sampler;
  if (!$("width").value) $("width").value = s.width;
  if (!$("height").value) $("height").value = s.height;
  // a fixed seed: the image then changes with the prompt only
  if (numberOrNull("seed", (v) => parseInt(v, 10)) === -1 || $("seed").value.trim() === "") {
    $("seed").value = Math.floor(Math.random() * 2 ** 31);
  }
  $("live-panel").hidden = false;
  $("live-info").textContent = `${s.model}: ${s.steps} steps, ${s.sampler}, CFG ${s.cfg}` +
    (s.lora ? `, LoRA ${s.lora}` : "") + " — type to draw";
  const source = new EventSource("/api/live/stream");
  live.source = source;
  source.addEventListener("ready", (ev) => {
    live.stream = JSON.parse(ev.data).stream;
    sendLive();                                  // (again after a reconnect: a new stream)
  });
  source.addEventListener("image", onLiveImage);
  source.addEventListener("failed", (ev) => {
    const f = JSON.parse(ev.data);
    if (f.seq >= live.seq) showError(`${f.status}: ${f.detail}`);
  });
  source.onerror = () => {
    live.stream = null;
    if (source.readyState === EventSource.CLOSED) {
      showError("the live stream was refused or closed (too many live streams open from here?)");
      $("live").checked = false;
      stopLive();
    }
  };
}

function stopLive() {
  live.on = false;
  clearTimeout(live.timer);
  if (live.source) live.source.close();
  live.source = live.stream = null;
  $("live-panel").hidden = true;
}

function onLiveChange() {
  if (!live.on) return;
  const now = performance.now();
  const wait = live.settings ? live.settings.debounce_ms : 100;
  const quiet = now - live.lastChange >= wait;
  live.lastChange = now;
  live.pendingKeys.push(now);
  clearTimeout(live.timer);
  // the first change after a pause goes at once; changes closer together than the debounce wait
  // until the typing pauses for it (a debounce with leading and trailing edges)
  if (quiet) sendLive();
  else live.timer = setTimeout(sendLive, wait);
}

async function sendLive() {
  if (!live.on || !live.stream) return;
  const seq = ++live.seq;
  // the page's own form fields (app.js's payload), minus what a live image does not take
  const { prompt, negative_prompt, seed, steps, cfg_scale, sampler_name, width, height } = payload();
  const body = { seq, prompt, negative_prompt, seed, steps, cfg_scale, sampler_name, width, height };
  for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
  live.sent.set(seq, performance.now());
  try {
    await api(`/api/live/${live.stream}`, { method: "POST", headers: { "Content-Type": "application/json" },
                                           body: JSON.stringify(body) });
    if (seq === live.seq) showError("");
  } catch (e) {
    if (seq === live.seq && !e.message.startsWith("409")) showError(e.message);   // 409: a newer one went first
  }
}

function onLiveImage(ev) {
  const r = JSON.parse(ev.data);
  if (r.seq <= live.shownSeq) { live.stale.push(r.seq); return; }
  live.shownSeq = r.seq;
  const img = $("live-image");
  img.onload = () => {
    if (live.shownSeq !== r.seq) return;         // a newer one was set meanwhile
    const at = performance.now();
    const sentAt = live.sent.get(r.seq);
    // every change made before this image's request left is now on screen
    const answered = live.pendingKeys.filter((t) => t <= sentAt);
    live.pendingKeys = live.pendingKeys.filter((t) => t > sentAt);
    for (const t of answered) live.latencies.push(at - t);
    if (live.latencies.length > 500) live.latencies.splice(0, live.latencies.length - 500);
    for (const s of live.sent.keys()) if (s <= r.seq) live.sent.delete(s);
    live.shown.push({ seq: r.seq, at, prompt: r.record.prompt, seconds: r.seconds });
    if (live.shown.length > 500) live.shown.splice(0, live.shown.length - 500);
    const last = answered.length ? ` — drawn ${Math.round(at - answered[answered.length - 1])} ms after your change` : "";
    $("live-info").textContent = `${r.parameters.split("\n").slice(-1)[0]}${last}`;
    $("live-prompt").textContent = r.record.prompt;
  };
  img.dataset.seq = r.seq;
  img.title = `${r.parameters}\n(click to keep it in the gallery)`;
  img.src = "data:image/png;base64," + r.png;
}

async function keepLive() {
  if (!live.stream || live.shownSeq < 0) return;
  try {
    await api(`/api/live/${live.stream}/keep`, { method: "POST", headers: { "Content-Type": "application/json" },
                                                body: JSON.stringify({ seq: live.shownSeq }) });
    await loadGallery();
  } catch (e) {
    showError(e.message);
  }
}

$("live").addEventListener("change", () => {
  live.on = $("live").checked;
  if (live.on) startLive().catch((e) => { showError(e.message); $("live").checked = false; stopLive(); });
  else stopLive();
});
for (const id of ["prompt", "negative", "seed", "steps", "cfg", "sampler", "width", "height"]) {
  $(id).addEventListener("input", onLiveChange);
}
$("live-image").addEventListener("click", keepLive);
$("keep").addEventListener("click", keepLive);
