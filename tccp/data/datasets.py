"""Prepared clips: lazy views of what `tccp prepare` wrote, the validation split.

Reads the folders of `tccp.data.prepare` (see there for the format). This module must
run on a bare GPU machine, so it imports only torch, numpy and OpenCV (plus the
mediapipe-free `tccp.face.sketch` and `tccp.media.audio` helpers, which import only
numpy/cv2 at module level); PyAV is used only as a fallback video reader, and to read
the audio. The training data of each stage is built on these views:
`tccp.data.landmarks` (stage 1) and `tccp.data.faces` (stage 2).
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from tccp.face.sketch import draw_sketch
from tccp.media.audio import mel_windows

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "VALIDATION_CLIPS",
    "PreparedClip",
    "is_complete",
    "find_prepared",
    "split_clips",
]

FORMAT_NAME = "tccp-prepared"
FORMAT_VERSION = 2
N_MESH_POINTS = 478
MEL_WIDTH = 16  # mel frames per video frame window (0.2 s)

# Held out of training, fixed so that validation numbers are comparable across runs:
# eight people, none of whom appears in a training clip: real footage (interviews,
# speeches, GRID, a full-body shot), two generated faces, and one driving clip whose
# audio is mostly music (lp_d20: lip-sync means skip clips without speech). Names are
# prepared-folder names (the file stem: `x_noaudio` for a clip whose audio is a .wav).
VALIDATION_CLIPS: tuple[str, ...] = (
    "vr_face5", "lp_d20", "vx_vasa_17", "vx_emo_yomir", "sadtalker_WDA_EdMarkey0_000",
    "lipnet_swiz3n", "edtalk_mouth_source_noaudio", "latentsync_demo3_video",
)


# --------------------------------------------------------------------------- one clip


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_complete(folder: str | os.PathLike) -> bool:
    """True if `folder` is a finished prepared clip of the current format version."""
    meta = _read_meta(Path(folder))
    return bool(
        meta
        and meta.get("format") == FORMAT_NAME
        and meta.get("version") == FORMAT_VERSION
        and meta.get("complete") is True
    )


def find_prepared(root: str | os.PathLike) -> list[Path]:
    """Complete clip folders under `root` (sorted by name; temp/partial ones skipped)."""
    base = Path(root)
    if is_complete(base):
        return [base]
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".") and is_complete(p))


def _read_video_frames(path: Path, n_expected: int | None = None) -> np.ndarray:
    """All frames of an mp4 as (N, H, W, 3) uint8 RGB; OpenCV first, PyAV as fallback."""
    frames: list[np.ndarray] = []
    cap = cv2.VideoCapture(str(path))
    try:
        while cap.isOpened():
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
    if not frames:
        try:
            import av
        except ImportError:
            raise OSError(f"{path}: OpenCV cannot read it and PyAV is not installed") from None
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise OSError(f"{path}: no frames could be decoded")
    if n_expected is not None and len(frames) != n_expected:
        raise OSError(f"{path}: decoded {len(frames)} frames, meta.json says {n_expected}")
    return np.stack(frames)


class PreparedClip:
    """Lazy, cached view of one prepared clip folder.

    Videos are decoded on first access and kept (a 10 s clip at 128 px is ~12 MB per
    stream); sketches are drawn from the stored landmarks, so the sketch style can
    change without re-preparing.
    """

    def __init__(self, folder: str | os.PathLike, max_frames: int | None = None) -> None:
        """`max_frames` views only the first frames of the clip: a CPU training run
        pre-encodes a prefix of each clip because the latent cache costs ~0.1-0.5 s
        per frame on 2 cores."""
        self.folder = Path(folder)
        self.max_frames = max_frames
        meta = _read_meta(self.folder)
        if not meta or meta.get("format") != FORMAT_NAME:
            raise FileNotFoundError(f"{self.folder}: not a prepared clip (no valid meta.json)")
        if meta.get("version") != FORMAT_VERSION or meta.get("complete") is not True:
            raise ValueError(
                f"{self.folder}: prepared clip is incomplete or of format version "
                f"{meta.get('version')} (expected {FORMAT_VERSION}); re-run tccp prepare"
            )
        self.meta: dict = meta

    def __repr__(self) -> str:
        return f"PreparedClip({self.name!r}, n_frames={self.n_frames}, size={self.size})"

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def n_frames(self) -> int:
        n = int(self.meta["n_frames"])
        return n if self.max_frames is None else min(n, int(self.max_frames))

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    @property
    def fps(self) -> float:
        return float(self.meta["fps"])

    # -- pixels
    @cached_property
    def faces(self) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB face crops."""
        return _read_video_frames(self.folder / "face.mp4", int(self.meta["n_frames"]))[: self.n_frames]

    @cached_property
    def contexts(self) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB context crops with the head greyed out."""
        return _read_video_frames(self.folder / "context.mp4", int(self.meta["n_frames"]))[: self.n_frames]

    # -- tracking
    @cached_property
    def _track(self) -> dict[str, np.ndarray]:
        with np.load(self.folder / "track.npz") as z:
            track = {k: z[k] for k in z.files}
        n, full = self.n_frames, int(self.meta["n_frames"])
        if n < full:  # a prefix view: per-frame arrays are cut (landmark deltas too)
            track = {k: (v[:n] if v.ndim and v.shape[0] == full else v) for k, v in track.items()}
        return track

    @cached_property
    def landmark_index(self) -> np.ndarray:
        """(P,) mesh index of each stored landmark (the sketch subset of the 478)."""
        return self._track["landmark_index"].astype(np.int64)

    @cached_property
    def landmarks(self) -> np.ndarray:
        """(N, P, 2) float32 landmarks in face-crop pixels (continuous coordinates)."""
        q = np.cumsum(self._track["landmarks"].astype(np.int32), axis=0)  # stored as deltas
        return (q / float(self.meta["landmark_scale"])).astype(np.float32)

    def mesh_landmarks(self, i: int | slice | np.ndarray = slice(None)) -> np.ndarray:
        """Stored landmarks scattered into (..., 478, 2) mesh layout (others are NaN)."""
        lm = self.landmarks[i]
        out = np.full(lm.shape[:-2] + (N_MESH_POINTS, 2), np.nan, np.float32)
        out[..., self.landmark_index, :] = lm
        return out

    @property
    def face_boxes(self) -> np.ndarray:
        """(N, 4) float32 face crop boxes in source-frame pixels."""
        return self._track["face_boxes"]

    @property
    def context_boxes(self) -> np.ndarray:
        """(N, 4) float32 context crop boxes in source-frame pixels."""
        return self._track["context_boxes"]

    @property
    def found(self) -> np.ndarray:
        """(N,) bool: a face was detected in this frame (not interpolated/held)."""
        return self._track["found"].astype(bool)

    @property
    def interpolated(self) -> np.ndarray:
        """(N,) bool: landmarks were filled in from neighbouring frames."""
        return self._track["interpolated"].astype(bool)

    # -- sketches
    def sketch(self, i: int) -> np.ndarray:
        """(S, S, 3) uint8 sketch of frame `i`, drawn now (not cached)."""
        full = np.zeros((N_MESH_POINTS, 2), np.float32)  # undrawn points: any finite value
        full[self.landmark_index] = self.landmarks[i]
        return draw_sketch(full, self.size)

    def sketches(self, indices: Iterable[int] | None = None) -> np.ndarray:
        """(len, S, S, 3) uint8 sketches of `indices` (all frames by default)."""
        idx = range(self.n_frames) if indices is None else indices
        return np.stack([self.sketch(int(i)) for i in idx])

    # -- audio
    @cached_property
    def mel(self) -> np.ndarray:
        """(T, 80) float32 log-mel of the clip's audio, 80 frames per second."""
        with np.load(self.folder / "mel.npz") as z:
            q = z["mel"]
        m = self.meta["mel"]
        return (q.astype(np.float32) * float(m["scale"]) + float(m["offset"])).astype(np.float32)

    @cached_property
    def mel_windows(self) -> np.ndarray:
        """(N, 16, 80) float32: the 0.2 s of mel centred on each video frame."""
        return mel_windows(self.mel, self.n_frames, fps=self.fps, width=MEL_WIDTH)

    @cached_property
    def audio(self) -> np.ndarray:
        """(samples,) float32 16 kHz mono: the clip's driving audio (`audio.m4a`), cut
        or padded to the video's length."""
        from tccp.media.io import read_audio

        a = read_audio(self.folder / "audio.m4a", 16000)
        n = int(round(int(self.meta["n_frames"]) / self.fps * 16000))
        return np.pad(a[:n], (0, max(0, n - len(a)))).astype(np.float32)

    @cached_property
    def voice(self) -> np.ndarray:
        """(N,) float32 P(speech) per frame (Silero VAD at prepare time)."""
        with np.load(self.folder / "voice.npz") as z:
            return (z["vad"].astype(np.float32) / 255.0)[: self.n_frames]

    @property
    def lipsync(self) -> bool:
        """Whether this clip is a lip-sync target: speech most of the time and a moving
        mouth (music, silence and still faces are not; see `tccp.data.prepare`)."""
        return bool((self.meta.get("speech") or {}).get("lipsync", False))

    @property
    def audible(self) -> np.ndarray:
        """(N,) bool: the frame's time lies before the end of the audio signal (False
        for a muted track and for the silent padding after audio shorter than the video)."""
        seconds = (self.meta.get("audio") or {}).get("signal_seconds")
        if seconds is None:
            return np.ones(self.n_frames, bool)
        return (np.arange(self.n_frames) + 1) / self.fps <= float(seconds) + 0.5 / self.fps

    def valid_starts(self, window: int, stride: int = 1, require_audio: bool = True) -> np.ndarray:
        """Window start indices whose frames all have a detected face (and, with
        `require_audio`, real audio under them)."""
        if self.n_frames < window:
            return np.zeros(0, np.int64)
        ok = self.found & self.audible if require_audio else self.found
        bad = (~ok).astype(np.int64)
        c = np.concatenate([[0], np.cumsum(bad)])
        starts = np.arange(0, self.n_frames - window + 1, stride)
        return starts[(c[starts + window] - c[starts]) == 0]


# --------------------------------------------------------------------------- splits


def _clip_name(item: str | os.PathLike) -> str:
    name = Path(item).name
    for suffix in (".mp4", ".mov", ".mkv", ".webm", ".avi"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def split_clips(
    names: Sequence[str | os.PathLike], validation: Sequence[str] = VALIDATION_CLIPS
) -> tuple[list, list]:
    """(train, val): items whose clip name is in `validation` go to val; order kept.

    Accepts clip names, prepared folders or source paths (the stem is the name).
    """
    held = set(validation)
    train = [n for n in names if _clip_name(n) not in held]
    val = [n for n in names if _clip_name(n) in held]
    return train, val
