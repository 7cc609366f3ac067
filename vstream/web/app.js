// The vstream page: streams, the newest frame, the transcript, questions answered as they
// are generated (server-sent events), and the answer's evidence on the stream's timeline.
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = { stream: null, duration: 0, asking: null };

const tokenInput = $("#token");
tokenInput.value = localStorage.getItem("vstream-token") || "";
tokenInput.addEventListener("change", () => localStorage.setItem("vstream-token", tokenInput.value));

function withToken(url) {
  const token = tokenInput.value;
  return token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
}

async function api(method, url, body, contentType) {
  const headers = {};
  if (contentType) headers["Content-Type"] = contentType;
  if (tokenInput.value) headers["Authorization"] = "Bearer " + tokenInput.value;
  const response = await fetch(url, { method, headers, body });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error ? data.error.message : response.statusText);
  return data;
}

function clock(seconds) {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return (h ? h + ":" + String(m).padStart(2, "0") : m) + ":" + String(r).padStart(2, "0");
}

function say(text) { $("#status").textContent = text; }

async function refreshStreams() {
  let streams;
  try {
    streams = (await api("GET", "/api/streams")).streams;
  } catch (error) {
    say(error.message);
    return;
  }
  const list = $("#streams");
  list.replaceChildren(...streams.map((s) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.stream = s.stream;
    button.textContent = `${s.stream} · ${s.frames_processed} frames · ${clock(s.last_t)}`;
    button.setAttribute("aria-current", String(s.stream === state.stream));
    button.addEventListener("click", () => select(s.stream));
    item.append(button);
    return item;
  }));
  const current = streams.find((s) => s.stream === state.stream);
  if (current) showStats(current);
}

function showStats(stats) {
  state.duration = stats.last_t;
  $("#stats").textContent = `${stats.frames_processed} frames, ${clock(stats.last_t)} of stream, ` +
    `${stats.transcript_segments} transcript lines, ${stats.questions} questions` +
    (stats.node ? `, node ${stats.node.slice(0, 8)}` : "");
}

function select(stream) {
  state.stream = stream;
  $("#view").hidden = false;
  $("#title").textContent = "Stream " + stream;
  $("#answer").textContent = "";
  $("#viewer").hidden = true;
  clearEvidence();
  refreshStreams();
  refreshWatch();
  $("#question").focus();
}

async function refreshWatch() {
  if (!state.stream) return;
  const stream = state.stream;
  const latest = withToken(`/api/streams/${stream}/frame?_=${Date.now()}`);
  const probe = new Image();
  probe.onload = () => { if (state.stream === stream) $("#latest").src = latest; };
  probe.src = latest;  // swapped in once loaded: no flicker, and no broken image before the first frame
  try {
    const texts = await api("GET", `/api/streams/${stream}/texts?limit=100`);
    const lines = [...texts.transcript.map((l) => [l, "said"]), ...texts.screen.map((l) => [l, "on screen"])]
      .sort((a, b) => a[0][0] - b[0][0]);
    const box = $("#transcript");
    box.replaceChildren(...lines.map(([[start, , text], kind]) => {
      const line = document.createElement("div");
      const time = document.createElement("span");
      time.className = "time";
      time.textContent = clock(start) + (kind === "on screen" ? " (screen)" : "");
      line.append(time, text);
      return line;
    }));
  } catch (error) {
    say(error.message);
  }
}

function clearEvidence() {
  $("#timeline").querySelectorAll(".evidence").forEach((e) => e.remove());
}

function showEvidence(evidence) {
  clearEvidence();
  const duration = Math.max(state.duration, ...evidence.map((e) => e.end), 1);
  for (const e of evidence.slice(0, 6)) {
    const t = (e.start + e.end) / 2;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "evidence";
    button.style.left = (100 * t / duration) + "%";
    button.title = `${e.kind} ${clock(e.start)}-${clock(e.end)}`;
    button.dataset.t = String(t);
    const img = document.createElement("img");
    img.alt = `evidence at ${clock(t)}`;
    img.src = withToken(`/api/streams/${state.stream}/frame?t=${t}`);
    button.append(img);
    button.addEventListener("click", () => view(t, e));
    $("#timeline").append(button);
  }
}

async function view(t, evidence) {
  const url = withToken(`/api/streams/${state.stream}/frame?t=${t}`);
  const headers = tokenInput.value ? { Authorization: "Bearer " + tokenInput.value } : {};
  const response = await fetch(url, { headers });
  const shown = Number(response.headers.get("X-Frame-Time") || t);
  $("#viewer img").src = URL.createObjectURL(await response.blob());
  $("#viewer .time").textContent = `${clock(shown)} (${evidence.kind}, ${clock(evidence.start)}-${clock(evidence.end)})`;
  $("#viewer").hidden = false;
}

$("#ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = $("#question").value.trim();
  if (!question || !state.stream) return;
  if (state.asking) state.asking.close();
  const answer = $("#answer");
  answer.textContent = "";
  answer.className = "";
  clearEvidence();
  let url = `/api/streams/${state.stream}/ask?question=${encodeURIComponent(question)}`;
  if ($("#last").value) url += "&last=" + encodeURIComponent($("#last").value);
  const source = new EventSource(withToken(url));
  state.asking = source;
  source.addEventListener("token", (e) => { answer.textContent += JSON.parse(e.data).text; });
  source.addEventListener("answer", (e) => {
    const result = JSON.parse(e.data);
    answer.textContent = result.answer;
    answer.dataset.done = "true";
    showEvidence(result.evidence);
    source.close();
  });
  source.addEventListener("error", (e) => {
    if (e.data) {
      answer.className = "error";
      answer.textContent = JSON.parse(e.data).message;
    } else if (source.readyState !== EventSource.CLOSED) {
      answer.className = "error";
      answer.textContent = "the connection to the server was lost";
    }
    source.close();
  });
});

$("#upload").addEventListener("change", async () => {
  const file = $("#upload").files[0];
  if (!file) return;
  say(`uploading ${file.name}…`);
  try {
    const result = await api("POST", "/api/upload?name=" + encodeURIComponent(file.name), file,
                             file.type || "application/octet-stream");
    say(`${file.name}: stream ${result.stream}`);
    select(result.stream);
  } catch (error) {
    say(error.message);
  }
  $("#upload").value = "";
});

refreshStreams();
setInterval(refreshStreams, 2000);
setInterval(refreshWatch, 1000);
