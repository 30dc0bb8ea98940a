"""Evaluation of one generated video: lip sync, fidelity, temporal stability, identity.

Two modes, chosen by whether the real video is given:
- reconstruction (`real` given): the generator re-synthesised the head of `real`
  driven by its own audio, so every frame has a ground truth. All measures apply.
- no reference (dubbing with other audio): only what needs no ground truth: mouth vs
  audio correlation and offset, landmark jitter and window seams.

Both videos are tracked the same way (`FaceTracker`); measures use the tracker's raw
(unsmoothed) landmarks, because smoothing would hide exactly the jitter we measure.
The head region is the head mask of the *real* landmarks (where the head should be);
"outside" is everything farther than `outside_margin` face heights from that mask,
which the compositor must leave untouched (its feathered edge lives in between).

`evaluate_arrays` works on in-memory frames (tests, the suite); `evaluate_files` loads
and aligns files for `tccp eval`. Both return an `EvalResult`: the JSON-ready metrics
plus the per-frame series the report plots.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tccp.errors import TCCPError
from tccp.face.geometry import CHIN, FOREHEAD, head_mask, mouth_aperture
from tccp.io_utils import atomic_path
from tccp.metrics.fidelity import psnr_from_mse, ssim_map
from tccp.metrics.lipsync import LIP_INDICES, best_lag, landmark_error_per_frame
from tccp.metrics.temporal import WindowLayout, landmark_jitter, seam_stats

__all__ = [
    "FORMAT_VERSION",
    "EvalConfig",
    "TrackedVideo",
    "EvalResult",
    "track_frames",
    "energy_db",
    "FrameRegions",
    "head_masks_for_frame",
    "evaluate_arrays",
    "evaluate_files",
    "to_jsonable",
    "write_json",
]

FORMAT_VERSION = 1


@dataclass
class EvalConfig:
    """Knobs of the evaluation; the defaults match the engine's layout and mask."""

    window: int = 8  # slots per window, slot 0 being the conditioning frame
    first_frames: int = 1  # frames generated alone before the first window
    max_lag: int = 10  # lag search range (frames) for mouth and audio correlations
    border_px: int = 3  # half-width of the seam band around the mask edge
    outside_margin: float = 0.25  # face heights between the mask and "outside"
    mask_dilate: float = 0.1  # head_mask parameters (see tccp.face.geometry.head_mask)
    mask_forehead: float = 0.35
    energy_floor_db: float = 60.0  # audio energy is clipped this far below its peak
    identity: bool = True
    identity_frames: int = 8  # dlib's ResNet takes ~0.15 s per face on a CPU core

    @property
    def layout(self) -> WindowLayout:
        return WindowLayout(new_frames=max(1, self.window - 1), first=self.first_frames)


@dataclass
class TrackedVideo:
    """Frames plus raw landmarks, NaN where the tracker has no usable face."""

    frames: np.ndarray  # (N, H, W, 3) uint8
    landmarks: np.ndarray  # (N, 478, 2) float64 frame px, NaN where not found
    found: np.ndarray  # (N,) bool

    @property
    def aperture(self) -> np.ndarray:
        """Inner-lip opening over inter-ocular distance, `(N,)` (NaN where not found)."""
        return np.asarray(mouth_aperture(self.landmarks), np.float64).reshape(-1)

    def head(self, n: int) -> "TrackedVideo":
        return TrackedVideo(self.frames[:n], self.landmarks[:n], self.found[:n])


@dataclass
class EvalResult:
    metrics: dict[str, Any]  # JSON-ready (NaN already turned into None by to_jsonable)
    series: dict[str, np.ndarray] = field(default_factory=dict)  # per-frame, for plots
    generated: TrackedVideo | None = None
    real: TrackedVideo | None = None


# --------------------------------------------------------------------------- helpers


def track_frames(frames: np.ndarray) -> TrackedVideo:
    """Track a frame stack; raw mesh landmarks with NaN where no face was usable.

    A fresh tracker each time: mediapipe's video-mode mesh keeps state between clips,
    so a reused one would track two identical videos (slightly) differently.
    """
    from tccp.face.track import FaceTracker

    with FaceTracker() as tracker:
        tr = tracker.track(frames)
    lm = np.asarray(tr.raw, np.float64).copy()
    found = np.asarray(tr.found, bool)
    lm[~found] = np.nan
    return TrackedVideo(np.asarray(frames), lm, found)


