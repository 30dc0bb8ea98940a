"""An independent WebRTC peer that measures what `tccp serve` really delivers.

    .venv/bin/python -m streaming.probe http://127.0.0.1:8080 --clip vr_face3.mp4 \
        --clip vx_short_AOC.mp4 --calls 5 --seconds 13 --size 512 --json probe.json

It is a plain aiortc peer, like a browser: it sends a clip's frames and audio in real
time (looped; by default its timestamps restart at every loop, as a looping file
player's do) and measures only what arrives back, never the server's own counters:

- every sent frame carries its number in a 4x4 block code in the top-left corner
  (16 px cells, survives VP8), so each received frame is matched to the frame it came
  from: per-frame latency (received - sent) and gaps;
- a received frame counts as *generated* when its mouth region differs from the sent
  frame clearly more than a control region of the same face does (the codec touches
  both alike; the engine only repaints the mouth); the boxes come from tracking the
  clip before the call. `--calibrate` prints the two differences per frame;
- the audio that comes back is matched to the sent audio by cross-correlation in
  0.5 s chunks: audio latency per chunk; the A/V offset is median audio latency minus
  median video latency (positive: sound after picture). aiortc's own receiver holds
  audio ~4 packets (80 ms) in its jitter buffer and video until the next frame's first
  packet (40 ms at 25 fps); `av_offset_ms` is as received, `receiver_buffering_ms`
  says how much of it that is.

Reported per call: time to the first frame back and to the first generated frame
(from the first frame sent), frames back, generated share, latency percentiles, the
longest gap, the A/V offset, and how the call ended. `--calls` run one after another,
`--parallel` at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ProbeClip", "load_clip", "stamp", "read_stamp", "run_call", "summarise", "main"]

CELL = 16
BITS = 16  # 12 bits of frame number + a 4-bit checksum, 4 x 4 cells
MOD = 1 << 12
AUDIO_SR = 48000
RECEIVER_BUFFERING_MS = 40.0  # aiortc: audio prefetch 4 x 20 ms minus video's one frame (40 ms)


# --------------------------------------------------------------------------- frame code
def _bits(i: int) -> list[int]:
    n = i % MOD
    check = ((n & 0xF) + ((n >> 4) & 0xF) + ((n >> 8) & 0xF)) & 0xF
    v = n | (check << 12)
    return [(v >> b) & 1 for b in range(BITS)]


def stamp(frame: np.ndarray, i: int) -> np.ndarray:
    """A copy of `frame` with frame number `i` drawn in its top-left 64x64 px."""
    out = np.array(frame, copy=True)
    for b, bit in enumerate(_bits(i)):
        r, c = divmod(b, 4)
        out[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = 235 if bit else 20
    return out


def read_stamp(frame: np.ndarray) -> int | None:
    """The frame number `stamp` drew (mod 4096), None if unreadable."""
    v = 0
    q = CELL // 4
    for b in range(BITS):
        r, c = divmod(b, 4)
        cell = frame[r * CELL + q:(r + 1) * CELL - q, c * CELL + q:(c + 1) * CELL - q]
        v |= int(cell.mean() > 127) << b
    n, check = v & (MOD - 1), v >> 12
    return n if ((n & 0xF) + ((n >> 4) & 0xF) + ((n >> 8) & 0xF)) & 0xF == check else None


# --------------------------------------------------------------------------- clip
@dataclass
class ProbeClip:
    name: str
    frames: np.ndarray  # (N, H, W, 3) uint8, unstamped
    audio: np.ndarray  # mono float32 at 48 kHz
    mouth: np.ndarray  # (N, 4) int boxes x0 y0 x1 y1 around the lips (frames without a face: -1)
    control: np.ndarray  # (N, 4) same-size box between the eyes


def load_clip(path: str, size: int = 512, seconds: float | None = None) -> ProbeClip:
    """Frames at 25 fps scaled so the longest side is `size` (even), the audio at 48 kHz,
    and per-frame mouth and control boxes from tracking the clip."""
    import cv2

    from tccp.face.track import FaceTracker
    from tccp.media.io import read_audio, read_video

    p = Path(path)
    if not p.exists():
        p = Path("/work/shared/data/clips") / path
    video = read_video(p, fps=25.0, max_seconds=seconds)
    h, w = video.frames[0].shape[:2]
    k = size / max(h, w)
    tw, th = max(2, int(round(w * k / 2)) * 2), max(2, int(round(h * k / 2)) * 2)
    frames = np.stack([cv2.resize(f, (tw, th), interpolation=cv2.INTER_AREA) for f in video.frames])
    audio = read_audio(p, sr=AUDIO_SR, max_seconds=len(frames) / 25.0)
    mouth = np.full((len(frames), 4), -1, np.int64)
    control = np.full((len(frames), 4), -1, np.int64)
    lips = [61, 291, 0, 17, 13, 14, 78, 308]
    with FaceTracker() as tr:
        for i, f in enumerate(frames):
            obs = tr.update(f)
            if obs is None:
                continue
            lm = obs.landmarks
            x0, y0 = lm[lips].min(0)
            x1, y1 = lm[lips].max(0)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            half = max(x1 - x0, (y1 - y0) * 1.6, 16) * 0.6
            mouth[i] = [cx - half, cy - half * 0.7, cx + half, cy + half * 0.7]
            bx, by = lm[168]  # between the eyes: never repainted
            control[i] = [bx - half, by - half * 0.7, bx + half, by + half * 0.7]
    for b in (mouth, control):
        b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, tw)
        b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, th)
    return ProbeClip(p.name, frames, audio.astype(np.float32), mouth, control)


# --------------------------------------------------------------------------- tracks
def _restartable_vp8() -> None:
    """Let this process's VP8 encoder take timestamps that go back (a looping player's).

    libvpx (through libavcodec) refuses a frame whose pts is not after the previous
    one and aiortc's sender then stops for good, so a peer whose timestamps restart
    would fall silent by its own fault. The encoder is fed a monotonic pts and the RTP
    timestamp keeps the frame's own (restarting) value, which is what reaches the
    server."""
    from aiortc.codecs import vpx

    if getattr(vpx.Vp8Encoder.encode, "_probe", False):
        return
    original = vpx.Vp8Encoder.encode

    def encode(self, frame, force_keyframe: bool = False):
        wire = frame.pts
        last = getattr(self, "_probe_last", None)
        shift = getattr(self, "_probe_shift", 0)
        if last is not None and wire + shift <= last:
            shift = last + 1 - wire
        self._probe_last, self._probe_shift = wire + shift, shift
        frame.pts = wire + shift
        payloads, _ = original(self, frame, force_keyframe)
        return payloads, vpx.convert_timebase(wire, frame.time_base, vpx.VIDEO_TIME_BASE)

    encode._probe = True  # type: ignore[attr-defined]
    vpx.Vp8Encoder.encode = encode


def _tracks(clip: ProbeClip, restart: bool, log: dict):
    """The probe's camera and microphone: the clip's frames stamped with their index,
    its audio, paced as `streaming.client`'s clip tracks; sending times logged."""
    from streaming.client import ClipAudioTrack, ClipVideoTrack

    if restart:
        _restartable_vp8()
    n = len(clip.frames)
    video = ClipVideoTrack(clip.frames, 25.0, loop=True, image=lambda i: stamp(clip.frames[i % n], i),
                           restart_pts=restart, on_send=lambda: log["video_sent"].append(time.monotonic()))
    audio = ClipAudioTrack(clip.audio, AUDIO_SR, loop=True, restart_pts=restart,
                           on_start=lambda t0: log.__setitem__("audio_t0", t0))
    return video, audio


