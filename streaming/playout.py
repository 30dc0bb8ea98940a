"""What a live call sends back, and when: the playout of video and the delayed audio.

A call must never fall silent, whatever the model is doing, and its sound must stay
with its picture. So the sender does not wait for the engine:

- `Playout` holds each incoming grid frame (the call's own picture) from the moment it
  arrives, and sends slot `pts` at `origin + pts + delay`. An edited frame that the
  engine finishes before that time replaces the original; one that comes later is
  dropped (the original went out instead, counted as ``late``). The very first frame
  goes out at once, so the caller sees their picture immediately; the video then runs
  `delay` behind. `delay` starts from what the model needs (measured at server start)
  and adapts: a generated frame that missed its slot pushes it later by as much (for
  the slots still to come; never past `max_delay_s`), and when every generated frame
  of `relax_s` had spare time it comes back by half the smallest margin (never below
  `min_delay_s`).
- `AudioDelayLine` keeps the call's audio on the same clock and the outgoing audio
  track reads it at `now - origin - delay`: the sound is delayed exactly as the
  picture. When `delay` grows the audio pauses (silence) until it is behind again;
  when it shrinks the audio skips ahead.

Times: `pts` are seconds on the peer's session clock (0 = the peer's origin, see
`resample.TrackClock`); `origin`, `ready` and the clock passed as `now` are
`time.monotonic()` seconds.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["Slot", "Playout", "AudioDelayLine", "auto_delay"]


def auto_delay(window_s: float | None, new_frames: int = 7, fps: float = 25.0, lookahead_s: float = 0.14,
               margin_s: float = 0.05, lo: float = 0.25, hi: float = 0.9) -> float:
    """The playout delay a model needs: the first frame of a window waits for the rest
    of it ((new_frames - 1) / fps), for the audio look-ahead the engine gives each
    window, and for the window's work (`window_s`, measured at warm-up: tracking,
    audio features, both stages, compositing), plus a margin; within [lo, hi].
    None (not measured): `hi`."""
    if window_s is None or not math.isfinite(window_s):
        return hi
    d = (new_frames - 1) / fps + lookahead_s + max(0.0, window_s) + margin_s
    return float(min(hi, max(lo, d)))


@dataclass
class Slot:
    pts: float
    frame: np.ndarray
    generated: bool = False
    reason: str | None = "pending"
    """Why the original is sent: 'pending' (the engine had nothing for it yet), the
    engine's own reason ('no_face', 'overload', ...), 'late' (the edited frame came
    after the slot was sent, kept in stats only); None for an edited frame."""
    window: int = -1
    due: float = 0.0
    arrived: float = 0.0
    repeat: bool = False
    """A repeat of the last frame sent, while the next one is not due yet (see `next`)."""


class Playout:
    """Video slots of one call (see module docstring). Not thread-safe: one event loop."""

    def __init__(self, origin: float, delay_s: float = 0.6, min_delay_s: float = 0.2, max_delay_s: float = 1.0,
                 fps: float = 25.0, relax_s: float = 2.0, adapt: bool = True,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.origin = origin
        self.min_delay = float(min_delay_s)
        self.max_delay = float(max(max_delay_s, min_delay_s))
        self.delay = float(min(self.max_delay, max(self.min_delay, delay_s)))
        self.fps = float(fps)
        self.relax_s = relax_s
        self.adapt = adapt
        self._now = now
        self._slots: deque[Slot] = deque()
        self._sent: deque[tuple[float, float]] = deque(maxlen=256)  # (pts, due) of sent slots
        self._event = asyncio.Event()
        self._closed = False
        self._started = False
        self._last_pts = -math.inf
        self._margin = math.inf
        self._since = now()
        self.sent = 0
        self.sent_generated = 0
        self.reasons: Counter = Counter()
        """Originals sent, by reason."""
        self.late = 0
        """Edited frames that arrived after their slot had gone out."""
        self.skipped = 0
        """Slots never sent because the sender fell behind."""
        self.repeats = 0
        """Repeats of the last frame sent while waiting for the next slot."""
        self._last_slot: Slot | None = None
        self._last_send = -math.inf
        self._last_input = -math.inf
        self.hold_s = 2.0
        """The last frame is repeated while input arrived within this long (a slow or
        stalled camera); after that the sender waits."""
        self.first_sent: float | None = None
        self.first_generated_sent: float | None = None
        self.delay_changes = 0

    # ------------------------------------------------------------------ input side
    def add_input(self, pts: float, frame: np.ndarray, arrived: float | None = None) -> None:
        """The call's own frame for grid slot `pts` (non-decreasing per call)."""
        if self._closed or pts <= self._last_pts:
            return
        self._last_pts = pts
        self._last_input = self._now()
        self._slots.append(Slot(float(pts), frame, arrived=self._now() if arrived is None else arrived))
        horizon = self.max_delay + 2.0  # bounded whatever the sender does
        while self._slots and self._slots[-1].pts - self._slots[0].pts > horizon:
            self._slots.popleft()
            self.skipped += 1
        self._event.set()

    def add_output(self, out: Any, ready: float | None = None) -> bool:
        """An engine output frame (`pts`, `frame`, `generated`, `reason`, `window`):
        True if it will be sent in place of the original."""
        ready = self._now() if ready is None else ready
        pts = float(out.pts)
        tol = 0.5 / self.fps
        for slot in self._slots:
            if abs(slot.pts - pts) <= tol:
                slot.frame = out.frame
                slot.generated = bool(out.generated)
                slot.reason = None if out.generated else (out.reason or "passthrough")
                slot.window = int(getattr(out, "window", -1))
                if out.generated:
                    self._margin = min(self._margin, self.due(pts) - ready)
                return True
            if slot.pts > pts + tol:
                break
        if out.generated:
            self.late += 1
            sent_due = self._sent_due(pts)
            if sent_due is not None:
                self._late_by(ready - sent_due)
        return False

    def _sent_due(self, pts: float) -> float | None:
        for p, due in reversed(self._sent):
            if abs(p - pts) <= 0.5 / self.fps:
                return due
            if p < pts:
                return None
        return None

    def _late_by(self, lateness: float) -> None:
        """A generated frame missed its slot by `lateness` s: play later, if allowed."""
        if not self.adapt or lateness <= 0:
            return
        want = min(self.max_delay, self.delay + lateness + 0.02)
        if want > self.delay + 1e-6:  # as far as allowed: the next windows will be as slow
            self.delay = want
            self.delay_changes += 1
            self._margin, self._since = math.inf, self._now()
            self._event.set()

    def due(self, pts: float) -> float:
        return self.origin + pts + self.delay

    def close(self) -> None:
        self._closed = True
        self._event.set()

    # ------------------------------------------------------------------ sender side
    async def next(self) -> Slot | None:
        """The next slot to send, at its time (None once closed). A sender that fell
        behind gets the newest due slot; the older ones are skipped. While no slot is
        due (the start of a call, after the delay grew, a camera slower than 25 fps)
        the last frame is repeated at the frame rate, for as long as input arrived in
        the last `hold_s`, so the stream never stalls: a receiver shows the
        caller's first frame at once (aiortc's receiver, for one, hands out a frame
        only when the next one starts arriving)."""
        period = 1.0 / self.fps
        while True:
            if self._closed:
                return None
            now = self._now()
            wait = math.inf
            if self._slots:
                head = self._slots[0]
                if not self._started:  # the caller's first frame goes back at once
                    self._started = True
                    return self._take(now)
                wait = self.due(head.pts) - now
                if wait <= 0:
                    while len(self._slots) > 1 and self.due(self._slots[1].pts) <= now:
                        self._slots.popleft()
                        self.skipped += 1
                    return self._take(now)
            if self._last_slot is not None and wait > 0.5 * period and now - self._last_input < self.hold_s:
                repeat_at = self._last_send + period
                if repeat_at <= now:
                    return self._repeat(now)
                wait = min(wait, repeat_at - now)
            self._event.clear()
            if math.isinf(wait):
                await self._event.wait()
                continue
            try:
                await asyncio.wait_for(self._event.wait(), max(wait, 1e-3))
            except asyncio.TimeoutError:
                pass

    def _repeat(self, now: float) -> Slot:
        last = self._last_slot
        assert last is not None
        self.repeats += 1
        self._last_send = now
        return Slot(last.pts, last.frame, last.generated, last.reason, last.window, last.due, last.arrived, True)

    def _take(self, now: float) -> Slot:
        slot = self._slots.popleft()
        slot.due = self.due(slot.pts)
        self._last_slot, self._last_send = slot, now
        self._sent.append((slot.pts, slot.due))
        self.sent += 1
        if self.first_sent is None:
            self.first_sent = now
        if slot.generated:
            self.sent_generated += 1
            if self.first_generated_sent is None:
                self.first_generated_sent = now
        else:
            self.reasons[slot.reason or "passthrough"] += 1
        self._relax(now)
        return slot

    def _relax(self, now: float) -> None:
        if not self.adapt or now - self._since < self.relax_s:
            return
        if math.isfinite(self._margin) and self._margin > 0.03:
            self.delay = max(self.min_delay, self.delay - 0.5 * self._margin)
            self.delay_changes += 1
        self._margin, self._since = math.inf, now

    @property
    def generated_share(self) -> float:
        return self.sent_generated / self.sent if self.sent else 0.0

    def pending(self) -> int:
        return len(self._slots)


