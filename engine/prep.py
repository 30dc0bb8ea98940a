"""Per-window face tracking and crops (the CPU work before the model).

Runs in the session's own worker thread (mediapipe graphs are stateful and not
thread-safe, and must not block the event loop). The face crops are
made exactly as `tccp.data.prepare` makes the training data (same boxes and sizes), so
the models see at inference what they saw in training.

Gaps: streaming has no look-ahead beyond the current window, so a missing face is
interpolated when the face comes back inside the same window, held from the last
tracked frame for up to `max_gap` frames otherwise, and declared absent after that
(those frames pass through unchanged).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from tccp.face import geometry as fg

__all__ = ["PreparedWindow", "ReplayTracker", "WindowPreparer", "frame_key"]


@dataclass
class PreparedWindow:
    index: int
    pts: np.ndarray  # (n,) grid times
    grid: np.ndarray  # (n,) grid indices
    frames: list[np.ndarray]  # originals (n of them, 1..window-1)
    arrival: float  # monotonic time the last frame became available
    found: np.ndarray  # (n,) bool: usable face
    landmarks: np.ndarray | None = None  # (n, 478, 2) frame px
    face_boxes: np.ndarray | None = None  # (n, 4)
    faces: np.ndarray | None = None  # (n, S, S, 3) tracked face crops
    ready: float = 0.0  # monotonic time preparation finished
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.frames)

    @property
    def any_face(self) -> bool:
        return bool(np.asarray(self.found).any())


def frame_key(frame: np.ndarray) -> bytes:
    """A cheap fingerprint of a frame (its shape and every 8th pixel): enough to tell
    that a replayed observation belongs to the frame in hand."""
    f = np.asarray(frame)
    h = hashlib.blake2b(repr(f.shape).encode(), digest_size=12)
    h.update(np.ascontiguousarray(f[::8, ::8]).tobytes())
    return h.digest()


class ReplayTracker:
    """A face tracker whose first frames were already tracked.

    Why: a file run adapts stage 1 to the person before it starts (`engine.adapt`), and
    that tracks the source's first seconds; the session would track the same frames
    again (~20 ms a frame on this CPU, 2-8 s of a run's start). This replays the
    recorded observations and then continues with the very tracker that made them, so
    the session sees exactly what tracking all along would have given. Each replayed
    frame is checked against the recorded fingerprint (`frame_key`); the first frame
    that differs ends the replay: the tracker is reset and tracks from there.
    """

    def __init__(self, observations: Sequence[Any], keys: Sequence[bytes], tracker: Any) -> None:
        if len(observations) != len(keys):
            raise ValueError("one fingerprint per observation")
        self._obs: list | None = list(observations)
        self._keys = list(keys)
        self._i = 0
        self.tracker = tracker
        self.replayed = 0  # frames answered from the recording

    def update(self, frame: np.ndarray, t: float | None = None):
        i, self._i = self._i, self._i + 1
        if self._obs is not None:
            if i < len(self._obs):
                if frame_key(frame) == self._keys[i]:
                    self.replayed += 1
                    return self._obs[i]
                self.tracker.reset()  # not the recorded frame: the tracker's state is not this stream's
            self._obs = None
        return self.tracker.update(frame, t)

    def reset(self) -> None:
        self._obs = None
        self.tracker.reset()

    def close(self) -> None:
        self._obs = None
        self.tracker.close()


class WindowPreparer:
    """Tracks frames window by window and makes the model's per-frame inputs."""

    def __init__(
        self,
        size: int,
        fps: float = 25.0,
        max_gap: int = 5,
        tracker=None,
        mask_dilate: float = 0.1,
        mask_forehead: float = 0.35,
        face_scale: float = 1.6,
        context_scale: float = 3.2,
    ) -> None:
        self.size = int(size)
        self.fps = float(fps)
        self.max_gap = int(max_gap)
        self._tracker = tracker
        self.mask_dilate = mask_dilate
        self.mask_forehead = mask_forehead
        self.face_scale = face_scale
        self.context_scale = context_scale
        self._last: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # lm, fbox, cbox
        self._miss = 0  # consecutive frames without a detection before this window

    @property
    def tracker(self):
        if self._tracker is None:
            from tccp.face.track import FaceTracker, FaceTrackerConfig

            self._tracker = FaceTracker(FaceTrackerConfig(
                fps=self.fps, max_gap=self.max_gap,
                face_scale=self.face_scale, context_scale=self.context_scale,
            ))
        return self._tracker

    def close(self) -> None:
        if self._tracker is not None and hasattr(self._tracker, "close"):
            self._tracker.close()
        self._tracker = None

    def _observe(self, frames: Sequence[np.ndarray], pts: np.ndarray) -> list:
        return [self.tracker.update(f, float(t)) for f, t in zip(frames, pts)]

    def prepare(self, win: PreparedWindow) -> PreparedWindow:
        obs = self._observe(win.frames, win.pts)
        n = win.n
        lm = np.zeros((n, 478, 2), np.float32)
        fb = np.zeros((n, 4), np.float32)
        cb = np.zeros((n, 4), np.float32)
        found = np.zeros(n, bool)
        for i, o in enumerate(obs):
            if o is not None:
                lm[i], fb[i], cb[i], found[i] = o.landmarks, o.face_box, o.context_box, True
        detected = found.copy()
        # causal gap policy (see module docstring)
        miss = self._miss
        i = 0
        while i < n:
            if detected[i]:
                self._last = (lm[i].copy(), fb[i].copy(), cb[i].copy())
                miss = 0
                i += 1
                continue
            j = i
            while j < n and not detected[j]:
                j += 1
            run_total = miss + (j - i)
            if self._last is not None and j < n and run_total <= self.max_gap:
                # the face comes back inside this window: interpolate across the gap
                before, after = self._last, (lm[j], fb[j], cb[j])
                steps = (j - i) + 1 + miss
                for k in range(i, j):
                    w = (k - i + 1 + miss) / steps
                    lm[k] = (1 - w) * before[0] + w * after[0]
                    fb[k] = (1 - w) * before[1] + w * after[1]
                    cb[k] = (1 - w) * before[2] + w * after[2]
                    found[k] = True
            elif self._last is not None:
                for k in range(i, j):
                    if miss + (k - i) + 1 <= self.max_gap:
                        lm[k], fb[k], cb[k] = self._last
                        found[k] = True
            miss += j - i
            i = j
        self._miss = miss
        win.found = found
        if not found.any():
            return win
        # frames without a face get the nearest usable values so every slot has inputs
        idx = np.flatnonzero(found)
        nearest = idx[np.abs(np.arange(n)[:, None] - idx[None, :]).argmin(axis=1)]
        lm, fb, cb = lm[nearest], fb[nearest], cb[nearest]
        s = self.size
        win.landmarks, win.face_boxes = lm, fb
        win.faces = np.stack([fg.crop(win.frames[k], fb[k], s) for k in range(n)])
        win.extra["context_boxes"] = cb
        return win
