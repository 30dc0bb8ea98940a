"""One WebRTC peer glued to one engine session.

Incoming video -> 25 fps grid -> `Session.push_video`; incoming audio -> 16 kHz mono ->
`Session.push_audio`; an outgoing video track pulls `Session.get()`. The peer also owns
its lifetime: it closes itself (session first, then transport) when the connection
fails or closes, when no media has arrived for `media_timeout_s` (a browser tab that
vanished without a BYE keeps ICE "connected" for tens of seconds), or when ICE never
connects at all. Every exit path goes through `close()`, which is idempotent and
bounded in time, so a slot is always given back.
"""

from __future__ import annotations

import asyncio
import bisect
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
from streaming.protocol import OutputFrameLike, SessionLike
from streaming.resample import (
    AudioTo16k, FrameGrid, PlayoutPacer, TrackClock, media_seconds, video_frame_to_rgb,
)

__all__ = ["PeerLimits", "Peer", "EditedVideoTrack"]

log = logging.getLogger("tccp.serve")

VIDEO_TIME_BASE = Fraction(1, 90000)


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
    """Send the browser's own audio back (undelayed) so a recording of the tab has sound."""
    pace: bool = True
    """Send output frames at their pts spacing (see resample.PlayoutPacer), not in bursts."""
    out_buffer: int = 64
    """Output frames waiting for the encoder; beyond this the oldest are dropped."""


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


class _Arrivals:
    """Arrival time of each pushed grid frame, looked up by the output frame's pts.

    Nearest match within half a frame, so an engine that re-grids its timestamps by a
    rounding error still gets its latency measured. Bounded: old entries fall off.
    """

    def __init__(self, tolerance_s: float, keep: int = 512) -> None:
        self.tol = tolerance_s
        self.keep = keep
        self.pts: list[float] = []
        self.at: list[float] = []

    def add(self, pts: float, arrival: float) -> None:
        self.pts.append(pts)
        self.at.append(arrival)
        if len(self.pts) > 2 * self.keep:
            del self.pts[: self.keep], self.at[: self.keep]

    def find(self, pts: float) -> float | None:
        i = bisect.bisect_left(self.pts, pts)
        best = None
        for j in (i - 1, i):
            if 0 <= j < len(self.pts) and abs(self.pts[j] - pts) <= self.tol:
                if best is None or abs(self.pts[j] - pts) < abs(self.pts[best] - pts):
                    best = j
        return None if best is None else self.at[best]


def _track_classes():
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    return MediaStreamTrack, MediaStreamError