def energy_db(audio: np.ndarray, sr: int, fps: float, n: int, floor_db: float = 60.0) -> np.ndarray:
    """Speech energy per video frame in dB, clipped `floor_db` below the peak: `(n,)`.

    Log energy follows perceived loudness and mouth opening better than raw RMS (a
    few loud plosives otherwise dominate the correlation).
    """
    from tccp.media.audio import energy_envelope

    env = energy_envelope(audio, sr=sr, fps=fps)
    env = np.concatenate([env, np.zeros(max(0, n - env.size), np.float32)])[:n]
    db = 20.0 * np.log10(np.maximum(env.astype(np.float64), 1e-10))
    peak = float(db.max()) if db.size else 0.0
    return np.maximum(db, peak - floor_db)


@dataclass
class FrameRegions:
    """Where to measure in one frame: all bool `(H, W)`; `box` bounds head and band."""

    head: np.ndarray
    outside: np.ndarray
    band: np.ndarray
    box: tuple[int, int, int, int]  # (y0, y1, x0, x1) covering head + band


def head_masks_for_frame(
    landmarks: np.ndarray, shape: tuple[int, int], cfg: EvalConfig
) -> FrameRegions | None:
    """Head, outside and border-band masks of one frame, or None without a face.

    The head is `tccp.face.geometry.head_mask` (oval swept up over the forehead, then
    grown by `mask_dilate` face heights). The hull comes from `head_mask` itself on
    the square box (0, 0, S, S), S = max(H, W), i.e. a crop of scale 1 whose
    coordinates are frame coordinates; the growth is done with one distance
    transform instead of a large dilation (the same Euclidean offset, 20x faster),
    and that distance also gives the outside region and the outer half of the band.
    """
    import cv2

    lm = np.asarray(landmarks, np.float64)
    if not np.isfinite(lm).all():
        return None
    h, w = shape
    s = max(h, w)
    box = np.array([0, 0, s, s], np.float32)
    hull = head_mask(lm, box, s, dilate=0.0, forehead=cfg.mask_forehead)[:h, :w] > 0.5
    if not hull.any():
        return None
    face_h = float(np.linalg.norm(lm[FOREHEAD] - lm[CHIN]))
    grow = cfg.mask_dilate * face_h
    dist_out = cv2.distanceTransform((~hull).astype(np.uint8), cv2.DIST_L2, 5)
    head = dist_out <= grow
    dist_in = cv2.distanceTransform(head.astype(np.uint8), cv2.DIST_L2, 5)
    b = cfg.border_px
    band = (head & (dist_in <= b)) | (~head & (dist_out <= grow + b))
    outside = dist_out > grow + cfg.outside_margin * face_h
    ys, xs = np.nonzero(band | head)
    return FrameRegions(head, outside, band, (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1))


def _fit_frames(gen: np.ndarray, shape: tuple[int, int], notes: list[str]) -> np.ndarray:
    """Generated frames at the real frames' size (writers pad odd sizes to even)."""
    import cv2

    h, w = shape
    gh, gw = gen.shape[1:3]
    if (gh, gw) == (h, w):
        return gen
    if h <= gh <= h + 1 and w <= gw <= w + 1:
        return gen[:, :h, :w]
    notes.append(f"generated frames {gw}x{gh} resized to the real {w}x{h}")
    return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in gen])


def _mean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def _audio_sync(aperture: np.ndarray, energy: np.ndarray | None, max_lag: int) -> dict | None:
    if energy is None:
        return None
    r = best_lag(energy, aperture, max_lag=max_lag)
    return {"r": r.r0, "offset_frames": r.lag, "r_best": r.r_best}


# --------------------------------------------------------------------------- core


