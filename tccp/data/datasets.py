"""Training data: prepared clip folders -> 8-frame windows (pixels or cached latents).

Reads what `tccp prepare` wrote (see `tccp.data.prepare` for the folder format). This module
must run on a bare GPU machine, so it imports only torch, numpy and OpenCV (plus the
mediapipe-free `tccp.face.sketch`, `tccp.face.geometry` and `tccp.media.audio` helpers, which
themselves import only numpy/cv2 at module level); PyAV is used only as a fallback
video reader when OpenCV cannot open a file.

Two ways to feed training:
- `WindowDataset`: decoded pixels (faces, head-masked contexts, sketches drawn on
  demand) for GPU training, where the autoencoder runs inside the training step.
- `encode_dataset_latents` + `LatentWindowDataset`: every frame encoded once to fp16
  TAEF2 latents, so CPU training never runs the encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
from einops import rearrange
from torch.utils.data import Dataset

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
    "WindowDataset",
    "encode_dataset_latents",
    "load_latent_cache",
    "LatentWindowDataset",
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


def _select_split(folders: Sequence[Path], split: str | None) -> list[Path]:
    if split is None or split == "all":
        return list(folders)
    train, val = split_clips(list(folders))
    if split == "train":
        return train
    if split in ("val", "validation"):
        return val
    raise ValueError(f"split must be 'train', 'val', 'all' or None, got {split!r}")


def _expand(folders: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """A root of prepared clips, or a list of clip folders / roots."""
    items = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
    out: list[Path] = []
    for item in items:
        found = find_prepared(item)
        if not found:
            raise FileNotFoundError(f"{item}: no complete prepared clip found")
        out.extend(found)
    return out


# --------------------------------------------------------------------------- windows


def _to_chw(stack: np.ndarray) -> torch.Tensor:
    return rearrange(torch.from_numpy(np.ascontiguousarray(stack)), "... h w c -> ... c h w").float() / 255.0


def _pick_ref(
    clip: PreparedClip, start: int, window: int, rng: np.random.Generator, min_gap: int
) -> int:
    """A found frame at least `min_gap` frames from the window (in short clips: at
    least half the largest distance available), so the reference shows another
    moment, not a near-copy of the frames to generate."""
    found = np.flatnonzero(clip.found)
    last = start + window - 1
    dist = np.where(found < start, start - found, found - last)
    if not len(found) or dist.max() <= 0:
        return int(rng.choice(found)) if len(found) else start
    threshold = min(min_gap, int(np.ceil(dist.max() / 2)))
    return int(rng.choice(found[dist >= threshold]))


class _WindowIndex:
    """(clip, start) pairs over clips, skipping windows with an undetected face."""

    def __init__(self, clips: Sequence, window: int, stride: int, require_audio: bool = True) -> None:
        self.entries: list[tuple[int, int]] = []
        for ci, clip in enumerate(clips):
            for s in clip.valid_starts(window, stride, require_audio):
                self.entries.append((ci, int(s)))

    def __len__(self) -> int:
        return len(self.entries)


@dataclass
class _RefPolicy:
    min_gap: int = 25  # one second: a different expression/pose than the window
    deterministic: bool = False
    seed: int = 0

    def rng(self, index: int) -> np.random.Generator:
        if self.deterministic:
            return np.random.default_rng((self.seed, index))
        # torch's per-worker seed differs across DataLoader workers and epochs
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))


class WindowDataset(Dataset):
    """8-frame training windows of pixels.

    Each item: `faces`, `contexts`, `sketches` (W, 3, S, S) float32 in [0, 1];
    `mel` (W, 16, 80) float32; `ref` (3, S, S) a face of the same clip at least
    `ref_min_gap` frames away from the window; `landmarks` (W, P, 2) face-crop px;
    `clip` (name) and `start` (first frame index). Windows containing a frame where
    no face was detected, or (with `require_audio`) where the audio is digital
    silence/padding, are skipped. Validation windows pick their reference
    deterministically so that validation losses are comparable between runs.
    """

    def __init__(
        self,
        folders: Sequence[str | os.PathLike] | str | os.PathLike,
        window: int = 8,
        stride: int = 1,
        split: str | None = None,
        ref_min_gap: int = 25,
        deterministic: bool | None = None,
        seed: int = 0,
        require_audio: bool = True,
    ) -> None:
        self.clips = [PreparedClip(f) for f in _select_split(_expand(folders), split)]
        self.window = window
        self.index = _WindowIndex(self.clips, window, stride, require_audio)
        det = (split in ("val", "validation")) if deterministic is None else deterministic
        self.ref_policy = _RefPolicy(ref_min_gap, det, seed)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        ci, s = self.index.entries[i]
        clip = self.clips[ci]
        sl = slice(s, s + self.window)
        ref = _pick_ref(clip, s, self.window, self.ref_policy.rng(i), self.ref_policy.min_gap)
        return {
            "faces": _to_chw(clip.faces[sl]),
            "contexts": _to_chw(clip.contexts[sl]),
            "sketches": _to_chw(clip.sketches(range(s, s + self.window))),
            "mel": torch.from_numpy(clip.mel_windows[sl].copy()),
            "ref": _to_chw(clip.faces[ref]),
            "landmarks": torch.from_numpy(clip.landmarks[sl].copy()),
            "clip": clip.name,
            "start": s,
        }


# --------------------------------------------------------------------------- latents

_LATENT_KINDS = ("faces", "contexts", "sketches")


def _fingerprint(clip: PreparedClip) -> str:
    """Changes whenever the clip is re-prepared (so stale latents are re-encoded)."""
    m = clip.meta
    key = json.dumps(
        [m.get("source"), m.get("n_frames"), m.get("size"), m.get("created"), m.get("version")],
        sort_keys=True,
    )
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, meta


@torch.inference_mode()
def _resize_stack(images: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or images.shape[1] == size:
        return images
    return np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images])


def _encode_clip(
    clip: PreparedClip, autoencoder, batch_size: int, size: int | None = None
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for kind in _LATENT_KINDS:
        parts = []
        for a in range(0, clip.n_frames, batch_size):
            idx = range(a, min(a + batch_size, clip.n_frames))
            images = clip.sketches(idx) if kind == "sketches" else getattr(clip, kind)[a : idx.stop]
            images = _resize_stack(images, size)
            parts.append(autoencoder.encode_images(images, batch_size=batch_size).half().cpu())
        out[f"{clip.name}/{kind}"] = torch.cat(parts)
    # release the decoded pixels: the cache is built clip by clip to bound memory
    for attr in ("faces", "contexts"):
        clip.__dict__.pop(attr, None)
    return out


def encode_dataset_latents(
    folders: Sequence[str | os.PathLike] | str | os.PathLike,
    autoencoder,
    out_file: str | os.PathLike,
    batch_size: int = 32,
    progress: bool = True,
    max_frames: int | None = None,
    size: int | None = None,
) -> Path:
    """Encode faces, contexts and sketches of every frame to fp16 TAEF2 latents.

    Writes one safetensors file with keys `<clip>/faces|contexts|sketches`
    (N, 32, S/8, S/8) fp16 and per-clip fingerprints in its metadata. Resumable per
    clip: finished clips go to `<out_file>.parts/` as they complete and clips already
    in `out_file` with an unchanged fingerprint are not re-encoded; the final file is
    written atomically and the parts folder removed.
    """
    out = Path(out_file)
    parts_dir = out.with_name(out.name + ".parts")
    clips = [PreparedClip(f, max_frames=max_frames) for f in _expand(folders)]
    existing: dict[str, torch.Tensor] = {}
    existing_meta: dict[str, str] = {}
    if out.is_file():
        existing, existing_meta = _read_cache(out)

    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(clips), desc="encode latents", unit="clip")
        except ImportError:
            pass
    merged: dict[str, torch.Tensor] = {}
    # a prefix (`max_frames`) or resized (`size`) cache is recorded here; the per-clip
    # fingerprints only track the prepared folders, so such a cache is reused as-is
    meta: dict[str, str] = {"format": "tccp-latents", "version": "1", "size": str(size or ""),
                            "max_frames": str(max_frames or "")}
    for clip in clips:
        fp = _fingerprint(clip)
        keys = [f"{clip.name}/{k}" for k in _LATENT_KINDS]
        part = parts_dir / f"{clip.name}.safetensors"
        tensors: dict[str, torch.Tensor] | None = None
        if existing_meta.get(f"fp/{clip.name}") == fp and all(k in existing for k in keys):
            tensors = {k: existing[k] for k in keys}
        elif part.is_file():
            t, m = _read_cache(part)
            if m.get(f"fp/{clip.name}") == fp and all(k in t for k in keys):
                tensors = t
        if tensors is None:
            tensors = _encode_clip(clip, autoencoder, batch_size, size)
            _atomic_save(tensors, part, {f"fp/{clip.name}": fp})
        merged.update(tensors)
        meta[f"fp/{clip.name}"] = fp
        meta[f"n/{clip.name}"] = str(clip.n_frames)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    _atomic_save(merged, out, meta)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return out


def load_latent_cache(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """`{clip: {"faces"|"contexts"|"sketches": (N, 32, h, w) fp16}}` from a latent cache."""
    tensors, _ = _read_cache(Path(path))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        clip, kind = key.rsplit("/", 1)
        out.setdefault(clip, {})[kind] = value
    return out


class LatentWindowDataset(Dataset):
    """Like `WindowDataset` but from pre-encoded latents (no pixels decoded).

    Items: `faces`, `contexts`, `sketches` as video latents (C, W, h, w) float32
    (the models' channels-first layout), `ref` (C, h, w), `mel` (W, 16, 80),
    `clip`, `start`.
    """

    def __init__(
        self,
        cache_file: str | os.PathLike,
        folders: Sequence[str | os.PathLike] | str | os.PathLike,
        window: int = 8,
        stride: int = 1,
        split: str | None = None,
        ref_min_gap: int = 25,
        deterministic: bool | None = None,
        seed: int = 0,
        require_audio: bool = True,
    ) -> None:
        cache = load_latent_cache(cache_file)
        # a cache built with `max_frames` holds a prefix: view each clip the same way
        clips = [
            PreparedClip(f, max_frames=int(cache[f.name]["faces"].shape[0]) if f.name in cache else None)
            for f in _select_split(_expand(folders), split)
        ]
        missing = [c.name for c in clips if c.name not in cache]
        if missing:
            raise KeyError(f"{cache_file}: no latents for {', '.join(missing)}; run encode_dataset_latents")
        self.clips = clips
        self.latents = [cache[c.name] for c in clips]
        for clip, lat in zip(clips, self.latents):
            if lat["faces"].shape[0] != clip.n_frames:
                raise ValueError(f"{cache_file}: latents of {clip.name} are stale; re-encode")
        self.window = window
        self.index = _WindowIndex(clips, window, stride, require_audio)
        det = (split in ("val", "validation")) if deterministic is None else deterministic
        self.ref_policy = _RefPolicy(ref_min_gap, det, seed)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        ci, s = self.index.entries[i]
        clip, lat = self.clips[ci], self.latents[ci]
        sl = slice(s, s + self.window)
        ref = _pick_ref(clip, s, self.window, self.ref_policy.rng(i), self.ref_policy.min_gap)

        def video(kind: str) -> torch.Tensor:
            return rearrange(lat[kind][sl].float(), "n c h w -> c n h w")

        return {
            "faces": video("faces"),
            "contexts": video("contexts"),
            "sketches": video("sketches"),
            "ref": lat["faces"][ref].float(),
            "mel": torch.from_numpy(clip.mel_windows[sl].copy()),
            "clip": clip.name,
            "start": s,
        }
