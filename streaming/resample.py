"""Timestamp plumbing between WebRTC tracks and the engine's 25 fps / 16 kHz world.

Browsers send video at whatever rate the camera and congestion control allow (often
30 fps, sometimes bursty) and Opus audio at 48 kHz. The engine wants 25 fps frames and
16 kHz mono samples with timestamps on one clock. Each RTP stream starts at a random
timestamp, so the two tracks are put on the server's monotonic clock by anchoring each
track's first frame to its arrival time and then following the track's own timestamps
(which keep the sender's pacing; arrival times carry network jitter).
"""

from __future__ import annotations

import math
import time
from fractions import Fraction

import numpy as np

__all__ = ["TrackClock", "FrameGrid", "AudioTo16k", "video_frame_to_rgb", "audio_frame_to_mono"]


class TrackClock:
    """Maps one track's media timestamps onto a shared session clock (seconds).

    The first frame is anchored at its arrival (`now - origin`); later frames keep their
    spacing from the stream. The result never goes back: a stream whose timestamps
    restart (a looping file player, a sender restart) or go back by any amount is
    re-anchored at once, at its arrival but after the last time given. If the stream's
    time drifts more than `resync_s` away from arrival time (a forward jump, a wrap, a
    long stall) it is re-anchored too, so one bad jump cannot push the track seconds
    away from the other one.
    """

    def __init__(self, origin: float, resync_s: float = 1.0, now=time.monotonic, back_tolerance_s: float = 0.002) -> None:
        self.origin = origin
        self.resync_s = resync_s
        self.back_tolerance_s = back_tolerance_s
        self._now = now
        self._offset: float | None = None
        self._last: float | None = None
        self.resyncs = 0

    def __call__(self, media_seconds: float, arrival: float | None = None) -> float:
        arrival_s = (self._now() if arrival is None else arrival) - self.origin
        if self._offset is None:
            self._offset = arrival_s - media_seconds
        else:
            t = media_seconds + self._offset
            back = self._last is not None and t < self._last - self.back_tolerance_s
            if back or abs(t - arrival_s) > self.resync_s:
                self._offset = arrival_s - media_seconds
                if self._last is not None and media_seconds + self._offset <= self._last:
                    self._offset = self._last + 1e-3 - media_seconds
                self.resyncs += 1
        t = media_seconds + self._offset
        self._last = t if self._last is None else max(self._last, t)
        return t


class FrameGrid:
    """Chooses which incoming frames land on the `fps` grid, by timestamp.

    Each grid slot `t0 + k / fps` takes the latest frame whose timestamp is at most half
    a slot after it: faster inputs lose frames, slower ones repeat them. A gap longer
    than `max_gap_s` is not filled (the grid jumps to the new frame) because repeating
    one frozen image for seconds would only add latency downstream.
    """

    def __init__(self, fps: float = 25.0, max_gap_s: float = 0.5) -> None:
        self.fps = float(fps)
        self.max_gap_s = max_gap_s
        self._t0: float | None = None
        self._k = 0
        self.dropped = 0
        self.repeated = 0

    def slot_time(self, k: int) -> float:
        assert self._t0 is not None
        return self._t0 + k / self.fps

    def push(self, t: float) -> list[float]:
        """Grid times the frame at time `t` fills (empty: the frame is dropped)."""
        half = 0.5 / self.fps
        if self._t0 is None:
            self._t0 = t
        elif t + half < self.slot_time(self._k):
            self.dropped += 1
            return []
        elif t - self.slot_time(self._k) > self.max_gap_s:
            self._k = max(self._k, int(math.floor((t - self._t0) * self.fps + 0.5)))
        out: list[float] = []
        while self.slot_time(self._k) <= t + half:
            out.append(self.slot_time(self._k))
            self._k += 1
        if not out:
            self.dropped += 1
        self.repeated += max(0, len(out) - 1)
        return out


class AudioTo16k:
    """Any `av.AudioFrame` (Opus gives 48 kHz stereo s16) -> mono float32 at 16 kHz.

    Channels are averaged here rather than by libswresample's downmix, which mixes
    stereo to mono at -3 dB per channel (x1.41 for identical channels) and would clip
    loud speech.
    """

    def __init__(self, rate: int = 16000) -> None:
        self.rate = rate
        self._resampler = None
        self._layout: str | None = None

    def __call__(self, frame) -> np.ndarray:
        import av

        layout = frame.layout.name
        if self._resampler is None or layout != self._layout:  # a mid-stream change restarts
            self._resampler = av.AudioResampler(format="fltp", layout=layout, rate=self.rate)
            self._layout = layout
        chunks = [f.to_ndarray().mean(axis=0) for f in self._resampler.resample(frame)]
        if not chunks:
            return np.zeros(0, np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)


def audio_frame_to_mono(frame) -> tuple[np.ndarray, int]:
    """`av.AudioFrame` (any sample format and layout) -> (mono float32 in [-1, 1], rate).

    Channels are averaged (see AudioTo16k); the rate is kept (Opus: 48 kHz)."""
    arr = frame.to_ndarray()
    channels = max(1, len(frame.layout.channels))
    if frame.format.is_planar:
        x = arr.reshape(channels, -1).astype(np.float32).mean(axis=0)
    else:
        x = arr.reshape(-1, channels).astype(np.float32).mean(axis=1)
    kind = arr.dtype
    if kind == np.int16:
        x /= 32768.0
    elif kind == np.int32:
        x /= 2147483648.0
    elif kind == np.uint8:
        x = (x - 128.0) / 128.0
    return x.astype(np.float32, copy=False), int(frame.sample_rate)


def media_seconds(frame) -> float:
    """A frame's pts in seconds (0 when the frame carries none)."""
    if frame.pts is None or frame.time_base is None:
        return 0.0
    return float(frame.pts * Fraction(frame.time_base))


def video_frame_to_rgb(frame, max_side: int | None = None) -> np.ndarray:
    """`av.VideoFrame` -> `(H, W, 3)` uint8 RGB, optionally shrunk so max(H, W) <= max_side.

    Shrinking happens in libswscale on the decoded YUV frame, before the RGB copy, which
    is the cheapest place to cap the per-frame cost of an oversized camera.
    """
    w, h = frame.width, frame.height
    if max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
        w, h = max(2, int(round(w * s / 2)) * 2), max(2, int(round(h * s / 2)) * 2)
        return frame.to_ndarray(format="rgb24", width=w, height=h)
    return frame.to_ndarray(format="rgb24")
