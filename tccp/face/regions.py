"""What stage 2 regenerates: region masks from landmarks.

`mouth` (the default for dubbing and live calls) is IP_LAP's lower half: from just
below the nose down to the chin and out to the cheeks, so lips, teeth, chin and the
skin that moves with them are regenerated and everything above (eyes, brows, nose,
hair, pose) stays the source's. `head` is TCCP's whole-head inpainting region
(`tccp.face.geometry.head_mask`).

When generated lips differ from the source's (dubbing), the region must cover both:
the source mouth must disappear and the new one must fit, so `region_mask` takes the
union of the masks of every landmark set it is given. Masks are float32 in [0, 1] on
a crop (or frame) grid; `feather` softens the edge for pasting.
"""

from __future__ import annotations

import cv2
import numpy as np

from tccp.face.geometry import LIPS_OUTER_LOOP, OVAL_INDICES, fill_vertices, loop_mask

__all__ = ["REGIONS", "LOWER_FACE", "lower_face_polygon", "region_mask", "lips_mask", "mask_box", "patch_box",
           "PATCH_FRACTION"]

REGIONS = ("mouth", "head")
# jaw line from the left cheek round the chin to the right cheek, then back along the
# line under the nose (cheek, nostril wings, subnasale)
LOWER_FACE = (
    132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361,
    294, 327, 2, 98, 64,
)
_FOREHEAD, _CHIN = 10, 152
# the nose's lower edge, wing to wing (alar base, nostril, subnasale, nostril, alar base)
NOSE_LINE = (64, 98, 2, 327, 294)

# Mouth mode regenerates only a patch of the face crop: the lower face of a face crop
# (box = 1.6 x the landmark extent) measured on the shared clips spans at most ~70 x 45
# px of a 128 px crop, centred near (64, 94). A fixed patch (x 24..104, y 48..128 at
# 128 px) holds it with room for a jaw that drops further than the source's. Only this
# patch goes through the autoencoder and the denoiser: 10 x 10 latents instead of the
# crop's 16 x 16, 2.6x less autoencoder work per frame on a CPU.
PATCH_FRACTION = (24 / 128, 48 / 128, 104 / 128, 128 / 128)


