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

__all__ = ["MAX_SCALE", "JAW_SIDES", "check_scale", "jaw_side_weights", "keep_jaw_sides", "scale_opening"]

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


JAW_SIDES = True
"""Mouth mode: the generated jaw contour's sides are the source's own (`keep_jaw_sides`)."""


def jaw_side_weights() -> np.ndarray:
    """(17,) share of the generated position along `hf.JAW` (cheek by the ear, round
    the chin, to the other cheek): 0 at both ends, 1 at the chin, smooth in between."""
    k = np.arange(len(hf.JAW), dtype=np.float64)
    mid = (len(hf.JAW) - 1) / 2
    return (np.sin(np.pi / 2 * (1 - np.abs(k - mid) / mid)) ** 2).astype(np.float32)


def keep_jaw_sides(gen: np.ndarray, src: np.ndarray) -> np.ndarray:
    """Head-frame meshes `gen` (N, 478, 2) with their jaw contour pulled back onto the
    source's `src` (N, 478, 2) towards the ears (`jaw_side_weights`). Speech moves the
    chin, hardly the jaw's sides; those follow the head, and the head is the source's.
    A generated contour drawn for a frontal rest shape leaves a turned or grimacing
    face's cheek line elsewhere, and the warped reference then shows its own
    background or earring inside the cheek (seen on `lp_d3`, dubbed)."""
    out = np.array(gen, np.float32, copy=True)
    idx = list(hf.JAW)
    w = jaw_side_weights()[None, :, None]
    out[:, idx] = src[:, idx] + w * (out[:, idx] - src[:, idx])
    return out