# --------------------------------------------------------------------------- a call
@dataclass
class CallLog:
    clip: str
    started: float = 0.0
    video_sent: list = field(default_factory=list)
    audio_t0: float | None = None
    received: list = field(default_factory=list)  # (arrival, index or None, generated, d_mouth, d_ctrl, w, h)
    audio: list = field(default_factory=list)  # (arrival, mono float32 48 kHz samples)
    status: int | None = None
    error: str | None = None
    ended: str = "timeout"
    events: list = field(default_factory=list)  # (time, connection state)


def _classify(clip: ProbeClip, i: int, img: np.ndarray) -> tuple[bool, float, float]:
    j = i % len(clip.frames)
    mb, cb = clip.mouth[j], clip.control[j]
    if mb[0] < 0 or img.shape[:2] != clip.frames.shape[1:3]:
        return False, 0.0, 0.0
    src = clip.frames[j]

    def diff(b) -> float:
        x0, y0, x1, y1 = (int(v) for v in b)
        a = img[y0:y1, x0:x1].astype(np.int16)
        s = src[y0:y1, x0:x1].astype(np.int16)
        return float(np.abs(a - s).mean()) if a.size else 0.0

    dm, dc = diff(mb), diff(cb)
    return dm > 1.6 * dc + 2.0, dm, dc


