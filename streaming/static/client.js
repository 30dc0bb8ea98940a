// TCCP live page: send camera + microphone, show the edited stream with fps and latency.
//
// URL parameters:
//   ?token=T     sent as "Authorization: Bearer T" with the offer (tccp serve --token T)
//   ?autostart=1 start without the button (kiosk use, tests)
//   ?report=1    test mode: autostart, and after `frames` (default 50) decoded frames and the
//                first server stats
//                POST {framesReceived, width, height, ...} to /test-report
//   ?frames=N    frames to wait for in report mode
//   ?avatar=NAME preselect an installed avatar (the list comes from GET /avatars)
"use strict";

const params = new URLSearchParams(location.search);
const token = params.get("token");
const reportMode = params.get("report") === "1";
const reportFrames = parseInt(params.get("frames") || "50", 10);

const $ = (id) => document.getElementById(id);
let pc = null;
let statsTimer = null;
let server = {};        // latest JSON from the server's "stats" data channel
let reported = false;
let prev = null;        // previous getStats sample, for rates

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function authHeaders() {
  const h = { "Content-Type": "application/json" };
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

function waitForIce(conn, timeoutMs) {
  // the server takes one complete offer (no trickle): wait until gathering ends
  if (conn.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { conn.removeEventListener("icegatheringstatechange", check); resolve(); };
    const check = () => { if (conn.iceGatheringState === "complete") done(); };
    conn.addEventListener("icegatheringstatechange", check);
    setTimeout(done, timeoutMs);
  });
}

async function start() {
  $("start").disabled = true;
  setStatus("asking for camera and microphone…");
  let media;
  try {
    media = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 25 } },
      audio: { channelCount: 1, echoCancellation: true },
    });
  } catch (err) {
    setStatus("camera/microphone unavailable: " + err.message, true);
    $("start").disabled = false;
    return;
  }
  $("local").srcObject = media;

  pc = new RTCPeerConnection();
  const stats = pc.createDataChannel("stats", { ordered: false, maxRetransmits: 0 });
  stats.onmessage = (ev) => { try { server = JSON.parse(ev.data); } catch (e) { /* ignore */ } };
  for (const track of media.getTracks()) pc.addTrack(track, media);
  pc.ontrack = (ev) => {
    const remote = $("remote");
    if (!remote.srcObject) remote.srcObject = new MediaStream();
    remote.srcObject.addTrack(ev.track);
  };
  pc.onconnectionstatechange = () => {
    setStatus("connection: " + pc.connectionState, pc.connectionState === "failed");
    if (["failed", "closed"].includes(pc.connectionState)) stop();
  };

  await pc.setLocalDescription(await pc.createOffer());
  await waitForIce(pc, 3000);
  setStatus("connecting…");
  let resp;
  try {
    resp = await fetch("offer", {
      method: "POST",
      headers: authHeaders(),
      body: JSON.stringify(offerBody()),
    });
  } catch (err) {
    setStatus("server unreachable: " + err.message, true);
    stop();
    return;
  }
  const answer = await resp.json().catch(() => ({ error: "HTTP " + resp.status }));
  if (!resp.ok) {
    setStatus("server refused (" + resp.status + "): " + (answer.error || "unknown error"), true);
    stop();
    return;
  }
  await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
  $("stop").disabled = false;
  statsTimer = setInterval(updateStats, 500);
}

function offerBody() {
  const body = { sdp: pc.localDescription.sdp, type: pc.localDescription.type };
  const avatar = $("avatar").value;
  if (avatar) body.avatar = avatar;
  return body;
}

async function loadAvatars() {
  // installed avatars the server can switch to; the default option is the caller's own face
  try {
    const resp = await fetch("avatars", { headers: authHeaders() });
    if (!resp.ok) return;
    const data = await resp.json();
    const sel = $("avatar");
    const wanted = params.get("avatar") || data.default || "";
    if (data.default) sel.options[0].textContent = data.default + " (server default)";
    for (const a of data.avatars || []) {
      if (a.name === data.default) continue;
      const opt = document.createElement("option");
      opt.value = a.name;
      opt.textContent = a.name;
      sel.appendChild(opt);
    }
    if (wanted && wanted !== data.default) sel.value = wanted;
  } catch (e) { /* no list: the server default is used */ }
}

