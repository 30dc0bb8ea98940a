"""Real prepared windows for parity checks, benchmarks and the steps study.

Random tensors make poor parity inputs: they sit in value ranges the networks never
see (a diverging graph can look fine on noise and fail on faces) and they say nothing
about speed on the shapes the engine really runs. So every check here starts from a
clip prepared exactly as training data is (`tccp.data.prepare`): by default a short piece
of the bundled sample, cut and prepared once into a cache folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tccp.errors import TCCPError

__all__ = ["RealClip", "cache_root", "prepare_sample", "load_real_clip", "resize_clip", "sample_clip"]


@dataclass
class RealClip:
    """Frames `start .. start + n - 1` of a prepared clip, in the engine's layout."""

    name: str
    size: int
    faces: np.ndarray  # (T, S, S, 3) uint8 ground-truth face crops
    contexts: np.ndarray  # (T, S, S, 3) uint8 head-masked context crops
    sketches: np.ndarray  # (T, S, S, 3) uint8 sketches of the tracked landmarks
    mel: np.ndarray  # (T, 16, 80) float32 mel window per frame
    masks: np.ndarray  # (T, S, S) float32 head masks in face-crop coordinates
    face_boxes: np.ndarray  # (T, 4) float32 face boxes in source pixels
    landmarks: np.ndarray  # (T, 478, 2) float32 face-crop px (NaN where not stored)
    identity: np.ndarray  # (S, S, 3) uint8 reference face (a frame outside the piece when possible)
    frames: np.ndarray | None = None  # (T, H, W, 3) uint8 source frames (for compositing)

    @property
    def n(self) -> int:
        return int(self.faces.shape[0])


def cache_root() -> Path:
    """Where derived artefacts (prepared sample pieces, on-the-fly exports) are cached:
    `$TCCP_CACHE`, else `~/.cache/tccp`."""
    env = os.environ.get("TCCP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tccp"


def prepare_sample(frames: int = 16, size: int = 128, cache: str | os.PathLike | None = None) -> Path:
    """The first `frames` frames of the bundled sample, prepared by `tccp.data.prepare`.

    Cut to a piece first because preparing runs face tracking on every frame; the
    result is cached (prepare_clip skips a complete folder), so only the first call
    pays for mediapipe."""
    from tccp.data.prepare import prepare_clip
    from tccp.media import io as media

    root = Path(cache) if cache is not None else cache_root() / "samples"
    work = root / f"sample-{frames}f"
    work.mkdir(parents=True, exist_ok=True)
    piece = work / "sample_piece.mp4"
    if not piece.is_file():
        video, _ = media.sample_paths()
        clip = media.load_clip(video, fps=25, sr=16000, max_frames=frames)
        n = min(frames, clip.frames.shape[0])
        audio = clip.audio[: int(round(n / clip.fps * clip.sr))]
        media.write_video(piece, clip.frames[:n], clip.fps, audio=audio, sr=clip.sr)  # atomic
    return prepare_clip(piece, work / f"prepared-{size}", size=size)


def _masks(lm: np.ndarray, size: int, dilate: float, forehead: float) -> np.ndarray:
    from tccp.face.geometry import head_mask

    box = np.array([0, 0, size, size], np.float32)  # landmarks are already in crop px
    return np.stack([head_mask(np.nan_to_num(f), box, size, dilate=dilate, forehead=forehead) for f in lm])


def load_real_clip(
    folder: str | os.PathLike,
    start: int = 0,
    n: int | None = None,
    with_frames: bool = False,
    identity_index: int | None = None,
    size: int | None = None,
) -> RealClip:
    """Frames `start .. start+n-1` of a prepared clip folder (`tccp prepare` output).

    The identity reference is frame `identity_index` (default: the frame furthest from
    the piece, so the model cannot copy the answer from its reference). `size`
    resamples the crops (area filter, as training's resized latent cache does) for a
    pack trained at another crop size than the clip was prepared at."""
    from tccp.data.datasets import PreparedClip

    folder = Path(folder)
    try:
        clip = PreparedClip(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise TCCPError(str(exc)) from None
    total = clip.n_frames
    n = total - start if n is None else n
    if start < 0 or n < 1 or start + n > total:
        raise TCCPError(f"{folder}: frames {start}..{start + n - 1} are outside the clip ({total} frames)")
    sl = slice(start, start + n)
    if identity_index is None:
        identity_index = total - 1 if total - 1 - (start + n - 1) >= start else 0
    lm = clip.mesh_landmarks(sl)
    mask_cfg = clip.meta.get("mask", {})
    frames = None
    if with_frames:
        from tccp.media import io as media

        src = Path(clip.meta["source"])
        if not src.is_file():
            raise TCCPError(f"{folder}: source video {src} is missing (needed for compositing)")
        frames = media.read_video(src, fps=clip.fps, max_frames=start + n).frames[start:]
        if frames.shape[0] < n:
            raise TCCPError(f"{src}: has fewer frames than its prepared folder {folder}")
    out = RealClip(
        name=clip.name,
        size=clip.size,
        faces=clip.faces[sl],
        contexts=clip.contexts[sl],
        sketches=clip.sketches(range(start, start + n)),
        mel=np.ascontiguousarray(clip.mel_windows[sl], np.float32),
        masks=_masks(lm, clip.size, float(mask_cfg.get("dilate", 0.1)), float(mask_cfg.get("forehead", 0.35))),
        face_boxes=np.asarray(clip.face_boxes[sl], np.float32),
        landmarks=lm,
        identity=clip.faces[identity_index],
        frames=frames,
    )
    return out if size is None or int(size) == clip.size else resize_clip(out, int(size))


def resize_clip(clip: RealClip, size: int) -> RealClip:
    """The same clip with its crops, masks and landmarks at `size` px."""
    import dataclasses

    import cv2

    def stack(x: np.ndarray, interp: int) -> np.ndarray:
        return np.stack([cv2.resize(im, (size, size), interpolation=interp) for im in x])

    area = cv2.INTER_AREA if size < clip.size else cv2.INTER_LINEAR
    return dataclasses.replace(
        clip, size=size, faces=stack(clip.faces, area), contexts=stack(clip.contexts, area),
        sketches=stack(clip.sketches, area), masks=stack(clip.masks, cv2.INTER_LINEAR),
        landmarks=clip.landmarks * (size / clip.size), identity=stack(clip.identity[None], area)[0],
    )


def sample_clip(frames: int = 16, size: int = 128, with_frames: bool = False,
                cache: str | os.PathLike | None = None) -> RealClip:
    """`load_real_clip` of `prepare_sample(frames, size)`."""
    return load_real_clip(prepare_sample(frames, size, cache), with_frames=with_frames)
