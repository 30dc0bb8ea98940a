"""Face geometry: square boxes, crops, coordinate maps, head masks, mouth measures.

Coordinates are *continuous* pixels: pixel i of an image spans [i, i+1), which is what
mediapipe's normalised landmarks times the image size give. Boxes are float32
`(x0, y0, x1, y1)` squares in source-frame coordinates and may leave the frame.
`box_to_affine` is the exception: it returns the matrix in cv2's pixel-centre
convention, ready for `cv2.warpAffine`, so that crops and paste-backs line up exactly.
No mediapipe import here: the dataset and engine use these on machines without it.
"""

from __future__ import annotations

import cv2
import numpy as np

from tccp.face.sketch import FACE_OVAL

__all__ = [
    "FOREHEAD",
    "CHIN",
    "face_square",
    "square_box",
    "face_box",
    "context_box",
    "box_to_affine",
    "crop_to_frame_affine",
    "invert_affine",
    "crop",
    "to_crop_coords",
    "from_crop_coords",
    "head_mask",
    "fill_vertices",
    "mask_context",
    "inter_ocular",
    "mouth_aperture",
    "lip_mask",
    "loop_mask",
    "LIPS_OUTER_LOOP",
    "LIPS_INNER_LOOP",
    "UPPER_INNER",
    "LOWER_INNER",
    "MASK_GREY",
]

FOREHEAD, CHIN = 10, 152  # top and bottom of the mesh's midline
EYE_OUTER_R, EYE_OUTER_L = 33, 263
LIP_INNER_TOP, LIP_INNER_BOTTOM = 13, 14
OVAL_INDICES = np.array(sorted({i for e in FACE_OVAL for i in e}), dtype=np.int64)
MASK_GREY = 127

# The mesh spans upper forehead to chin; the hair above it needs more room than the
# neck below, so box centres sit this fraction of the landmark extent above the middle.
CENTRE_SHIFT = 0.1


def _up_vector(lm: np.ndarray) -> np.ndarray:
    """Unit vector from chin to forehead (..., 2): "up" for the face, roll included."""
    v = lm[..., FOREHEAD, :] - lm[..., CHIN, :]
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    fallback = np.array([0.0, -1.0])
    return np.where(n > 1e-6, v / np.maximum(n, 1e-6), fallback)


def face_square(landmarks: np.ndarray) -> np.ndarray:
    """`(cx, cy, extent)` of the face (..., 3): the centre shared by face and context boxes.

    `extent` is the larger side of the landmarks' bounding box: the face height in
    most poses, so it barely changes when the head turns left/right.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    lo, hi = lm.min(axis=-2), lm.max(axis=-2)
    extent = (hi - lo).max(axis=-1)
    centre = (lo + hi) / 2 + _up_vector(lm) * (CENTRE_SHIFT * extent)[..., None]
    return np.concatenate([centre, extent[..., None]], axis=-1)


def square_box(cx, cy, side) -> np.ndarray:
    """Square `(x0, y0, x1, y1)` float32 box(es) from centre and side."""
    cx, cy, half = np.asarray(cx), np.asarray(cy), np.asarray(side) / 2
    return np.stack([cx - half, cy - half, cx + half, cy + half], axis=-1).astype(np.float32)


def face_box(landmarks: np.ndarray, scale: float = 1.6) -> np.ndarray:
    """Square box around the face, forehead and chin included; (..., 478, 2) -> (..., 4)."""
    sq = face_square(landmarks)
    return square_box(sq[..., 0], sq[..., 1], sq[..., 2] * scale)


def context_box(landmarks: np.ndarray, scale: float = 3.2) -> np.ndarray:
    """The talking context (shoulders, surroundings): same centre as `face_box`, larger."""
    return face_box(landmarks, scale)


def _box_parts(box) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(box, dtype=np.float64)
    return b[..., :2], (b[..., 2] - b[..., 0])


def box_to_affine(box, size: int) -> np.ndarray:
    """2x3 matrix mapping frame pixels into the `size` crop of `box`, for cv2.warpAffine.

    Pixel-centre convention: crop pixel u samples frame position x0 + (u + 0.5) * k - 0.5
    with k = side / size.
    """
    origin, side = _box_parts(box)
    s = size / float(side)
    tx = s * (0.5 - origin[0]) - 0.5
    ty = s * (0.5 - origin[1]) - 0.5
    return np.array([[s, 0.0, tx], [0.0, s, ty]], dtype=np.float64)


def crop_to_frame_affine(box, size: int) -> np.ndarray:
    """Inverse of `box_to_affine`: maps crop pixels back into the frame (for paste-back).

    Use with `cv2.warpAffine(crop, M, (W, H))` (or the engine's own compositing).
    """
    return invert_affine(box_to_affine(box, size))


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine matrix."""
    return cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))


