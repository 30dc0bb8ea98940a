"""Mouth-opening control (ControlTalk's alpha) on stage 1's coordinates.

ControlTalk (eq. 3) edits expression as `E' = E + alpha * dE`: the audio-driven part
is scaled by alpha (0 = mouth closed whatever the syllable, 1 = as generated, > 1
exaggerated). Stage 1 generates explicit lip and jaw coordinates in the head frame, so
the audio-driven part is their vertical displacement from the person's rest (closed)
mouth, and `scale_opening` scales exactly that before stage 2 draws the mouth
(`--mouth-scale F`; applied per session by `engine.runner`, tracked landmarks too).
"""

from __future__ import annotations

import numpy as np

from tccp.face import headframe as hf

__all__ = ["MAX_SCALE", "check_scale", "scale_opening"]

MAX_SCALE = 4.0


def check_scale(scale: float) -> float:
    """A usable factor or ValueError (0 .. MAX_SCALE; beyond that lips leave the face)."""
    s = float(scale)
    if not np.isfinite(s) or s < 0 or s > MAX_SCALE:
        raise ValueError(f"mouth scale must be between 0 and {MAX_SCALE:g}, got {scale}")
    return s


def scale_opening(heads: np.ndarray, rest: np.ndarray, factor: float) -> np.ndarray:
    """Mouth-opening control on head-frame meshes: lips and jaw move `factor` times as
    far from the rest (closed) shape as generated, vertically (0 closes the mouth, 1
    leaves it, 2 doubles the opening); horizontal motion (spreading, rounding) stays."""
    if factor == 1.0:
        return heads
    out = np.array(heads, np.float32, copy=True)
    idx = list(hf.MOUTH)
    dy = out[:, idx, 1] - rest[idx, 1]
    out[:, idx, 1] = rest[idx, 1] + factor * dy
    return out
