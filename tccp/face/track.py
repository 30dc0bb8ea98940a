"""Face tracking: mediapipe detection + 478-point mesh, One-Euro smoothing, gap filling.

Why the mesh always runs on a crop: mediapipe's mesh finds faces with a short-range
detector, which misses small faces in wide shots (a full-body or scene clip). We keep
our own region of interest instead: a square around the previous frame's landmarks
(or, when the track is lost, around a full-range face detection), warped to a fixed
size so the face is always large and centred for the mesh. Following one region also
keeps the choice of face stable when several people are in the frame.

The mesh runs in video mode (its own landmark-to-ROI tracking between our crops);
smoothing is causal (One-Euro) so streaming and batch tracking give the same numbers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Iterable

import cv2
import numpy as np

from tccp.errors import TCCPError
from tccp.face.geometry import crop, face_square, from_crop_coords, square_box
from tccp.face.sketch import SKETCH_PARTS

__all__ = [
    "OneEuroFilter",
    "SmoothingConfig",
    "FaceTrackerConfig",
    "FaceObs",
    "Track",
    "FaceTracker",
    "fill_gaps",
    "require_face",
    "face_fraction",
    "no_face_message",
    "MIN_FACE_FRACTION",
    "jitter",
]

N_LANDMARKS = 478
MOBILE_INDICES = np.array(
    sorted(
        {i for part in ("left_eye", "right_eye", "left_iris", "right_iris", "lips_outer", "lips_inner")
         for e in SKETCH_PARTS[part] for i in e}
    ),
    dtype=np.int64,
)


class OneEuroFilter:
    """One-Euro filter (Casiez et al. 2012) over arrays of any shape.

    A low-pass whose cutoff rises with speed: still faces get heavy smoothing (no
    crop jitter), fast motion (speech, head turns) gets little lag. Each element has
    its own adaptive cutoff, so a moving lip is not held back by a still forehead.
    """

    def __init__(
        self,
        min_cutoff: float | np.ndarray = 1.0,
        beta: float | np.ndarray = 0.0,
        d_cutoff: float = 1.0,
    ) -> None:
        # min_cutoff and beta may be arrays broadcastable to the signal (per-element tuning)
        self.min_cutoff = np.asarray(min_cutoff, dtype=np.float64)
        self.beta = np.asarray(beta, dtype=np.float64)
        self.d_cutoff = float(d_cutoff)
        self.reset()

    def reset(self) -> None:
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t: float | None = None

    @staticmethod
    def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
        tau = 1.0 / (2.0 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self._x is None or self._t is None:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), float(t)
            return x.copy()
        dt = float(t) - self._t
        if dt <= 0:  # repeated timestamp: nothing new to integrate
            return self._x.copy()
        dx = (x - self._x) / dt
        a_d = self._alpha(self.d_cutoff, dt)
        self._dx = a_d * dx + (1 - a_d) * self._dx
        cutoff = self.min_cutoff + self.beta * np.abs(self._dx)
        a = self._alpha(cutoff, dt)
        self._x = a * x + (1 - a) * self._x
        self._t = float(t)
        return self._x.copy()


@dataclass
class SmoothingConfig:
    """One-Euro parameters in *face units* (coordinates divided by the face extent).

    Working in face units makes the same settings fit a close-up and a wide shot.
    """

    min_cutoff: float = 1.0  # Hz: smoothing when still
    beta: float = 15.0  # cutoff gain per (face extent / s) of speed
    d_cutoff: float = 3.0  # Hz: speed estimate; high enough to follow speech


@dataclass
class FaceTrackerConfig:
    fps: float = 25.0
    max_gap: int = 5  # missing runs up to this long are interpolated
    detect_long_side: int = 640  # detection runs on frames downscaled to this
    detection_confidence: float = 0.5
    tracking_confidence: float = 0.5
    mesh_size: int = 256  # side of the square crop the mesh runs on
    roi_scale: float = 2.0  # mesh crop side / landmark extent when tracking
    det_roi_scale: float = 2.4  # mesh crop side / detection box side when re-detecting
    max_candidates: int = 3  # detections tried per frame when lost
    face_scale: float = 1.6
    context_scale: float = 3.2
    landmarks: SmoothingConfig = field(default_factory=SmoothingConfig)
    # lips, eyes, irises: speech and blinks are fast; lag here costs lip sync
    mobile: SmoothingConfig = field(
        default_factory=lambda: SmoothingConfig(min_cutoff=2.5, beta=40.0, d_cutoff=3.0)
    )
    # boxes move slower than lips: lower cutoff so crops glide rather than twitch
    boxes: SmoothingConfig = field(
        default_factory=lambda: SmoothingConfig(min_cutoff=0.6, beta=1.5, d_cutoff=1.0)
    )


@dataclass
class FaceObs:
    """One frame's face: landmarks in source-frame continuous pixels."""

    index: int
    t: float
    landmarks: np.ndarray  # (478, 2) float32, smoothed
    raw: np.ndarray  # (478, 2) float32, straight from the mesh
    face_box: np.ndarray  # (4,) float32, from smoothed landmarks, smoothed again
    context_box: np.ndarray  # (4,) float32, same centre as face_box


