"""A/V alignment for pushed streams: video onto a 25 fps grid, audio into a timeline.

Files arrive already resampled (tccp.media.io), but live sources deliver frames at their
own, jittery rate (30 fps webcams, WebRTC with dropped packets) and audio in chunks of
arbitrary size. The models need exactly one frame per 1/25 s and the 0.2 s of audio
centred on each frame, so the session puts both on one clock here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tccp.media.audio import log_mel, mel_windows

__all__ = ["GridFrame", "FrameAligner", "AudioBuffer", "mel_for_frames"]

_EPS = 1e-4


@dataclass
class GridFrame:
    index: int
    """Position on the session's 25 fps grid (0, 1, 2, ...; gaps when the input stalls)."""
    pts: float
    """Grid time in the input's clock (seconds)."""
    frame: np.ndarray
    arrival: float
    """Monotonic time the source frame was pushed (for end-to-end latency)."""


class FrameAligner:
    """Resample pushed `(pts, frame)` to a fixed-rate grid by timestamp.

    Grid slot `k` (time `t0 + k / fps`, `t0` = first pts) shows the latest input frame
    whose pts <= the slot time, the same rule `tccp.media.io.iter_video` uses for files,
    so a file pushed frame by frame aligns exactly as it would have been read. A slot
    is emitted as soon as it is decided (a frame at or after its time arrived). A stall
    longer than `max_gap` slots is not bridged with a frozen frame: the grid skips
    ahead (the index jumps) and `skipped` counts the slots left out.
    """

    def __init__(self, fps: float = 25.0, max_gap: int = 12) -> None:
        self.fps = float(fps)
        self.max_gap = int(max_gap)
        self.t0: float | None = None
        self.next_index = 0
        self._prev: tuple[float, np.ndarray, float] | None = None
        self.duplicated = 0
        self.skipped = 0

    def slot_time(self, k: int) -> float:
        assert self.t0 is not None
        return self.t0 + k / self.fps

    def push(self, pts: float, frame: np.ndarray, arrival: float) -> list[GridFrame]:
        out: list[GridFrame] = []
        if self.t0 is None:
            self.t0 = float(pts)
        if self._prev is not None and pts <= self._prev[0] + _EPS:
            # equal or backwards timestamp: the newer image replaces the held one
            self._prev = (self._prev[0], frame, arrival)
            return out
        if self._prev is not None:
            # slots strictly before this frame's pts show the previous frame
            pending = 0
            while self.slot_time(self.next_index + pending) < pts - _EPS:
                pending += 1
            if pending > self.max_gap + 1:
                # stall: keep one slot of the old frame, then jump to this frame
                out.append(self._emit(self._prev, arrival))
                new_index = int(np.ceil((pts - self.t0) * self.fps - _EPS))
                self.skipped += max(0, new_index - self.next_index)
                self.next_index = max(self.next_index, new_index)
            else:
                for i in range(pending):
                    out.append(self._emit(self._prev, arrival))
                    if i > 0:
                        self.duplicated += 1
        self._prev = (float(pts), frame, arrival)
        if abs(self.slot_time(self.next_index) - pts) <= _EPS:
            out.append(self._emit(self._prev, arrival))
        return out

    def _emit(self, prev: tuple[float, np.ndarray, float], arrival: float) -> GridFrame:
        # `arrival` is when the slot became decidable (this push), which is what the
        # end-to-end latency of its window should be measured from
        k = self.next_index
        self.next_index += 1
        return GridFrame(index=k, pts=self.slot_time(k), frame=prev[1], arrival=arrival)

    def flush(self, end_pts: float | None = None) -> list[GridFrame]:
        """At end of stream: the held frame fills its own slot (if not yet emitted) and,
        with `end_pts`, every slot before `end_pts`."""
        out: list[GridFrame] = []
        if self._prev is None or self.t0 is None:
            return out
        last_pts = self._prev[0]
        now = self._prev[2]
        if self.slot_time(self.next_index) <= last_pts + _EPS:
            out.append(self._emit(self._prev, now))
        if end_pts is not None:
            while self.slot_time(self.next_index) < end_pts - _EPS:
                out.append(self._emit(self._prev, now))
        return out


class AudioBuffer:
    """Mono float32 samples placed on the session clock by their pts.

    Chunks may arrive with gaps (filled with silence), overlaps (the later chunk wins)
    or without pts (appended after the last chunk). Memory is bounded by `trim_before`,
    which the session calls once a window no longer needs older audio.
    """

    def __init__(self, sr: int = 16000) -> None:
        self.sr = int(sr)
        self._start = 0  # absolute sample index of _data[0]
        self._data = np.zeros(0, np.float32)
        self._origin: float | None = None  # pts of absolute sample 0
        self.received = False

    def _index(self, t: float) -> int:
        return int(round(t * self.sr))

    @property
    def end_time(self) -> float:
        """Session time up to which audio has been received (-inf before the first chunk)."""
        if not self.received:
            return float("-inf")
        return (self._start + self._data.size) / self.sr

    def push(self, samples: np.ndarray, pts: float | None = None) -> None:
        x = np.asarray(samples, np.float32).reshape(-1)
        if pts is None:
            start = self._start + self._data.size
        else:
            start = self._index(pts)
        if not self.received:
            self._start = start
            self._data = x.copy()
            self.received = True
            return
        end = start + x.size
        cur_end = self._start + self._data.size
        if start < self._start:  # older than what we keep: drop the part before
            x = x[self._start - start:]
            start = self._start
            if x.size == 0:
                return
        if end > cur_end:
            self._data = np.concatenate([self._data, np.zeros(end - cur_end, np.float32)])
        self._data[start - self._start:start - self._start + x.size] = x

    def read(self, t0: float, t1: float) -> np.ndarray:
        """Samples for `[t0, t1)`; silence where nothing was received."""
        a, b = self._index(t0), self._index(t1)
        out = np.zeros(max(0, b - a), np.float32)
        if not self.received or b <= a:
            return out
        data, start = self._data, self._start  # one snapshot: read() may run in a worker thread
        lo, hi = max(a, start), min(b, start + data.size)
        if hi > lo:
            out[lo - a:hi - a] = data[lo - start:hi - start]
        return out

    def trim_before(self, t: float) -> None:
        cut = self._index(t) - self._start
        if cut > 0:
            self._data = self._data[cut:]
            self._start += cut


def mel_for_frames(
    audio: AudioBuffer, times: np.ndarray, fps: float = 25.0, width: int = 16
) -> np.ndarray:
    """`(n, width, 80)` mel windows for frames at `times` (consecutive grid times).

    The mel is computed on the frames' audio plus 0.2 s either side (5 frames at
    25 fps), so every window sees real neighbouring audio rather than edge padding and
    the result matches `mel_windows` computed on the whole track.
    """
    times = np.asarray(times, np.float64)
    n = int(times.size)
    if n == 0:
        return np.zeros((0, width, 80), np.float32)
    pad_frames = 5
    pad = pad_frames / fps
    t_start = times[0] - pad
    t_end = times[0] + (n - 1) / fps + pad + 1.0 / fps
    samples = audio.read(t_start, t_end)
    mel = log_mel(samples, sr=audio.sr)
    return mel_windows(mel, n + 2 * pad_frames, fps=fps, width=width)[pad_frames:pad_frames + n]
