"""Real inputs for parity checks, benchmarks and the steps study.

Random tensors make poor parity inputs: they sit in value ranges the networks never
see (a diverging graph can look fine on noise and fail on faces) and they say nothing
about speed on the shapes the engine really runs. So every check here starts from a
real talking-head clip (by default the bundled sample, `tccp.media.io.sample_paths`),
tracked with the engine's own face tracker and cut into the engine's own inputs: face
crops and landmarks in crop pixels, the source frames and face boxes (compositing),
the mel windows of stage 2, voice activity, Whisper tokens of stage 1 and a reference
bank of the person's own frames. Tracking is cached per video (`cache_root()`), so
only the first call pays for mediapipe.

`window_request` turns a slice of a clip into the `engine.runner.WindowRequest` a
session would send, so parity inputs, benchmark windows and study windows all go
through `engine.runner.PipelineRunner` exactly as the engine's do.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tccp.errors import TCCPError

__all__ = ["RealClip", "cache_root", "load_real_clip", "sample_clip", "window_request", "live_tokens"]


def cache_root() -> Path:
    """Where derived artefacts (tracked sample pieces, on-the-fly exports) are cached:
    `$TCCP_CACHE`, else `~/.cache/tccp`."""
    env = os.environ.get("TCCP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tccp"


@dataclass
class RealClip:
    """Frames 0 .. n-1 of a real clip, in the engine's layout (see module docstring)."""

    name: str
    size: int  # crop size the clip was cut at (the pack's)
    fps: float
    frames: np.ndarray  # (T, H, W, 3) uint8 source frames
    boxes: np.ndarray  # (T, 4) float32 face boxes, source px
    landmarks: np.ndarray  # (T, 478, 2) float32 tracked landmarks, source px
    crops: np.ndarray  # (T, S, S, 3) uint8 face crops
    meshes: np.ndarray  # (T, 478, 2) float32 landmarks in crop px
    audio: np.ndarray  # (samples,) float32 16 kHz, sample 0 under frame 0
    mel: np.ndarray  # (T, 16, 80) float32 stage-2 mel windows
    vad: np.ndarray  # (T,) float32 voice activity
    sr: int = 16000
    _tokens: dict = field(default_factory=dict, repr=False)
    _banks: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return int(self.crops.shape[0])

    def tokens(self, whisper: Any, radius: int = 2) -> np.ndarray:
        """(T, La, F) Whisper tokens of every frame (full-context features, as a file
        session computes them; +-`radius` frames, the network's `audio_radius`), cached
        per encoder object."""
        key = (id(whisper), int(radius))
        if key not in self._tokens:
            from tccp.media.whisper import frame_tokens, full_features

            feats = full_features(whisper, self.audio)
            self._tokens[key] = frame_tokens(feats, 0, self.n, fps=self.fps, radius=radius).astype(np.float32)
        return self._tokens[key]

    def bank(self, template: np.ndarray, size: int = 4) -> Any:
        """A `ReferenceBank` of `size` of the clip's own frames (farthest lip shapes, as
        `engine.refs.scan_video` picks them), cached per template."""
        key = (hashlib.sha1(np.ascontiguousarray(template, np.float32).tobytes()).hexdigest(), size)
        if key not in self._banks:
            from engine.refs import BankBuilder

            self._banks[key] = BankBuilder.from_frames(self.frames, self.landmarks, self.boxes, template,
                                                       size, self.size, own=True).bank
        return self._banks[key]


