"""What one model call does for one window, and the requests/results it trades.

A `WindowRequest` holds everything a window needs (head-masked context crops, tracked
sketches, mel windows, identity crop, the autoregressive carry and the rung of the
degradation ladder); `PipelineRunner.run_batch` turns several such requests with the
same shapes into one batched pass of `tccp.pipeline.TCCPPipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = [
    "ModelState",
    "WindowRequest",
    "WindowResult",
    "pad_frames",
    "PipelineRunner",
    "default_pack_missing",
]


@dataclass
class ModelState:
    """The autoregressive carry: latents of the previous window's last frame."""

    face: Any  # (C, h, w) tensor: stage-2 conditioning slot
    sketch: Any  # (C, h, w) tensor: stage-1 conditioning slot


@dataclass
class WindowRequest:
    mode: str  # 'generated' (stage 1 + 2) or 'tracked' (stage 2 on tracked sketches)
    steps: int
    sampler: str
    guidance: float
    window: int  # slots per window (new frames = window - 1)
    contexts: np.ndarray  # (n, S, S, 3) uint8 head-masked context crops, 1 <= n <= window - 1
    sketches: np.ndarray  # (n, S, S, 3) uint8 sketches of the tracked landmarks
    mel: np.ndarray  # (n, 16, 80) float32
    identity: np.ndarray  # (S, S, 3) uint8 identity face crop
    state: ModelState | None  # None: start from a first frame (first-frame step)
    seed: int = 0
    want_sketches: bool = False  # decode the stage-1 sketches (previews/debug)

    @property
    def n(self) -> int:
        return int(self.contexts.shape[0])

    @property
    def restart(self) -> bool:
        return self.state is None


@dataclass
class WindowResult:
    faces: np.ndarray  # (n, S, S, 3) uint8 generated face crops
    state: ModelState
    sketches: np.ndarray | None = None  # (n, S, S, 3) uint8 decoded stage-1 sketches
    stage1_s: float = 0.0
    stage2_s: float = 0.0
    batch: int = 1


def pad_frames(x: np.ndarray, n: int) -> np.ndarray:
    """Repeat the last item so a short (final) window has the batch's shape."""
    if x.shape[0] >= n:
        return x[:n]
    return np.concatenate([x, np.repeat(x[-1:], n - x.shape[0], axis=0)])


def default_pack_missing() -> bool:
    """True while the bundled model pack has not been trained/committed yet."""
    try:
        from tccp.pack import DEFAULT_PACK, pack_exists
    except ImportError:
        return True
    return not pack_exists(DEFAULT_PACK)


class PipelineRunner:
    """Runs `WindowRequest`s on a `TCCPPipeline` (see module docstring)."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.size = int(pipeline.size)

    @classmethod
    def from_pack(cls, pack: str | None = None, device: str = "cpu", backend: str = "torch") -> "PipelineRunner":
        raise NotImplementedError

    @classmethod
    def random(cls, config: str = "tiny", device: str = "cpu", seed: int = 0) -> "PipelineRunner":
        raise NotImplementedError

    def batch_key(self, r: WindowRequest) -> tuple:
        return (r.mode, r.steps, r.sampler, float(r.guidance), r.window, r.restart, r.contexts.shape[1:])

    def run_batch(self, requests: Sequence[WindowRequest]) -> list[WindowResult]:
        raise NotImplementedError
