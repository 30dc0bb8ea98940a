"""Pixel fidelity inside and outside the head mask, and along its border.

The engine only regenerates the head; everything else is pasted back from the source.
So fidelity is measured in three disjoint places that fail for different reasons:
- inside the mask: how close the generated face is to the real one (reconstruction);
- outside the mask: must be (near) identical to the real frame; a drop here means the
  compositor touched pixels it must not (wrong mask, colour shift, resize blur);
- a thin band around the mask edge: where blending seams show up.

Scores are per frame, then averaged, so one bad frame is visible in the series.
PSNR of identical images is infinite; it is capped at `PSNR_CAP` dB so that results
stay finite numbers in JSON and averages stay meaningful.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "PSNR_CAP",
    "masked_mse",
    "masked_psnr",
    "masked_ssim",
    "ssim_map",
    "border_band",
    "psnr_from_mse",
]

PSNR_CAP = 100.0  # dB; what identical images score (MSE 0)

# SSIM constants of Wang et al. 2004 (K1 = 0.01, K2 = 0.03, 8-bit range)
_C1 = (0.01 * 255.0) ** 2
_C2 = (0.03 * 255.0) ** 2


def psnr_from_mse(mse: float, max_val: float = 255.0, cap: float = PSNR_CAP) -> float:
    """PSNR in dB; `cap` for MSE 0, NaN when there were no pixels to compare."""
    if not np.isfinite(mse):
        return float("nan")
    if mse <= 0.0:
        return float(cap)
    return float(min(cap, 10.0 * math.log10(max_val * max_val / mse)))


def _as_stack(x: np.ndarray) -> np.ndarray:
    # RGB images: (H, W, 3) is one frame, (N, H, W, 3) a stack
    x = np.asarray(x)
    return x[None] if x.ndim == 3 else x


def _mask_stack(mask: np.ndarray | None, n: int, h: int, w: int) -> np.ndarray:
    if mask is None:
        return np.ones((n, h, w), bool)
    m = np.asarray(mask).astype(bool)
    if m.ndim == 2:
        m = np.broadcast_to(m, (n, h, w))
    if m.shape != (n, h, w):
        raise ValueError(f"mask shape {m.shape} does not match frames ({n}, {h}, {w})")
    return m


def masked_mse(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-frame MSE over the pixels where `mask` is true: `(N,)` float64.

    `a`, `b`: `(H, W, 3)` or `(N, H, W, 3)`; `mask`: `(H, W)` (same for all frames) or
    `(N, H, W)`, None for the whole frame. Frames with an empty mask give NaN.
    """
    a, b = _as_stack(a), _as_stack(b)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    n, h, w = a.shape[:3]
    m = _mask_stack(mask, n, h, w)
    out = np.full(n, np.nan)
    for i in range(n):
        sel = m[i]
        count = int(sel.sum())
        if count == 0:
            continue
        d = a[i][sel].astype(np.float64) - b[i][sel].astype(np.float64)
        out[i] = float(np.mean(d * d))
    return out


def masked_psnr(
    a: np.ndarray,
    b: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    max_val: float = 255.0,
    cap: float = PSNR_CAP,
    per_frame: bool = False,
) -> float | np.ndarray:
    """PSNR (dB) of `b` against `a` over the masked pixels, averaged over frames.

    Identical images give `cap` (100 dB) instead of infinity. With `per_frame` the
    `(N,)` series is returned; frames whose mask is empty are NaN and skipped in the mean.
    """
    series = np.array([psnr_from_mse(m, max_val, cap) for m in masked_mse(a, b, mask)])
    if per_frame:
        return series
    return float(np.nanmean(series)) if np.isfinite(series).any() else float("nan")


def _luma(img: np.ndarray) -> np.ndarray:
    x = np.asarray(img, np.float32)
    if x.ndim == 3:
        x = x @ np.array([0.299, 0.587, 0.114], np.float32)  # BT.601 luma
    return x


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM map of two `(H, W[, 3])` uint8 images on luma (BT.601): `(H, W)` float32.

    Gaussian window sigma 1.5 (11 x 11) and the constants of Wang et al. 2004, on the
    luma channel as is usual for SSIM of colour video. Identical inputs give exactly
    1 (numerator and denominator round identically).
    """
    import cv2

    if np.shape(a) != np.shape(b):
        raise ValueError(f"image shapes differ: {np.shape(a)} vs {np.shape(b)}")
    x, y = _luma(a), _luma(b)

    def blur(img: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(img, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    mx, my = blur(x), blur(y)
    mxx, myy, mxy = mx * mx, my * my, mx * my
    sxx = blur(x * x) - mxx
    syy = blur(y * y) - myy
    sxy = blur(x * y) - mxy
    num = (2.0 * mxy + _C1) * (2.0 * sxy + _C2)
    den = (mxx + myy + _C1) * (sxx + syy + _C2)
    return num / den


def masked_ssim(
    a: np.ndarray,
    b: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    per_frame: bool = False,
) -> float | np.ndarray:
    """Mean SSIM over the masked pixels, averaged over frames (1 = identical).

    The SSIM map is computed on the whole frame (so windows near the mask edge see
    real neighbourhoods) and then averaged inside the mask.
    """
    a, b = _as_stack(a), _as_stack(b)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    n, h, w = a.shape[:3]
    m = _mask_stack(mask, n, h, w)
    series = np.full(n, np.nan)
    for i in range(n):
        if m[i].any():
            series[i] = float(ssim_map(a[i], b[i])[m[i]].mean())
    if per_frame:
        return series
    return float(np.nanmean(series)) if np.isfinite(series).any() else float("nan")


def border_band(mask: np.ndarray, width: int = 3) -> np.ndarray:
    """Pixels within `width` px of the mask edge, on either side: `(H, W)` bool.

    That is where a composite switches from generated to original pixels, so a
    colour or alignment mismatch shows there first (a visible seam).
    """
    import cv2

    m = np.asarray(mask).astype(np.uint8)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    grown = cv2.dilate(m, k)
    shrunk = cv2.erode(m, k)
    return (grown > 0) & ~(shrunk > 0)
