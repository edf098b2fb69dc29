// The scoring page: uploads a file (dropped, chosen or recorded) to POST /detect and draws the
// per-window scores it returns over the waveform. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const MODEL_RATE = 24000;   // recordings are sent as 16-bit mono WAV at the model's rate
let limits = null;          // from GET /model: max_upload_mb, max_duration_s, max_concurrent

async function loadModel() {
  const el = $("model");
  try {
    const r = await fetch("/model", { cache: "no-store" });
    const m = await r.json();
    if (!r.ok) throw new Error(m.detail || r.statusText);
    limits = m.limits;
    const p = m.promotion;
    const since = p ? ` · ${p.action === "rollback" ? "rolled back to" : "promoted"} ${fmtTime(p.at)}` +
      (p.by ? ` by ${p.by}` : "") + (p.reason ? ` (${p.reason})` : "") : "";
    el.textContent = `${m.name} v${m.version} (@${m.alias})${since} · threshold ${m.threshold.toFixed(3)}`;
    el.dataset.version = m.version;
    el.dataset.promotedAt = p ? p.at : "";
    $("limits").textContent = `up to ${limits.max_upload_mb} MB and ${limits.max_duration_s} s of audio`;
  } catch (err) {
    el.textContent = `no model served: ${err.message}`;
    el.dataset.version = "";
  }
}

function fmtTime(iso) {
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
}

async function score(file) {
  $("error").hidden = true;
  $("result").hidden = true;
  if (limits && file.size > limits.max_upload_mb * 2 ** 20) {   // the service would say the same, after the upload
    return showError(`${file.name}: upload too large (limit ${limits.max_upload_mb} MB)`);
  }
  $("status").textContent = `scoring ${file.name} …`;
  const form = new FormData();
  form.append("file", file, file.name);
  let r, body;
  try {
    r = await fetch("/detect", { method: "POST", body: form });
    body = await r.json();
  } catch (err) {
    return showError(`${file.name}: ${err.message}`);
  }
  if (!r.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    return showError(detail.startsWith(file.name + ":") ? detail : `${file.name}: ${detail}`);
  }
  $("status").textContent = "";
  const wave = await decodeWave(file);
  render(body, wave);
}

async function decodeWave(file) {
  // the browser's own decoder, only to draw the waveform; the score comes from the service
  try {
    return await new OfflineAudioContext(1, 1, 8000).decodeAudioData(await file.arrayBuffer());
  } catch (err) {
    return null;
  }
}

function render(d, wave) {
  $("result-name").textContent = d.path;
  $("label").textContent = d.label === "AI_GENERATED" ? "AI-generated" : "Human";
  $("label").dataset.label = d.label;
  $("score").textContent = d.ai_score.toFixed(3);
  $("threshold").textContent = d.threshold.toFixed(3);
  $("language").textContent = d.language;
  $("speakers").textContent = d.speakers;
  $("result-version").textContent = `v${d.model_version}`;
  $("result").dataset.version = d.model_version;
  const rows = $("windows");
  rows.replaceChildren(...d.windows.map((s, i) => {
    const tr = document.createElement("tr");
    tr.className = "window";
    tr.dataset.start = d.window_starts[i];
    tr.dataset.score = s;
    tr.innerHTML = `<td>${d.window_starts[i].toFixed(2)}</td><td>${s.toFixed(3)}</td>`;
    return tr;
  }));
  $("result").hidden = false;
  draw($("timeline"), d, wave);
}

