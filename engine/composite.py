"""Paste-back compositing: a generated face crop back into its source frame.

The generator works on a square crop; the viewer sees the whole frame. Three things
keep the seam invisible: the crop is mapped back with the exact inverse of the crop
transform (no half-pixel drift), only the head region is replaced and its edge is
feathered with a Gaussian, and the generated pixels are colour-matched (mean/std per
LAB channel) to the original head near the seam, so a lighting or white-balance
difference of the generator does not show as a sharp outline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from tccp.face.geometry import lip_mask

__all__ = [
    "crop_affine",
    "crop_box",
    "feather_mask",
    "colour_match",
    "paste_back",
    "CompositeSettings",
]

Box = Sequence[float]


@dataclass(frozen=True)
class CompositeSettings:
    feather: float = 0.06
    """Gaussian sigma of the mask edge, as a fraction of the crop size."""
    colour_match: bool = True
    ring: float = 0.12
    """Width of the band inside the head edge used for colour statistics (fraction of
    the crop size): that is where generated and original pixels must agree."""
    max_gain: float = 1.6
    """Clamp on the per-channel std ratio so a degenerate crop cannot blow up."""
    resample: int = cv2.INTER_CUBIC
    """Interpolation of the paste-back and of the references' detail. Each bilinear
    resampling at a fractional offset is a small blur; measured on 6 clips outside the
    validation set (tracked landmarks, so only compositing differs), see docs/faces.md."""


def crop_affine(box: Box, size: int) -> np.ndarray:
    """2x3 affine mapping crop pixel centres to frame coordinates for `box`.

    Pixel-centre convention: crop pixel (u, v) covers frame
    `x0 + (u + 0.5) * s - 0.5` with `s = (x1 - x0) / size`; its inverse is what a
    crop with `cv2.warpAffine(frame, inverse)` samples, so crop and paste-back are
    exact inverses of each other.
    """
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    sx = (x1 - x0) / size
    sy = (y1 - y0) / size
    return np.array(
        [[sx, 0.0, x0 + 0.5 * sx - 0.5], [0.0, sy, y0 + 0.5 * sy - 0.5]], np.float64
    )


def crop_box(frame: np.ndarray, box: Box, size: int) -> np.ndarray:
    """The `size x size` crop of `box` (edges replicated where the box leaves the frame)."""
    m = cv2.invertAffineTransform(crop_affine(box, size))
    return cv2.warpAffine(
        np.ascontiguousarray(frame), m, (size, size), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )


def feather_mask(mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """Soft version of a head mask in crop coordinates, zero at the crop border.

    The mask is eroded by about one sigma before blurring so that the soft edge sits
    on the head boundary rather than spilling 2 sigma into the background, and it is
    forced to zero at the crop border so the square box itself never shows.
    """
    is_bytes = np.asarray(mask).dtype == np.uint8
    m = np.asarray(mask, np.float32)
    if is_bytes:  # a 0-255 mask (a float mask may exceed 1.0 by rounding: never rescale it)
        m = m / 255.0
    size = m.shape[0]
    if sigma_px > 0:
        k = max(1, int(round(sigma_px)))
        m = cv2.erode(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)))
        m = cv2.GaussianBlur(m, (0, 0), sigmaX=sigma_px, sigmaY=sigma_px)
    # ramp to zero over the outer ~sigma pixels of the crop
    ramp_w = max(1.0, sigma_px)
    idx = np.arange(size, dtype=np.float32)
    edge = np.minimum(idx + 0.5, size - idx - 0.5)
    ramp = np.clip(edge / ramp_w, 0.0, 1.0)
    m = m * ramp[:, None] * ramp[None, :]
    return np.clip(m, 0.0, 1.0)


def _support(on: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), end-exclusive, of the True pixels of a 2-D mask; None if none."""
    cols, rows = np.flatnonzero(on.any(axis=0)), np.flatnonzero(on.any(axis=1))
    if not cols.size:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _ring(mask: np.ndarray, width_px: int) -> np.ndarray:
    hard = (np.asarray(mask, np.float32) > 0.5).astype(np.uint8)
    k = max(1, width_px)
    inner = cv2.erode(hard, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)))
    return (hard > 0) & (inner == 0)


