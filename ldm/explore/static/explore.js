// ldm explore: the page. It asks /api/info once, then POST /api/run with the controls' values, and draws
// what comes back (ldm/explore/stages.py says what each field is). No library, nothing from elsewhere.
// URL parameters set the controls (?prompt=...&steps=8&seed=3&sampler=ddim&step=2&autorun=0), so a
// view can be linked, and tested with a headless browser.
"use strict";

const $ = (id) => document.getElementById(id);
const FIELDS = ["prompt", "negative_prompt", "steps", "guidance", "seed", "sampler", "num_images", "layer"];
const NUMBERS = new Set(["steps", "guidance", "seed", "num_images"]);
let info = null, result = null, running = false, pending = false, timer = null;

// viridis, 9 stops (matplotlib's, sampled): perceptually even, readable in grey, colour-blind safe
const VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
                 [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];
function colour(v) {  // v in [0, 1] -> [r, g, b]
  const x = Math.min(Math.max(Number.isFinite(v) ? v : 0, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(x), VIRIDIS.length - 2), f = x - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
}
const css = (rgb) => `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`;

function sized(canvas, w, h) {  // a canvas of w x h CSS pixels, sharp on high-DPI screens
  const r = window.devicePixelRatio || 1;
  canvas.width = Math.round(w * r); canvas.height = Math.round(h * r);
  canvas.style.width = w + "px"; canvas.style.height = h + "px";
  const ctx = canvas.getContext("2d");
  ctx.setTransform(r, 0, 0, r, 0, 0);
  return ctx;
}

function colourBar(canvas, lo, hi, height, digits) {  // a vertical scale with 5 labelled ticks
  const ctx = sized(canvas, 62, height + 12);
  for (let y = 0; y < height; y++) {
    ctx.fillStyle = css(colour(1 - y / (height - 1)));
    ctx.fillRect(0, 6 + y, 14, 1);
  }
  ctx.strokeStyle = "#5b6475"; ctx.strokeRect(0.5, 6.5, 14, height - 1);
  ctx.fillStyle = "#1d2330"; ctx.font = "11px system-ui, sans-serif"; ctx.textBaseline = "middle";
  for (let k = 0; k <= 4; k++) {
    const y = 6 + (height - 1) * (1 - k / 4);
    ctx.fillRect(14, y, 4, 1);
    ctx.fillText((lo + (hi - lo) * k / 4).toFixed(digits), 21, y);
  }
}

// ---- the controls ---------------------------------------------------------------------------------
function values() {
  const out = {};
  for (const f of FIELDS) out[f] = NUMBERS.has(f) ? Number($(f).value) : $(f).value;
  return out;
}

function showValues() {
  $("steps-value").textContent = $("steps").value;
  $("guidance-value").textContent = Number($("guidance").value).toFixed(1);
}

function schedule(delay) {  // run after the user paused; the newest settings win
  clearTimeout(timer);
  timer = setTimeout(run, delay);
}

async function run() {
  if (running) { pending = true; return; }
  running = true; pending = false;
  for (const f of FIELDS) $(f).classList.remove("bad");
  status("generating…", "busy");
  try {
    const answer = await fetch("/api/run", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(values())});
    const data = await answer.json();
    if (!answer.ok) {
      if (data.field && $(data.field)) $(data.field).classList.add("bad");
      status(`${answer.status}: ${data.error}`, "error");
    } else {
      result = data;
      draw();
      const t = data.timing;
      status(`done: ${data.steps.length} steps in ${t.generate_s.toFixed(2)} s (all stages ${t.total_s.toFixed(2)} s)`, "done");
    }
  } catch (e) {
    status(`the server did not answer (${e.message}); is \`ldm explore\` still running?`, "error");
  } finally {
    running = false;
    if (pending) run();
  }
}

function status(text, kind) {
  const s = $("status");
  s.textContent = text; s.className = kind;
  document.body.dataset.state = kind;  // "busy" | "done" | "error": what a test waits for
}

