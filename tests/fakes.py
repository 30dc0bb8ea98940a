"""Test doubles for the engine: a fast stand-in model, fault injection, a fake tracker.

They exist so that queueing, latency and failure behaviour (which depends on timing,
not on what the network draws) can be tested quickly and deterministically, and so
that the streaming layer can run real `Session`s without loading a model. They are
not used by any production path.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from engine.runner import ModelState, WindowRequest, WindowResult
from tccp.face import geometry as fg

__all__ = ["FakeRunner", "FaultyRunner", "FakeTracker", "synthetic_landmarks"]


class ZeroFeatures:
    """Audio conditions of the right shape, all zero (no Whisper in the fast tests)."""

    def for_frames(self, audio: Any, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(times)
        return np.zeros((n, 10, 8), np.float32), np.zeros(n, np.float32)


class FakeRunner:
    """Answers every window at once: the 'generated' face is the tracked face crop with
    a constant offset (so pasted frames differ from the input), pasted everywhere."""

    def __init__(self, size: int = 64, offset: int = 40) -> None:
        self.size = size
        self.offset = offset
        self.calls: list[int] = []  # batch size of each call
        self.last_request: WindowRequest | None = None
        self.template = _synthetic_template()
        self.references = None
        self.triangulation = None

    def audio_features(self, live: bool, fps: float = 25.0) -> ZeroFeatures:
        return ZeroFeatures()

    def batch_key(self, r: WindowRequest) -> tuple:
        return (r.mode, r.steps, r.restart, tuple(r.crops.shape[1:]))

    def run_batch(self, requests: Sequence[WindowRequest]) -> list[WindowResult]:
        self.calls.append(len(requests))
        out = []
        for r in requests:
            self.last_request = r
            faces = np.clip(r.crops.astype(np.int16) + self.offset, 0, 255).astype(np.uint8)
            n = r.n
            masks = np.zeros(faces.shape[:3], np.float32)
            s = faces.shape[1]
            masks[:, s // 8: -s // 8, s // 8: -s // 8] = 1.0
            state = ModelState(x=None, latent=None, tokens=r.tokens[-1], vad=float(r.vad[-1]), cv=None,
                               mel=r.mel[-1], mesh=r.meshes[-1], crop=r.crops[-1], source_mesh=r.meshes[-1])
            out.append(WindowResult(faces=faces, masks=masks, targets=r.meshes, ref_index=np.zeros(n, int),
                                    state=state, batch=len(requests)))
        return out


class FaultyRunner:
    """Wraps a runner: adds `delay` seconds to each call and raises for requests that
    `fail(request)` selects (the whole batched call fails, as a real error would)."""

    def __init__(self, inner: Any, delay: float = 0.0,
                 fail: Callable[[WindowRequest], bool] | None = None) -> None:
        self.inner = inner
        self.size = inner.size
        self.template = inner.template
        self.references = getattr(inner, "references", None)
        self.triangulation = getattr(inner, "triangulation", None)
        self.delay = delay
        self.fail = fail
        self.lock = threading.Lock()
        self.calls = 0

    def audio_features(self, live: bool, fps: float = 25.0) -> Any:
        return self.inner.audio_features(live, fps)

    def batch_key(self, r: WindowRequest) -> Any:
        return self.inner.batch_key(r)

    def run_batch(self, requests: Sequence[WindowRequest]) -> list[WindowResult]:
        with self.lock:
            self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None and any(self.fail(r) for r in requests):
            raise RuntimeError("injected model failure")
        return self.inner.run_batch(requests)


def _synthetic_template() -> np.ndarray:
    return synthetic_landmarks(0.0, 0.0, 1.0)


def synthetic_landmarks(cx: float, cy: float, r: float) -> np.ndarray:
    """478 points on a face-shaped ellipse (forehead point 10 on top, chin 152 at the
    bottom), enough for boxes, head masks and sketches."""
    ang = np.linspace(0, 2 * np.pi, 478, endpoint=False)
    lm = np.stack([cx + 0.8 * r * np.cos(ang), cy + r * np.sin(ang)], axis=1)
    lm[fg.FOREHEAD] = (cx, cy - r)
    lm[fg.CHIN] = (cx, cy + r)
    return lm.astype(np.float32)


@dataclass
class _Obs:
    index: int
    t: float
    landmarks: np.ndarray
    raw: np.ndarray
    face_box: np.ndarray
    context_box: np.ndarray


class FakeTracker:
    """Stands in for `tccp.face.track.FaceTracker`: a face at a fixed place in every
    frame whose mean brightness is above `min_mean` (dark frames have "no face")."""

    def __init__(self, min_mean: float = 8.0, where: tuple[float, float, float] | None = None) -> None:
        self.min_mean = min_mean
        self.where = where
        self._i = 0

    def update(self, frame: np.ndarray, t: float | None = None) -> _Obs | None:
        i = self._i
        self._i += 1
        if float(frame.mean()) < self.min_mean:
            return None
        h, w = frame.shape[:2]
        cx, cy, r = self.where or (w / 2, h / 2, min(h, w) / 5)
        lm = synthetic_landmarks(cx, cy, r)
        return _Obs(i, float(t or 0.0), lm, lm, fg.face_box(lm), fg.context_box(lm))

    def close(self) -> None:
        pass
