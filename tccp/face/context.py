"""Head mode's c_v: the head-masked context video pooled to one token per frame.

TCCP conditions whole-head generation on the context video with the head masked out
(shoulders, neck, background: where the body is and how it moves tells where the head
can go). Its stage 1 pools the context's latents; this coordinate-space stage 1 pools
the context crop itself to an 8 x 8 colour grid (192 values per frame, in [-1, 1]):
at that pooling an autoencoder's latent is close to a linear map of the pixel blocks,
and pixels cost nothing at inference while a 128 px encode per frame does (CPU).
The same crops `tccp prepare` stores (`context.mp4`) are made live by `masked_context`.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["CONTEXT_GRID", "CONTEXT_DIM", "context_tokens", "masked_context", "mirror_tokens"]

CONTEXT_GRID = 8
CONTEXT_DIM = 3 * CONTEXT_GRID * CONTEXT_GRID


def context_tokens(contexts: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) uint8 head-masked context crops -> (N, CONTEXT_DIM) float32."""
    c = np.asarray(contexts)
    if c.ndim != 4 or c.shape[-1] != 3:
        raise ValueError(f"context crops must be (N, S, S, 3), got {c.shape}")
    g = CONTEXT_GRID
    small = np.stack([cv2.resize(x, (g, g), interpolation=cv2.INTER_AREA) for x in c]) if len(c) else \
        np.zeros((0, g, g, 3), np.uint8)
    return (small.astype(np.float32) / 127.5 - 1.0).reshape(len(c), -1)


def mirror_tokens(tokens: np.ndarray) -> np.ndarray:
    """Context tokens of the horizontally mirrored crops (training augmentation)."""
    g = CONTEXT_GRID
    t = np.asarray(tokens).reshape(-1, g, g, 3)[:, :, ::-1]
    return np.ascontiguousarray(t).reshape(len(t), -1)


def masked_context(frame: np.ndarray, landmarks_px: np.ndarray, box, size: int, dilate: float = 0.1,
                   forehead: float = 0.35) -> np.ndarray:
    """One frame's context crop of `box` with the head greyed out: what `tccp prepare`
    writes to `context.mp4` and what a head-mode session computes per frame
    (landmarks: (478, 2) frame px)."""
    from tccp.face import geometry as face

    ctx = face.crop(frame, box, size)
    return face.mask_context(ctx, face.head_mask(landmarks_px, box, size, dilate=dilate, forehead=forehead))
