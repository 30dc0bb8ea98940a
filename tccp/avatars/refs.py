"""Reference images of an avatar: which frames to keep, and which one to use when.

TCCP's identity encoder takes one reference face per window. IP_LAP showed that
references covering several poses and mouth shapes let a renderer borrow the right
appearance (the side of the face that is visible, teeth or no teeth). An avatar
therefore keeps a few references, chosen by farthest-point sampling over
(yaw proxy, pitch proxy, mouth aperture) from the tracked landmarks of the person's
footage, and the engine gives the identity encoder, per window, the reference whose
head pose is nearest to the caller's tracked head in that window (with hysteresis, so
the reference does not flicker between two near-equal candidates).

At run time the engine only holds sketch images (the tracked landmarks drawn in
colour), so the pose is read from those: the nose and eye contours are found by their
colours (`tccp.face.mouth.part_pixels`), and yaw/pitch proxies are the nose centroid's
offset from the eyes' midpoint in units of the eye distance. References carry the same
numbers computed from their own sketches, so both sides are measured alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = [
    "landmark_features",
    "select_references",
    "sketch_pose",
    "ReferenceBank",
]

NOSE_TIP = 1
_RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173)
_LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398)


def landmark_features(landmarks: np.ndarray) -> np.ndarray:
    """(..., 478, 2) mesh landmarks -> (..., 3): yaw proxy, pitch proxy, mouth aperture.

    Proxies, not angles: the nose tip's offset from the eyes' midpoint in eye-distance
    units (x: turning left/right, y: nodding), and `mouth_aperture`."""
    from tccp.face.geometry import mouth_aperture

    lm = np.asarray(landmarks, np.float64)
    re = lm[..., list(_RIGHT_EYE), :].mean(axis=-2)
    le = lm[..., list(_LEFT_EYE), :].mean(axis=-2)
    mid = 0.5 * (re + le)
    dist = np.maximum(np.linalg.norm(le - re, axis=-1), 1e-6)
    off = (lm[..., NOSE_TIP, :] - mid) / dist[..., None]
    return np.stack([off[..., 0], off[..., 1], np.asarray(mouth_aperture(lm), np.float64)], axis=-1)


def select_references(features: np.ndarray, k: int, floor: Sequence[float] = (0.02, 0.02, 0.02)) -> list[int]:
    """`k` row indices of `features` (N, F) that cover their spread: farthest-point
    sampling on z-scored features, started at the most typical row (nearest to the
    median), among rows inside the 2nd..98th percentile of every feature (tracking
    glitches are the extremes). `floor` bounds each feature's scale from below so
    noise in a feature that hardly varies is not blown up."""
    f = np.asarray(features, np.float64)
    n = f.shape[0]
    if n == 0:
        return []
    lo, hi = np.percentile(f, 2, axis=0), np.percentile(f, 98, axis=0)
    ok = np.flatnonzero(np.all((f >= lo) & (f <= hi), axis=1))
    if len(ok) < min(k, n):
        ok = np.arange(n)
    scale = np.maximum(f[ok].std(axis=0), np.asarray(floor, np.float64)[: f.shape[1]])
    z = (f[ok] - np.median(f[ok], axis=0)) / scale
    chosen = [int(np.argmin(np.linalg.norm(z, axis=1)))]
    dist = np.linalg.norm(z - z[chosen[0]], axis=1)
    while len(chosen) < min(k, len(ok)):
        nxt = int(np.argmax(dist))
        if dist[nxt] <= 0:
            break  # only duplicates left
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(z - z[nxt], axis=1))
    return [int(ok[i]) for i in chosen]


def _centroid(sketch: np.ndarray, part: str, classes: tuple) -> np.ndarray | None:
    from tccp.face.mouth import part_pixels

    ys, xs, w = part_pixels(sketch, part, classes=classes)
    if len(xs) < 3:
        return None
    return np.array([np.average(xs, weights=w), np.average(ys, weights=w)])


def sketch_pose(sketch: np.ndarray) -> np.ndarray | None:
    """(yaw, pitch) proxies read off a sketch image (None if nose or eyes are missing):
    nose centroid minus the eyes' midpoint, over the eye distance."""
    from tccp.face.mouth import classify_parts

    classes = classify_parts(sketch)
    nose = _centroid(sketch, "nose", classes)
    re = _centroid(sketch, "right_eye", classes)
    le = _centroid(sketch, "left_eye", classes)
    if nose is None or re is None or le is None:
        return None
    dist = float(np.linalg.norm(le - re))
    if dist < 1.0:
        return None
    return (nose - 0.5 * (le + re)) / dist


@dataclass
class ReferenceBank:
    """An avatar's reference face crops and the head pose each shows.

    `crops` (K, S, S, 3) uint8 at the model's crop size, `poses` (K, 2) sketch-pose
    proxies (rows may be NaN: never chosen by pose). Index 0 is the most typical
    reference, used when the caller's pose cannot be read.
    """

    crops: np.ndarray
    poses: np.ndarray
    hysteresis: float = 0.8
    """Switch only when another reference is this much closer than the current one."""
    _latents: Any = None

    def __post_init__(self) -> None:
        self.crops = np.ascontiguousarray(np.asarray(self.crops, np.uint8))
        if self.crops.ndim != 4 or self.crops.shape[0] < 1 or self.crops.shape[-1] != 3:
            raise ValueError(f"reference crops must be (K, S, S, 3), got {self.crops.shape}")
        self.poses = np.asarray(self.poses, np.float64).reshape(len(self.crops), 2)

    def __len__(self) -> int:
        return int(self.crops.shape[0])

    @classmethod
    def from_crops(cls, crops: np.ndarray, sketches: np.ndarray | None = None) -> "ReferenceBank":
        poses = np.full((len(crops), 2), np.nan)
        if sketches is not None:
            for i, sk in enumerate(sketches):
                p = sketch_pose(sk)
                if p is not None:
                    poses[i] = p
        return cls(np.asarray(crops), poses)

    def choose(self, sketch: np.ndarray | None, current: int | None = None) -> int:
        """Index of the reference for a window whose first tracked sketch is `sketch`."""
        cur = current if current is not None and 0 <= current < len(self) else None
        known = np.isfinite(self.poses).all(axis=1)
        pose = sketch_pose(sketch) if sketch is not None and known.any() else None
        if pose is None:
            return 0 if cur is None else cur
        d = np.where(known, np.linalg.norm(self.poses - pose[None], axis=1), np.inf)
        best = int(np.argmin(d))
        if cur is None or not np.isfinite(d[cur]):
            return best
        return best if d[best] < self.hysteresis * d[cur] else cur

    def latents(self, encode) -> Any:
        """The references encoded once with `encode` ((K, S, S, 3) uint8 -> latents)."""
        if self._latents is None:
            self._latents = encode(self.crops)
        return self._latents
