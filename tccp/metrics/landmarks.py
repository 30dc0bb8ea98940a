"""Stage-1 measures: generated landmarks against the tracked ones of the same clip.

Reconstruction: a clip's own audio drives stage 1 and its tracked landmarks are the
truth. Reported per clip, on head-frame meshes (scale-free: unit = eye-corner distance):
- `aperture_corr`: Pearson correlation of the inner-lip opening, generated vs tracked;
- `lag`: the shift (frames, |lag| <= 5) that maximises that correlation (> 0: generated
  lags the real mouth);
- `lip_lmd`: mean distance of the 40 lip points (IP_LAP's LipLMD, head-frame units);
- `silence_ratio`: spread (std) of the generated aperture in silent stretches (voice
  activity < 0.2 for >= 5 frames) over its spread in speech; the target is <= 0.3;
  `silence_open`: its mean opening there above the clip's most closed mouth (5th
  percentile), in the same units (a mouth that rests closed scores ~0).
Baselines measured on the same clips: "mean lips" (the references' mean mouth held
still) and "energy" (the rest mouth opened in proportion to the audio's RMS energy, with
the gain fitted on the clip itself, i.e. the best any energy mapping can do).

Head mode (`head_metrics`) adds the whole sketch and the pose: `sketch_lmd` over every
sketch point; the pose's RMS errors (in-plane angle in degrees, head position in
crop fractions, log scale) and `pose_motion_ratio` (std of the generated angle / the
real one: 0 is a frozen head), each against "hold" (the references' mean shape and
pose held still, what a frozen head scores).
"""

from __future__ import annotations

import numpy as np

from tccp.face import headframe as hf
from tccp.metrics.lipsync import best_lag, pearson

__all__ = ["silent_frames", "stage1_metrics", "energy_baseline", "mean_lips_baseline", "head_metrics"]


def silent_frames(vad: np.ndarray, threshold: float = 0.2, min_run: int = 5) -> np.ndarray:
    """Frames inside runs of at least `min_run` frames with voice activity < threshold."""
    quiet = np.asarray(vad) < threshold
    out = np.zeros_like(quiet)
    i = 0
    while i < len(quiet):
        if quiet[i]:
            j = i
            while j < len(quiet) and quiet[j]:
                j += 1
            if j - i >= min_run:
                out[i:j] = True
            i = j
        else:
            i += 1
    return out


def stage1_metrics(gen: np.ndarray, real: np.ndarray, vad: np.ndarray | None = None) -> dict:
    """gen, real (N, 478, 2) head-frame meshes (N, 478, 2) -> measures (see module doc)."""
    ag, ar = hf.aperture(gen), hf.aperture(real)
    lips = list(hf.LIPS)
    out = {
        "aperture_corr": pearson(ag, ar),
        "lip_lmd": float(np.linalg.norm(gen[:, lips] - real[:, lips], axis=-1).mean()),
        "aperture_mean": float(ag.mean()),
        "aperture_std": float(ag.std()),
    }
    out["lag"] = best_lag(ar, ag, max_lag=5).lag
    if vad is not None:
        sil = silent_frames(vad)
        speech = np.asarray(vad) > 0.5
        out["silent_frames"] = int(sil.sum())
        if sil.sum() >= 5 and speech.sum() >= 10:
            spread = max(float(ag[speech].std()), 1e-6)
            closed = float(np.percentile(ag, 5))
            out["silence_ratio"] = float(ag[sil].std() / spread)
            out["silence_open"] = float((ag[sil].mean() - closed) / spread)
            out["silence_aperture"] = float(ag[sil].mean())
        else:
            out["silence_ratio"] = out["silence_open"] = None
    return out


def mean_lips_baseline(real: np.ndarray, anchor_mesh: np.ndarray) -> np.ndarray:
    """The references' mean mouth held still on every frame."""
    out = np.array(real, np.float32, copy=True)
    idx = list(hf.MOUTH)
    out[:, idx] = anchor_mesh[idx]
    return out


def energy_baseline(real: np.ndarray, rest: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """Rest mouth, lower lip and jaw moved down by gain * normalised energy; the gain is
    least-squares fitted on the real lower-lip displacement (an optimistic baseline)."""
    e = np.asarray(energy, np.float64)
    e = (e - e.min()) / max(e.max() - e.min(), 1e-9)
    lower = [i for i in hf.MOUTH if rest[i, 1] > rest[14, 1] - 1e-6]  # on/below the inner lower lip
    dy_real = (real[:, lower, 1] - rest[lower, 1]).mean(1)
    gain = float((e * dy_real).sum() / max((e * e).sum(), 1e-9))
    out = np.array(real, np.float32, copy=True)
    idx = list(hf.MOUTH)
    out[:, idx] = rest[idx]
    out[:, lower, 1] += (gain * e)[:, None]
    return out


def head_metrics(gen: np.ndarray, gen_pose: np.ndarray, real: np.ndarray, real_pose: np.ndarray,
                 anchor_mesh: np.ndarray, ref_pose: np.ndarray) -> dict:
    """Head mode: gen/real (N, 478, 2) head-frame meshes, (N, 4) pose params (log
    scale, angle, origin x, y in crop units), anchor_mesh (478, 2) and ref_pose (4,) the
    references' mean -> whole-sketch and pose measures with the "hold" baseline."""
    from tccp.face.sketch import SKETCH_INDICES

    idx = list(SKETCH_INDICES)
    gp, rp = np.asarray(gen_pose, np.float64), np.asarray(real_pose, np.float64)
    hold = np.broadcast_to(np.asarray(ref_pose, np.float64), rp.shape)

    def pose_err(p: np.ndarray) -> dict:
        d = p - rp
        return {"angle_deg": float(np.degrees(np.sqrt((d[:, 1] ** 2).mean()))),
                "origin": float(np.sqrt((d[:, 2:] ** 2).sum(1).mean())),
                "log_scale": float(np.sqrt((d[:, 0] ** 2).mean()))}

    out = {"sketch_lmd": float(np.linalg.norm(gen[:, idx] - real[:, idx], axis=-1).mean()),
           "baseline_hold_sketch_lmd": float(np.linalg.norm(anchor_mesh[idx][None] - real[:, idx], axis=-1).mean())}
    for k, v in pose_err(gp).items():
        out[f"pose_{k}"] = v
    for k, v in pose_err(hold).items():
        out[f"baseline_hold_pose_{k}"] = v
    out["pose_motion_ratio"] = float(gp[:, 1].std() / max(rp[:, 1].std(), 1e-9))
    return out