@dataclass
class Track:
    """Per-frame tracking result for a clip.

    `found` means the landmarks are usable: detected, or interpolated across a short
    gap (then `interpolated` is also set). In frames with found=False (long gaps) the
    arrays hold the nearest found frame's values, so crops never see NaN, but they
    must not be trusted as landmarks of that frame.
    """

    landmarks: np.ndarray  # (N, 478, 2) float32 smoothed, frame px
    raw: np.ndarray  # (N, 478, 2) float32
    found: np.ndarray  # (N,) bool
    interpolated: np.ndarray  # (N,) bool
    face_boxes: np.ndarray  # (N, 4) float32
    context_boxes: np.ndarray  # (N, 4) float32
    fps: float = 25.0
    frame_size: tuple[int, int] = (0, 0)  # (H, W)

    def __len__(self) -> int:
        return int(self.found.shape[0])

    @property
    def detected(self) -> np.ndarray:
        """Frames where the mesh actually found the face."""
        return self.found & ~self.interpolated

    def gaps(self) -> list[tuple[int, int]]:
        """Runs of frames without a usable face, as half-open (start, end) ranges."""
        return _runs(~self.found)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    m = np.concatenate([[False], np.asarray(mask, bool), [False]]).astype(np.int8)
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def fill_gaps(
    found: np.ndarray, arrays: list[np.ndarray], max_gap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fill missing frames of `arrays` (each (N, ...)) in place.

    Runs of at most `max_gap` frames are linearly interpolated between their
    neighbours (held from the one neighbour at a clip edge) and become found; longer
    runs hold the nearest found values and stay not found. Returns (found, interpolated).
    """
    found = np.asarray(found, bool).copy()
    interp = np.zeros_like(found)
    n = found.shape[0]
    if not found.any():
        return found, interp
    for start, end in _runs(~found):
        before, after = start - 1, end  # neighbouring found frames (may be out of range)
        short = end - start <= max_gap
        for arr in arrays:
            if before >= 0 and after < n:
                if short:
                    w = (np.arange(start, end) - before) / (after - before)
                    w = w.reshape((-1,) + (1,) * (arr.ndim - 1))
                    arr[start:end] = (1 - w) * arr[before] + w * arr[after]
                else:
                    mid = (start + end) // 2
                    arr[start:mid] = arr[before]
                    arr[mid:end] = arr[after]
            else:
                arr[start:end] = arr[before] if before >= 0 else arr[after]
        if short:
            found[start:end] = True
            interp[start:end] = True
    return found, interp


MIN_FACE_FRACTION = 0.5
"""A clip is "faceless" when fewer than this share of its frames have a usable face:
`tccp run` refuses it (exit 2), `tccp prepare` skips it. Short gaps in a clip that
mostly shows a face pass through unchanged, as before."""


def face_fraction(found: np.ndarray) -> float:
    """Share of frames with a usable face (0 for an empty clip)."""
    f = np.asarray(found, bool)
    return float(f.mean()) if f.size else 0.0


def no_face_message(name: str, missing: int, total: int) -> str:
    """The one-line problem of a faceless clip (see MIN_FACE_FRACTION)."""
    if missing >= total:
        return f"{name}: no face found in {total} frames"
    return (f"{name}: no face in {missing} of {total} frames; a face must be visible in at least "
            f"{MIN_FACE_FRACTION:.0%} of them")


def require_face(track: Track, name: str, min_fraction: float = MIN_FACE_FRACTION) -> Track:
    """Turn a clip without a face (none, or in fewer than `min_fraction` of its frames)
    into a user error naming the file."""
    found = np.asarray(track.found, bool)
    if not found.any() or face_fraction(found) < min_fraction:
        raise TCCPError(no_face_message(name, int((~found).sum()), len(track)))
    return track


def jitter(landmarks: np.ndarray, found: np.ndarray | None = None) -> float:
    """Mean frame-to-frame acceleration of landmarks in face units (lower = steadier).

    The second difference is what the eye sees as shake; dividing by the face extent
    makes numbers comparable across clips.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    ok = np.ones(len(lm), bool) if found is None else np.asarray(found, bool)
    valid = ok[2:] & ok[1:-1] & ok[:-2]
    if not valid.any():
        return float("nan")
    acc = np.linalg.norm(lm[2:] - 2 * lm[1:-1] + lm[:-2], axis=-1).mean(axis=-1)
    mid = lm[1:-1]
    scale = (mid.max(axis=-2) - mid.min(axis=-2)).max(axis=-1)  # any point subset works
    return float((acc / np.maximum(scale, 1e-6))[valid].mean())


class FaceTracker:
    """Stateful face tracker: `update(frame)` per streamed frame, `track(frames)` for clips.

    Not thread-safe (mediapipe graphs are stateful); use one per stream.
    """

    def __init__(self, config: FaceTrackerConfig | None = None) -> None:
        self.cfg = config or FaceTrackerConfig()
        os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe's C++ log noise
        import mediapipe as mp  # heavy: only when a tracker is actually built

        self._mp = mp
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=False,
            max_num_faces=1,
            refine_landmarks=True,
            min_detection_confidence=self.cfg.detection_confidence,
            min_tracking_confidence=self.cfg.tracking_confidence,
        )
        self._detectors: dict[int, object] = {}
        sm, mo, sb = self.cfg.landmarks, self.cfg.mobile, self.cfg.boxes
        mobile = np.zeros((N_LANDMARKS, 1), bool)
        mobile[MOBILE_INDICES] = True
        self._lm_filter = OneEuroFilter(
            np.where(mobile, mo.min_cutoff, sm.min_cutoff),
            np.where(mobile, mo.beta, sm.beta),
            max(sm.d_cutoff, mo.d_cutoff),
        )
        self._box_filter = OneEuroFilter(sb.min_cutoff, sb.beta, sb.d_cutoff)
        self.reset()

    # -- lifecycle -------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the face (new clip/stream): same input, same output, whatever came before."""
        self._mesh.reset()  # the mesh's own video-mode tracking state
        self._index = 0
        self._last_raw: np.ndarray | None = None
        self._miss = 0
        self._reset_smoothing()

    def _reset_smoothing(self) -> None:
        self._lm_filter.reset()
        self._box_filter.reset()
        self._scale: float | None = None

    def close(self) -> None:
        self._mesh.close()
        for d in self._detectors.values():
            d.close()
        self._detectors.clear()

    def __enter__(self) -> "FaceTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public ----------------------------------------------------------------------
    def update(self, frame: np.ndarray, t: float | None = None) -> FaceObs | None:
        """Track one RGB uint8 frame; `t` in seconds (default: frame index / fps)."""
        _check_frame(frame)
        idx = self._index
        self._index += 1
        t = idx / self.cfg.fps if t is None else float(t)
        raw = self._locate(frame)
        if raw is None:
            self._miss += 1
            if self._miss > self.cfg.max_gap:  # a new face later starts fresh filters
                self._reset_smoothing()
            return None
        self._miss = 0
        self._last_raw = raw
        if self._scale is None:
            self._scale = float(face_square(raw)[2])
        s = self._scale
        smooth = (self._lm_filter(raw / s, t) * s).astype(np.float32)
        sq = face_square(smooth)
        sq = self._box_filter(sq / s, t) * s
        fbox = square_box(sq[0], sq[1], sq[2] * self.cfg.face_scale)
        cbox = square_box(sq[0], sq[1], sq[2] * self.cfg.context_scale)
        return FaceObs(idx, t, smooth, raw, fbox, cbox)

    def track(self, frames: Iterable[np.ndarray] | np.ndarray) -> Track:
        """Track a whole clip from its first frame (state is reset first)."""
        self.reset()
        obs: list[FaceObs | None] = []
        size = (0, 0)
        for frame in frames:
            size = tuple(frame.shape[:2])
            obs.append(self.update(frame))
        n = len(obs)
        lm = np.zeros((n, N_LANDMARKS, 2), np.float32)
        raw = np.zeros_like(lm)
        fb = np.zeros((n, 4), np.float32)
        cb = np.zeros((n, 4), np.float32)
        found = np.zeros(n, bool)
        for i, o in enumerate(obs):
            if o is not None:
                lm[i], raw[i], fb[i], cb[i], found[i] = o.landmarks, o.raw, o.face_box, o.context_box, True
        found, interp = fill_gaps(found, [lm, raw, fb, cb], self.cfg.max_gap)
        return Track(lm, raw, found, interp, fb, cb, self.cfg.fps, size)  # type: ignore[arg-type]

    # -- internals -------------------------------------------------------------------
    def _locate(self, frame: np.ndarray) -> np.ndarray | None:
        """Raw landmarks (478, 2) in frame px, or None."""
        if self._last_raw is not None and self._miss <= self.cfg.max_gap:
            sq = face_square(self._last_raw)
            box = square_box(sq[0], sq[1], sq[2] * self.cfg.roi_scale)
            lm = self._mesh_in(frame, box)
            if lm is not None:
                return lm
        for det in self._detect(frame)[: self.cfg.max_candidates]:
            cx, cy = (det[0] + det[2]) / 2, (det[1] + det[3]) / 2
            side = max(det[2] - det[0], det[3] - det[1]) * self.cfg.det_roi_scale
            lm = self._mesh_in(frame, square_box(cx, cy, side))
            if lm is not None:
                return lm
        return None

    def _mesh_in(self, frame: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        """Run the mesh on the crop of `box`; accept only a face near the crop centre."""
        size = self.cfg.mesh_size
        patch = np.ascontiguousarray(crop(frame, box, size, border="constant"))
        res = self._mesh.process(patch)
        if not res.multi_face_landmarks:
            return None
        pts = res.multi_face_landmarks[0].landmark
        lm = np.array([(p.x, p.y) for p in pts], dtype=np.float64) * size
        if lm.shape[0] != N_LANDMARKS or not np.isfinite(lm).all():
            return None
        centre = face_square(lm)[:2]
        if np.abs(centre - size / 2).max() > 0.3 * size:  # another face at the edge
            return None
        return from_crop_coords(lm, box, size)

    def _detector(self, model: int):
        if model not in self._detectors:
            self._detectors[model] = self._mp.solutions.face_detection.FaceDetection(
                model_selection=model, min_detection_confidence=self.cfg.detection_confidence
            )
        return self._detectors[model]

    def _detect(self, frame: np.ndarray) -> list[np.ndarray]:
        """Face boxes (x0, y0, x1, y1) in frame px, best candidate first."""
        h, w = frame.shape[:2]
        k = min(1.0, self.cfg.detect_long_side / max(h, w))
        small = frame if k >= 1.0 else cv2.resize(
            frame, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA
        )
        small = np.ascontiguousarray(small)
        dets = []
        for model in (1, 0):  # full range (small faces) first, short range as a fallback
            res = self._detector(model).process(small)
            for d in res.detections or []:
                r = d.location_data.relative_bounding_box
                box = np.array([r.xmin * w, r.ymin * h, (r.xmin + r.width) * w, (r.ymin + r.height) * h])
                if r.width > 0 and r.height > 0:
                    dets.append(box)
            if dets:
                break
        return sorted(dets, key=lambda b: -self._preference(b, w, h))

    def _preference(self, box: np.ndarray, w: int, h: int) -> float:
        """Higher is better: near the last known face, else large and central."""
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        side = max(box[2] - box[0], box[3] - box[1])
        if self._last_raw is not None:
            lx, ly, ls = face_square(self._last_raw)
            d = math.hypot(cx - lx, cy - ly) / max(ls, 1.0)
            if d < 1.5:
                return 10.0 - d  # the same person, whatever its size
        diag = math.hypot(w, h)
        centrality = 1.0 - min(1.0, math.hypot(cx - w / 2, cy - h / 2) / (0.5 * diag))
        return (side / diag) * (0.3 + 0.7 * centrality)


def _check_frame(frame: np.ndarray) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        shape = getattr(frame, "shape", None)
        dtype = getattr(frame, "dtype", None)
        raise ValueError(f"FaceTracker expects RGB uint8 (H, W, 3) frames, got {shape} {dtype}")