def evaluate_arrays(
    generated: np.ndarray | TrackedVideo,
    real: np.ndarray | TrackedVideo | None = None,
    audio: np.ndarray | None = None,
    *,
    sr: int = 16000,
    fps: float = 25.0,
    cfg: EvalConfig | None = None,
    embedder=None,
) -> EvalResult:
    """All measures for in-memory frames (already on the same 25 fps timeline).

    `generated`/`real`: frame stacks or `TrackedVideo`s (pass tracked ones to reuse
    tracking across calls). `audio`: mono float32 at `sr` starting at frame 0, or
    None (audio measures become null). `embedder`: a `FaceEmbedder` or None (then
    identity is attempted with `load_embedder()` when `cfg.identity`).
    """
    cfg = cfg or EvalConfig()
    notes: list[str] = []
    gen = generated if isinstance(generated, TrackedVideo) else None
    ref = real if isinstance(real, TrackedVideo) else None
    if gen is None:
        gen = track_frames(np.asarray(generated))
    if real is not None and ref is None:
        ref = track_frames(np.asarray(real))
    if ref is not None:
        n = min(len(gen.frames), len(ref.frames))
        if len(gen.frames) != len(ref.frames):
            notes.append(
                f"frame counts differ (real {len(ref.frames)}, generated {len(gen.frames)}); "
                f"compared the first {n}"
            )
        gen, ref = gen.head(n), ref.head(n)
        if gen.frames.shape[1:3] != ref.frames.shape[1:3]:
            gen = TrackedVideo(_fit_frames(gen.frames, ref.frames.shape[1:3], notes),
                               gen.landmarks, gen.found)
    n = len(gen.frames)
    energy = energy_db(audio, sr, fps, n, cfg.energy_floor_db) if audio is not None else None
    if audio is None:
        notes.append("no audio: mouth-vs-audio measures skipped")

    series: dict[str, np.ndarray] = {"aperture_generated": gen.aperture}
    if energy is not None:
        series["energy_db"] = energy
    metrics: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "mode": "reconstruction" if ref is not None else "no_reference",
        "frames": n,
        "fps": fps,
        "face_found": {"generated": float(gen.found.mean()) if n else 0.0},
    }

    # ---- lip sync
    lips: dict[str, Any] = {
        "audio_sync": {"generated": _audio_sync(gen.aperture, energy, cfg.max_lag)},
        "aperture_std": {"generated": float(np.nanstd(gen.aperture)) if gen.found.any() else None},
    }
    if ref is not None:
        series["aperture_real"] = ref.aperture
        metrics["face_found"]["real"] = float(ref.found.mean()) if n else 0.0
        lip_err = landmark_error_per_frame(gen.landmarks, ref.landmarks, LIP_INDICES)
        series["lip_lmd"] = lip_err
        lag = best_lag(ref.aperture, gen.aperture, max_lag=cfg.max_lag)
        series["lag_curve"] = lag.curve
        lips.update(
            {
                "lip_lmd": _mean(lip_err),
                "landmark_error": _mean(landmark_error_per_frame(gen.landmarks, ref.landmarks)),
                "aperture_corr": lag.r0,
                "lag_frames": lag.lag,
                "aperture_corr_at_lag": lag.r_best,
            }
        )
        lips["audio_sync"]["real"] = _audio_sync(ref.aperture, energy, cfg.max_lag)
        lips["aperture_std"]["real"] = float(np.nanstd(ref.aperture)) if ref.found.any() else None
    metrics["lipsync"] = lips

    # ---- per-frame pass: fidelity (with reference) and head-region frame differences
    import cv2

    anchor = ref if ref is not None else gen
    h, w = gen.frames.shape[1:3]
    names = ("head_mse", "head_ssim", "outside_mse", "outside_ssim", "border_mse",
             "border_mae", "diff_generated", "diff_real")
    per = {k: np.full(n, np.nan) for k in names}
    for t in range(n):
        reg = head_masks_for_frame(anchor.landmarks[t], (h, w), cfg)
        if reg is None:
            continue
        y0, y1, x0, x1 = reg.box
        head = reg.head[y0:y1, x0:x1]
        if t > 0:
            per["diff_generated"][t] = _abs_diff(gen.frames, t, reg)
        if ref is None:
            continue
        if t > 0:
            per["diff_real"][t] = _abs_diff(ref.frames, t, reg)
        r, g = ref.frames[t], gen.frames[t]
        sq = _sq_err(r, g)
        smap = ssim_map(r, g)
        per["head_mse"][t] = sq[y0:y1, x0:x1][head].mean()
        per["head_ssim"][t] = smap[y0:y1, x0:x1][head].mean()
        if reg.outside.any():
            per["outside_mse"][t] = sq[reg.outside].mean()
            per["outside_ssim"][t] = smap[reg.outside].mean()
        band = reg.band[y0:y1, x0:x1]
        if band.any():
            per["border_mse"][t] = sq[y0:y1, x0:x1][band].mean()
            ad = cv2.absdiff(r[y0:y1, x0:x1], g[y0:y1, x0:x1])
            per["border_mae"][t] = ad[band].mean(dtype=np.float64)

    series["diff_generated"] = per["diff_generated"]
    layout = cfg.layout
    seams = {
        "window": cfg.window,
        "new_frames": layout.new_frames,
        "first_frames": layout.first,
        "generated": seam_stats(per["diff_generated"], layout),
    }
    temporal: dict[str, Any] = {"jitter": {"generated": landmark_jitter(gen.landmarks)}, "seams": seams}
    if ref is not None:
        series["diff_real"] = per["diff_real"]
        seams["real"] = seam_stats(per["diff_real"], layout)
        jr = landmark_jitter(ref.landmarks)
        jg = temporal["jitter"]["generated"]
        temporal["jitter"]["real"] = jr
        temporal["jitter"]["ratio"] = jg / jr if np.isfinite(jg) and np.isfinite(jr) and jr > 0 else None
        psnr = lambda k: np.array([psnr_from_mse(v) for v in per[k]])  # noqa: E731
        for k in ("head", "outside", "border"):
            series[f"{k}_psnr"] = psnr(f"{k}_mse")
        metrics["fidelity"] = {
            "head": {"psnr": _mean(series["head_psnr"]), "ssim": _mean(per["head_ssim"])},
            "outside": {"psnr": _mean(series["outside_psnr"]), "ssim": _mean(per["outside_ssim"])},
            "border": {
                "psnr": _mean(series["border_psnr"]),
                "mae": _mean(per["border_mae"]),
                "width_px": 2 * cfg.border_px,
            },
            "frames": int(np.isfinite(per["head_mse"]).sum()),
        }
    metrics["temporal"] = temporal

    # ---- the mouth at source resolution (what an independent check measures)
    if ref is not None:
        metrics["mouth"] = mouth_region_measures(gen.frames, ref)

    # ---- identity
    if ref is not None:
        metrics["identity"], metrics["identity_note"] = _identity(gen, ref, cfg, embedder)
    metrics["notes"] = notes
    return EvalResult(metrics=to_jsonable(metrics), series=series, generated=gen, real=ref)