// ---- the stages -------------------------------------------------------------------------------------
function draw() {
  drawTokens(); drawSimilarity();
  const step = $("step"), n = result.steps.length;
  const atEnd = Number(step.value) >= Number(step.max);  // a slider at the last step stays at the last step
  step.max = n;
  if (!draw.done) step.value = Math.min(Number(new URLSearchParams(location.search).get("step")) || n, n);
  else step.value = atEnd ? n : Math.min(Number(step.value), n);
  draw.done = true;
  const pick = $("attention-image"), keep = Number(pick.value) || 0;
  pick.replaceChildren(...result.images.map((_, b) => new Option(String(b + 1), String(b))));
  pick.value = String(Math.min(keep, result.images.length - 1));
  drawStep(); drawImages();
}

function drawTokens() {
  const box = $("tokens");
  box.replaceChildren(...result.tokens.map((t) => {
    const el = document.createElement("div");
    el.className = "token" + (t.text.startsWith("<") && t.id >= 49406 ? " special" : "");
    el.dataset.id = t.id; el.title = `BPE piece ${t.piece}`;
    const piece = document.createElement("span"); piece.className = "piece"; piece.textContent = t.text;
    const id = document.createElement("span"); id.className = "id"; id.textContent = t.id;
    el.append(piece, id);
    return el;
  }));
  let note = `then ${result.padding} × padding to 77 ids.`;
  if (result.dropped) note += ` Past 75 tokens, dropped: “${result.dropped}”.`;
  $("padding").textContent = note;
}

function drawSimilarity() {
  const m = result.similarity, n = m.length, labels = result.tokens.map((t) => t.text);
  const cell = Math.max(14, Math.min(34, Math.floor(300 / n))), pad = 70;
  const canvas = $("similarity"), ctx = sized(canvas, pad + n * cell + 36, pad + n * cell + 4);  // + slanted labels
  const lo = Math.min(...m.flat()), hi = 1;
  ctx.font = "11px system-ui, sans-serif"; ctx.textBaseline = "middle";
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      const v = (m[i][j] - lo) / ((hi - lo) || 1), rgb = colour(v);
      ctx.fillStyle = css(rgb);
      ctx.fillRect(pad + j * cell, pad + i * cell, cell, cell);
      if (cell >= 26) {  // the value, in a colour that reads on the cell
        ctx.fillStyle = v > 0.6 ? "#1d2330" : "#fff"; ctx.textAlign = "center";
        ctx.fillText(m[i][j].toFixed(2), pad + (j + 0.5) * cell, pad + (i + 0.5) * cell);
      }
    }
    ctx.fillStyle = "#1d2330"; ctx.textAlign = "right";
    ctx.fillText(short(labels[i], 10), pad - 4, pad + (i + 0.5) * cell);
    ctx.save(); ctx.translate(pad + (i + 0.5) * cell, pad - 4); ctx.rotate(-Math.PI / 3);
    ctx.textAlign = "left"; ctx.fillText(short(labels[i], 10), 0, 0); ctx.restore();
  }
  colourBar($("similarity-bar"), lo, hi, n * cell, 2);
  $("similarity-bar").style.marginTop = pad - 6 + "px";  // beside the cells, not the labels
}

const short = (s, k) => (s.length > k ? s.slice(0, k - 1) + "…" : s);

function drawStep() {
  if (!result) return;
  const i = Number($("step").value) - 1, s = result.steps[i], n = result.steps.length;
  $("step-value").textContent = `${i + 1} / ${n}`;
  $("step-info").textContent = `t = ${s.t}` + (s.sigma === null ? "" : `, σ after = ${s.sigma}`);
  const how = result.x0_preview === "vae" ? "VAE-decoded" : "cheap linear preview of";
  $("frames").replaceChildren(...s.x0.map((x0, b) => {
    const fig = document.createElement("div"); fig.className = "row";
    fig.append(figure(s.latent[b], `latent x, image ${b + 1} (std ${s.latent_std[b].toFixed(2)})`, "latent"),
               figure(x0, `x0 estimate, image ${b + 1}`, "x0"));
    return fig;
  }));
  $("strip").replaceChildren(...result.steps.map((st, k) => {
    const img = document.createElement("img");
    img.src = st.x0[0]; img.alt = img.title = `step ${k + 1}`;
    img.className = "pixelated" + (k === i ? " current" : "");
    img.addEventListener("click", () => { $("step").value = k + 1; drawStep(); });
    return img;
  }));
  $("frames-note").textContent = `Left: the latent after step ${i + 1}, one square per channel (grey: ±3 std). ` +
    `Right: the ${how} x0 the model predicted at this step.`;
  drawAttention();
}

