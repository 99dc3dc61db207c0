// Browser sender: mic -> AudioWorklet (16 kHz) -> PCM16 -> WebSocket /ingest/<channel>.
// Query parameters: channel, token, autostart=1 (kiosk and tests). Reconnects by itself.
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const TEXT = {
  connecting: "連線中… Connecting…",
  live: "直播中 Live",
  closed: "已中斷 Disconnected",
  reconnecting: "重新連線中… Reconnecting…",
  error: "錯誤 Error",
  nomic: "無法使用麥克風 Microphone unavailable",
};
let ws = null, ctx = null, stream = null, sent = 0;
// Reconnecting: after the server restarts or the network drops, the page keeps the microphone
// and opens the connection again (0.5 s doubling to 8 s) until Stop. Audio while disconnected
// is not kept: sending it late would only add delay. A refusal that retrying cannot cure (bad
// hello, wrong token, no such channel, unsupported or undecodable audio) stops instead.
const PERMANENT = new Set([4400, 4401, 4404, 4415, 4422]);
let wanted = false, retries = 0, retryTimer = null, run = 0;
// this tab's id: the server lets a sender it holds half-open give way to the same one only
const SENDER = sessionStorage.getItem("musetalk_sender") ||
  Math.random().toString(36).slice(2, 12) + Date.now().toString(36);
sessionStorage.setItem("musetalk_sender", SENDER);
const CONNECT_TIMEOUT_MS = 10000;  // a connection not ready by then is closed and retried

function setState(text, cls) {
  $("state").textContent = text;
  $("state").className = cls;
}

async function loadChannels() {
  try {
    const r = await fetch("channels.json");
    const names = (await r.json()).channels;
    for (const n of names) {
      const o = document.createElement("option");
      o.value = o.textContent = n;
      $("channel").appendChild(o);
    }
  } catch (e) { /* the list is a convenience; the query parameter still works */ }
  if (params.get("channel")) $("channel").value = params.get("channel");
  if (params.get("token")) $("token").value = params.get("token");
}

async function start() {
  wanted = true;
  retries = 0;
  const mine = ++run;  // a Stop (or another Start) while this one awaits ends it
  setState(TEXT.connecting, "wait");
  $("go").textContent = "停止 Stop";
  let mic;
  try {
    mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch (e) {
    if (mine !== run) return;
    setState(TEXT.nomic + " (" + e.name + ")", "bad");
    stop();
    return;
  }
  if (mine !== run || !wanted) { mic.getTracks().forEach((t) => t.stop()); return; }
  stream = mic;
  const audio = new AudioContext({ sampleRate: 16000 });
  ctx = audio;
  await audio.audioWorklet.addModule("worklet.js");
  if (mine !== run || !wanted) return;  // stop() closed them
  const node = new AudioWorkletNode(ctx, "pcm16-chunker");
  ctx.createMediaStreamSource(stream).connect(node);
  node.port.onmessage = (ev) => {
    $("level").value = ev.data.peak;
    if (ws && ws.ready && ws.readyState === WebSocket.OPEN) { ws.send(ev.data.pcm); sent++; }
  };
  connect();
}

function connect() {
  const channel = $("channel").value || params.get("channel");
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const sock = new WebSocket(`${scheme}//${location.host}/ingest/${encodeURIComponent(channel)}`);
  ws = sock;
  sock.ready = false;
  sock.binaryType = "arraybuffer";
  const timer = setTimeout(() => { if (!sock.ready) sock.close(); }, CONNECT_TIMEOUT_MS);
  sock.onopen = () => sock.send(JSON.stringify({
    type: "hello", token: $("token").value, format: "pcm_s16le", sample_rate: 16000,
    channels: 1, sender: SENDER,
  }));
  sock.onmessage = (ev) => {
    if (ws !== sock) return;
    const m = JSON.parse(ev.data);
    if (m.type === "ready") {
      sock.ready = true;
      sock.readyAt = Date.now();
      setState(TEXT.live + " · " + channel, "ok");
    } else if (m.type === "error") {
      sock.refusal = m.message;
      setState(TEXT.error + ": " + m.message, "bad");
    } else if (m.type === "stats") {
      const lat = m.voice_to_frame_p95_ms == null ? "—" : Math.round(m.voice_to_frame_p95_ms);
      $("stats").innerHTML = `<small>已送出 sent ${m.received_s.toFixed(1)} s · ` +
        `延遲 latency p95 ${lat} ms · 遲到 late ${m.late_frames ?? 0}</small>`;
    }
  };
  sock.onclose = (ev) => {
    clearTimeout(timer);
    if (ws !== sock) return;
    ws = null;
    if (!wanted) return;
    if (sock.ready && Date.now() - sock.readyAt > 5000) retries = 0;  // it had worked a while
    if (PERMANENT.has(ev.code)) {  // the settings are wrong: say so and stop
      setState(TEXT.error + ": " + (sock.refusal || ev.code), "bad");
      stop();
      return;
    }
    retries += 1;
    // 0.5 s doubling to 8 s, +-20% so that many pages do not come back in step
    const baseMs = Math.min(8000, 500 * 2 ** Math.min(retries - 1, 4));
    const delayMs = baseMs * (0.8 + 0.4 * Math.random());
    setState(`${TEXT.reconnecting} (${retries}, ${ev.code})`, "wait");
    retryTimer = setTimeout(() => { retryTimer = null; if (wanted) connect(); }, delayMs);
  };
}

function stop() {
  wanted = false;
  run++;
  if (retryTimer) clearTimeout(retryTimer);
  retryTimer = null;
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "bye" }));
  if (ws) ws.close();  // also one still connecting
  if (stream) stream.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close();
  ws = ctx = stream = null;
  $("go").textContent = "開始 Start";
  if ($("state").className !== "bad") setState(TEXT.closed, "bad");
}

$("go").onclick = () => (wanted ? stop() : start());
loadChannels().then(() => { if (params.get("autostart") === "1") start(); });
