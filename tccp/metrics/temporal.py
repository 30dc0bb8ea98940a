"""Temporal stability: landmark jitter and autoregressive window seams.

Jitter: trackers and generators both add frame-to-frame noise to otherwise smooth
motion. Noise shows up in the second temporal difference (acceleration), which real
head and lip motion at 25 fps keeps small, so jitter is the mean L2 norm of
`lm[t+1] - 2 lm[t] + lm[t-1]` in inter-ocular units. The same tracker measures the
real video, so `jitter_ratio = jitter(generated) / jitter(real)` cancels the
tracker's own noise: 1 is as steady as the real footage, > 1 shakier.

Seams: the engine generates a first frame alone, then windows of 7 new frames, each
conditioned on the last frame of the previous window. If windows do not join up, the
frame difference across a join (frame 7k -> 7k + 1) is larger than inside a window.
`seam_ratio = mean diff at joins / mean diff elsewhere`, measured in the head region:
~1 means invisible joins; real footage gives the reference value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tccp.face.geometry import inter_ocular

__all__ = [
    "WindowLayout",
    "landmark_velocity",
    "landmark_jitter",
    "frame_differences",
    "seam_stats",
]


@dataclass(frozen=True)
class WindowLayout:
    """Which frames start a window: `first` frames alone, then blocks of `new_frames`.

    Defaults match the engine: frame 0 is generated alone, then windows of 8 slots of
    which 7 are new frames (1..7, 8..14, ...).
    """

    new_frames: int = 7
    first: int = 1

    def is_boundary(self, n: int) -> np.ndarray:
        """`(n,)` bool: True at `t` when frame `t` starts a window after the first."""
        t = np.arange(n)
        return (t >= self.first) & ((t - self.first) % max(1, self.new_frames) == 0)


def _unit(lm: np.ndarray) -> np.ndarray:
    iod = np.asarray(inter_ocular(lm), np.float64).reshape(-1)
    return np.where(iod > 1e-6, iod, np.nan)


def landmark_velocity(lm: np.ndarray, indices: np.ndarray | None = None) -> float:
    """Mean frame-to-frame landmark displacement, in inter-ocular units."""
    x = np.asarray(lm, np.float64)
    unit = _unit(x)
    if indices is not None:
        x = x[:, indices]
    if x.shape[0] < 2:
        return float("nan")
    d = np.linalg.norm(np.diff(x, axis=0), axis=-1).mean(axis=-1) / unit[1:]
    return float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")


def landmark_jitter(lm: np.ndarray, indices: np.ndarray | None = None) -> float:
    """Mean L2 norm of the landmarks' second temporal difference, inter-ocular units.

    `lm`: `(N, P, 2)` pixels; frames with NaN (face lost) drop out of the mean.
    """
    x = np.asarray(lm, np.float64)
    unit = _unit(x)
    if indices is not None:
        x = x[:, indices]
    if x.shape[0] < 3:
        return float("nan")
    acc = x[2:] - 2.0 * x[1:-1] + x[:-2]
    d = np.linalg.norm(acc, axis=-1).mean(axis=-1) / unit[1:-1]
    return float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")


def frame_differences(frames: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """`(N,)` mean absolute difference of frame t and t-1 inside `masks[t]` (NaN at 0).

    `frames`: `(N, H, W, 3)` uint8; `masks`: `(N, H, W)` bool or None (whole frame).
    """
    f = np.asarray(frames)
    n = f.shape[0]
    out = np.full(n, np.nan)
    for t in range(1, n):
        d = np.abs(f[t].astype(np.int16) - f[t - 1].astype(np.int16)).mean(axis=-1)
        if masks is None:
            out[t] = float(d.mean())
        else:
            m = np.asarray(masks[t], bool)
            if m.any():
                out[t] = float(d[m].mean())
    return out


def seam_stats(diffs: np.ndarray, layout: WindowLayout = WindowLayout()) -> dict:
    """Mean frame difference at window joins vs inside windows, and their ratio."""
    d = np.asarray(diffs, np.float64)
    joins = layout.is_boundary(d.size)
    inside = ~joins & (np.arange(d.size) >= 1)
    at_join = d[joins & np.isfinite(d)]
    within = d[inside & np.isfinite(d)]
    mj = float(at_join.mean()) if at_join.size else float("nan")
    mi = float(within.mean()) if within.size else float("nan")
    ratio = mj / mi if np.isfinite(mj) and np.isfinite(mi) and mi > 1e-9 else float("nan")
    return {
        "boundary_diff": mj,
        "inside_diff": mi,
        "seam_ratio": ratio,
        "n_boundaries": int(at_join.size),
    }