def patch_box(size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the mouth patch in a `size` px face crop: a square of 5/8 of
    the crop (a multiple of 8 px, for the autoencoder), centred horizontally, at the
    bottom edge. 128 px crops: (24, 48, 104, 128)."""
    side = max(8, int(round(size * (PATCH_FRACTION[2] - PATCH_FRACTION[0]) / 8)) * 8)
    x0 = (size - side) // 2
    return x0, size - side, x0 + side, size


def lower_face_polygon(mesh: np.ndarray) -> np.ndarray:
    """(K, 2) polygon of the lower face from full-mesh points (478, 2)."""
    return np.asarray(mesh, np.float64)[list(LOWER_FACE)]


def _face_height(mesh: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(mesh, np.float64)[_FOREHEAD] - np.asarray(mesh, np.float64)[_CHIN]))


def _tracked(meshes):
    """The usable (finite) meshes of `meshes`, as float64 arrays."""
    for mesh in meshes:
        mesh = np.asarray(mesh, np.float64)
        if np.isfinite(mesh).all():
            yield mesh


def region_mask(meshes, shape: tuple[int, int], region: str = "mouth", offset: tuple[float, float] = (0.0, 0.0),
                dilate: float = 0.04, feather: float = 0.0, inside_face: float | None = None,
                below_nose: float | None = None) -> np.ndarray:
    """Union of the region's masks for each full-mesh landmark set in `meshes` (one
    (478, 2) array or a list), on a grid of `shape` whose pixel (0, 0) sits at `offset`.

    `dilate` and `feather` are fractions of the face height (forehead-chin); the mask is
    dilated first, then blurred, so a feathered edge stays outside the hard region.
    `inside_face` (mouth region; a fraction of the face height): keep the mask within
    the face ovals of `meshes` grown by that much. The dilation and feather otherwise
    reach past the jaw's edge onto background, ears and earrings, which the warped
    reference shows where *its* head was (ghosted earrings, smeared collars).
    `below_nose` (mouth region; a fraction of the face height): keep the mask below the
    nose's lower edge (`NOSE_LINE`) raised by that much. The dilation otherwise reaches
    up over the nostrils and the nose tip, which speech does not move, and the warped
    reference redraws them from another frame."""
    if isinstance(meshes, np.ndarray) and meshes.ndim == 2:
        meshes = [meshes]
    h, w = shape
    mask = np.zeros((h, w), np.uint8)
    height = 0.0
    shift = 4
    for mesh in _tracked(meshes):
        height = max(height, _face_height(mesh))
        if region == "mouth":
            pts = lower_face_polygon(mesh)
            cv2.fillPoly(mask, [fill_vertices(pts, shift, offset)], 1, cv2.LINE_8, shift)
            continue
        elif region == "head":
            oval = mesh[OVAL_INDICES]
            up = mesh[_FOREHEAD] - mesh[_CHIN]
            pts = np.concatenate([oval, oval + 0.35 * up])
        else:
            raise ValueError(f"region {region!r}: choose from {REGIONS}")
        hull = cv2.convexHull(fill_vertices(pts, shift, offset))
        cv2.fillConvexPoly(mask, hull, 1, cv2.LINE_8, shift)
    r = int(round(dilate * height))
    if r > 0:
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2))
    out = mask.astype(np.float32)
    sigma = feather * height
    if sigma > 0:
        grow = int(round(2 * sigma))
        if grow > 0:
            out = cv2.dilate(out, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1,) * 2))
        out = cv2.GaussianBlur(out, (0, 0), sigma)
        out = np.maximum(out, mask.astype(np.float32))
    if inside_face is not None and region == "mouth" and height > 0:
        out = out * _face_clip(meshes, (h, w), offset, inside_face * height, max(sigma, 0.5), shift)
    if below_nose is not None and region == "mouth" and height > 0:
        out = out * _nose_clip(meshes, (h, w), offset, below_nose * height, max(sigma, 0.5), shift)
    return out


def _nose_clip(meshes, shape, offset, margin: float, sigma: float, shift: int) -> np.ndarray:
    """1 below the nose's lower edge raised by `margin` px (extended sideways across the
    face), 0 above it, the step softened by `sigma` on the upper side; the union over
    `meshes`."""
    h, w = shape
    m = np.zeros((h, w), np.uint8)
    for mesh in _tracked(meshes):
        up = mesh[_FOREHEAD] - mesh[_CHIN]
        far = 2.0 * float(np.linalg.norm(up))
        up = up / max(float(np.linalg.norm(up)), 1e-6)
        line = mesh[list(NOSE_LINE)] + up * (margin + 2 * sigma)
        side = line[-1] - line[0]
        side = side / max(float(np.linalg.norm(side)), 1e-6)
        down = -up
        poly = np.concatenate([[line[0] - side * far], line, [line[-1] + side * far],
                               [line[-1] + side * far + down * far], [line[0] - side * far + down * far]])
        cv2.fillPoly(m, [fill_vertices(poly, shift, offset)], 1, cv2.LINE_8, shift)
    return np.clip(cv2.GaussianBlur(m.astype(np.float32), (0, 0), sigma), 0.0, 1.0)


def _face_clip(meshes, shape, offset, margin: float, sigma: float, shift: int) -> np.ndarray:
    """Union of the meshes' face ovals grown by `margin` px, softened by `sigma`: what
    lies beyond the face's own edge (background, ears, earrings, hair) is never edited."""
    h, w = shape
    m = np.zeros((h, w), np.uint8)
    for mesh in _tracked(meshes):
        hull = cv2.convexHull(fill_vertices(mesh[OVAL_INDICES], shift, offset))
        cv2.fillConvexPoly(m, hull, 1, cv2.LINE_8, shift)
    r = int(round(margin))
    if r > 0:
        m = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2))
    return np.clip(cv2.GaussianBlur(m.astype(np.float32), (0, 0), sigma), 0.0, 1.0) * (m > 0)


def lips_mask(mesh: np.ndarray, shape: tuple[int, int], offset: tuple[float, float] = (0.0, 0.0),
              margin: float = 0.1, feather: float = 0.05) -> np.ndarray:
    """The mouth of one mesh (inside its outer lip contour) grown by `margin` and
    softened by a Gaussian of `feather`, both shares of the mouth's width (corner to
    corner), on a grid of `shape` whose pixel (0, 0) sits at `offset`; float in [0, 1].
    Where the reference must draw the mouth inside a region whose skin stays the
    source's (`engine.composite.paste_mouth(source_skin=True)`)."""
    mesh = np.asarray(mesh, np.float64)
    width = float(np.linalg.norm(mesh[61] - mesh[291]))
    m = loop_mask(mesh, LIPS_OUTER_LOOP, shape, offset).astype(np.uint8)
    r = int(round(margin * width))
    if r > 0:
        m = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2))
    out = m.astype(np.float32)
    if feather > 0:
        out = cv2.GaussianBlur(out, (0, 0), max(feather * width, 0.5))
    return np.clip(out, 0.0, 1.0)


def mask_box(mask: np.ndarray, pad: int = 2) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1) of mask > 0, padded and clipped; None if empty."""
    ys, xs = np.nonzero(mask > 1e-3)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    return (max(0, xs.min() - pad), max(0, ys.min() - pad), min(w, xs.max() + 1 + pad), min(h, ys.max() + 1 + pad))
