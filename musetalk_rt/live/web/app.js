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
  insecure: "需要 HTTPS：請以 --cert 啟動直播程式，或在本機以 localhost 開啟 · Needs HTTPS: " +
    "start the live process with --cert, or open the page on its own computer",
  silent: "無回應 no reply",
};
// the server's refusals, in both languages (its own message, English, follows)
const CODE_TEXT = {
  4400: "訊息錯誤 Bad message",
  4401: "通行碼錯誤 Wrong token",
  4404: "沒有這個頻道 No such channel",
  4408: "逾時 Timed out",
  4409: "頻道已有人傳送 Channel busy",
  4415: "不支援的音訊 Unsupported audio",
  4422: "無法解碼的音訊 Undecodable audio",
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
// A dropped network can leave the socket "open" for minutes with nothing arriving. The server
// sends stats every stats_interval_s (1 s), so a live connection that has been silent for
// STALE_INTERVALS of them, and at least STALE_MIN_MS, is given up and connected again.
const STALE_INTERVALS = 4, STALE_MIN_MS = 5000;

function refusalText(code, message) {
  const known = CODE_TEXT[code];
  return known ? (message ? `${known} — ${message}` : known) : (message || String(code));
}

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
  // the microphone and the worklet exist only on https or on this computer (localhost)
  if (!window.isSecureContext || !navigator.mediaDevices || !window.AudioWorkletNode) {
    setState(TEXT.insecure, "bad");
    return;
  }
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
  try {  // a browser that cannot resample to 16 kHz, or blocks the worklet, ends here
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
  } catch (e) {
    if (mine !== run) return;
    setState(TEXT.nomic + " (" + e.name + ": " + e.message + ")", "bad");
    stop();
    return;
  }
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
    sock.lastMessageAt = Date.now();
    let m;
    try { m = JSON.parse(ev.data); } catch (e) { return; }
    if (m.type === "ready") {
      sock.ready = true;
      sock.readyAt = Date.now();
      const staleMs = Math.max(STALE_MIN_MS, STALE_INTERVALS * 1000 * (m.stats_interval_s || 1));
      sock.watchdog = setInterval(() => {
        if (ws === sock && Date.now() - sock.lastMessageAt > staleMs) {
          sock.close();  // may take minutes to report on a dead network: do not wait for it
          lost(sock, TEXT.silent);
        }
      }, 1000);
      setState(TEXT.live + " · " + channel, "ok");
    } else if (m.type === "error") {
      sock.refusal = refusalText(m.code, m.message);
      setState(TEXT.error + ": " + sock.refusal, "bad");
    } else if (m.type === "stats") {
      const lat = m.voice_to_frame_p95_ms == null ? "—" : Math.round(m.voice_to_frame_p95_ms);
      $("stats").innerHTML = `<small>已送出 sent ${m.received_s.toFixed(1)} s · ` +
        `伺服器延遲 server voice→frame p95 ${lat} ms · 遲到 late frames ${m.late_frames ?? 0}` +
        `</small>`;
    }
  };
  sock.onclose = (ev) => {
    clearTimeout(timer);
    if (ws !== sock) return;
    if (PERMANENT.has(ev.code) && wanted) {  // the settings are wrong: say so and stop
      ws = null;
      clearInterval(sock.watchdog);
      setState(TEXT.error + ": " + (sock.refusal || refusalText(ev.code, ev.reason)), "bad");
      stop();
      return;
    }
    lost(sock, sock.refusal || String(ev.code));
  };
}

// The connection is gone (closed, or silent too long): connect again with backoff.
function lost(sock, why) {
  clearInterval(sock.watchdog);
  if (ws !== sock) return;
  ws = null;
  if (!wanted) return;
  if (sock.ready && Date.now() - sock.readyAt > 5000) retries = 0;  // it had worked a while
  retries += 1;
  // 0.5 s doubling to 8 s, +-20% so that many pages do not come back in step
  const baseMs = Math.min(8000, 500 * 2 ** Math.min(retries - 1, 4));
  const delayMs = baseMs * (0.8 + 0.4 * Math.random());
  setState(`${TEXT.reconnecting} (${retries}, ${why})`, "wait");
  retryTimer = setTimeout(() => { retryTimer = null; if (wanted) connect(); }, delayMs);
}

function stop() {
  wanted = false;
  run++;
  if (retryTimer) clearTimeout(retryTimer);
  retryTimer = null;
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "bye" }));
  if (ws) { clearInterval(ws.watchdog); ws.close(); }  // also one still connecting
  if (stream) stream.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close();
  ws = ctx = stream = null;
  $("go").textContent = "開始 Start";
  $("level").value = 0;
  if ($("state").className !== "bad") setState(TEXT.closed, "bad");
}

$("go").onclick = () => (wanted ? stop() : start());
loadChannels().then(() => { if (params.get("autostart") === "1") start(); });
