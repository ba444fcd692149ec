// cmkit studio: the page. Every input event sends one request over the WebSocket; the server computes only a
// tab's newest request, and the page shows only the newest answer of each mode. window.studio.stats records,
// for every answer shown, the time from the input event to the frame after the image was painted.
"use strict";

const $ = (selector) => document.querySelector(selector);
const TITLES = { generate: "Generate", draw: "Draw", inpaint: "Inpaint", interpolate: "Interpolate",
  colorize: "Colorize", superres: "Super-resolution" };
const SOURCE_MODES = ["inpaint", "colorize", "superres"];
const DISPLAY = 336; // canvas pixels
// The studio's token (when it has one) comes in the page's URL and is kept in memory only, sent with every
// request: the server refuses requests without it.
const TOKEN = new URLSearchParams(location.search).get("token");
const withToken = (path) => (TOKEN ? `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(TOKEN)}` : path);

const studio = {
  info: null, ws: null, mode: "generate", nextId: 0, latest: {}, sent: new Map(),
  source: null, mask: null, strokes: null, ready: false,
  stats: { painted: {}, shown: {}, latency: {}, model: {}, server: {}, errors: [], superseded: 0 },
};
window.studio = studio;

// ------------------------------------------------------------------------------------------- pixels

function b64encode(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

function b64decode(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

// Canvas RGBA -> the model's channels (gray: the luma of each pixel, exact for gray paint).
function fromRGBA(rgba, channels) {
  const n = rgba.length / 4;
  const out = new Uint8Array(n * channels);
  for (let i = 0; i < n; i++) {
    const [r, g, b] = [rgba[4 * i], rgba[4 * i + 1], rgba[4 * i + 2]];
    if (channels === 1) out[i] = Math.round(0.299 * r + 0.587 * g + 0.114 * b);
    else out.set([r, g, b], 3 * i);
  }
  return out;
}

function toImageData(pixels, channels, size) {
  const data = new ImageData(size, size);
  for (let i = 0; i < size * size; i++) {
    const rgb = channels === 1 ? [pixels[i], pixels[i], pixels[i]] : pixels.subarray(3 * i, 3 * i + 3);
    data.data.set([rgb[0], rgb[1], rgb[2], 255], 4 * i);
  }
  return data;
}

// --------------------------------------------------------------------------------------- messaging

function connect() {
  const ws = new WebSocket(withToken(`ws://${location.host}/ws`));
  studio.ws = ws;
  ws.onopen = () => {
    setConnection(true, "connected");
    studio.ready = true;
    run(performance.now());
  };
  ws.onmessage = (event) => onReply(JSON.parse(event.data));
  ws.onclose = (event) => {
    studio.ready = false;
    const why = event.code === 1009 ? `a request was over ${studio.info.max_message.toLocaleString("en")} bytes`
      : event.reason || "connection lost";
    setConnection(false, `${why}; reconnecting`);
    setTimeout(connect, event.code === 1013 ? 5000 : 1000);
  };
}

function setConnection(on, text) {
  const el = $("#connection");
  el.className = on ? "on" : "off";
  el.textContent = text;
}

function request(mode, fields, t0) {
  if (!studio.ws || studio.ws.readyState !== WebSocket.OPEN) return;
  const id = ++studio.nextId;
  const message = JSON.stringify({ id, mode, ...fields });
  studio.latest[mode] = id;
  if (message.length > studio.info.max_message) {  // ASCII: characters are bytes
    showStatus(`this request has ${message.length.toLocaleString("en")} bytes; the studio accepts at most ` +
      `${studio.info.max_message.toLocaleString("en")}`, true);
    return;
  }
  studio.sent.set(id, { mode, t0 });
  studio.ws.send(message);
}

async function onReply(reply) {
  const meta = studio.sent.get(reply.id);
  studio.sent.delete(reply.id);
  if (reply.status === "superseded") { studio.stats.superseded++; return; }
  if (reply.error) {
    studio.stats.errors.push(reply.error);
    if (!meta || studio.latest[meta.mode] === reply.id) showStatus(reply.error, true);
    return;
  }
  if (!meta || studio.latest[reply.mode] !== reply.id) return; // an older answer: a newer one is coming
  const images = Object.entries(reply.images).map(([name, url]) => {
    const img = document.querySelector(`img[data-out="${reply.mode}-${name}"]`);
    img.src = url;
    return img.decode();
  });
  await Promise.all(images);
  requestAnimationFrame(() => setTimeout(() => painted(reply, meta), 0)); // after the frame with the image
}

function painted(reply, meta) {
  const ms = performance.now() - meta.t0;
  const s = studio.stats;
  for (const [key, value] of [["latency", ms], ["model", reply.model_ms], ["server", reply.server_ms]]) {
    (s[key][reply.mode] ||= []).push(value);
  }
  s.painted[reply.mode] = (s.painted[reply.mode] || 0) + 1;
  s.shown[reply.mode] = reply.id;
  document.querySelector(`[data-time="${reply.mode}"]`).textContent =
    `model ${reply.model_ms.toFixed(1)} ms, input to screen ${ms.toFixed(0)} ms`;
  showStatus("", false);
  if (reply.mode === "generate" && studio.info.teacher) {
    document.querySelector('[data-time="teacher"]').textContent = "sampling...";
    request("teacher", sampling(), performance.now());
  }
}

function showStatus(text, error) {
  const el = $("#status");
  el.textContent = text;
  el.className = error ? "status error" : "status";
}

// ---------------------------------------------------------------------------------------------- modes

function sampling() {
  const fields = { steps: Number($("#steps").value), seed: Math.max(0, Number($("#seed").value) || 0) };
  if ($("#label").value !== "") fields.label = Number($("#label").value);
  if (studio.info.guidance) fields.guidance = Number($("#guidance").value);
  return fields;
}

function run(t0) {
  const mode = studio.mode;
  const base = sampling();
  if (mode === "generate") request(mode, base, t0);
  else if (mode === "draw") request(mode, { ...base, image: b64encode(studio.strokes()), strength: strength() }, t0);
  else if (mode === "interpolate") {
    request(mode, { seed_a: Number($("#seed-a").value) || 0, seed_b: Number($("#seed-b").value) || 0,
      t: Number($("#slider").value) / 100, ...(base.label === undefined ? {} : { label: base.label }) }, t0);
  } else if (studio.source) {
    const fields = { ...base, image: b64encode(studio.source) };
    if (mode === "inpaint") fields.mask = b64encode(studio.mask);
    if (mode === "superres") fields.factor = Number($("#factor").value);
    request(mode, fields, t0);
  } else showStatus("load or upload a source image first", true);
}

function selectMode(mode, t0) {
  studio.mode = mode;
  for (const button of document.querySelectorAll("nav button")) button.setAttribute("aria-selected", button.dataset.mode === mode);
  for (const pane of document.querySelectorAll(".pane")) pane.hidden = pane.dataset.mode !== mode;
  $("#source").hidden = !SOURCE_MODES.includes(mode);
  run(t0);
}

// Strength: the first noise level of stroke-guided generation, on a log scale from 2 sigma_min to sigma_max.
function strength() {
  const lo = Math.log(2 * studio.info.sigma_min), hi = Math.log(studio.info.sigma_max);
  return Math.exp(lo + (hi - lo) * Number($("#strength").value) / 1000);
}

function setStrength(sigma) {
  const lo = Math.log(2 * studio.info.sigma_min), hi = Math.log(studio.info.sigma_max);
  $("#strength").value = Math.round(1000 * (Math.log(sigma) - lo) / (hi - lo));
  $("#strength-value").textContent = strength().toFixed(2);
}

// ---------------------------------------------------------------------------------------------- draw

function setUpDraw() {
  const canvas = $("#draw-canvas");
  const ctx = canvas.getContext("2d");
  const { resolution: res, channels } = studio.info;
  const small = new OffscreenCanvas(res, res).getContext("2d", { willReadFrequently: true });
  const fill = () => { ctx.fillStyle = $("#ink").value; ctx.fillRect(0, 0, DISPLAY, DISPLAY); };
  ctx.fillStyle = "#000000";
  ctx.fillRect(0, 0, DISPLAY, DISPLAY);
  studio.strokes = () => {
    small.imageSmoothingEnabled = true;
    small.imageSmoothingQuality = "high";
    small.drawImage(canvas, 0, 0, res, res);
    return fromRGBA(small.getImageData(0, 0, res, res).data, channels);
  };
  let last = null;
  const point = (e) => [e.offsetX * DISPLAY / canvas.clientWidth, e.offsetY * DISPLAY / canvas.clientHeight];
  const paint = (e) => {
    const p = point(e);
    ctx.strokeStyle = $("#ink").value;
    ctx.lineWidth = Number($("#brush").value);
    ctx.lineCap = "round";
    ctx.beginPath();
    ctx.moveTo(...(last || p));
    ctx.lineTo(...p);
    ctx.stroke();
    last = p;
    run(e.timeStamp);
  };
  canvas.addEventListener("pointerdown", (e) => { canvas.setPointerCapture(e.pointerId); last = null; paint(e); });
  canvas.addEventListener("pointermove", (e) => { if (last) paint(e); });
  canvas.addEventListener("pointerup", () => { last = null; });
  $("#draw-fill").addEventListener("click", (e) => { fill(); run(e.timeStamp); });
  $("#strength").addEventListener("input", (e) => {
    $("#strength-value").textContent = strength().toFixed(2);
    run(e.timeStamp);
  });
  setStrength(studio.info.stroke_sigma);
}

// -------------------------------------------------------------------------------------------- inpaint

function setUpMask() {
  const canvas = $("#mask-canvas");
  const ctx = canvas.getContext("2d");
  const res = studio.info.resolution;
  const cell = DISPLAY / res;
  studio.mask = new Uint8Array(res * res);
  studio.redrawMask = () => {
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, DISPLAY, DISPLAY);
    if (studio.sourceBitmap) ctx.drawImage(studio.sourceBitmap, 0, 0, DISPLAY, DISPLAY);
    ctx.fillStyle = "rgba(255, 40, 40, 0.55)";
    for (let i = 0; i < res * res; i++) {
      if (studio.mask[i]) ctx.fillRect((i % res) * cell, Math.floor(i / res) * cell, cell, cell);
    }
  };
  let down = false;
  const paint = (e) => {
    const x = e.offsetX * res / canvas.clientWidth, y = e.offsetY * res / canvas.clientHeight;
    const r = Number($("#mask-brush").value), value = $("#mask-erase").checked ? 0 : 1;
    for (let row = 0; row < res; row++) {
      for (let col = 0; col < res; col++) {
        if ((col + 0.5 - x) ** 2 + (row + 0.5 - y) ** 2 <= r * r) studio.mask[row * res + col] = value;
      }
    }
    studio.redrawMask();
    run(e.timeStamp);
  };
  canvas.addEventListener("pointerdown", (e) => { canvas.setPointerCapture(e.pointerId); down = true; paint(e); });
  canvas.addEventListener("pointermove", (e) => { if (down) paint(e); });
  canvas.addEventListener("pointerup", () => { down = false; });
  $("#mask-clear").addEventListener("click", (e) => { studio.mask.fill(0); studio.redrawMask(); run(e.timeStamp); });
}

// --------------------------------------------------------------------------------------------- source

async function setSource(reply, t0) {
  const { resolution: res, channels } = studio.info;
  studio.source = b64decode(reply.pixels);
  studio.sourceBitmap = await createImageBitmap(toImageData(studio.source, channels, res));
  studio.redrawMask();
  if (SOURCE_MODES.includes(studio.mode)) run(t0);
}

async function fetchSource(url, options, t0) {
  const status = $("#source-status");
  status.textContent = "loading...";
  status.className = "status";
  try {
    const response = await fetch(withToken(url), options);
    const reply = await response.json();
    if (!response.ok) throw new Error(reply.error || `HTTP ${response.status}`);
    if (reply.index !== undefined) {
      $("#source-index").value = reply.index;
      status.textContent = `image ${reply.index} of ${reply.count}` + (reply.label === null ? "" : `, class ${reply.label}`);
    } else status.textContent = "uploaded image";
    await setSource(reply, t0);
  } catch (err) {
    status.textContent = err.message;
    status.className = "status error";
  }
}

function setUpSource() {
  $("#source-load").addEventListener("click", (e) =>
    fetchSource(`/api/dataset?index=${Math.max(0, Number($("#source-index").value) || 0)}`, {}, e.timeStamp));
  $("#source-random").addEventListener("click", (e) => fetchSource("/api/dataset?index=random", {}, e.timeStamp));
  $("#source-file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file && file.size > studio.info.max_upload) {
      $("#source-status").textContent = `${file.name} has ${file.size.toLocaleString("en")} bytes; at most ` +
        `${studio.info.max_upload.toLocaleString("en")} are accepted`;
      $("#source-status").className = "status error";
    } else if (file) fetchSource("/api/upload", { method: "POST", body: file }, e.timeStamp);
  });
}

