// lens-jax web page: POST /v1/images/generations with stream=true, read the Server-Sent Events
// (queued, started, progress, result | error), show progress and add the images to the gallery.
"use strict";
const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function request() {
  const body = { prompt: $("prompt").value.trim(), negative_prompt: $("negative_prompt").value, stream: true };
  if ($("sizemode").value === "size") body.size = `${$("width").value}x${$("height").value}`;
  else body.aspect_ratio = $("aspect_ratio").value;
  if ($("steps").value !== "") body.steps = parseInt($("steps").value, 10);
  if ($("seed").value !== "") body.seed = $("seed").value.trim();  // digits: seeds go past 2**53 (toJson)
  if ($("guidance").value !== "") body.guidance = parseFloat($("guidance").value);
  if ($("variant").value) body.variant = $("variant").value;
  if ($("lora").value) body.lora = [{ name: $("lora").value, multiplier: parseFloat($("lora_multiplier").value || "1") }];
  return body;
}

// Seeds are integers up to 2**64 - 1, past what a JavaScript number holds exactly: they travel as
// their digits, written into the JSON text as a number and read back from it as a string.
function toJson(body) {
  return JSON.stringify(body).replace(/"seed":"(\d+)"/, '"seed":$1');
}

function fromJson(text) {
  return JSON.parse(text.replace(/"seed":\s*(\d{16,})/g, '"seed":"$1"'));
}

function setProgress(value, max, text) {
  $("progress").max = max;
  $("progress").value = value;
  $("progresstext").textContent = text;
}

function showSizeMode() {
  const size = $("sizemode").value === "size";
  $("sizebox").hidden = !size;
  $("aspectbox").hidden = size;
}

function reuse(settings, sent) {
  $("prompt").value = settings.prompt;
  $("negative_prompt").value = settings.negative_prompt || "";
  $("steps").value = settings.steps;
  $("guidance").value = settings.guidance;
  $("seed").value = settings.seed;
  $("variant").value = settings.variant || "";
  const lora = (settings.lora || [])[0];
  $("lora").value = lora ? lora.name : "";
  if (lora) $("lora_multiplier").value = lora.multiplier;
  if (sent.aspect_ratio) { $("sizemode").value = "aspect"; $("aspect_ratio").value = sent.aspect_ratio; }
  else { $("sizemode").value = "size"; $("width").value = settings.width; $("height").value = settings.height; }
  showSizeMode();
  $("prompt").focus();
}

function addToGallery(result, sent) {
  const s = result.settings;
  for (const item of result.data) {
    const fig = document.createElement("figure");
    fig.title = "click to reuse these settings";
    const img = document.createElement("img");
    img.alt = s.prompt;
    img.src = item.url || "data:image/png;base64," + item.b64_json;
    const cap = document.createElement("figcaption");
    const b = document.createElement("b");
    b.textContent = s.prompt;
    cap.append(b, `${s.width}×${s.height} · ${s.steps} steps · guidance ${s.guidance} · seed ${item.seed}` +
      (s.negative_prompt ? ` · not: ${s.negative_prompt}` : "") +
      (s.lora || []).map((l) => ` · LoRA ${l.name} × ${l.multiplier}`).join(""));
    fig.append(img, cap);
    fig.addEventListener("click", () => reuse({ ...s, seed: item.seed }, sent));
    $("gallery").prepend(fig);
  }
}

async function errorText(resp) {
  try {
    const j = await resp.json();
    if (Array.isArray(j.detail)) return j.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
    return j.detail || resp.statusText;
  } catch (e) { return resp.statusText; }
}

async function generate(ev) {
  ev.preventDefault();
  $("error").textContent = "";
  const sent = request();
  $("generate").disabled = true;
  setProgress(0, 1, "queued…");
  try {
    const resp = await fetch("/v1/images/generations", { method: "POST", headers: headers(), body: toJson(sent) });
    if (!resp.ok) throw new Error(`${resp.status}: ${await errorText(resp)}`);
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let event = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
        }
        const msg = data ? fromJson(data) : {};
        if (event === "queued") setProgress(0, 1, `queued (${msg.queue} waiting)`);
        else if (event === "started") setProgress(0, 1, `running in a batch of ${msg.batch_images}`);
        else if (event === "progress") setProgress(msg.step, msg.steps, `step ${msg.step} / ${msg.steps}`);
        else if (event === "result") { setProgress(1, 1, "done"); addToGallery(msg, sent); }
        else if (event === "error") throw new Error(`${msg.status}: ${msg.detail}`);
      }
    }
  } catch (e) {
    $("error").textContent = String(e.message || e);
    setProgress(0, 1, "");
  } finally {
    $("generate").disabled = false;
  }
}

async function health() {
  try {
    const h = await (await fetch("/health")).json();
    $("status").textContent = `${h.model || "model"} · max batch ${h.max_batch} · defaults ${h.defaults.steps} steps, guidance ${h.defaults.guidance}`;
  } catch (e) { $("status").textContent = "server unreachable"; }
}

// The LoRA selector appears when the server offers LoRAs (GET /v1/loras; `lens-jax serve --lora-dir`).
async function loras() {
  try {
    const resp = await fetch("/v1/loras", { headers: headers() });
    if (!resp.ok) return;
    const list = await resp.json();
    for (const l of list.data) $("lora").append(new Option(l.name, l.name));
    if (list.max_multiplier) { $("lora_multiplier").min = -list.max_multiplier; $("lora_multiplier").max = list.max_multiplier; }
    $("lorabox").hidden = list.data.length === 0;
  } catch (e) { /* no LoRAs then */ }
}

$("form").addEventListener("submit", generate);
$("apikey").addEventListener("change", () => { if ($("lora").options.length <= 1) loras(); });
$("sizemode").addEventListener("change", showSizeMode);
showSizeMode();
health();
loras();