def _track(video: Path, frames: np.ndarray, start: int, cache: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(landmarks (T, 478, 2), face boxes (T, 4), found (T,)) of the frames, cached by
    the video's content hash and the frame range."""
    h = hashlib.sha256()
    with open(video, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    root = Path(cache) if cache is not None else cache_root() / "tracks"
    path = root / f"{h.hexdigest()[:16]}-{start}-{len(frames)}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return z["landmarks"], z["boxes"], z["found"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry: track again
    from tccp.face.track import FaceTracker

    with FaceTracker() as tracker:
        tr = tracker.track(frames)
    lm, boxes, found = np.asarray(tr.landmarks, np.float32), np.asarray(tr.face_boxes, np.float32), np.asarray(tr.found, bool)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, landmarks=lm, boxes=boxes, found=found)
    os.replace(tmp, path)
    return lm, boxes, found


def load_real_clip(video: str | os.PathLike, audio: str | os.PathLike | None = None, *, frames: int | None = 48,
                   size: int = 128, start: int = 0, cache: str | os.PathLike | None = None) -> RealClip:
    """Frames `start .. start + frames - 1` of a video with a face (and its audio, or
    `audio`), tracked and cut at `size` px crops. Every frame must have a tracked face
    (a TCCPError names the first that has none)."""
    from tccp.face import geometry as fg
    from tccp.media import io as media
    from tccp.media.audio import log_mel, mel_windows
    from tccp.media.vad import frame_voice_activity

    video = Path(video)
    if start < 0 or (frames is not None and frames < 2):
        raise TCCPError(f"{video}: need start >= 0 and at least 2 frames")
    clip = media.load_clip(video, audio, fps=25.0, sr=16000,
                           max_frames=None if frames is None else start + frames, min_frames=2)
    fr = clip.frames[start:]
    if len(fr) < 2:
        raise TCCPError(f"{video}: has {clip.frames.shape[0]} frames, fewer than start {start} + 2")
    sps = clip.sr / clip.fps
    samples = np.asarray(clip.audio[int(round(start * sps)):], np.float32)
    samples = np.pad(samples, (0, max(0, int(round(len(fr) * sps)) - len(samples))))
    lm, boxes, found = _track(video, fr, start, Path(cache) / "tracks" if cache is not None else None)
    if not found.all():
        raise TCCPError(f"{video}: no face tracked in frame {start + int(np.flatnonzero(~found)[0])}")
    crops = np.stack([fg.crop(f, b, size) for f, b in zip(fr, boxes)])
    meshes = np.stack([fg.to_crop_coords(p, b, size) for p, b in zip(lm, boxes)]).astype(np.float32)
    n = len(fr)
    mel = mel_windows(log_mel(samples, sr=clip.sr), n, fps=clip.fps).astype(np.float32)
    vad = frame_voice_activity(samples, n, clip.fps).astype(np.float32)
    return RealClip(name=video.stem, size=int(size), fps=float(clip.fps), frames=fr, boxes=boxes, landmarks=lm,
                    crops=crops, meshes=meshes, audio=samples, mel=mel, vad=vad, sr=int(clip.sr))


def sample_clip(frames: int = 48, size: int = 128, cache: str | os.PathLike | None = None) -> RealClip:
    """`load_real_clip` of the bundled sample (125 frames, one speaker)."""
    from tccp.media.io import sample_paths

    video, _ = sample_paths()
    return load_real_clip(video, frames=frames, size=size, cache=cache)


def live_tokens(whisper: Any, clip: RealClip, start: int, n: int, context_s: float = 3.0, radius: int = 2) -> np.ndarray:
    """Tokens of frames start .. start+n-1 as a live session computes them: Whisper on
    the last `context_s` seconds of audio ending at the window's last frame (unpadded,
    `engine.features.full_features_unpadded`). The per-window audio cost of the engine."""
    from engine.features import full_features_unpadded
    from tccp.media.whisper import frame_tokens

    end = int(round((start + n) / clip.fps * clip.sr))
    begin = max(0, end - int(context_s * clip.sr))
    seg = clip.audio[begin:end]
    if len(seg) < 640:
        seg = np.pad(seg, (640 - len(seg), 0))
        begin = end - 640
    feats = full_features_unpadded(whisper, seg)
    first = int(round(start - begin / clip.sr * clip.fps))
    return frame_tokens(feats, first, n, fps=clip.fps, radius=radius).astype(np.float32)


def window_request(clip: RealClip, sl: slice, refs: Any, state: Any = None, *, tokens: np.ndarray,
                   steps: int = 4, mode: str = "generated", sampler: str = "ddim", window: int = 8,
                   seed: int = 0) -> Any:
    """The `WindowRequest` a session sends for frames `sl` of `clip`: `refs` is the
    stream's `engine.runner.SessionRefs` (kept across its windows), `tokens` the
    window's audio tokens (`clip.tokens(whisper)[sl]` or `live_tokens(...)`)."""
    from engine.runner import WindowRequest

    return WindowRequest(
        mode=mode, steps=steps, sampler=sampler, guidance=1.0, window=window,
        crops=clip.crops[sl], meshes=clip.meshes[sl], tokens=tokens, vad=clip.vad[sl], mel=clip.mel[sl],
        refs=refs, state=state, seed=seed,
    )