def _square(pts: np.ndarray, grow: float, h: int, w: int) -> tuple[int, int, int, int]:
    c = (pts.min(0) + pts.max(0)) / 2
    s = (pts.max(0) - pts.min(0)).max() * grow / 2
    x0, y0 = np.maximum(np.floor(c - s), 0).astype(int)
    x1, y1 = np.minimum(np.ceil(c + s), [w, h]).astype(int)
    return int(x0), int(y0), int(x1), int(y1)


def mouth_region_measures(gen_frames: np.ndarray, ref: TrackedVideo) -> dict[str, Any]:
    """Medians over frames, boxes from the REAL frame's landmarks: PSNR in the mouth box
    (lip landmarks' box grown 1.8x, square), the sharpness ratio there (variance of the
    Laplacian, generated / real), and PSNR of the face outside the regenerated region
    (the face box minus the lower face dilated by 15 % of the face height), where an
    editor must leave the source as it is."""
    import cv2

    from tccp.face.regions import region_mask

    n = min(len(gen_frames), len(ref.frames))
    h, w = ref.frames.shape[1:3]
    pm, sr, pk = [], [], []
    lap = lambda a: cv2.Laplacian(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()  # noqa: E731
    for t in range(n):
        if not ref.found[t]:
            continue
        lm = ref.landmarks[t]
        r, g = ref.frames[t], gen_frames[t]
        x0, y0, x1, y1 = _square(lm[list(LIP_INDICES)], 1.8, h, w)
        if x1 - x0 < 4 or y1 - y0 < 4:
            continue
        pm.append(psnr_from_mse(float(_sq_err(r[y0:y1, x0:x1], g[y0:y1, x0:x1]).mean())))
        sr.append(lap(g[y0:y1, x0:x1]) / max(lap(r[y0:y1, x0:x1]), 1e-6))
        fx0, fy0, fx1, fy1 = _square(lm, 1.0, h, w)
        keep = region_mask(lm, (fy1 - fy0, fx1 - fx0), "mouth", offset=(float(fx0), float(fy0)), dilate=0.15) < 1e-3
        if keep.any():
            sq = _sq_err(r[fy0:fy1, fx0:fx1], g[fy0:fy1, fx0:fx1])
            pk.append(psnr_from_mse(float(sq[keep].mean())))
    med = lambda x: float(np.median(x)) if x else None  # noqa: E731
    return {"psnr_mouth": med(pm), "sharpness_ratio": med(sr), "psnr_face_kept": med(pk), "frames": len(pm)}


def _abs_diff(frames: np.ndarray, t: int, reg: FrameRegions) -> float:
    """Mean |frame t - frame t-1| over the head region of frame t (8-bit levels)."""
    import cv2

    y0, y1, x0, x1 = reg.box
    d = cv2.absdiff(frames[t, y0:y1, x0:x1], frames[t - 1, y0:y1, x0:x1])
    # (K, 3) pixels under the mask; one flat mean (a mean over a size-3 axis is slow)
    return float(d[reg.head[y0:y1, x0:x1]].mean(dtype=np.float64))


def _sq_err(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel squared error averaged over RGB, float32 `(H, W)`."""
    d = a.astype(np.float32) - b.astype(np.float32)
    return np.einsum("hwc,hwc->hw", d, d) / 3.0


def _identity(gen: TrackedVideo, ref: TrackedVideo, cfg: EvalConfig, embedder):
    from tccp.metrics.identity import identity_similarity, load_embedder

    if not cfg.identity:
        return None, "identity disabled"
    if embedder is None:
        embedder, why = load_embedder()
        if embedder is None:
            return None, why
    both = gen.found & ref.found
    res = identity_similarity(
        embedder, ref.frames, gen.frames, ref.landmarks, gen.landmarks, both, cfg.identity_frames
    )
    if res is None:
        return None, "no frame with a face in both videos"
    return res, None


# --------------------------------------------------------------------------- files


def evaluate_files(
    generated: str | os.PathLike,
    real: str | os.PathLike | None = None,
    audio: str | os.PathLike | None = None,
    cfg: EvalConfig | None = None,
    max_seconds: float | None = None,
) -> EvalResult:
    """Load, track and evaluate files. Audio: `audio`, else the real video's own track
    (reconstruction), else the generated video's track, else none."""
    from tccp.media.io import load_clip, probe

    cfg = cfg or EvalConfig()
    gpath = Path(generated)
    rpath = Path(real) if real is not None else None
    apath = Path(audio) if audio is not None else None
    if apath is None:
        for cand in (rpath, gpath):
            if cand is not None and probe(cand).has_audio:
                apath = cand
                break
    gclip = load_clip(gpath, apath, require_audio=False, max_seconds=max_seconds)
    rclip = load_clip(rpath, require_audio=False, max_seconds=max_seconds) if rpath else None
    gen = track_frames(gclip.frames)
    ref = track_frames(rclip.frames) if rclip is not None else None
    anchor_name, anchor = (rpath, ref) if ref is not None else (gpath, gen)
    if not anchor.found.any():
        raise TCCPError(f"{anchor_name}: no face found in {len(anchor.found)} frames")
    result = evaluate_arrays(gen, ref, gclip.audio, sr=gclip.sr, fps=gclip.fps, cfg=cfg)
    result.metrics["inputs"] = {
        "generated": str(gpath),
        "real": str(rpath) if rpath else None,
        "audio": str(apath) if apath else None,
        "size": list(gen.frames.shape[1:3]),
    }
    return result


# --------------------------------------------------------------------------- JSON


def to_jsonable(obj: Any, digits: int = 6) -> Any:
    """Plain JSON types: NaN/inf -> None, numpy scalars -> Python, floats rounded."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, digits) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), digits)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return round(x, digits) if math.isfinite(x) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return to_jsonable(asdict(obj), digits)
    return obj


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """Write `data` as indented JSON atomically; returns the path."""
    p = Path(path)
    with atomic_path(p) as tmp:
        tmp.write_text(json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n")
    return p