class AudioDelayLine:
    """Mono audio on the session clock, read back at any time (missing: silence).

    Chunks are kept for `keep_s` seconds behind the newest one, so memory is bounded.
    """

    def __init__(self, sr: int = 48000, keep_s: float = 4.0) -> None:
        self.sr = int(sr)
        self.keep_s = keep_s
        self._starts: list[float] = []
        self._chunks: list[np.ndarray] = []
        self._next: float | None = None

    def push(self, samples: np.ndarray, t: float) -> None:
        """`samples` (float32 mono at `sr`) starting at session time `t`; a chunk that
        follows the previous one within 0.1 s is placed right after it (the sender's
        own pacing), so arrival jitter does not tear the signal."""
        x = np.asarray(samples, np.float32).reshape(-1)
        if x.size == 0:
            return
        if self._next is not None and abs(t - self._next) < 0.1:
            t = self._next
        if self._starts and t < self._starts[-1]:
            # the clock went back (restarted stream): start over from here
            self._starts.clear()
            self._chunks.clear()
        self._starts.append(float(t))
        self._chunks.append(x)
        self._next = t + x.size / self.sr
        cut = bisect.bisect_left(self._starts, t - self.keep_s)
        if cut:
            del self._starts[:cut], self._chunks[:cut]

    @property
    def end_time(self) -> float | None:
        return self._next

    def read(self, t: float, n: int) -> np.ndarray:
        """`n` samples from session time `t`."""
        out = np.zeros(n, np.float32)
        if not self._starts:
            return out
        t_end = t + n / self.sr
        i = max(0, bisect.bisect_right(self._starts, t) - 1)
        while i < len(self._starts) and self._starts[i] < t_end:
            s, x = self._starts[i], self._chunks[i]
            a = int(round((s - t) * self.sr))  # chunk start within out
            lo, hi = max(0, a), min(n, a + x.size)
            if hi > lo:
                out[lo:hi] = x[lo - a:hi - a]
            i += 1
        return out


class DelayedAudioReader:
    """Pulls 20 ms frames out of an `AudioDelayLine` at `now - origin - delay()`,
    pausing (silence) when the delay grows and skipping ahead when it shrinks."""

    def __init__(self, line: AudioDelayLine, origin: float, delay: Callable[[], float], frame_s: float = 0.02) -> None:
        self.line = line
        self.origin = origin
        self.delay = delay
        self.n = int(round(line.sr * frame_s))
        self.frame_s = self.n / line.sr
        self.cursor: float | None = None
        self.paused = 0
        self.skips = 0

    def read(self, now: float) -> tuple[np.ndarray, float | None]:
        """The frame to send at `now` and its session time (None: silence inserted)."""
        target = now - self.origin - self.delay()
        if self.cursor is None:
            self.cursor = target
        elif target < self.cursor - 1.5 * self.frame_s:
            self.paused += 1  # the video was pushed later: wait for it
            return np.zeros(self.n, np.float32), None
        elif target > self.cursor + 1.5 * self.frame_s:
            self.skips += 1  # the video came forward (or we fell behind): follow it
            self.cursor = target
        t = self.cursor
        self.cursor += self.frame_s
        return self.line.read(t, self.n), t
