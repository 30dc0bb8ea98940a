"""Landmark sketches: the stage-2 control image and the stage-1 generation target.

The connection sets are copied from mediapipe 0.10.21 (`face_mesh_connections`) rather
than imported, so that drawing sketches (done by the dataset on the training machine)
does not need mediapipe; a test checks the copies against the installed mediapipe.
Every part gets its own colour so the networks can tell, say, the inner lip line
(mouth aperture, the lip-sync signal) from the outer one even where they touch.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = [
    "SKETCH_PARTS",
    "SKETCH_COLORS",
    "SKETCH_INDICES",
    "FACE_OVAL",
    "LIPS_OUTER",
    "LIPS_INNER",
    "sketch_thickness",
    "draw_sketch",
]

Edges = tuple[tuple[int, int], ...]

FACE_OVAL: Edges = (
    (10, 338), (338, 297), (297, 332), (332, 284), (284, 251), (251, 389), (389, 356),
    (356, 454), (454, 323), (323, 361), (361, 288), (288, 397), (397, 365), (365, 379),
    (379, 378), (378, 400), (400, 377), (377, 152), (152, 148), (148, 176), (176, 149),
    (149, 150), (150, 136), (136, 172), (172, 58), (58, 132), (132, 93), (93, 234),
    (234, 127), (127, 162), (162, 21), (21, 54), (54, 103), (103, 67), (67, 109), (109, 10),
)
# mediapipe's LEFT/RIGHT are the subject's: the "left" eye is on the image's right.
LEFT_EYEBROW: Edges = (
    (276, 283), (283, 282), (282, 295), (295, 285), (300, 293), (293, 334), (334, 296),
    (296, 336),
)
RIGHT_EYEBROW: Edges = (
    (46, 53), (53, 52), (52, 65), (65, 55), (70, 63), (63, 105), (105, 66), (66, 107),
)
LEFT_EYE: Edges = (
    (263, 249), (249, 390), (390, 373), (373, 374), (374, 380), (380, 381), (381, 382),
    (382, 362), (263, 466), (466, 388), (388, 387), (387, 386), (386, 385), (385, 384),
    (384, 398), (398, 362),
)
RIGHT_EYE: Edges = (
    (33, 7), (7, 163), (163, 144), (144, 145), (145, 153), (153, 154), (154, 155),
    (155, 133), (33, 246), (246, 161), (161, 160), (160, 159), (159, 158), (158, 157),
    (157, 173), (173, 133),
)
LEFT_IRIS: Edges = ((474, 475), (475, 476), (476, 477), (477, 474))
RIGHT_IRIS: Edges = ((469, 470), (470, 471), (471, 472), (472, 469))
NOSE: Edges = (
    (168, 6), (6, 197), (197, 195), (195, 5), (5, 4), (4, 1), (1, 19), (19, 94), (94, 2),
    (98, 97), (97, 2), (2, 326), (326, 327), (327, 294), (294, 278), (278, 344),
    (344, 440), (440, 275), (275, 4), (4, 45), (45, 220), (220, 115), (115, 48),
    (48, 64), (64, 98),
)
# FACEMESH_LIPS split by index set: the outer contour and the inner (mouth opening) one.
LIPS_OUTER: Edges = (
    (61, 146), (146, 91), (91, 181), (181, 84), (84, 17), (17, 314), (314, 405),
    (405, 321), (321, 375), (375, 291), (61, 185), (185, 40), (40, 39), (39, 37),
    (37, 0), (0, 267), (267, 269), (269, 270), (270, 409), (409, 291),
)
LIPS_INNER: Edges = (
    (78, 95), (95, 88), (88, 178), (178, 87), (87, 14), (14, 317), (317, 402),
    (402, 318), (318, 324), (324, 308), (78, 191), (191, 80), (80, 81), (81, 82),
    (82, 13), (13, 312), (312, 311), (311, 310), (310, 415), (415, 308),
)

# Drawing order matters where lines cross: later parts are drawn on top.
SKETCH_PARTS: dict[str, Edges] = {
    "face_oval": FACE_OVAL,
    "left_brow": LEFT_EYEBROW,
    "right_brow": RIGHT_EYEBROW,
    "nose": NOSE,
    "left_eye": LEFT_EYE,
    "right_eye": RIGHT_EYE,
    "left_iris": LEFT_IRIS,
    "right_iris": RIGHT_IRIS,
    "lips_outer": LIPS_OUTER,
    "lips_inner": LIPS_INNER,
}

# RGB. Irises share one colour (one part: gaze); everything else is distinct.
SKETCH_COLORS: dict[str, tuple[int, int, int]] = {
    "face_oval": (220, 220, 220),
    "left_brow": (255, 150, 0),
    "right_brow": (255, 235, 0),
    "nose": (0, 110, 255),
    "left_eye": (0, 220, 255),
    "right_eye": (0, 255, 110),
    "left_iris": (255, 0, 255),
    "right_iris": (255, 0, 255),
    "lips_outer": (255, 30, 30),
    "lips_inner": (255, 140, 180),
}

# Eye corners (33, 133, 362, 263), mouth corners (61, 291) and the inner-lip midpoints
# (13, 14) used by mouth_aperture are all already part of the drawn sets; listed
# explicitly so the guarantee survives edits to the parts above.
_EXTRA = (33, 133, 362, 263, 61, 291, 13, 14, 10, 152)
SKETCH_INDICES: np.ndarray = np.array(
    sorted({i for edges in SKETCH_PARTS.values() for e in edges for i in e} | set(_EXTRA)),
    dtype=np.int64,
)

_SHIFT = 4  # cv2 fixed-point sub-pixel bits: sketches move smoothly, not in 1-px steps


def sketch_thickness(size: int) -> int:
    """Line width that keeps the same relative weight at every crop size (1 px at 128)."""
    return max(1, int(round(size / 128)))


def draw_sketch(
    landmarks_in_crop: np.ndarray, size: int, thickness: int | None = None
) -> np.ndarray:
    """Coloured anti-aliased polylines of the face parts on black, `(size, size, 3)` uint8 RGB.

    `landmarks_in_crop` are continuous crop coordinates (pixel i spans [i, i+1)), as
    returned by `to_crop_coords`; shape `(478, 2)`.
    """
    lm = np.asarray(landmarks_in_crop, dtype=np.float64)
    if lm.ndim != 2 or lm.shape[1] != 2 or lm.shape[0] < 478:
        raise ValueError(f"draw_sketch expects (478, 2) landmarks, got {lm.shape}")
    img = np.zeros((size, size, 3), np.uint8)
    if not np.isfinite(lm).all():
        return img
    th = sketch_thickness(size) if thickness is None else int(thickness)
    # continuous -> pixel-centre coordinates, then fixed point
    fixed = np.round((lm - 0.5) * (1 << _SHIFT)).astype(np.int64)
    limit = 1 << 28  # keep far off-crop points from overflowing cv2's int32 maths
    fixed = np.clip(fixed, -limit, limit).astype(np.int32)
    for name, edges in SKETCH_PARTS.items():
        segs = [fixed[list(e)] for e in edges]
        cv2.polylines(img, segs, False, SKETCH_COLORS[name], th, cv2.LINE_AA, _SHIFT)
    return img