def crop(
    frame: np.ndarray,
    box,
    size: int,
    border: str = "replicate",
    value: int = 0,
) -> np.ndarray:
    """Square crop of `box` resampled to `size` x `size`; the box may leave the frame.

    Outside the frame is filled by edge replication (`border="replicate"`, the default:
    no hard black edge for a network to learn) or with `value` (`"constant"`).
    Large downscales go through an integer-factor area average after the warp, because
    warpAffine's bilinear sampling aliases badly below half size.
    """
    if frame.ndim not in (2, 3):
        raise ValueError(f"crop expects an (H, W[, C]) image, got {frame.shape}")
    _, side = _box_parts(box)
    if not np.isfinite(side) or side <= 0:
        raise ValueError(f"crop: degenerate box {box}")
    factor = max(1, int(side / size / 1.5))  # intermediate pixels per output pixel
    work = size * factor
    mode = {"replicate": cv2.BORDER_REPLICATE, "constant": cv2.BORDER_CONSTANT}[border]
    m = box_to_affine(box, work)
    channels = frame.shape[2] if frame.ndim == 3 else 0
    fill = (value,) * max(channels, 1)
    out = cv2.warpAffine(
        np.ascontiguousarray(frame), m, (work, work), flags=cv2.INTER_LINEAR, borderMode=mode, borderValue=fill
    )
    if factor > 1:
        out = cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)
    return out


def to_crop_coords(landmarks: np.ndarray, box, size: int) -> np.ndarray:
    """Frame coordinates -> crop coordinates; box (4,) or one per leading item (N, 4)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    origin, side = _box_parts(box)
    origin = origin[..., None, :] if origin.ndim > 1 else origin
    k = (size / side)[..., None, None] if np.ndim(side) else size / side
    return ((lm - origin) * k).astype(np.float32)


def from_crop_coords(points: np.ndarray, box, size: int) -> np.ndarray:
    """Crop coordinates -> frame coordinates (inverse of `to_crop_coords`)."""
    p = np.asarray(points, dtype=np.float64)
    origin, side = _box_parts(box)
    origin = origin[..., None, :] if origin.ndim > 1 else origin
    k = (side / size)[..., None, None] if np.ndim(side) else side / size
    return (p * k + origin).astype(np.float32)


def head_mask(
    landmarks_px: np.ndarray,
    box,
    size: int,
    dilate: float = 0.1,
    forehead: float = 0.35,
    feather: float = 0.0,
) -> np.ndarray:
    """Mask of the head in the `size` crop of `box`: float32 (size, size), 1 inside.

    The mesh stops at the upper forehead, so the face oval is swept upwards by
    `forehead` x face height to cover forehead and hair, then dilated by `dilate` x face
    height to take in ears and the jaw line. `feather` (fraction of face height) blurs
    the edge for compositing; 0 gives a hard 0/1 mask (for masking the context).
    """
    lm = to_crop_coords(landmarks_px, box, size).astype(np.float64)
    if lm.ndim != 2:
        raise ValueError(f"head_mask expects (478, 2) landmarks, got {lm.shape}")
    up = lm[FOREHEAD] - lm[CHIN]
    height = float(np.linalg.norm(up))
    mask = np.zeros((size, size), np.uint8)
    if not np.isfinite(lm).all() or height < 1e-3:
        return mask.astype(np.float32)
    oval = lm[OVAL_INDICES]
    swept = np.concatenate([oval, oval + up * forehead])
    shift = 4
    hull = cv2.convexHull(fill_vertices(swept, shift))
    cv2.fillConvexPoly(mask, hull, 1, cv2.LINE_8, shift)
    radius = int(round(dilate * height))
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2)
        mask = cv2.dilate(mask, kernel)
    out = mask.astype(np.float32)
    sigma = feather * height
    if sigma > 0:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    return out


def mask_context(context_crop: np.ndarray, mask: np.ndarray, grey: int = MASK_GREY) -> np.ndarray:
    """Hide the head: blend the crop towards a constant grey where `mask` is 1."""
    m = np.asarray(mask, dtype=np.float32)[..., None]
    out = context_crop.astype(np.float32) * (1.0 - m) + float(grey) * m
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def inter_ocular(landmarks: np.ndarray) -> np.ndarray | float:
    """Distance between the outer eye corners (33, 263): the face's scale-free unit."""
    lm = np.asarray(landmarks, dtype=np.float64)
    d = np.linalg.norm(lm[..., EYE_OUTER_R, :] - lm[..., EYE_OUTER_L, :], axis=-1)
    return float(d) if d.ndim == 0 else d


