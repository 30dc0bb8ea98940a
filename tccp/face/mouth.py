"""Mouth-opening control: scale the audio-driven lip opening by a factor.

ControlTalk (eq. 3) edits expression as `E' = E + alpha * dE`: the audio-driven part of
the expression is scaled by alpha (0 = mouth closed whatever the syllable, 1 = as
predicted, > 1 exaggerated). TCCP has no expression coefficients, but its stage-1 ->
stage-2 interface is an explicit lip geometry: the landmark *sketch* (colour-coded
polylines, `tccp.face.sketch`). The "neutral" of the lips is the closed mouth (inner lips
meeting on the lip midline), so the audio-driven part is the inner lips' displacement
from that midline, and the edit scales it:

- `scale_mouth_landmarks(lm, s)`: on mesh landmarks (where they are explicit). Each
  upper/lower inner-lip pair moves about its midpoint by `s`; the outer lip lines move
  rigidly with the inner line above/below them, so lip thickness is kept.
- `warp_mouth(sketch, s)`: the same edit on a sketch *image*. The engine only has sketch
  images at the point where the edit must happen (the tracked sketches the session
  drew, or stage 1's sketch latent decoded by TAEF2), so the lips are found by their
  colours, and the image is remapped vertically about the lip midline: rows inside the
  opening are scaled by `s`, the lip bands translate with the opening, and the shift
  tapers to zero over a band below/above the lips (chin, nose untouched).

Both are measured with the same number, `mouth_aperture` (inner-lip gap over the
inter-ocular distance, as `tccp.face.geometry.mouth_aperture`): `sketch_aperture` reads
it off a sketch image (lips and eye corners located by colour), so the effect of a
factor is measurable on exactly what drives stage 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from tccp.face.sketch import SKETCH_COLORS

__all__ = [
    "INNER_PAIRS",
    "UPPER_OUTER",
    "LOWER_OUTER",
    "scale_mouth_landmarks",
    "classify_parts",
    "part_pixels",
    "SketchMouth",
    "find_mouth",
    "sketch_aperture",
    "warp_mouth",
    "check_scale",
]

# Inner-lip points facing each other across the opening (upper, lower), left to right
# in mediapipe's mesh; the corners 78 / 308 belong to both lines and stay put.
INNER_PAIRS: tuple[tuple[int, int], ...] = (
    (191, 95), (80, 88), (81, 178), (82, 87), (13, 14), (312, 317), (311, 402), (310, 318), (415, 324),
)
INNER_CORNERS = (78, 308)
UPPER_OUTER = (185, 40, 39, 37, 0, 267, 269, 270, 409)
LOWER_OUTER = (146, 91, 181, 84, 17, 314, 405, 321, 375)
MAX_SCALE = 4.0
IOD_PER_CROP = 0.345
"""Inter-ocular distance over the face-crop side: the face box normalises the face's
scale, so this is nearly constant (measured on 5 shared clips: 0.317..0.383 between
people, +-2 % within a clip). The unit `sketch_aperture` falls back to when the eye
contours are not found (TAEF2 decodes of 64 px sketches blur them into the irises)."""


def check_scale(scale: float) -> float:
    """A usable factor or ValueError (0 .. MAX_SCALE; beyond that lips leave the face)."""
    s = float(scale)
    if not np.isfinite(s) or s < 0 or s > MAX_SCALE:
        raise ValueError(f"mouth scale must be between 0 and {MAX_SCALE:g}, got {scale}")
    return s


# --------------------------------------------------------------------------- landmarks


def scale_mouth_landmarks(landmarks: np.ndarray, scale: float) -> np.ndarray:
    """Mesh landmarks (..., 478, 2) with the lip opening scaled by `scale` about the
    closed-mouth shape (see module docstring); other points are unchanged."""
    s = check_scale(scale)
    lm = np.array(landmarks, dtype=np.float64, copy=True)
    up = np.array([p[0] for p in INNER_PAIRS])
    lo = np.array([p[1] for p in INNER_PAIRS])
    mid = 0.5 * (lm[..., up, :] + lm[..., lo, :])
    d_up = (s - 1.0) * (lm[..., up, :] - mid)  # displacement of each upper inner point
    d_lo = (s - 1.0) * (lm[..., lo, :] - mid)
    # the outer lip lines follow the inner line next to them (interpolated along the
    # mouth, zero at the corners), so each lip moves as a rigid band
    corners = lm[..., list(INNER_CORNERS), :]

    def follow(outer: tuple[int, ...], inner: np.ndarray, disp: np.ndarray) -> np.ndarray:
        flat_lm = lm.reshape(-1, lm.shape[-2], 2)
        flat_in = inner.reshape(-1, inner.shape[-2], 2)
        flat_d = disp.reshape(-1, disp.shape[-2], 2)
        flat_c = corners.reshape(-1, 2, 2)
        out = np.zeros((flat_lm.shape[0], len(outer), 2))
        for b in range(flat_lm.shape[0]):
            xs = np.concatenate([flat_c[b, :1, 0], flat_in[b, :, 0], flat_c[b, 1:, 0]])
            order = np.argsort(xs)
            for k in range(2):
                ds = np.concatenate([[0.0], flat_d[b, :, k], [0.0]])
                out[b, :, k] = np.interp(flat_lm[b, list(outer), 0], xs[order], ds[order])
        return out.reshape(lm.shape[:-2] + (len(outer), 2))

    d_uo = follow(UPPER_OUTER, lm[..., up, :], d_up)
    d_lo_out = follow(LOWER_OUTER, lm[..., lo, :], d_lo)
    lm[..., up, :] += d_up
    lm[..., lo, :] += d_lo
    lm[..., list(UPPER_OUTER), :] += d_uo
    lm[..., list(LOWER_OUTER), :] += d_lo_out
    return lm.astype(np.asarray(landmarks).dtype if np.asarray(landmarks).dtype.kind == "f" else np.float32)


# --------------------------------------------------------------------------- sketch images

_PART_NAMES = tuple(SKETCH_COLORS)
_PART_RGB = np.array([SKETCH_COLORS[k] for k in _PART_NAMES], np.float32)  # (K, 3)


def classify_parts(sketch: np.ndarray, tol: float = 48.0, min_strength: float = 0.3
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every lit pixel of a sketch assigned to a part: (flat pixel index, part index
    into `tccp.face.sketch.SKETCH_COLORS`, strength); see `part_pixels`."""
    img = np.asarray(sketch, np.float32).reshape(-1, 3)
    lit = np.flatnonzero(img.max(axis=1) >= min_strength * 100.0)  # most of a sketch is black
    px = img[lit]
    cc = (_PART_RGB * _PART_RGB).sum(1)  # (K,)
    alpha = np.clip(px @ _PART_RGB.T / cc, 0.0, 1.5)  # (P, K)
    resid = np.linalg.norm(px[:, None, :] - alpha[:, :, None] * _PART_RGB[None], axis=2)
    resid = np.where(alpha >= min_strength, resid, np.inf)
    best = resid.argmin(axis=1)
    rows = np.arange(len(best))
    ok = resid[rows, best] < tol
    return lit[ok], best[ok], np.minimum(alpha[rows, best], 1.0)[ok].astype(np.float64)