def EditedVideoTrack(peer: "Peer"):  # noqa: N802 - a class factory (aiortc imported lazily)
    """The outgoing video track: each `recv()` is the session's next output frame."""
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
            out, ready = await peer.next_ready()
            if out is None:
                self.stop()
                raise MediaStreamError
            wait = peer.pacer.delay(float(out.pts), ready) if peer.pacer is not None else 0.0
            if wait > 0:
                await asyncio.sleep(wait)
            peer.record_sent(out)
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(out.frame), format="rgb24")
            pts = int(round(float(out.pts) / VIDEO_TIME_BASE))
            if pts <= self._last_pts:  # the encoder needs strictly increasing pts
                pts = self._last_pts + 1
            self._last_pts = pts
            vf.pts = pts
            vf.time_base = VIDEO_TIME_BASE
            return vf

    return _EditedVideoTrack()


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
        from aiortc.contrib.media import MediaRelay

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
        self._closing = False
        self._tasks: set[asyncio.Task] = set()
        self._relay = MediaRelay()
        self._arrivals = _Arrivals(0.5 / limits.fps)
        self._feed = WindowFeed(metrics)
        self._rate_in = _Rate()
        self._rate_out = _Rate()
        self._latency: deque[float] = deque(maxlen=50)
        self._last_stats_sent = 0.0
        self._channel: Any = None
        self._size: tuple[int, int] | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.audio_samples = 0
        self.has_video = False
        self.has_audio = False
        self.pacer = PlayoutPacer() if limits.pace else None
        self._ready: deque[tuple[OutputFrameLike | None, float]] = deque()
        self._ready_event = asyncio.Event()
        self.dropped_out = 0
        self.outgoing = EditedVideoTrack(self)
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_state)

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
            if self.limits.audio_back:
                self.pc.addTrack(self._relay.subscribe(track))
                track = self._relay.subscribe(track)
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
    async def _consume_video(self, track) -> None:
        _, MediaStreamError = _track_classes()
        clock = TrackClock(self.origin)
        grid = FrameGrid(self.limits.fps)
        counter = self.metrics.frames_in.labels("video")
        try:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                now = time.monotonic()
                self.last_media = now
                slots = grid.push(clock(media_seconds(frame), now))
                if not slots:
                    continue
                img = self._to_rgb(frame)
                for t in slots:
                    self._arrivals.add(t, now)
                    await self.session.push_video(img, t)
                    self.frames_in += 1
                    self._rate_in.tick(now)
                    counter.inc()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an engine failure ends this peer, not the server
            log.exception("peer %s: video input failed", self.id)
            self._spawn(self.close(f"error: {exc}"), "close")

    @staticmethod
    async def _discard(track) -> None:
        _, MediaStreamError = _track_classes()
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()

    def _to_rgb(self, frame) -> np.ndarray:
        """RGB at one fixed size per peer (a resolution change mid-call is scaled back)."""
        if self._size is None:
            img = video_frame_to_rgb(frame, self.limits.max_side)
            self._size = (img.shape[1], img.shape[0])
            return img
        w, h = self._size
        if (frame.width, frame.height) == (w, h):
            return frame.to_ndarray(format="rgb24")
        return frame.to_ndarray(format="rgb24", width=w, height=h)

    async def _consume_audio(self, track) -> None:
        _, MediaStreamError = _track_classes()
        clock = TrackClock(self.origin)
        to16k = AudioTo16k()
        counter = self.metrics.frames_in.labels("audio")
        next_t: float | None = None
        try:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                now = time.monotonic()
                self.last_media = now
                counter.inc()
                t = clock(media_seconds(frame), now)
                samples = to16k(frame)
                if samples.size == 0:
                    continue
                # the resampler may hold samples back; contiguous blocks keep their
                # own running clock unless the stream jumped
                if next_t is None or abs(t - next_t) > 0.1:
                    next_t = t
                await self.session.push_audio(samples, next_t)
                next_t += samples.size / to16k.rate
                self.audio_samples += samples.size
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("peer %s: audio input failed", self.id)
            self._spawn(self.close(f"error: {exc}"), "close")

    # ------------------------------------------------------------------ media out
    async def next_output(self) -> OutputFrameLike | None:
        """Next edited frame for the outgoing track (None: the session is over)."""
        if self._closing:
            return None
        try:
            out = await self.session.get()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._closing:
                log.warning("peer %s: session output ended: %s", self.id, exc)
            return None
        return out

    async def _read_output(self) -> None:
        """Take frames from the session as soon as they exist, stamped with that time,
        so the pacer knows how early each one was ready (see PlayoutPacer)."""
        while True:
            out = await self.next_output()
            self._push_ready(out)
            if out is None:
                return

    def _push_ready(self, out: OutputFrameLike | None) -> None:
        self._ready.append((out, time.monotonic()))
        while len(self._ready) > self.limits.out_buffer:  # the encoder stalled: drop oldest
            self._ready.popleft()
            self.dropped_out += 1
        self._ready_event.set()

    async def next_ready(self) -> tuple[OutputFrameLike | None, float]:
        """The next output frame and when it became ready ((None, t): no more)."""
        while not self._ready:
            self._ready_event.clear()
            await self._ready_event.wait()
        return self._ready.popleft()

    def record_sent(self, out: OutputFrameLike) -> None:
        """Count a frame handed to the encoder (after pacing) and measure its latency."""
        now = time.monotonic()
        self.frames_out += 1
        self._rate_out.tick(now)
        self.metrics.frames_out.labels("true" if out.generated else "false").inc()
        arrival = self._arrivals.find(float(out.pts))
        if arrival is not None:
            self._latency.append(now - arrival)
            self.metrics.frame_latency.observe(now - arrival)
        if now - self._last_stats_sent >= self.limits.stats_interval_s:
            self._last_stats_sent = now
            self._feed.poll(self.session.stats)
            self._send_stats(out, now)

    def _send_stats(self, out: OutputFrameLike, now: float) -> None:
        ch = self._channel
        if ch is None or ch.readyState != "open":
            return
        lat = sorted(self._latency)
        windows = getattr(self.session.stats, "windows", None)
        last_window = windows[-1] if windows else None
        msg = {
            "type": "stats",
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "fps_in": round(self._rate_in.rate(now), 2),
            "fps_out": round(self._rate_out.rate(now), 2),
            "server_latency_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None,
            "window_e2e_ms": round(1000 * float(last_window.e2e), 1) if last_window else None,
            "window_steps": getattr(last_window, "steps", None),
            "generated": bool(out.generated),
            "reason": out.reason,
            "pts": round(float(out.pts), 3),
        }
        with contextlib.suppress(Exception):
            ch.send(json.dumps(msg))

    # ------------------------------------------------------------------ lifetime
    async def _watchdog(self) -> None:
        lim = self.limits
        while not self._closing:
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
        if self._closing:
            await self.closed.wait()
            return
        self._closing = True
        self.close_reason = reason
        log.info("peer %s: closing (%s)", self.id, reason)
        with contextlib.suppress(Exception):
            self._feed.poll(self.session.stats)
        me = asyncio.current_task()
        for task in list(self._tasks):
            if task is not me:
                task.cancel()
        with contextlib.suppress(Exception):
            self.outgoing.stop()
        self._push_ready(None)  # wake a waiting recv()
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
            "fps_out": round(self._rate_out.rate(now), 2),
        }
