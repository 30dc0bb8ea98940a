"""One WebRTC peer glued to one engine session.

Incoming video -> 25 fps grid -> `Session.push_video` and the call's `Playout`;
incoming audio -> 16 kHz mono -> `Session.push_audio`, and 48 kHz mono -> the call's
`AudioDelayLine`. The outgoing video track sends the playout's slots on time: the
edited frame where the session finished it in time, the caller's own frame otherwise,
so a call never falls silent, whatever the model does (even when the session failed).
The outgoing audio track plays the caller's audio delayed exactly as the video
(`streaming.playout`). The peer also owns its lifetime: it closes itself (session
first, then transport) when the connection fails or closes, when no media has arrived
for `media_timeout_s` (a browser tab that vanished without a BYE keeps ICE
"connected" for tens of seconds), or when ICE never connects at all. Every exit path
goes through `close()`, which is idempotent and bounded in time, so a slot is always
given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

import numpy as np

from streaming.metrics import ServerMetrics, WindowFeed
from streaming.playout import AudioDelayLine, DelayedAudioReader, Playout, Slot, auto_delay
from streaming.protocol import SessionLike
from streaming.resample import AudioTo16k, FrameGrid, TrackClock, audio_frame_to_mono, media_seconds, video_frame_to_rgb

__all__ = ["PeerLimits", "Peer", "EditedVideoTrack", "DelayedAudioTrack"]

log = logging.getLogger("tccp.serve")

VIDEO_TIME_BASE = Fraction(1, 90000)
AUDIO_RECEIVE_LEAD_S = 0.04
"""aiortc's receiver hands out audio ~4 packets (80 ms) after they arrive (its jitter
buffer's prefetch) and video one frame interval (~40 ms) after, when the next frame
starts; both tracks are anchored at the arrival of their first decoded frame, so the
audio's clock is moved back by the difference to keep the caller's sound and picture
on one clock (for the model's lip sync and for the audio sent back)."""


@dataclass
class PeerLimits:
    media_timeout_s: float = 5.0
    """Close a connected peer after this long without any incoming audio or video."""
    connect_timeout_s: float = 20.0
    """Close a peer whose ICE/DTLS never reached 'connected'."""
    close_timeout_s: float = 5.0
    """Upper bound for each of session.close() and pc.close() during cleanup."""
    fps: float = 25.0
    max_side: int | None = 1280
    """Incoming frames larger than this (longest side) are scaled down first."""
    watchdog_interval_s: float = 0.25
    stats_interval_s: float = 0.25
    """How often the 'stats' data channel gets a JSON update for the page."""
    audio_back: bool = True
    """Send the browser's own audio back, delayed as the video, so sound and picture
    stay together (and a recording of the tab has sound)."""
    delay_s: float | None = None
    """Playout delay at the start of a call (None: from `window_s`, see
    `playout.auto_delay`)."""
    window_s: float | None = None
    """The model's per-window time measured at server start (sets the auto delay)."""
    min_delay_s: float = 0.2
    max_delay_s: float = 1.0
    """The playout delay adapts within these bounds; an edited frame later than the
    delay allows is replaced by the original."""
    new_frames: int = 7
    """Frames per engine window (the auto delay waits for a whole window)."""


class _Rate:
    """Events per second over a sliding window (for the on-screen fps)."""

    def __init__(self, span_s: float = 2.0) -> None:
        self.span = span_s
        self.times: deque[float] = deque()

    def tick(self, now: float) -> None:
        self.times.append(now)
        while self.times and now - self.times[0] > self.span:
            self.times.popleft()

    def rate(self, now: float) -> float:
        while self.times and now - self.times[0] > self.span:
            self.times.popleft()
        if len(self.times) < 2:
            return 0.0
        return (len(self.times) - 1) / max(1e-6, self.times[-1] - self.times[0])


def _track_classes():
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    return MediaStreamTrack, MediaStreamError


def EditedVideoTrack(peer: "Peer"):  # noqa: N802 - a class factory (aiortc imported lazily)
    """The outgoing video track: each `recv()` is the playout's next slot, on time."""
    import av

    MediaStreamTrack, MediaStreamError = _track_classes()

    class _EditedVideoTrack(MediaStreamTrack):
        kind = "video"

        def __init__(self) -> None:
            super().__init__()
            self._last_pts = -1

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            slot = await peer.playout.next()
            if slot is None:
                self.stop()
                raise MediaStreamError
            now = time.monotonic()
            if not slot.repeat:
                peer.record_sent(slot)
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(slot.frame), format="rgb24")
            # timestamps follow the sending clock, as the audio track's do, so a
            # receiver that syncs the two by their RTCP sender reports keeps them together
            pts = int(round((now - peer.origin) / VIDEO_TIME_BASE))
            if pts <= self._last_pts:  # the encoder needs strictly increasing pts
                pts = self._last_pts + 1
            self._last_pts = pts
            vf.pts = pts
            vf.time_base = VIDEO_TIME_BASE
            return vf

    return _EditedVideoTrack()