def part_pixels(sketch: np.ndarray, part: str, tol: float = 48.0, min_strength: float = 0.3,
                classes: tuple | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels of one coloured sketch part: (ys, xs, strength).

    A pixel is modelled as `strength x colour` (anti-aliased lines on black, and TAEF2's
    blurry decodes of sketch latents, are darker versions of the part colour); it
    belongs to the part whose colour explains it with the smallest residual, if that
    residual is under `tol` and the strength over `min_strength`. `classes` reuses a
    `classify_parts` result of the same image.
    """
    idx, lab, strength = classes if classes is not None else classify_parts(sketch, tol, min_strength)
    sel = lab == _PART_NAMES.index(part)
    w = np.asarray(sketch).shape[1]
    ys, xs = np.divmod(idx[sel], w)
    return ys.astype(np.float64), xs.astype(np.float64), strength[sel]


@dataclass
class SketchMouth:
    """Lip geometry read off a sketch image (pixels)."""

    x0: float  # inner-lip extent (mouth corners)
    x1: float
    a: float  # lip midline y = a + b * x
    b: float
    aperture_px: float  # inner-lip gap (line centre to line centre) at the mouth centre
    upper_px: float  # upper lip band: inner line to the top of the outer line
    lower_px: float  # lower lip band
    inter_ocular_px: float | None  # outer eye corners distance
    inter_ocular_estimated: bool = False  # eyes not found: IOD_PER_CROP x crop side

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def aperture(self) -> float:
        """Gap over the inter-ocular distance: `mouth_aperture`'s unit."""
        if not self.inter_ocular_px:
            return float("nan")
        return self.aperture_px / self.inter_ocular_px


def _runs(values: np.ndarray, weights: np.ndarray, gap: float) -> list[tuple[float, float]]:
    """Weighted centres of clusters of sorted 1-D values split where they are > gap apart."""
    order = np.argsort(values)
    v, w = values[order], weights[order]
    out, start = [], 0
    for i in range(1, len(v) + 1):
        if i == len(v) or v[i] - v[i - 1] > gap:
            ww = w[start:i]
            out.append((float(np.average(v[start:i], weights=ww)), float(ww.sum())))
            start = i
    return out


def _wvar(v: np.ndarray, w: np.ndarray) -> float:
    mu = np.average(v, weights=w)
    return float(np.average((v - mu) ** 2, weights=w))


def _centre_gap(iy, ix, iw, oy, ox, ow, a: float, b: float, xc: float, width: float) -> float:
    """Inner-lip gap in px at the mouth's centre columns, sub-pixel.

    Per column: two separate inner-lip runs give the distance of their centres; lines
    too close to separate (small openings at 64 px) form one run whose spread is that
    of one line plus (gap/2)^2, so the gap is read from the excess spread over the
    upper outer lip line in the same column (same thickness, same drawing).
    """
    gaps = []
    for x in range(int(round(xc)) - 1, int(round(xc)) + 2):
        mid = a + b * x
        c = (ix == x) & (np.abs(iy - mid) < 0.5 * width)
        if not c.any():
            continue
        d, w = iy[c] - mid, iw[c]
        runs = _runs(d, w, gap=1.5)
        if len(runs) >= 2:
            top = sorted(sorted(runs, key=lambda r: -r[1])[:2])  # the two heaviest: upper, lower
            gaps.append(max(0.0, top[1][0] - top[0][0]))
            continue
        co = (ox == x) & (oy < mid)
        if not co.any():
            continue
        do, wo = oy[co] - mid, ow[co]
        line = min(_runs(do, wo, gap=1.5), key=lambda r: r[0])  # the upper outer line
        near = np.abs(do - line[0]) < 2.0
        gaps.append(2.0 * np.sqrt(max(0.0, _wvar(d, w) - _wvar(do[near], wo[near]))))
    return float(np.mean(gaps)) if gaps else 0.0


def _inter_ocular(sketch: np.ndarray, classes: tuple | None = None) -> float | None:
    """Outer eye corners: the extreme x of the two eye contours (mesh 33 and 263)."""
    ry, rx, _ = part_pixels(sketch, "right_eye", classes=classes)
    ly, lx, _ = part_pixels(sketch, "left_eye", classes=classes)
    if len(rx) < 3 or len(lx) < 3:
        return None
    # the subject's right eye is on the image's left
    i, j = int(np.argmin(rx)), int(np.argmax(lx))
    d = float(np.hypot(lx[j] - rx[i], ly[j] - ry[i]))
    return d if d > 1.0 else None


def find_mouth(sketch: np.ndarray, tol: float = 48.0) -> SketchMouth | None:
    """The lips of a sketch image, or None when they cannot be found."""
    classes = classify_parts(sketch, tol)
    oy, ox, ow = part_pixels(sketch, "lips_outer", classes=classes)
    if len(ox) < 4:
        return None
    # the outer (red) line is the most distinctive colour: it bounds where the inner
    # line can be (blends of other parts, e.g. iris over eye, can look pink)
    lo_x, hi_x = np.percentile(ox, [2, 98])
    lo_y, hi_y = np.percentile(oy, [2, 98])
    pad = 2.0 + 0.1 * (hi_x - lo_x)
    keep = (ox >= lo_x - pad) & (ox <= hi_x + pad) & (oy >= lo_y - pad) & (oy <= hi_y + pad)
    oy, ox, ow = oy[keep], ox[keep], ow[keep]
    iy, ix, iw = part_pixels(sketch, "lips_inner", classes=classes)
    inside = (ix >= lo_x - pad) & (ix <= hi_x + pad) & (iy >= lo_y - pad) & (iy <= hi_y + pad)
    iy, ix, iw = iy[inside], ix[inside], iw[inside]
    if len(ix) < 4:
        return None
    x0, x1 = float(ix.min()), float(ix.max())
    if x1 - x0 < 2:
        return None
    # midline: the inner lines are symmetric about it, so a weighted line fit through
    # all inner-lip pixels runs along it (tilted with head roll)
    b, a = np.polyfit(ix, iy, 1, w=np.sqrt(iw)) if len(set(ix.tolist())) > 1 else (0.0, float(iy.mean()))
    xc, half = 0.5 * (x0 + x1), 0.5 * (x1 - x0)
    aperture = _centre_gap(iy, ix, iw, oy, ox, ow, a, b, xc, x1 - x0)
    upper = lower = max(1.0, 0.15 * (x1 - x0))  # fallback lip thickness
    if len(ox):
        d_out = oy - (a + b * ox)
        oc = np.abs(ox - xc) <= max(1.0, 0.25 * half)
        if (oc & (d_out < 0)).any():
            upper = max(1.0, float(-d_out[oc & (d_out < 0)].min()) - 0.5 * aperture)
        if (oc & (d_out > 0)).any():
            lower = max(1.0, float(d_out[oc & (d_out > 0)].max()) - 0.5 * aperture)
    iod = _inter_ocular(sketch, classes)
    estimated = iod is None
    if estimated:
        iod = IOD_PER_CROP * float(np.asarray(sketch).shape[1])
    return SketchMouth(x0, x1, float(a), float(b), float(aperture), upper, lower, iod, estimated)


def sketch_aperture(sketch: np.ndarray) -> float:
    """`mouth_aperture` measured on a sketch image (NaN if the lips are not found)."""
    m = find_mouth(sketch)
    return float("nan") if m is None else m.aperture


def _inverse_offsets(u_out: np.ndarray, h: np.ndarray, band: float, fall: float, s: float) -> np.ndarray:
    """Source distance from the midline for output distance `u_out` >= 0 on one side.

    Forward map (per column with half-opening h): u <= h -> s*u (the opening scales);
    h < u <= h+band -> u + (s-1)h (the lip translates); then the shift fades linearly
    to 0 over `fall` px; beyond, identity. Monotone by construction (fall is widened
    where needed), so it has this closed-form inverse.
    """
    k = (s - 1.0) * h
    a = h + band
    fall = np.maximum(fall, 1.5 * np.maximum(k, 0.0) + 1e-6)
    u = u_out.copy()
    inner_end = s * h
    if s > 0:
        m = u_out <= inner_end
        u[m] = u_out[m] / s
    else:
        m = u_out <= 0
        u[m] = h[m] if np.ndim(h) else h
    m_band = (u_out > inner_end) & (u_out <= a + k)
    u[m_band] = (u_out - k)[m_band]
    m_fall = (u_out > a + k) & (u_out <= a + fall)
    sol = (u_out - k - k * a / fall) / (1.0 - k / fall)
    u[m_fall] = sol[m_fall]
    return u


def warp_mouth(sketch: np.ndarray, scale: float, mouth: SketchMouth | None = None) -> np.ndarray:
    """The sketch with its lip opening scaled by `scale` (unchanged if no lips are found
    or `scale` is 1). uint8 (H, W, 3) in and out."""
    s = check_scale(scale)
    img = np.asarray(sketch)
    if s == 1.0:
        return img
    m = mouth if mouth is not None else find_mouth(img)
    if m is None or m.aperture_px <= 0.0:
        return img  # nothing to scale: a closed mouth stays closed at any factor
    hgt, wid = img.shape[:2]
    xs = np.arange(wid, dtype=np.float64)
    xc, half = 0.5 * (m.x0 + m.x1), 0.5 * m.width
    # half-opening along the mouth: an ellipse through the corners
    h = 0.5 * m.aperture_px * np.sqrt(np.clip(1.0 - ((xs - xc) / max(half, 1e-6)) ** 2, 0.0, 1.0))
    mid = m.a + m.b * xs  # (W,)
    ys = np.arange(hgt, dtype=np.float64)[:, None]  # (H, 1)
    d = ys - mid[None, :]  # signed distance below the midline, (H, W)
    hh = np.broadcast_to(h[None, :], d.shape)
    fall = 0.35 * m.width
    src = d.copy()
    up = d < 0
    lo = ~up
    src[up] = -_inverse_offsets(-d[up], hh[up], m.upper_px, fall, s)
    src[lo] = _inverse_offsets(d[lo], hh[lo], m.lower_px, fall, s)
    map_y = (mid[None, :] + src).astype(np.float32)
    map_x = np.broadcast_to(xs[None, :], d.shape).astype(np.float32)
    out = cv2.remap(np.ascontiguousarray(img), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out