function stop() {
  if (statsTimer) clearInterval(statsTimer);
  statsTimer = null;
  if (pc) {
    for (const s of pc.getSenders()) if (s.track) s.track.stop();
    pc.close();
  }
  pc = null;
  $("start").disabled = false;
  $("stop").disabled = true;
}

async function updateStats() {
  if (!pc) return;
  const report = await pc.getStats();
  let inbound = null, outbound = null, pair = null;
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") inbound = s;
    else if (s.type === "outbound-rtp" && s.kind === "video") outbound = s;
    else if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") pair = s;
  });
  const now = performance.now();
  const got = inbound ? (inbound.framesDecoded || 0) : 0;
  let fps = inbound && inbound.framesPerSecond;
  if (!fps && prev && inbound) fps = (1000 * (got - prev.got)) / (now - prev.now);
  prev = { got, now };
  const rttMs = pair && pair.currentRoundTripTime != null ? 1000 * pair.currentRoundTripTime : null;
  let jitterMs = null;
  if (inbound && inbound.jitterBufferEmittedCount) {
    jitterMs = (1000 * inbound.jitterBufferDelay) / inbound.jitterBufferEmittedCount;
  }
  const decodeMs = inbound && inbound.framesDecoded ? (1000 * inbound.totalDecodeTime) / inbound.framesDecoded : null;
  // End-to-end estimate: uplink (rtt/2) + server (input frame arrival -> output to
  // encoder, measured by the server) + downlink (rtt/2) + receive jitter buffer + decode.
  // Capture and send-side encode are not visible to getStats and are left out.
  let e2e = null;
  if (server.server_latency_ms != null) {
    e2e = server.server_latency_ms + (rttMs || 0) + (jitterMs || 0) + (decodeMs || 0);
  }
  const fmt = (v, unit) => (v == null || isNaN(v) ? "–" : v.toFixed(unit === "fps" ? 1 : 0) + " " + unit);
  const w = inbound ? inbound.frameWidth : null, h = inbound ? inbound.frameHeight : null;
  $("hud").textContent = [
    "received   " + fmt(fps, "fps") + (w ? `  ${w}x${h}` : ""),
    "sent       " + fmt(outbound && outbound.framesPerSecond, "fps"),
    "server out " + fmt(server.fps_out, "fps"),
    "server     " + fmt(server.server_latency_ms, "ms") + "  (window " + fmt(server.window_e2e_ms, "ms") + ")",
    "generated  " + (server.generated_share == null ? "–" : Math.round(100 * server.generated_share) + " %") +
      " of frames sent  (playout delay " + fmt(server.playout_delay_ms, "ms") + ")",
    server.input_size && server.size && server.input_size.join("x") !== server.size.join("x")
      ? "camera " + server.input_size.join("x") + " scaled to " + server.size.join("x") : "",
    server.engine_error ? "model stopped (" + server.engine_error + "): showing your own video" : "",
    "rtt        " + fmt(rttMs, "ms") + "  jitter buf " + fmt(jitterMs, "ms"),
    "end-to-end ≈ " + fmt(e2e, "ms"),
    server.generated === false && server.reason ? "passing through: " + server.reason : "",
  ].filter(Boolean).join("\n");

  // (and once the server's stats have come over the data channel, which may open after
  // the video is already playing: the report checks that channel too)
  if (reportMode && !reported && got >= reportFrames && server.frames_out != null) {
    reported = true;
    const body = {
      framesReceived: got, width: w, height: h, fps: fps,
      e2eEstimateMs: e2e, serverLatencyMs: server.server_latency_ms ?? null, rttMs: rttMs,
      serverFramesOut: server.frames_out ?? null,
      generatedShare: server.generated_share ?? null,
    };
    fetch("test-report", { method: "POST", headers: authHeaders(), body: JSON.stringify(body) })
      .then(() => setStatus("reported " + got + " frames"))
      .catch((err) => setStatus("report failed: " + err.message, true));
  }
}

$("start").onclick = start;
$("stop").onclick = stop;
$("sound").onchange = (ev) => { $("remote").muted = !ev.target.checked; };
loadAvatars().finally(() => { if (reportMode || params.get("autostart") === "1") start(); });