def colour_match(
    generated: np.ndarray,
    original: np.ndarray,
    region: np.ndarray,
    max_gain: float = 1.6,
) -> np.ndarray:
    """Shift/scale each LAB channel of `generated` so that, inside `region`, its mean and
    std equal those of `original`. Returns uint8 RGB. A region of fewer than 16 pixels
    leaves the image unchanged (no reliable statistics)."""
    region = np.asarray(region, bool)
    if region.sum() < 16:
        return generated
    gen = cv2.cvtColor(generated.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    ref = cv2.cvtColor(original.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    g, r = gen[region], ref[region]
    g_mean, g_std = g.mean(0), g.std(0) + 1e-3
    r_mean, r_std = r.mean(0), r.std(0) + 1e-3
    gain = np.clip(r_std / g_std, 1.0 / max_gain, max_gain)
    out = (gen - g_mean) * gain + r_mean
    out[..., 0] = np.clip(out[..., 0], 0.0, 100.0)
    rgb = cv2.cvtColor(out.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


LIP_MATCH = True
"""Also match the edited lips' colour to the source frame's own lips (`match_lips`).
A/B on 14 clips (6 outside the validation set + the 8 validation clips, 3 s, one
sitting; docs/faces.md "Lip colour"): mouth-box PSNR +0.11 dB with generated landmarks
(12 of 14 clips up), +0.04 dB with tracked ones (11 of 14); mouth r and sharpness
unchanged."""
SOURCE_SKIN = True
"""Mouth region, a bank of the edited video's own frames (`ReferenceBank.own`): outside
the mouth (the lips grown by `SKIN_MARGIN`) the region shows the source frame itself
warped onto the target landmarks, at the source resolution, instead of the reference's
skin (`paste_mouth(source_skin=True)`): the frame's own light, stubble and creases, no
texture switch when the reference changes. A/B on 14 clips (6 outside the validation
set + the 8 validation clips, 3 s, one sitting; docs/faces.md "The skin stays the
source's"): generated landmarks 24.26 -> 25.21 dB mouth-box PSNR (13 clips up, none
down), sharpness 0.724 -> 0.764, mouth r unchanged (0.549 / 0.546). In reconstruction
the source frame is the real one, so part of that gain is the protocol's."""
SKIN_MARGIN = 0.15
"""The reference's share: the target's outer lip contour grown by this share of the
mouth's width (0.08: 25.35 dB, 0.25: 25.03 dB on the same A/B; a small margin lets a
tracking error show the source's own lip edge)."""
SKIN_FEATHER = 0.06
SKIN_REACH = True
"""Mouth region: past the region's edge, show the source frame warped onto the target
landmarks wherever that warp moves it by more than `SKIN_STILL` source px
(`_source_skin(reach=True)`), with the reference's skin or the source's inside. The
region is the union of the source's lower face and the target's; where the target closes
a jaw the source opened wide, its feathered lower edge used to blend the moved chin with
the frame's own, drawing the chin twice (docs/faces.md, "The edge follows the warp")."""
SKIN_STILL = (2.0, 6.0)
"""Displacement (source px) below which the frame past the region is left as it is, and
above which the warped frame replaces it; smooth in between. A shift of a pixel or two
blended with the frame is invisible and, in reconstruction, nearer the real frame (A/B
on 14 clips, generated landmarks: 25.22 dB without the reach, 25.18 dB at (2, 6), 25.09 dB
at (0.3, 1)); the second chin is the large shift's."""
SKIN_MAP_STEP = 2
"""The source-skin warp's map is computed every this many px and interpolated
(`warp_map(step=...)`): skin is smooth, the map is exact inside each triangle, and the
area (the region and, with `SKIN_REACH`, past it) is most of the face box. Error against
the exact map on a synthetic face (a 24 px jaw drop, 1 px landmark noise), in the region
away from the lips: 99.9 % under 0.94 px (step 4: 2.4 px, near the nostrils)."""
LIP_MAX_SHIFT = (12.0, 8.0, 8.0)
"""Largest LAB shift (L, a, b) `match_lips` applies: a mistracked source lip region
(teeth in it, a hand over the mouth) cannot repaint the mouth."""


def match_lips(edited: np.ndarray, original: np.ndarray, target_mesh: np.ndarray, source_mesh: np.ndarray,
               max_shift: Sequence[float] = LIP_MAX_SHIFT) -> np.ndarray:
    """Shift the colour of the edited lips (under `target_mesh`) so that their median
    LAB equals that of the source frame's own lips (`original` under `source_mesh`).

    The ring colour match evens out the skin at the region's edge; the lips inside come
    from a reference taken elsewhere in the video (other light, lipstick worn off, a
    wetter lip), and a source frame always shows the person's lips as they are now,
    whatever its mouth does. Mean shift only (no gain), median statistics, clamped to
    `max_shift`, feathered by a pixel at the lips' edge. Fewer than 16 lip pixels on
    either side: unchanged."""
    tm, sm = lip_mask(target_mesh, edited.shape[:2]), lip_mask(source_mesh, original.shape[:2])
    if tm.sum() < 16 or sm.sum() < 16:
        return edited
    gen = cv2.cvtColor(edited.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    ref = cv2.cvtColor(original.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    shift = np.clip(np.median(ref[sm], 0) - np.median(gen[tm], 0), -np.asarray(max_shift), np.asarray(max_shift))
    soft = cv2.GaussianBlur(tm.astype(np.float32), (0, 0), 1.0)
    out = gen + soft[..., None] * shift.astype(np.float32)
    out[..., 0] = np.clip(out[..., 0], 0.0, 100.0)
    rgb = cv2.cvtColor(out, cv2.COLOR_LAB2RGB)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def paste_back(
    frame: np.ndarray,
    crop: np.ndarray,
    box: Box,
    mask: np.ndarray,
    settings: CompositeSettings = CompositeSettings(),
) -> np.ndarray:
    """Blend the generated `crop` (size x size, for `box`) into a copy of `frame`.

    `mask` is the head region in crop coordinates (float [0, 1] or uint8), the part the
    generator was asked to fill. Only the frame region under the box is touched.
    """
    size = crop.shape[0]
    if crop.shape[:2] != (size, size) or mask.shape[:2] != (size, size):
        raise ValueError(f"crop {crop.shape} and mask {mask.shape} must be square and equal")
    out = np.array(frame, copy=True)
    h, w = out.shape[:2]
    m = crop_affine(box, size)
    # frame ROI covered by the box (one pixel margin for interpolation)
    x0 = max(0, int(np.floor(box[0])) - 1)
    y0 = max(0, int(np.floor(box[1])) - 1)
    x1 = min(w, int(np.ceil(box[2])) + 1)
    y1 = min(h, int(np.ceil(box[3])) + 1)
    if x1 <= x0 or y1 <= y0:
        return out  # box entirely outside the frame

    if settings.colour_match:
        original = crop_box(frame, box, size)
        ring = _ring(mask, max(1, int(round(settings.ring * size))))
        crop = colour_match(crop, original, ring, settings.max_gain)
    alpha = feather_mask(mask, settings.feather * size)
    # only the frame pixels under the alpha's support change: shrink the ROI to it (a
    # mouth region is ~40 % of the box), with a crop pixel of margin for interpolation
    box_a = _support(alpha > 0)
    if box_a is None:
        return out
    u0, v0, u1, v1 = box_a  # crop px; u1 - 1 is the last column with alpha
    x0 = max(x0, int(np.floor(m[0, 0] * (u0 - 1) + m[0, 2])) - 1)
    x1 = min(x1, int(np.ceil(m[0, 0] * u1 + m[0, 2])) + 2)
    y0 = max(y0, int(np.floor(m[1, 1] * (v0 - 1) + m[1, 2])) - 1)
    y1 = min(y1, int(np.ceil(m[1, 1] * v1 + m[1, 2])) + 2)
    if x1 <= x0 or y1 <= y0:
        return out

    m_roi = m.copy()
    m_roi[:, 2] -= (x0, y0)
    roi_w, roi_h = x1 - x0, y1 - y0
    warped = cv2.warpAffine(
        np.ascontiguousarray(crop), m_roi, (roi_w, roi_h),
        flags=settings.resample, borderMode=cv2.BORDER_REPLICATE,
    )
    a = cv2.warpAffine(
        alpha, m_roi, (roi_w, roi_h), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0.0,
    )
    # cv2.blendLinear does the per-pixel weighted sum in C (several times faster than
    # float numpy on a few hundred thousand pixels); weights must sum to > 0
    roi = np.ascontiguousarray(out[y0:y1, x0:x1])
    out[y0:y1, x0:x1] = cv2.blendLinear(warped, roi, a, np.float32(1.0) - a)
    return out


def _high_pass(bank, j: int, size: int) -> np.ndarray:
    """The part of reference `j` a `size` px crop cannot hold: itself minus its `size` px
    version (cached on the bank: computed once per reference)."""
    cache = bank.__dict__.setdefault("_high", {})
    if j not in cache:
        ref = bank.hires[j]
        rs = ref.shape[0]
        low = cv2.resize(cv2.resize(ref, (size, size), interpolation=cv2.INTER_AREA), (rs, rs),
                         interpolation=cv2.INTER_CUBIC)
        cache[j] = ref.astype(np.float32) - low.astype(np.float32)
    return cache[j]


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _source_skin(edited: np.ndarray, m: np.ndarray, frame: np.ndarray, box: Box, tri, source: np.ndarray,
                 targets: np.ndarray, settings: CompositeSettings, support: tuple[int, int, int, int],
                 skin: bool = True, reach: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The source frame warped from its own landmarks (`source`, big px) onto the
    target's (`targets`), used for `edited` (big x big, the crop pasted at the box's
    resolution) under the region `m`; returns the new (edited, m) for `paste_back`.

    `skin`: where the region reaches, away from the mouth, the edited skin is replaced by
    the warped frame. `reach`: past the region, the warped frame is shown wherever the
    warp moves it by more than `SKIN_STILL` source px (fading in over that range), so
    the region's feathered edge blends two pictures of the same geometry: a jaw the
    target closes is not drawn twice, once moved by the warp and once, faintly, where
    the source's own chin still is (docs/faces.md, "The edge follows the warp").
    `support`: `_support(m > 1e-3)`, found once by `paste_mouth` (never None there)."""
    from tccp.face import warp as fw
    from tccp.face.regions import lips_mask

    big = edited.shape[0]
    a = crop_affine(box, big)
    x0, y0, x1, y1 = support
    if reach:
        moving = fw.moving_box(tri, source, targets, SKIN_STILL[0] / a[0, 0])
        if moving is None and not skin:  # nothing past the region moves: the frame stays as it is
            return edited, m
        if moving is not None:
            x0, y0 = max(0, min(x0, int(np.floor(moving[0])))), max(0, min(y0, int(np.floor(moving[1]))))
            x1, y1 = min(big, max(x1, int(np.ceil(moving[2])) + 1)), min(big, max(y1, int(np.ceil(moving[3])) + 1))
    mx, my, _ = fw.warp_map(tri, source, targets, (y1 - y0, x1 - x0), (float(x0), float(y0)), step=SKIN_MAP_STEP)
    # the map is in the box's pixels at `big`: read the frame itself through it (one
    # resampling, instead of cropping the box first and warping the crop)
    fx, fy = (mx * a[0, 0] + a[0, 2]).astype(np.float32), (my * a[1, 1] + a[1, 2]).astype(np.float32)
    warped = cv2.remap(np.ascontiguousarray(frame), fx, fy, settings.resample,
                       borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
    part = edited[y0:y1, x0:x1].astype(np.float32)
    if skin:
        keep = lips_mask(targets, (y1 - y0, x1 - x0), (float(x0), float(y0)), SKIN_MARGIN, SKIN_FEATHER)[..., None]
        part = part * keep + warped * (1.0 - keep)
    region = m[y0:y1, x0:x1]
    if reach:
        gx = np.arange(x0, x1, dtype=np.float32)[None, :]
        gy = np.arange(y0, y1, dtype=np.float32)[:, None]
        shift = np.hypot(mx - gx, my - gy) * np.float32(a[0, 0])  # source px
        lo, hi = SKIN_STILL
        past = _smoothstep((shift - lo) / (hi - lo)) * (1.0 - region)
        region = region + past
        r = region[..., None]
        part = (part * (r - past[..., None]) + warped * past[..., None]) / np.maximum(r, 1e-6)
        m = np.array(m, copy=True)
        m[y0:y1, x0:x1] = region
    out = np.array(edited, copy=True)
    out[y0:y1, x0:x1] = np.clip(part + 0.5, 0, 255).astype(np.uint8)
    return out, m


def paste_mouth(
    frame: np.ndarray,
    crop: np.ndarray,
    box: Box,
    mask: np.ndarray,
    targets: np.ndarray | None = None,
    bank=None,
    ref_index: int = -1,
    tri=None,
    settings: CompositeSettings = CompositeSettings(),
    detail: bool = True,
    align: bool = False,
    source_mesh: np.ndarray | None = None,
    source_skin: bool | None = None,
) -> np.ndarray:
    """Paste an edited crop (the source crop with its regenerated mouth patch) into the
    frame at the source resolution, under the region `mask` (crop px, float).

    A 128 px crop upsampled 2-4x to the source is soft; the mouth would look blurred
    beside the sharp source. So the crop is upsampled to the box's size and the
    reference's own high frequencies are added back: the bank keeps each reference at
    the source resolution, which is warped onto the target landmarks there (`targets`,
    crop px) and high-pass filtered (itself minus its 128 px version); `align` (the
    head region) moves the reference by its skull points first (`warp_map(align=True)`). Colour is
    matched at the crop's scale on a ring just inside the region's edge (where edited
    and original pixels meet), and the edge is the mask's own feather. `source_skin`
    (None: `SOURCE_SKIN` for a bank of the source's own frames, `ReferenceBank.own`)
    keeps the source frame's own skin away from the mouth (`_source_skin`); not in
    the head region (`align`).
    """
    from engine.refs import hires_size

    size = crop.shape[0]
    mask = np.asarray(mask, np.float32)
    if not (mask > 1e-3).any():
        return np.array(frame, copy=True)
    if settings.colour_match:
        original = crop_box(frame, box, size)
        ring = _ring(mask, max(1, int(round(settings.ring * size * 0.5)))) & (mask > 0.5)
        crop = colour_match(crop, original, ring, settings.max_gain)
    if LIP_MATCH and source_mesh is not None and targets is not None and not align:
        crop = match_lips(crop, crop_box(frame, box, size), np.asarray(targets), np.asarray(source_mesh))
    big = hires_size(box)
    edited = cv2.resize(crop, (big, big), interpolation=cv2.INTER_CUBIC)  # uint8
    m = np.clip(cv2.resize(mask, (big, big), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    sup = _support(m > 1e-3)  # where the region reaches at `big`: the detail's and the skin's box
    if sup is None:  # the mask vanished in the resize: nothing to paste
        return np.array(frame, copy=True)
    if detail and bank is not None and targets is not None and tri is not None and 0 <= ref_index < len(bank) \
            and bank.hires[ref_index] is not None:
        from tccp.face import warp as fw

        ref = bank.hires[ref_index]
        rs = ref.shape[0]
        x0, y0, x1, y1 = sup  # the detail goes where the mask reaches: its box only
        cavity = np.zeros((y1 - y0, x1 - x0), np.float32) if fw.MOUTH_CAVITY > 0 else None
        mx, my, _ = fw.warp_map(tri, bank.meshes[ref_index] * (rs / size), np.asarray(targets) * (big / size),
                                (y1 - y0, x1 - x0), (float(x0), float(y0)), align=align, cavity=cavity)
        high = cv2.remap(_high_pass(bank, ref_index, size), mx, my, settings.resample, borderMode=cv2.BORDER_CONSTANT)
        if cavity is not None:  # no smeared detail where the mouth's inside is darkened
            high = fw.darken(high, cavity, tone=0.0)
        part = edited[y0:y1, x0:x1].astype(np.float32) + high
        edited[y0:y1, x0:x1] = np.clip(part + 0.5, 0, 255).astype(np.uint8)
    if source_skin is None:
        source_skin = SOURCE_SKIN and bool(getattr(bank, "own", False))
    if (source_skin or SKIN_REACH) and source_mesh is not None and targets is not None and tri is not None \
            and not align:
        edited, m = _source_skin(edited, m, frame, box, tri, np.asarray(source_mesh) * (big / size),
                                 np.asarray(targets) * (big / size), settings, sup, skin=source_skin,
                                 reach=SKIN_REACH)
    flat = CompositeSettings(feather=0.0, colour_match=False, resample=settings.resample)
    return paste_back(frame, edited, box, m, flat)