// ----------------------------------------------------------------------------------------------- page

function buildControls(info) {
  const params = info.parameters.toLocaleString("en");
  const shape = `${info.resolution}x${info.resolution} ${info.channels === 1 ? "gray" : "RGB"}`;
  let text = `${info.preset} (${info.method}, ${params} parameters, ${shape}, ${info.precision})`;
  if (info.teacher) text += `; teacher ${info.teacher.preset} (${info.teacher.parameters.toLocaleString("en")})`;
  $("#model").textContent = text;
  for (const mode of info.modes.filter((m) => m !== "teacher")) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.mode = mode;
    button.textContent = TITLES[mode];
    button.addEventListener("click", (e) => selectMode(mode, e.timeStamp));
    $("#tabs").append(button);
  }
  for (const k of info.steps) $("#steps").append(new Option(`${k}`, k));
  for (const f of info.factors) $("#factor").append(new Option(`${f}x`, f));
  for (let c = 0; c < info.classes; c++) $("#label").append(new Option(`${c}`, c));
  $("#class-control").hidden = !info.classes;
  if (info.guidance) {  // a guided model: classifier-free guidance, or the w input of an LCM model
    const g = $("#guidance");
    [g.min, g.max, g.value] = [info.guidance.min, info.guidance.max, info.guidance.default];
    const show = () => { $("#guidance-value").textContent = Number(g.value).toFixed(1); };
    g.addEventListener("input", show);
    show();
  }
  $("#guidance-control").hidden = !info.guidance;
  $("#teacher-figure").hidden = !info.teacher;
  for (const id of ["#steps", "#seed", "#label", "#guidance", "#factor", "#seed-a", "#seed-b", "#slider"]) {
    $(id).addEventListener("input", (e) => run(e.timeStamp));
  }
  $("#generate-next").addEventListener("click", (e) => {
    $("#seed").value = (Number($("#seed").value) || 0) + info.grid;
    run(e.timeStamp);
  });
}

async function main() {
  const response = await fetch(withToken("/api/info"));
  studio.info = await response.json();
  buildControls(studio.info);
  setUpDraw();
  setUpMask();
  setUpSource();
  selectMode("generate", performance.now());
  connect();
  fetchSource("/api/dataset?index=0", {}, performance.now());
}

main();