def DelayedAudioTrack(peer: "Peer"):  # noqa: N802
    """The outgoing audio track: the caller's audio, delayed as the video (20 ms frames
    of 48 kHz mono, paced in real time, timestamps always increasing)."""
    import av

    MediaStreamTrack, MediaStreamError = _track_classes()
    rate = peer.audio_line.sr

    class _DelayedAudioTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self._reader = DelayedAudioReader(peer.audio_line, peer.origin, lambda: peer.playout.delay)
            self._start: float | None = None
            self._k = 0

        async def recv(self):
            if self.readyState != "live" or peer.closing:
                raise MediaStreamError
            if self._start is None:
                self._start = time.monotonic()
            due = self._start + self._k * self._reader.frame_s
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            elif wait < -0.2:  # the loop stalled: do not send a burst to catch up
                self._start -= wait
            samples, _ = self._reader.read(time.monotonic())
            pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = rate
            frame.pts = self._k * self._reader.n
            frame.time_base = Fraction(1, rate)
            self._k += 1
            return frame

    return _DelayedAudioTrack()


class Peer:
    """The server side of one browser (or aiortc) connection."""

    def __init__(
        self,
        pc: Any,
        session: SessionLike,
        limits: PeerLimits,
        metrics: ServerMetrics,
        on_closed: Callable[["Peer", str], None] | None = None,
    ) -> None:
        self.id = uuid.uuid4().hex[:8]
        self.pc = pc
        self.session = session
        self.limits = limits
        self.metrics = metrics
        self._on_closed = on_closed
        self.origin = time.monotonic()
        self.last_media = self.origin
        self.connected_at: float | None = None
        self.close_reason: str | None = None
        self.closed = asyncio.Event()
        self.closing = False
        self._tasks: set[asyncio.Task] = set()
        delay = limits.delay_s if limits.delay_s is not None else auto_delay(
            limits.window_s, limits.new_frames, limits.fps, hi=min(0.9, limits.max_delay_s))
        self.playout = Playout(self.origin, delay_s=delay, min_delay_s=limits.min_delay_s,
                               max_delay_s=limits.max_delay_s, fps=limits.fps)
        self.audio_line = AudioDelayLine(48000, keep_s=limits.max_delay_s + 2.0)
        self._bind_controller()
        self._feed = WindowFeed(metrics)
        self._rate_in = _Rate()
        self._rate_out = _Rate()
        self._latency: deque[float] = deque(maxlen=50)
        self._last_stats_sent = 0.0
        self._channel: Any = None
        self._size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.audio_samples = 0
        self.has_video = False
        self.has_audio = False
        self.session_error: str | None = None
        """Set when the engine session failed: the call goes on with the caller's own frames."""
        self.outgoing = EditedVideoTrack(self)
        self.outgoing_audio = DelayedAudioTrack(self) if limits.audio_back else None
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_state)

    def _bind_controller(self) -> None:
        """Give the session's live controller the playout's slack: a window may take
        until its first frame's slot (delay minus the window's own span)."""
        from streaming.live import LiveController

        ctl = getattr(self.session, "controller", None)
        if isinstance(ctl, LiveController):
            span = (self.limits.new_frames - 1) / self.limits.fps
            ctl.set_slack(lambda: self.playout.delay - span)

    # ------------------------------------------------------------------ wiring
    def start(self) -> None:
        """Start the watchdog and the output reader; call after the answer is set."""
        self._spawn(self._watchdog(), "watchdog")
        self._spawn(self._read_output(), "output")

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"peer-{self.id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _on_track(self, track) -> None:
        # Fired inside setRemoteDescription: adding our tracks here reuses the offer's
        # transceivers, so the answer says sendrecv for them.
        if track.kind == "video" and not self.has_video:
            self.has_video = True
            self.pc.addTrack(self.outgoing)
            self._spawn(self._consume_video(track), "video-in")
        elif track.kind == "audio" and not self.has_audio:
            self.has_audio = True
            if self.outgoing_audio is not None:
                self.pc.addTrack(self.outgoing_audio)
            self._spawn(self._consume_audio(track), "audio-in")
        else:
            # a second camera/mic: read and discard, or aiortc queues its frames forever
            self._spawn(self._discard(track), "discard")

    def _on_datachannel(self, channel) -> None:
        if channel.label == "stats":
            self._channel = channel

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        log.info("peer %s: connection %s", self.id, state)
        if state == "connected":
            self.connected_at = time.monotonic()
            self.last_media = max(self.last_media, self.connected_at)
        elif state in ("failed", "closed", "disconnected"):
            await self.close(f"connection_{state}")

    # ------------------------------------------------------------------ media in
    async def _received(self, track):
        """The frames of `track` until it ends, each with its arrival time (which also
        marks the peer as alive for the idle watchdog)."""
        _, MediaStreamError = _track_classes()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = time.monotonic()
            self.last_media = now
            yield frame, now

    async def _consume_video(self, track) -> None:
        clock = TrackClock(self.origin)
        grid = FrameGrid(self.limits.fps)
        counter = self.metrics.frames_in.labels("video")
        async for frame, now in self._received(track):
            slots = grid.push(clock(media_seconds(frame), now))
            if not slots:
                continue
            img = self._to_rgb(frame)
            for t in slots:
                self.playout.add_input(t, img, now)
                self.frames_in += 1
                self._rate_in.tick(now)
                counter.inc()
                await self._push(self.session.push_video, img, t)

    async def _push(self, method, data, t: float) -> None:
        """Hand media to the session; a failed session ends the editing, not the call."""
        if self.session_error is not None:
            return
        try:
            await method(data, t)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._session_failed(exc)

    def _session_failed(self, exc: BaseException) -> None:
        if self.session_error is None:
            self.session_error = f"{type(exc).__name__}: {exc}"
            log.warning("peer %s: engine session failed (%s); sending the caller's own frames", self.id,
                        self.session_error)
            self.metrics.session_errors.inc()

    @staticmethod
    async def _discard(track) -> None:
        _, MediaStreamError = _track_classes()
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()

    def _to_rgb(self, frame) -> np.ndarray:
        """RGB at one fixed size per peer (a resolution change mid-call is scaled back)."""
        if self._size is None:
            self.input_size = (frame.width, frame.height)
            img = video_frame_to_rgb(frame, self.limits.max_side)
            self._size = (img.shape[1], img.shape[0])
            if self._size != self.input_size:
                log.info("peer %s: camera sends %dx%d; scaled to %dx%d", self.id, *self.input_size, *self._size)
            return img
        w, h = self._size
        if (frame.width, frame.height) == (w, h):
            return frame.to_ndarray(format="rgb24")
        return frame.to_ndarray(format="rgb24", width=w, height=h)

    async def _consume_audio(self, track) -> None:
        clock = TrackClock(self.origin)
        to16k = AudioTo16k()
        counter = self.metrics.frames_in.labels("audio")
        next_t: float | None = None
        async for frame, now in self._received(track):
            counter.inc()
            t = clock(media_seconds(frame), now) - AUDIO_RECEIVE_LEAD_S
            try:
                mono, rate = audio_frame_to_mono(frame)
                if self.outgoing_audio is not None and mono.size:
                    self.audio_line.push(mono if rate == self.audio_line.sr else
                                         _resample(mono, rate, self.audio_line.sr), t)
                samples = to16k(frame)
            except Exception as exc:  # an undecodable frame: skip it, keep the call
                log.info("peer %s: audio frame skipped: %r", self.id, exc)
                continue
            if samples.size == 0:
                continue
            # the resampler may hold samples back; contiguous blocks keep their
            # own running clock unless the stream jumped
            if next_t is None or abs(t - next_t) > 0.1:
                next_t = t
            await self._push(self.session.push_audio, samples, next_t)
            next_t += samples.size / to16k.rate
            self.audio_samples += samples.size

    # ------------------------------------------------------------------ media out
    async def _read_output(self) -> None:
        """Engine frames go to the playout as soon as they exist (in time: they replace
        the originals; late: dropped and counted)."""
        while not self.closing:
            try:
                out = await self.session.get()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._session_failed(exc)
                return
            if out is None:
                return
            if not self.playout.add_output(out, time.monotonic()) and out.generated:
                self.metrics.frames_late.inc()

    def record_sent(self, slot: Slot) -> None:
        """Count a frame handed to the encoder and measure its latency."""
        now = time.monotonic()
        self.frames_out += 1
        self._rate_out.tick(now)
        self.metrics.frames_out.labels("true" if slot.generated else "false").inc()
        latency = now - slot.arrived
        self._latency.append(latency)
        self.metrics.frame_latency.observe(latency)
        if now - self._last_stats_sent >= self.limits.stats_interval_s:
            self._last_stats_sent = now
            self._feed.poll(self.session.stats)
            self.metrics.peer_generated.labels(self.id).set(self.playout.generated_share)
            self.metrics.peer_delay.labels(self.id).set(self.playout.delay)
            self._send_stats(slot, now)

    def stats(self) -> dict[str, Any]:
        """What the page shows (also sent over the 'stats' data channel)."""
        now = time.monotonic()
        lat = sorted(self._latency)
        windows = getattr(self.session.stats, "windows", None)
        last_window = windows[-1] if windows else None
        p = self.playout
        return {
            "type": "stats",
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "frames_generated": p.sent_generated,
            "generated_share": round(p.generated_share, 3),
            "late": p.late,
            "playout_delay_ms": round(1000 * p.delay, 1),
            "fps_in": round(self._rate_in.rate(now), 2),
            "fps_out": round(self._rate_out.rate(now), 2),
            "server_latency_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None,
            "window_e2e_ms": round(1000 * float(last_window.e2e), 1) if last_window else None,
            "window_steps": getattr(last_window, "steps", None),
            "input_size": list(self.input_size) if self.input_size else None,
            "size": list(self._size) if self._size else None,
            "engine_error": self.session_error,
        }

    def _send_stats(self, slot: Slot, now: float) -> None:
        ch = self._channel
        if ch is None or ch.readyState != "open":
            return
        msg = self.stats()
        msg.update(generated=bool(slot.generated), reason=slot.reason, pts=round(float(slot.pts), 3))
        with contextlib.suppress(Exception):
            ch.send(json.dumps(msg))

    # ------------------------------------------------------------------ lifetime
    async def _watchdog(self) -> None:
        lim = self.limits
        while not self.closing:
            await asyncio.sleep(lim.watchdog_interval_s)
            now = time.monotonic()
            if self.connected_at is None:
                if now - self.origin > lim.connect_timeout_s:
                    await self.close("connect_timeout")
                    return
            elif now - self.last_media > lim.media_timeout_s:
                log.info("peer %s: no media for %.1f s", self.id, now - self.last_media)
                await self.close("media_timeout")
                return

    async def close(self, reason: str) -> None:
        """Tear down session and transport (idempotent, each step time-bounded)."""
        if self.closing:
            await self.closed.wait()
            return
        self.closing = True
        self.close_reason = reason
        log.info("peer %s: closing (%s)", self.id, reason)
        with contextlib.suppress(Exception):
            self._feed.poll(self.session.stats)
        for gauge in (self.metrics.peer_generated, self.metrics.peer_delay):
            with contextlib.suppress(Exception):
                gauge.remove(self.id)
        me = asyncio.current_task()
        for task in list(self._tasks):
            if task is not me:
                task.cancel()
        self.playout.close()  # wakes a waiting recv()
        for track in (self.outgoing, self.outgoing_audio):
            with contextlib.suppress(Exception):
                if track is not None:
                    track.stop()
        t = self.limits.close_timeout_s
        abort = getattr(self.session, "abort", None)
        try:
            if callable(abort):
                # nobody will receive a flushed last window once the peer is gone:
                # drop the in-flight work instead of waiting for the model
                abort()
            else:
                await asyncio.wait_for(self.session.close(), t)
        except Exception as exc:  # includes the timeout: the slot must come back anyway
            log.warning("peer %s: session close: %r", self.id, exc)
        try:
            await asyncio.wait_for(self.pc.close(), t)
        except Exception as exc:
            log.warning("peer %s: transport close: %r", self.id, exc)
        self.closed.set()
        if self._on_closed is not None:
            self._on_closed(self, reason)

    def info(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "id": self.id,
            "state": self.pc.connectionState,
            "age_s": round(now - self.origin, 2),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "generated_share": round(self.playout.generated_share, 3),
            "fps_out": round(self._rate_out.rate(now), 2),
            "playout": {"delay_ms": round(1000 * self.playout.delay, 1), "late": self.playout.late,
                        "skipped": self.playout.skipped, "repeats": self.playout.repeats,
                        "originals": dict(self.playout.reasons)},
            "engine": _engine_info(self.session),
        }