function figure(src, caption, kind) {
  const fig = document.createElement("figure"), img = document.createElement("img"), cap = document.createElement("figcaption");
  img.src = src; img.alt = caption; img.className = "pixelated " + kind;
  cap.textContent = caption;
  fig.append(img, cap);
  return fig;
}

function drawAttention() {
  const i = Number($("step").value) - 1, b = Number($("attention-image").value) || 0;
  const maps = result.steps[i].attention[b], [H, W] = result.attention.size;
  const labels = result.tokens.map((t) => t.text).concat([`<pad>×${result.padding}`]);
  const own = $("own-scale").checked, overlay = $("overlay").checked;
  const hi = Math.max(...maps.flat(2)) || 1;
  $("attention-info").textContent = `layer ${result.attention.label}, step ${i + 1}, image ${b + 1}; ` +
    (own ? "colour: each map divided by its own maximum" : "colour: attention probability");
  const px = 66, backdrop = new Image();
  backdrop.src = result.steps[i].x0[b];
  const figures = maps.map((map, k) => {
    const fig = document.createElement("figure"), canvas = document.createElement("canvas");
    const ctx = sized(canvas, px, px), top = own ? (Math.max(...map.flat()) || 1) : hi;
    const paint = () => {
      ctx.globalAlpha = 1;
      if (overlay) { ctx.imageSmoothingEnabled = false; ctx.drawImage(backdrop, 0, 0, px, px); ctx.globalAlpha = 0.7; }
      for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) {
        ctx.fillStyle = css(colour(map[y][x] / top));
        ctx.fillRect(x * px / W, y * px / H, px / W + 0.5, px / H + 0.5);
      }
    };
    if (overlay && !backdrop.complete) backdrop.addEventListener("load", paint); else paint();
    canvas.dataset.token = k;
    const cap = document.createElement("figcaption"); cap.textContent = labels[k]; cap.title = labels[k];
    fig.append(canvas, cap);
    return fig;
  });
  $("maps").replaceChildren(...figures);
  if (own) colourBar($("attention-bar"), 0, 1, px, 1);
  else colourBar($("attention-bar"), 0, hi, px, 3);
}

function drawImages() {
  $("images").replaceChildren(...result.images.map((src, b) => {
    const fig = figure(src, `seed ${result.seeds[b]}`, "final");
    fig.title = result.parameters[b];
    return fig;
  }));
}

// ---- start ------------------------------------------------------------------------------------------
async function start() {
  const answer = await fetch("/api/info");
  info = await answer.json();
  if (!answer.ok) { status(info.error, "error"); setTimeout(start, 1000); return; }
  $("model").textContent = `${info.model} (${info.family}, ${info.size}×${info.size})`;
  $("sampler").replaceChildren(...info.samplers.map((s) => new Option(s, s)));
  $("layer").replaceChildren(...info.layers.map((l) => new Option(l.label, l.name)));
  $("steps").max = info.limits.steps[1]; $("guidance").max = info.limits.guidance[1];
  const params = new URLSearchParams(location.search);
  for (const f of FIELDS) $(f).value = params.get(f) ?? info.defaults[f];
  showValues();
  for (const f of FIELDS) {
    $(f).addEventListener("input", () => { showValues(); schedule(f.endsWith("prompt") ? 500 : 250); });
  }
  $("controls").addEventListener("submit", (e) => { e.preventDefault(); clearTimeout(timer); run(); });
  $("reseed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 32); schedule(0); });
  $("step").addEventListener("input", drawStep);
  for (const id of ["own-scale", "overlay", "attention-image"]) $(id).addEventListener("input", drawAttention);
  if (params.get("autorun") !== "0") run();
}

start().catch((e) => status(`cannot start: ${e.message}`, "error"));
