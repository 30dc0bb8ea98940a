"""Face tracking, crops, masks and landmark sketches: the import surface.

The work lives in three modules with one job each: `track` (mediapipe + smoothing;
imports mediapipe only when a tracker is built), `geometry` (boxes, crops, masks,
measures) and `sketch` (landmark drawings); `mouth` (mouth-opening control on landmarks
and sketches) sits beside them. Importing this package does not import mediapipe, so
the dataset and engine can use it (or import `tccp.face.sketch` / `tccp.face.geometry`
directly) on a machine without it.
"""

from __future__ import annotations

from tccp.face.geometry import (
    CHIN,
    FOREHEAD,
    MASK_GREY,
    box_to_affine,
    context_box,
    crop,
    crop_to_frame_affine,
    face_box,
    face_square,
    from_crop_coords,
    head_mask,
    inter_ocular,
    invert_affine,
    mask_context,
    mouth_aperture,
    square_box,
    to_crop_coords,
)
from tccp.face.track import (
    FaceObs,
    FaceTracker,
    FaceTrackerConfig,
    OneEuroFilter,
    SmoothingConfig,
    MIN_FACE_FRACTION,
    Track,
    face_fraction,
    fill_gaps,
    jitter,
    no_face_message,
    require_face,
)
from tccp.face.sketch import SKETCH_COLORS, SKETCH_INDICES, SKETCH_PARTS, draw_sketch, sketch_thickness

__all__ = [
    "CHIN",
    "FOREHEAD",
    "MASK_GREY",
    "SKETCH_COLORS",
    "SKETCH_INDICES",
    "SKETCH_PARTS",
    "FaceObs",
    "FaceTracker",
    "FaceTrackerConfig",
    "OneEuroFilter",
    "SmoothingConfig",
    "Track",
    "box_to_affine",
    "context_box",
    "crop",
    "crop_to_frame_affine",
    "draw_sketch",
    "face_box",
    "face_square",
    "fill_gaps",
    "from_crop_coords",
    "head_mask",
    "inter_ocular",
    "invert_affine",
    "jitter",
    "mask_context",
    "mouth_aperture",
    "require_face",
    "face_fraction",
    "no_face_message",
    "MIN_FACE_FRACTION",
    "sketch_thickness",
    "square_box",
    "to_crop_coords",
]
