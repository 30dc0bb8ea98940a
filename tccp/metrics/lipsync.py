"""Lip-sync measures from tracked landmarks and the audio energy envelope.

Without a SyncNet checkpoint (none ships in a package that installs offline) lip sync
is measured geometrically:
- LipLMD: mean L2 distance between the 40 mediapipe lip landmarks (FACEMESH_LIPS) of
  generated and real frames, in units of the real face's inter-ocular distance, so
  the number does not depend on resolution or how large the face is;
- mouth-aperture correlation, generated vs real, and the signed lag (frames) that
  maximises it: a lip-sync delay shows up as a non-zero lag even when the shapes are
  right;
- for any single video, correlation of mouth aperture with the speech energy envelope
  and its best offset: needs no ground truth, so it also works for dubbing.

Conventions: `lag > 0` means the second signal (generated / mouth) happens *later*
than the first (real / audio): `b[t + lag] ~ a[t]`. A signal with (near) zero
variance has no defined correlation: it is reported as NaN (JSON null), never 0,
so a frozen mouth cannot pass as "uncorrelated but fine".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tccp.face.geometry import inter_ocular
from tccp.face.sketch import LIPS_INNER, LIPS_OUTER

__all__ = [
    "LIP_INDICES",
    "MAX_LAG",
    "landmark_error",
    "landmark_error_per_frame",
    "lip_lmd",
    "pearson",
    "LagResult",
    "best_lag",
]

# the 40 points of mediapipe's FACEMESH_LIPS (outer and inner lip contours)
LIP_INDICES = np.array(sorted({i for e in LIPS_OUTER + LIPS_INNER for i in e}), dtype=np.int64)
MAX_LAG = 10  # frames searched either side (0.4 s at 25 fps)
_FLAT = 1e-6  # relative std below which a signal counts as constant


def landmark_error_per_frame(
    pred_lm: np.ndarray,
    real_lm: np.ndarray,
    indices: np.ndarray | None = None,
) -> np.ndarray:
    """Per-frame mean L2 landmark distance / real inter-ocular distance: `(N,)`.

    `pred_lm`, `real_lm`: `(N, 478, 2)` (or one `(478, 2)` face) in pixels of the same
    frame size. No alignment is done: in reconstruction the head pose is the real one,
    so any offset is an error of the generator. Frames with NaN landmarks give NaN.
    """
    p = np.asarray(pred_lm, np.float64)
    r = np.asarray(real_lm, np.float64)
    if p.shape != r.shape:
        raise ValueError(f"landmark shapes differ: {p.shape} vs {r.shape}")
    if p.ndim == 2:
        p, r = p[None], r[None]
    iod = np.asarray(inter_ocular(r), np.float64).reshape(-1)
    if indices is not None:
        p, r = p[:, indices], r[:, indices]
    dist = np.linalg.norm(p - r, axis=-1).mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(iod > 1e-6, dist / np.maximum(iod, 1e-6), np.nan)


def landmark_error(
    pred_lm: np.ndarray,
    real_lm: np.ndarray,
    indices: np.ndarray | None = None,
) -> float:
    """Mean landmark error normalised by inter-ocular distance (all points by default).

    Frames where either track is NaN are skipped; NaN if none remain.
    """
    e = landmark_error_per_frame(pred_lm, real_lm, indices)
    return float(np.nanmean(e)) if np.isfinite(e).any() else float("nan")


def lip_lmd(pred_lm: np.ndarray, real_lm: np.ndarray) -> float:
    """LipLMD: `landmark_error` over the FACEMESH_LIPS points."""
    return landmark_error(pred_lm, real_lm, LIP_INDICES)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two equal-length series; NaN if either is (near) constant or short.

    "Near constant" is std below 1e-6 of the mean magnitude (plus an absolute floor),
    so a mouth frozen on one frame, which trackers reproduce up to float noise, is NaN.
    Pairs containing NaN are dropped first.
    """
    x = np.asarray(a, np.float64).reshape(-1)
    y = np.asarray(b, np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"series lengths differ: {x.shape} vs {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3:
        return float("nan")
    floor_x = _FLAT * float(np.mean(np.abs(x))) + 1e-12
    floor_y = _FLAT * float(np.mean(np.abs(y))) + 1e-12
    x = x - x.mean()
    y = y - y.mean()
    sx, sy = np.sqrt(np.mean(x * x)), np.sqrt(np.mean(y * y))
    if sx <= floor_x or sy <= floor_y:
        return float("nan")
    return float(np.clip(np.mean(x * y) / (sx * sy), -1.0, 1.0))


@dataclass(frozen=True)
class LagResult:
    """Correlation at lag 0, the best lag and its correlation, and the whole curve."""

    r0: float  # correlation without shifting
    lag: int | None  # argmax over lags of r; None when no lag has a defined r
    r_best: float  # r at `lag` (NaN when lag is None)
    lags: np.ndarray  # (2 * max_lag + 1,) int
    curve: np.ndarray  # (2 * max_lag + 1,) r per lag, NaN where undefined

    def as_dict(self) -> dict:
        return {"r": _num(self.r0), "best_lag": self.lag, "r_best": _num(self.r_best)}


def _num(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def best_lag(
    a: np.ndarray,
    b: np.ndarray,
    max_lag: int = MAX_LAG,
    min_overlap: int = 10,
) -> LagResult:
    """Lag `k` in `[-max_lag, max_lag]` maximising `pearson(a[t], b[t + k])`.

    Positive `k`: `b` lags `a` (e.g. the generated mouth moves k frames after the real
    one, or the mouth after the sound). Each lag uses only the overlapping part of the
    two series; lags leaving fewer than `min_overlap` frames are NaN. Ties go to the
    smallest |k|.
    """
    x = np.asarray(a, np.float64).reshape(-1)
    y = np.asarray(b, np.float64).reshape(-1)
    n = min(x.size, y.size)
    x, y = x[:n], y[:n]
    lags = np.arange(-max_lag, max_lag + 1)
    curve = np.full(lags.size, np.nan)
    for i, k in enumerate(lags):
        if k >= 0:
            xa, yb = x[: n - k], y[k:]
        else:
            xa, yb = x[-k:], y[: n + k]
        if xa.size >= min_overlap:
            curve[i] = pearson(xa, yb)
    r0 = curve[max_lag]
    if not np.isfinite(curve).any():
        return LagResult(r0=float(r0), lag=None, r_best=float("nan"), lags=lags, curve=curve)
    best = np.nanmax(curve)
    cand = lags[np.isclose(curve, best, rtol=0, atol=1e-12)]
    k = int(cand[np.argmin(np.abs(cand))])
    return LagResult(r0=float(r0), lag=k, r_best=float(best), lags=lags, curve=curve)