function draw(canvas, d, wave) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, top = 10, plot = H - 30;
  const duration = Math.max(d.duration_s, 1e-3);
  const x = (t) => (t / duration) * W;
  const y = (s) => top + (1 - s) * plot;
  ctx.clearRect(0, 0, W, H);
  if (wave) {   // min/max envelope per pixel column
    const data = wave.getChannelData(0), per = data.length / W, mid = top + plot / 2;
    ctx.fillStyle = "#9e9e9e";
    for (let px = 0; px < W; px++) {
      let lo = 0, hi = 0;
      for (let i = Math.floor(px * per); i < Math.min(data.length, Math.floor((px + 1) * per)); i++) {
        lo = Math.min(lo, data[i]); hi = Math.max(hi, data[i]);
      }
      ctx.fillRect(px, mid - hi * plot / 2, 1, Math.max(1, (hi - lo) * plot / 2));
    }
  }
  d.windows.forEach((s, i) => {   // each window's score, from its start to the next window's
    const start = d.window_starts[i], end = i + 1 < d.windows.length ? d.window_starts[i + 1] : duration;
    ctx.fillStyle = s >= d.threshold ? "rgba(198,40,40,.55)" : "rgba(46,125,50,.45)";
    ctx.fillRect(x(start), y(s), Math.max(1, x(end) - x(start) - 1), y(0) - y(s));
  });
  ctx.strokeStyle = "#333";
  ctx.setLineDash([6, 4]);
  ctx.beginPath(); ctx.moveTo(0, y(d.threshold)); ctx.lineTo(W, y(d.threshold)); ctx.stroke();
  ctx.setLineDash([]);
  ctx.fillStyle = "#444";
  ctx.font = "12px system-ui";
  const step = duration > 60 ? 10 : duration > 20 ? 5 : 1;
  for (let t = 0; t <= duration; t += step) ctx.fillText(`${t}s`, Math.min(x(t) + 2, W - 24), H - 8);
}

// --- input: drop, choose, record ---

const drop = $("drop");
["dragenter", "dragover"].forEach((e) => drop.addEventListener(e, (ev) => { ev.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((e) => drop.addEventListener(e, () => drop.classList.remove("over")));
drop.addEventListener("drop", (ev) => {
  ev.preventDefault();
  if (ev.dataTransfer.files.length) score(ev.dataTransfer.files[0]);
});
$("file-input").addEventListener("change", (ev) => {
  if (ev.target.files.length) score(ev.target.files[0]);
  ev.target.value = "";
});

let recorder = null;
$("record").addEventListener("click", async () => {
  const button = $("record");
  if (recorder) { recorder.stop(); return; }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    return showError("recording: this browser allows the microphone only on https or localhost");
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (err) {
    return showError(`recording: ${err.message}`);
  }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (ev) => chunks.push(ev.data);
  recorder.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    recorder = null;
    button.classList.remove("on");
    button.innerHTML = "&#9679; Record";
    // MediaRecorder gives WebM/Opus, which the service's decoder (libsndfile) does not read: send WAV
    try {
      const blob = new Blob(chunks, { type: chunks[0] ? chunks[0].type : "audio/webm" });
      const audio = await new OfflineAudioContext(1, 1, MODEL_RATE).decodeAudioData(await blob.arrayBuffer());
      score(new File([wav(audio)], "recording.wav", { type: "audio/wav" }));
    } catch (err) {
      showError(`recording.wav: the recording could not be decoded (${err.message})`);
    }
  };
  recorder.start();
  $("result").hidden = true;
  $("error").hidden = true;
  button.classList.add("on");
  button.textContent = "■ Stop";
  $("status").textContent = "recording … press Stop to score it";
});

function wav(audio) {
  // 16-bit PCM mono WAV of an AudioBuffer (channels averaged)
  const n = audio.length, rate = audio.sampleRate, out = new DataView(new ArrayBuffer(44 + 2 * n));
  const mono = new Float32Array(n);
  for (let c = 0; c < audio.numberOfChannels; c++) {
    const ch = audio.getChannelData(c);
    for (let i = 0; i < n; i++) mono[i] += ch[i] / audio.numberOfChannels;
  }
  const str = (o, s) => [...s].forEach((ch, i) => out.setUint8(o + i, ch.charCodeAt(0)));
  str(0, "RIFF"); out.setUint32(4, 36 + 2 * n, true); str(8, "WAVE"); str(12, "fmt ");
  out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true);
  out.setUint32(24, rate, true); out.setUint32(28, 2 * rate, true); out.setUint16(32, 2, true);
  out.setUint16(34, 16, true); str(36, "data"); out.setUint32(40, 2 * n, true);
  for (let i = 0; i < n; i++) out.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, mono[i])) * 0x7fff, true);
  return out.buffer;
}

loadModel();