async def run_call(url: str, clip: ProbeClip, seconds: float, token: str | None = None, restart: bool = True,
                   log: CallLog | None = None) -> CallLog:
    """One call of `seconds` from the first frame sent; never raises (errors are logged)."""
    import aiohttp
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    log = log or CallLog(clip.name)
    raw: dict = {"video_sent": log.video_sent, "audio_t0": None}
    video, audio = _tracks(clip, restart, raw)
    pc = RTCPeerConnection()
    pc.addTrack(video)
    pc.addTrack(audio)
    consumers: list[asyncio.Task] = []

    async def consume(track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = time.monotonic()
            if track.kind == "audio":
                a = frame.to_ndarray().astype(np.float32).reshape(-1, len(frame.layout.channels)).mean(1) / 32768
                log.audio.append((now, a))
                continue
            img = frame.to_ndarray(format="rgb24")
            i = read_stamp(img)
            gen, dm, dc = _classify(clip, i, img) if i is not None else (False, 0.0, 0.0)
            log.received.append((now, i, gen, dm, dc, frame.width, frame.height))

    @pc.on("connectionstatechange")
    def on_state() -> None:
        log.events.append((time.monotonic(), pc.connectionState))

    @pc.on("track")
    def on_track(track) -> None:
        consumers.append(asyncio.ensure_future(consume(track)))

    try:
        await pc.setLocalDescription(await pc.createOffer())
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            async with http.post(url.rstrip("/") + "/offer", headers=headers, data=json.dumps(
                    {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})) as r:
                log.status = r.status
                body = await r.json(content_type=None)
        if log.status != 200:
            log.error, log.ended = str(body.get("error") if isinstance(body, dict) else body), "refused"
            return log
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
        t_end = None
        while True:
            await asyncio.sleep(0.05)
            if log.video_sent and t_end is None:
                t_end = log.video_sent[0] + seconds
            if t_end is not None and time.monotonic() >= t_end:
                break
            if pc.connectionState in ("failed", "closed"):
                log.ended = f"connection_{pc.connectionState}"
                break
            if t_end is None and pc.connectionState == "new" and False:
                break
        log.audio_t0 = raw["audio_t0"]
    except Exception as exc:  # noqa: BLE001 - a probe reports, it does not crash
        log.error, log.ended = f"{type(exc).__name__}: {exc}", "error"
    finally:
        for t in consumers:
            t.cancel()
        await pc.close()
    return log


# --------------------------------------------------------------------------- analysis
def _audio_latencies(log: CallLog, clip: ProbeClip, max_latency_s: float = 4.0) -> list[tuple[float, float]]:
    """(arrival, latency) per 0.5 s chunk of returned audio matched to the sent audio."""
    if log.audio_t0 is None or not log.audio:
        return []
    sent = clip.audio
    # a looped clip repeats itself: search less than one loop back, or chunks match
    # several loops equally well
    max_latency_s = min(max_latency_s, 0.9 * sent.size / AUDIO_SR - 0.5)
    if max_latency_s <= 0.1:
        return []
    n_sent = int((log.audio[-1][0] - log.audio_t0 + 1) * AUDIO_SR)
    reps = n_sent // max(1, sent.size) + 2
    s_all = np.tile(sent, reps)
    dec = 6  # 8 kHz is plenty for matching speech
    s8 = s_all[: s_all.size // dec * dec].reshape(-1, dec).mean(1)
    out = []
    per = 25
    for c in range(0, len(log.audio) - per + 1, per):
        chunk = log.audio[c:c + per]
        x = np.concatenate([a for _, a in chunk])
        x8 = x[: x.size // dec * dec].reshape(-1, dec).mean(1)
        if np.sqrt(np.mean(x8 ** 2)) < 1e-3:
            continue  # silence (nothing to match)
        arr0 = chunk[0][0]
        hi = int((arr0 - log.audio_t0) * AUDIO_SR / dec)
        lo = max(0, hi - int(max_latency_s * AUDIO_SR / dec))
        seg = s8[lo: hi + x8.size]
        if seg.size < x8.size + 8:
            continue
        nfft = 1 << int(np.ceil(np.log2(seg.size + x8.size)))
        corr = np.fft.irfft(np.fft.rfft(seg, nfft) * np.conj(np.fft.rfft(x8, nfft)), nfft)[: seg.size - x8.size + 1]
        energy = np.sqrt(np.convolve(seg ** 2, np.ones(x8.size), "valid")[: corr.size] * np.sum(x8 ** 2)) + 1e-9
        ncc = corr / energy
        j = int(np.argmax(ncc))
        if ncc[j] < 0.5:
            continue
        m = (lo + j) * dec  # sent sample index of the chunk's first sample
        # each frame of the chunk: arrival minus when its samples were sent
        lat = [a - (log.audio_t0 + (m + k * (x.size // per)) / AUDIO_SR) for k, (a, _) in enumerate(chunk)]
        out.append((arr0, float(np.median(lat))))
    return out


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def summarise(log: CallLog, clip: ProbeClip) -> dict[str, Any]:
    """The measured numbers of one call (milliseconds, shares, counts)."""
    out: dict[str, Any] = {"clip": log.clip, "status": log.status, "ended": log.ended, "error": log.error}
    base = log.video_sent[0] if log.video_sent else (log.events[0][0] if log.events else 0.0)
    out["states"] = [(round(t - base, 2), s) for t, s in log.events]
    if not log.video_sent:
        out.update(frames_sent=0, frames_back=0, video_within_1s=False)
        return out
    t0 = log.video_sent[0]
    sent = log.video_sent
    rec = [r for r in log.received if r[0] >= t0]
    matched = [r for r in rec if r[1] is not None]
    # distinct frames: a repeat of the frame already on screen (a sender holding its
    # picture) counts once, at its first arrival
    seen: set = set()
    distinct = []
    for r in matched:
        if r[1] not in seen:
            seen.add(r[1])
            distinct.append(r)
    lat_at: list[tuple[float, float]] = []
    for arr, i, *_ in distinct:
        # the most recent send of this number (mod 4096) before the frame arrived
        cands = [k for k in range(i, len(sent), MOD) if sent[k] <= arr]
        if cands:
            lat_at.append((arr, arr - sent[cands[-1]]))
    lat = [x for _, x in lat_at]
    gen = [r for r in distinct if r[2]]
    arrivals = [r[0] for r in rec]
    gaps = np.diff(arrivals) if len(arrivals) > 1 else np.zeros(0)
    audio = _audio_latencies(log, clip)
    steady_from = t0 + 3.0
    a_lat = [x for a, x in audio if a >= steady_from] or [x for _, x in audio]
    v_lat = [x for arr, x in lat_at if arr >= steady_from] or lat
    first = (arrivals[0] - t0) if arrivals else None
    out.update(
        frames_sent=len(sent),
        frames_back=len(rec),
        frames_matched=len(matched),
        frames_distinct=len(distinct),
        sizes=sorted({(r[5], r[6]) for r in rec}),
        first_frame_ms=None if first is None else 1000 * first,
        video_within_1s=first is not None and first <= 1.0,
        first_generated_ms=(1000 * (gen[0][0] - t0)) if gen else None,
        generated_share=(len(gen) / len(distinct)) if distinct else 0.0,
        generated_share_of_all_received=(sum(1 for r in matched if r[2]) / len(matched)) if matched else 0.0,
        fps_back=(len(rec) / max(1e-6, rec[-1][0] - rec[0][0])) if len(rec) > 1 else 0.0,
        longest_gap_ms=1000 * float(gaps.max()) if gaps.size else None,
        latency_ms={q: (None if _pct(lat, q) is None else 1000 * _pct(lat, q)) for q in (50, 90, 99)},
        audio_chunks_matched=len(audio),
        audio_latency_ms=None if not a_lat else 1000 * float(np.median(a_lat)),
        video_latency_steady_ms=None if not v_lat else 1000 * float(np.median(v_lat)),
        av_offset_ms=None if not (a_lat and v_lat) else 1000 * (float(np.median(a_lat)) - float(np.median(v_lat))),
        receiver_buffering_ms=RECEIVER_BUFFERING_MS,
        mouth_diff_p50=_pct([r[3] for r in matched], 50),
        control_diff_p50=_pct([r[4] for r in matched], 50),
    )
    return out


def aggregate(calls: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [c for c in calls if c.get("frames_sent")]
    vals = lambda k: [c[k] for c in ok if c.get(k) is not None]  # noqa: E731
    back = sum(c.get("frames_distinct", 0) for c in ok)
    gen = sum(round(c.get("generated_share", 0) * c.get("frames_distinct", 0)) for c in ok)
    return {
        "calls": len(calls),
        "calls_with_video_within_1s": sum(bool(c.get("video_within_1s")) for c in calls),
        "silent_calls": sum(1 for c in ok if not c.get("frames_back")),
        "first_frame_ms": vals("first_frame_ms"),
        "first_generated_ms": vals("first_generated_ms"),
        "generated_share": gen / back if back else 0.0,
        "latency_p50_ms": vals("latency_ms") and [c["latency_ms"][50] for c in ok if c["latency_ms"][50] is not None],
        "av_offset_ms": vals("av_offset_ms"),
    }


# --------------------------------------------------------------------------- CLI
def _fmt(x: Any, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    clips = [load_clip(c, args.size, args.clip_seconds) for c in args.clip]
    results = []
    for k in range(0, args.calls, args.parallel):
        batch = [clips[(k + j) % len(clips)] for j in range(min(args.parallel, args.calls - k))]
        logs = await asyncio.gather(*(run_call(args.url, c, args.seconds, args.token, not args.no_restart)
                                      for c in batch))
        for log, c in zip(logs, batch):
            s = summarise(log, c)
            results.append(s)
            print(f"{s['clip']:<22} {s.get('ended'):<10} back {s.get('frames_back', 0):4d}/{s.get('frames_sent', 0):4d}"
                  f" first {_fmt(s.get('first_frame_ms'))} ms, first generated {_fmt(s.get('first_generated_ms'))} ms,"
                  f" generated {100 * s.get('generated_share', 0):.0f}%, latency p50 "
                  f"{_fmt((s.get('latency_ms') or {}).get(50))} ms, gap max {_fmt(s.get('longest_gap_ms'))} ms,"
                  f" A/V {_fmt(s.get('av_offset_ms'), '+.0f')} ms" + (f" [{s['error']}]" if s.get("error") else ""),
                  flush=True)
            if args.calibrate:
                print("   mouth/control diff p50:", s.get("mouth_diff_p50"), s.get("control_diff_p50"))
        if k + args.parallel < args.calls:
            await asyncio.sleep(args.pause)
    return {"url": args.url, "seconds": args.seconds, "size": args.size, "restart_timestamps": not args.no_restart,
            "calls": results, "summary": aggregate(results)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streaming.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("--clip", action="append", required=True, help="video with a face and speech (repeatable)")
    p.add_argument("--calls", type=int, default=1)
    p.add_argument("--parallel", type=int, default=1, help="calls at once")
    p.add_argument("--seconds", type=float, default=13.0, help="length of each call from its first frame")
    p.add_argument("--size", type=int, default=512, help="longest side of the sent video")
    p.add_argument("--clip-seconds", type=float, default=None, help="use only the clip's first seconds")
    p.add_argument("--no-restart", action="store_true", help="keep timestamps increasing across loops")
    p.add_argument("--pause", type=float, default=2.0, help="seconds between sequential calls")
    p.add_argument("--token", default=None)
    p.add_argument("--calibrate", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from streaming.eventloop import run as run_loop

    report = run_loop(_main(args))
    s = report["summary"]
    print(f"summary: {s['calls_with_video_within_1s']}/{s['calls']} calls with video within 1 s, "
          f"{s['silent_calls']} silent, generated share {100 * s['generated_share']:.0f}%", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