def _engine_info(session: Any) -> dict[str, Any]:
    """A short view of the session's engine counters and window timings (ms, p50)."""
    st = getattr(session, "stats", None)
    out: dict[str, Any] = {}
    if st is None:
        return out
    with contextlib.suppress(Exception):
        out.update(windows=st.windows_total, generated=st.frames_generated, passthrough=dict(st.passthrough),
                   dropped_input=st.dropped_input, error=st.error)
        for name in ("queue_wait", "features", "stage2", "composite", "e2e"):
            vals = [getattr(w, name) for w in list(st.windows)[-50:] if w.mode != "passthrough"]
            out[f"{name}_ms"] = round(1000 * float(np.median(vals)), 1) if vals else None
    adapter = getattr(session, "adapter", None)
    if adapter is not None:  # stage 1 adapting to the caller: collecting / adapting / adapted / not adapted
        out["adapt"] = adapter.state
    ctl = getattr(session, "controller", None)
    if ctl is not None:
        out["skipped"] = getattr(ctl, "skipped", None)
        out["detail"] = getattr(ctl, "_detail", None)
    return out


def _resample(x: np.ndarray, rate: int, to: int) -> np.ndarray:
    n = int(round(x.size * to / rate))
    if n <= 0:
        return np.zeros(0, np.float32)
    return np.interp(np.arange(n) * (rate / to), np.arange(x.size), x).astype(np.float32)


UDP_BUFFER_BYTES = 4 << 20
"""Receive buffer asked for each of a call's UDP sockets. The kernel default (~208 KB)
holds a fraction of a second of a call's media: a server whose event loop is late by a
few hundred milliseconds under load (four calls on two cores) drops datagrams, and
aiortc then waits for a keyframe on each lost picture (measured: all four calls'
video stalled 5-8 s). The kernel caps the value at `net.core.rmem_max`."""


def widen_udp_buffers(pc: Any, nbytes: int = UDP_BUFFER_BYTES) -> int:
    """Ask for `nbytes` of receive buffer on every UDP socket of a peer connection's ICE
    transports (call after `setLocalDescription`, when the sockets exist). Returns how
    many sockets were widened; 0 when aiortc's internals differ (nothing else changes)."""
    import socket

    done = 0
    try:
        for transceiver in pc.getTransceivers():
            dtls = transceiver.receiver.transport or transceiver.sender.transport
            conn = dtls.transport._connection
            for proto in list(getattr(conn, "_protocols", [])):
                sock = proto.transport.get_extra_info("socket") if proto.transport else None
                if sock is not None and sock.type == socket.SOCK_DGRAM:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, nbytes)
                    done += 1
    except (AttributeError, OSError):
        return done
    return done
