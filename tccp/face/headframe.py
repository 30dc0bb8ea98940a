"""Landmarks in a head frame: the coordinates stage 1 generates.

A face's landmarks mix two motions: the head moving in the image (translation,
in-plane rotation, scale) and the face deforming (speech, expression). Stage 1 must
learn only the second, so landmarks are similarity-aligned onto a template on points
that speech does not move (eye corners, nose bridge, upper face oval): what is left is
the deformation, in units of the template's eye-corner distance. The per-frame
similarity (`Pose`: complex scale-rotation `a` and offset `b`, head = a * image + b) is
kept apart, so generated head-frame points go back into the image exactly where the
source head is (mouth mode), or with a generated pose (head mode).

Point groups (mediapipe mesh indices, all within `tccp.face.sketch.SKETCH_INDICES`, so
sketches for stage 2 are drawn from them exactly as from tracked landmarks):
`MOUTH` = outer lips (20) + inner lips (20) + jaw line (17): what mouth mode generates;
`REST` = the other sketch points: mouth mode's pose prior (IP_LAP), given to stage 1 as
c_v. Arrays are full-mesh `(..., 478, 2)`; only the indices used are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tccp.face.sketch import LIPS_INNER, LIPS_OUTER, SKETCH_INDICES

__all__ = [
    "N_MESH",
    "STABLE",
    "LIPS",
    "JAW",
    "MOUTH",
    "REST",
    "Pose",
    "similarity",
    "apply_similarity",
    "fit_pose",
    "to_head",
    "to_image",
    "fit_template",
    "mirror_permutation",
    "aperture",
    "to_mesh",
]

N_MESH = 478


def _ordered(edges) -> list[int]:
    out: list[int] = []
    for a, b in edges:
        for i in (a, b):
            if i not in out:
                out.append(i)
    return out


# eye corners, nose bridge, upper oval: rigid with the skull, untouched by speech
STABLE = (33, 133, 362, 263, 168, 6, 197, 195, 10, 109, 67, 103, 338, 297, 332, 234, 454, 127, 356, 162, 389)
LIPS = tuple(_ordered(LIPS_OUTER) + _ordered(LIPS_INNER))
JAW = (132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361)
MOUTH = LIPS + JAW
REST = tuple(i for i in SKETCH_INDICES if i not in MOUTH)
_INNER_TOP, _INNER_BOTTOM, _EYE_R, _EYE_L = 13, 14, 33, 263


@dataclass
class Pose:
    """Per-frame similarity, head = a * image + b in complex form (x + iy).

    `a` (N,) complex: scale * exp(i * angle); `b` (N,) complex offset."""

    a: np.ndarray
    b: np.ndarray

    def __getitem__(self, idx) -> "Pose":
        return Pose(self.a[idx], self.b[idx])

    def params(self, size: float = 1.0) -> np.ndarray:
        """(N, 4): log scale, angle, and the head-frame origin's image position (x, y)
        divided by `size`: a smooth parametrisation for generating poses (head mode,
        whose unit is the crop: `size` = the crop's side in px)."""
        origin = -self.b / self.a / size  # image point that maps to the head-frame origin
        return np.stack([np.log(np.abs(self.a)), np.angle(self.a), origin.real, origin.imag], -1).astype(np.float32)

    @classmethod
    def from_params(cls, p: np.ndarray, size: float = 1.0) -> "Pose":
        """Inverse of `params(size)`."""
        p = np.asarray(p, np.float64)
        a = np.exp(p[..., 0]) * np.exp(1j * p[..., 1])
        origin = (p[..., 2] + 1j * p[..., 3]) * size
        return cls(a, -a * origin)


def _complex(p: np.ndarray) -> np.ndarray:
    return p[..., 0] + 1j * p[..., 1]


def similarity(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity (no reflection) with dst ~ a * src + b; points (..., P, 2)."""
    zs, zd = _complex(np.asarray(src, np.float64)), _complex(np.asarray(dst, np.float64))
    ms, md = zs.mean(-1, keepdims=True), zd.mean(-1, keepdims=True)
    s0, d0 = zs - ms, zd - md
    a = (np.conj(s0) * d0).sum(-1) / np.maximum((np.abs(s0) ** 2).sum(-1), 1e-12)
    b = md[..., 0] - a * ms[..., 0]
    return a, b


def apply_similarity(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> np.ndarray:
    w = np.asarray(a)[..., None] * _complex(np.asarray(points, np.float64)) + np.asarray(b)[..., None]
    return np.stack([w.real, w.imag], -1).astype(np.float32)


def fit_pose(landmarks: np.ndarray, template: np.ndarray) -> Pose:
    """The similarity taking each frame's stable points onto the template's."""
    lm = np.asarray(landmarks)
    idx = list(STABLE)
    a, b = similarity(lm[..., idx, :], np.broadcast_to(template[idx], lm[..., idx, :].shape))
    return Pose(np.atleast_1d(a), np.atleast_1d(b))


def to_head(landmarks: np.ndarray, template: np.ndarray) -> tuple[np.ndarray, Pose]:
    """(N, 478, 2) image/crop px -> (head-frame points (N, 478, 2), pose)."""
    pose = fit_pose(landmarks, template)
    return apply_similarity(pose.a, pose.b, landmarks), pose


def to_image(head: np.ndarray, pose: Pose) -> np.ndarray:
    """Inverse of `to_head`."""
    return apply_similarity(1.0 / pose.a, -pose.b / pose.a, head)


def fit_template(landmarks: np.ndarray, iterations: int = 4) -> np.ndarray:
    """Mean head-frame shape by generalised Procrustes over many frames (M, 478, 2):
    centred on the stable points, unit distance between the outer eye corners."""
    lm = np.asarray(landmarks, np.float64)
    t = lm[0].copy()
    idx = list(STABLE)
    for _ in range(iterations + 1):
        t = (t - t[idx].mean(0)) / np.linalg.norm(t[_EYE_L] - t[_EYE_R])
        a, b = similarity(lm[:, idx], np.broadcast_to(t[idx], lm[:, idx].shape))
        t = apply_similarity(a, b, lm).astype(np.float64).mean(0)
    t = (t - t[idx].mean(0)) / np.linalg.norm(t[_EYE_L] - t[_EYE_R])
    return t.astype(np.float32)


def mirror_permutation(template: np.ndarray, indices=SKETCH_INDICES) -> np.ndarray:
    """perm (478,) such that mirrored[..., i, :] = flip_x(points[..., perm[i], :]) for the
    given indices (each point's left-right partner, found on the template)."""
    idx = np.asarray(indices)
    pts = template[idx]
    flipped = pts * np.array([-1.0, 1.0])
    d = np.linalg.norm(pts[:, None] - flipped[None], axis=-1)
    perm = np.arange(N_MESH)
    perm[idx] = idx[d.argmin(1)]
    return perm


def aperture(points: np.ndarray) -> np.ndarray:
    """Inner-lip gap (13-14) over the outer-eye-corner distance (33-263), per frame."""
    p = np.asarray(points, np.float64)
    gap = np.linalg.norm(p[..., _INNER_TOP, :] - p[..., _INNER_BOTTOM, :], axis=-1)
    return gap / np.maximum(np.linalg.norm(p[..., _EYE_R, :] - p[..., _EYE_L, :], axis=-1), 1e-9)


def to_mesh(points: np.ndarray, index) -> np.ndarray:
    """Scatter (..., P, 2) points with mesh indices `index` into a full (..., 478, 2) array."""
    out = np.zeros(points.shape[:-2] + (N_MESH, 2), np.float32)
    out[..., np.asarray(index), :] = points
    return out