def mouth_aperture(landmarks: np.ndarray) -> np.ndarray | float:
    """Inner-lip opening (13-14) over inter-ocular distance: ~0 closed, ~0.3+ wide open."""
    lm = np.asarray(landmarks, dtype=np.float64)
    gap = np.linalg.norm(lm[..., LIP_INNER_TOP, :] - lm[..., LIP_INNER_BOTTOM, :], axis=-1)
    d = gap / np.maximum(inter_ocular(lm), 1e-6)
    return float(d) if np.ndim(d) == 0 else d


# the lips' contours as closed polygons (mediapipe mesh indices, in drawing order)
LIPS_OUTER_LOOP = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
# inner lip contours, corner (78) to corner (308), column-aligned (13 over 14 in the middle)
UPPER_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LOWER_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
LIPS_INNER_LOOP = LOWER_INNER + UPPER_INNER[-2:0:-1]  # along the lower lip, back along the upper


def fill_vertices(points: np.ndarray, shift: int = 4, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Points (continuous px) -> int32 vertices for cv2's fill functions (`shift`
    fractional bits) on a grid whose pixel (0, 0) sits at `offset`. cv2 puts vertex
    (x, y) on the *centre* of pixel (x, y), which is at x + 0.5 in continuous px, hence
    the half pixel: without it a filled polygon lands half a pixel right and down."""
    pts = np.asarray(points, np.float64) - [offset[0] + 0.5, offset[1] + 0.5]
    return np.round(pts * (1 << shift)).astype(np.int32)


def loop_mask(mesh: np.ndarray, loop, shape: tuple[int, int], offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Inside the closed contour `loop` (mesh indices) of a mesh, on a grid of `shape`
    whose pixel (0, 0) sits at `offset` (bool)."""
    m = np.zeros(shape[:2], np.uint8)
    cv2.fillPoly(m, [fill_vertices(np.asarray(mesh)[list(loop)], 4, offset)], 1, lineType=cv2.LINE_8, shift=4)
    return m > 0


def lip_mask(mesh: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The lips of a 478-point mesh (px of an image of `shape`): inside the outer lip
    contour, outside the inner one (bool)."""
    return loop_mask(mesh, LIPS_OUTER_LOOP, shape) & ~loop_mask(mesh, LIPS_INNER_LOOP, shape)
