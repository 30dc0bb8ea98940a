"""Where a person is in a picture: mediapipe's selfie segmentation (bundled in the
mediapipe wheel, nothing downloaded), for the head region of another person's
reference (`tccp.pipelines.heads`).

The head region drawn from landmarks (`tccp.face.regions`, the face oval swept over the
forehead) knows nothing of hair: pasting a reference with more hair than the source
cuts it at the oval. The person mask does see hair; kept only near the head and above
the chin, it is the reference's whole head.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["PersonSegmenter", "head_with_hair"]


class PersonSegmenter:
    """A lazily built mediapipe selfie-segmentation graph (one per instance; calls are
    serialised, mediapipe graphs are not thread-safe)."""

    def __init__(self) -> None:
        self._seg = None
        self._lock = threading.Lock()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) float32 in [0, 1], 1 = person."""
        with self._lock:
            if self._seg is None:
                import mediapipe as mp

                self._seg = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
            out = self._seg.process(np.ascontiguousarray(image)).segmentation_mask
        return np.clip(np.asarray(out, np.float32), 0.0, 1.0)

    def close(self) -> None:
        with self._lock:
            if self._seg is not None:
                self._seg.close()
                self._seg = None


def head_with_hair(person: np.ndarray, mesh: np.ndarray, reach: float = 0.25, below_chin: float = 0.03
                   ) -> np.ndarray:
    """The part of a person mask (H, W) that is head and hair: within `reach` face
    heights of the head region of `mesh` (478, 2; same pixel grid) and above a line
    `below_chin` face heights under the chin, across the head's own up direction (so
    neck, collar and shoulders stay out)."""
    from tccp.face.regions import region_mask

    h, w = person.shape
    zone = region_mask(mesh, (h, w), "head", dilate=reach)
    m = np.asarray(mesh, np.float64)
    up = m[10] - m[152]
    height = float(np.linalg.norm(up))
    if height < 1e-6:
        return np.zeros((h, w), np.float32)
    up /= height
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    along = (xs + 0.5 - m[152, 0]) * up[0] + (ys + 0.5 - m[152, 1]) * up[1]
    above = (along > -below_chin * height).astype(np.float32)
    return (person * zone * above).astype(np.float32)
