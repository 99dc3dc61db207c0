// Browser sender: mic -> AudioWorklet (16 kHz) -> PCM16 -> WebSocket /ingest/<channel>.
// Query parameters: channel, token, autostart=1 (kiosk and tests).
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const TEXT = {
  connecting: "連線中… Connecting…",
  live: "直播中 Live",
  closed: "已中斷 Disconnected",
  error: "錯誤 Error",
  nomic: "無法使用麥克風 Microphone unavailable",
};
let ws = null, ctx = null, stream = null, sent = 0;

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
  const channel = $("channel").value || params.get("channel");
  setState(TEXT.connecting, "wait");
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch (e) {
    setState(TEXT.nomic + " (" + e.name + ")", "bad");
    return;
  }
  ctx = new AudioContext({ sampleRate: 16000 });
  await ctx.audioWorklet.addModule("worklet.js");
  const node = new AudioWorkletNode(ctx, "pcm16-chunker");
  ctx.createMediaStreamSource(stream).connect(node);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  ws = new WebSocket(`${scheme}//${location.host}/ingest/${encodeURIComponent(channel)}`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => ws.send(JSON.stringify({
    type: "hello", token: $("token").value, format: "pcm_s16le", sample_rate: 16000,
    channels: 1,
  }));
  let ready = false;
  ws.onmessage = (ev) => {
    const m = JSON.parse(ev.data);
    if (m.type === "ready") { ready = true; setState(TEXT.live + " · " + channel, "ok"); }
    else if (m.type === "error") { setState(TEXT.error + ": " + m.message, "bad"); }
    else if (m.type === "stats") {
      const lat = m.voice_to_frame_p95_ms == null ? "—" : Math.round(m.voice_to_frame_p95_ms);
      $("stats").innerHTML = `<small>已送出 sent ${m.received_s.toFixed(1)} s · ` +
        `延遲 latency p95 ${lat} ms · 遲到 late ${m.late_frames ?? 0}</small>`;
    }
  };
  ws.onclose = (ev) => {
    if ($("state").className !== "bad") setState(TEXT.closed + " (" + ev.code + ")", "bad");
    stop();
  };
  node.port.onmessage = (ev) => {
    $("level").value = ev.data.peak;
    if (ready && ws.readyState === WebSocket.OPEN) { ws.send(ev.data.pcm); sent++; }
  };
  $("go").textContent = "停止 Stop";
}

function stop() {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "bye" }));
  if (stream) stream.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close();
  ws = ctx = stream = null;
  $("go").textContent = "開始 Start";
}

$("go").onclick = () => (ws ? stop() : start());
loadChannels().then(() => { if (params.get("autostart") === "1") start(); });
