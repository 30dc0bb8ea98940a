"""`tccp prepare`: turn talking-head clips into compact training samples.

One folder per clip (named after the clip stem), written to a temp folder and renamed
when complete, so a folder that exists with a complete `meta.json` is always usable
and a rerun skips it. Format version 1:

- `face.mp4`     face crops (S x S, H.264 yuv420p, CRF 16, 25 fps, no audio)
- `context.mp4`  context crops (S x S, same centre, 2x wider) with the head greyed
                 out (`tccp.face.geometry.head_mask` / `mask_context`): the stage-1 condition
- `track.npz`    compressed: `landmarks` int16 (N, P, 2) face-crop coordinates in
                 1/`landmark_scale` px, delta-coded along time (cumsum to decode);
                 `landmark_index` (P,) mesh indices (the sketch subset
                 `tccp.face.sketch.SKETCH_INDICES`, enough for sketches, masks, boxes and
                 mouth metrics); `face_boxes`, `context_boxes` (N, 4) float32 in source
                 frame px; `found`, `interpolated` (N,) bool
- `mel.npz`      compressed: `mel` uint8 (T, 80), log-mel at 80 frames/s;
                 value = q * meta.mel.scale + meta.mel.offset
- `audio.m4a`    the driving audio, 16 kHz mono AAC at 32 kbit/s (~160 B per frame;
                 Whisper features are computed from it at training time and cached)
- `voice.npz`    `vad` uint8 (N,): P(speech) per video frame x 255 (Silero VAD)
- `meta.json`    written last; `complete: true` marks a finished folder

Why video for the crops: 128 px faces as H.264 cost ~1 KB per frame at a PSNR (~38 dB)
well above what the TAEF2 autoencoder keeps (~32 dB), so the codec is not what limits
quality, and 48 clips fit in a few tens of MiB.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tccp.errors import TCCPError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PrepareConfig",
    "PrepareResult",
    "UnusableClip",
    "MIN_SIZE",
    "MAX_SIZE",
    "SILENCE_RMS",
    "check_settings",
    "resolve_audio",
    "prepare_clip",
    "prepare_clips",
    "folder_size",
    "write_track",
    "write_mel",
    "write_audio",
]

FORMAT_NAME = "tccp-prepared"  # keep in sync with tccp.data.datasets (checked by a test)
FORMAT_VERSION = 2  # 2: + audio.m4a, voice.npz, meta.speech
LANDMARK_SCALE = 16  # 1/16 px: the sub-pixel precision the sketches are drawn with
_LM_LIMIT = 16383  # |q| bound so int16 deltas cannot overflow
MEL_LO, MEL_HI = -4.0, 4.0  # tccp.media.audio.log_mel's output range
MIN_SIZE, MAX_SIZE = 32, 512  # crop side in px: 4x the default at most (4096 px crops took minutes per clip)
MAX_CRF = 51  # H.264's range is 0..51
SILENCE_RMS = 1e-4  # -80 dBFS: a muted or empty track, not quiet speech


class UnusableClip(TCCPError):
    """A readable clip that cannot teach anything (silent audio, no face in most
    frames): `prepare_clips` reports it as "unusable" (a warning) and goes on."""


@dataclass
class PrepareConfig:
    size: int = 128
    crf: int = 16
    preset: str = "slow"
    fps: float = 25.0
    sr: int = 16000
    min_frames: int = 8
    # head mask in the context crop (see tccp.face.geometry.head_mask)
    mask_dilate: float = 0.1
    mask_forehead: float = 0.35
    strict_decoding: bool = True  # a damaged file is an error, not fewer frames
    tracker: dict = field(default_factory=dict)  # FaceTrackerConfig overrides


@dataclass
class PrepareResult:
    clip: Path
    folder: Path | None
    status: str  # "done", "skipped" (already complete), "unusable" (silent or faceless) or "failed"
    error: str | None = None
    n_frames: int = 0
    seconds: float = 0.0


def _stem(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def sibling_audio(clip: Path) -> Path | None:
    """A same-stem .wav beside `clip` (`x_noaudio.mp4` -> `x.wav` or `x_noaudio.wav`):
    how the shared clips without a track of their own carry their speech."""
    stem = _stem(clip)
    candidates = [stem[: -len("_noaudio")], stem] if stem.endswith("_noaudio") else [stem]
    for name in candidates:
        for ext in (".wav", ".WAV"):
            p = clip.with_name(name + ext)
            if p.is_file():
                return p
    return None


def resolve_audio(clip: Path, audio: Path | None, has_audio: bool) -> Path | None:
    """Where the clip's audio comes from: its own track, a same-stem .wav beside it
    (`sibling_audio`), else `audio`; None = own track."""
    if has_audio:
        return None
    found = sibling_audio(clip)
    if found is not None:
        return found
    if audio is not None:
        return audio
    stem = _stem(clip).removesuffix("_noaudio")
    raise TCCPError(f"{clip}: has no audio stream and no {stem}.wav beside it; pass --audio FILE")


def _load(clip: Path, audio: Path | None, cfg: PrepareConfig):
    from tccp.media import io as media

    info = media.probe(clip)
    if not info.has_video:
        raise TCCPError(f"{clip}: has no video stream (is it an audio file?)")
    apath = resolve_audio(clip, audio, info.has_audio)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", media.MediaWarning)
        data = media.load_clip(
            clip, apath, fps=cfg.fps, sr=cfg.sr, require_audio=True, min_frames=cfg.min_frames
        )
    problems = [w for w in caught if issubclass(w.category, media.MediaWarning)]
    if problems and cfg.strict_decoding:
        msg = str(problems[0].message).split("; using the")[0]
        msg = msg if msg.startswith(str(clip)) else f"{clip}: {msg}"
        raise TCCPError(f"{msg}; a damaged clip is not used for training")
    audio_data = np.asarray(data.audio, np.float64)
    rms = float(np.sqrt(np.mean(audio_data ** 2))) if audio_data.size else 0.0
    if rms < SILENCE_RMS:
        where = f" ({apath})" if apath is not None else ""
        raise UnusableClip(f"{clip}: the audio{where} is silent (rms {rms:.1e}); a clip without speech "
                           "is not used for training")
    return data


def _quantise_landmarks(lm_crop: np.ndarray) -> np.ndarray:
    q = np.clip(np.round(lm_crop * LANDMARK_SCALE), -_LM_LIMIT, _LM_LIMIT).astype(np.int32)
    return np.diff(q, axis=0, prepend=np.zeros_like(q[:1])).astype(np.int16)


def _quantise_mel(mel: np.ndarray) -> tuple[np.ndarray, float, float]:
    scale = (MEL_HI - MEL_LO) / 255.0
    q = np.clip(np.round((mel - MEL_LO) / scale), 0, 255).astype(np.uint8)
    return q, scale, MEL_LO


Progress = Callable[[str, int, int], None]  # (phase, frames done, frames total)


def _counted(frames, progress: Progress | None, phase: str):
    n = len(frames)
    for i, f in enumerate(frames):
        if progress is not None and i % 10 == 0:
            progress(phase, i, n)
        yield f
    if progress is not None:
        progress(phase, n, n)


def _write_clip(clip: Path, tmp: Path, data, cfg: PrepareConfig, progress: Progress | None) -> dict:
    """Track, crop, mask and write every file of one clip into `tmp` (meta.json last)."""
    from tccp import face
    from tccp.face.context import masked_context
    from tccp.face.track import FaceTrackerConfig
    from tccp.media import io as media
    from tccp.media.audio import log_mel

    size = cfg.size
    tcfg = FaceTrackerConfig(fps=cfg.fps, **cfg.tracker)
    with _quiet_native_stderr(), face.FaceTracker(tcfg) as tracker:
        track = tracker.track(_counted(data.frames, progress, "track"))
    n = len(track)
    if face.face_fraction(track.found) < face.MIN_FACE_FRACTION:
        # noise and faceless footage: the tracker's rare false detections stay far below half
        raise UnusableClip(face.no_face_message(str(clip), int((~track.found).sum()), n))
    lm_crop = face.to_crop_coords(track.landmarks, track.face_boxes, size)
    sub = np.asarray(face.SKETCH_INDICES, dtype=np.int64)

    writer_args = dict(fps=cfg.fps, crf=cfg.crf, preset=cfg.preset)
    with media.VideoWriter(tmp / "face.mp4", **writer_args) as fw, media.VideoWriter(
        tmp / "context.mp4", **writer_args
    ) as cw:
        for i, frame in enumerate(_counted(data.frames, progress, "crop")):
            fw.write(face.crop(frame, track.face_boxes[i], size))
            cw.write(masked_context(frame, track.landmarks[i], track.context_boxes[i], size,
                                    dilate=cfg.mask_dilate, forehead=cfg.mask_forehead))

    write_track(
        tmp, lm_crop[:, sub], sub, track.face_boxes, track.context_boxes, track.found, track.interpolated
    )
    mel_meta = write_mel(tmp, log_mel(data.audio, data.sr), cfg.sr)
    speech = write_audio(tmp, data.audio, n, cfg.fps, lm_crop[:, sub], sub)

    info = media.probe(clip)
    audio = np.asarray(data.audio, np.float32)
    nonzero = np.flatnonzero(audio)
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "source": str(clip.resolve()),
        "audio_source": str(Path(data.audio_path).resolve()) if data.audio_path else None,
        "fps": cfg.fps,
        "src_fps": info.fps,
        "src_size": [info.width, info.height],
        "n_frames": n,
        "size": size,
        "face_scale": tcfg.face_scale,
        "context_scale": tcfg.context_scale,
        "mask": {"dilate": cfg.mask_dilate, "forehead": cfg.mask_forehead, "grey": face.MASK_GREY},
        "landmark_scale": LANDMARK_SCALE,
        "landmark_points": int(len(sub)),
        "landmark_coding": "int16 deltas along time; cumsum then divide by landmark_scale",
        "mel": mel_meta,
        "sr": cfg.sr,
        # digital silence (a muted track, or padding where the audio ends before the
        # video) teaches lips to move without sound: the dataset skips those frames
        "audio": {
            "rms": float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) if audio.size else 0.0,
            "signal_seconds": float((nonzero[-1] + 1) / data.sr) if nonzero.size else 0.0,
        },
        "speech": speech,
        "video": {"codec": "h264", "crf": cfg.crf, "preset": cfg.preset, "pix_fmt": "yuv420p"},
        "n_found": int(track.found.sum()),
        "n_interpolated": int(track.interpolated.sum()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": True,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: the done marker
    return meta


def write_track(
    folder: Path,
    landmarks_crop: np.ndarray,
    landmark_index: np.ndarray,
    face_boxes: np.ndarray,
    context_boxes: np.ndarray,
    found: np.ndarray,
    interpolated: np.ndarray,
) -> None:
    """`track.npz`: (N, P, 2) face-crop landmarks of mesh points `landmark_index`."""
    np.savez_compressed(
        Path(folder) / "track.npz",
        landmarks=_quantise_landmarks(np.asarray(landmarks_crop, np.float64)),
        landmark_index=np.asarray(landmark_index).astype(np.int16),
        face_boxes=np.asarray(face_boxes, np.float32),
        context_boxes=np.asarray(context_boxes, np.float32),
        found=np.asarray(found, bool),
        interpolated=np.asarray(interpolated, bool),
    )


def write_mel(folder: Path, mel: np.ndarray, sr: int = 16000) -> dict:
    """`mel.npz` (uint8); returns the `meta["mel"]` entry that de-quantises it."""
    q, scale, offset = _quantise_mel(np.asarray(mel, np.float32))
    np.savez_compressed(Path(folder) / "mel.npz", mel=q)
    return {"scale": scale, "offset": offset, "n_frames": int(q.shape[0]), "fps": sr / 200}


# a clip teaches lip sync when somebody speaks most of the time and the mouth moves;
# music, silence, or a still face dubbed with speech (a generated face) teach wrong lips
MIN_SPEECH_FRACTION = 0.5
MIN_APERTURE_STD = 0.01


def write_audio(folder: Path, audio: np.ndarray, n_frames: int, fps: float, landmarks: np.ndarray,
                landmark_index: np.ndarray) -> dict:
    """`audio.m4a` + `voice.npz`; returns `meta["speech"]`: the fraction of frames with
    speech (Silero VAD), the mouth aperture's spread and whether the clip is a lip-sync
    training target (`lipsync`)."""
    from tccp.face.headframe import aperture, to_mesh
    from tccp.media.io import write_audio_file
    from tccp.media.vad import frame_voice_activity

    a = np.clip(np.asarray(audio, np.float32), -1.0, 1.0)
    write_audio_file(Path(folder) / "audio.m4a", a, 16000, bitrate=32000)
    vad = frame_voice_activity(a, n_frames, fps)
    np.savez_compressed(Path(folder) / "voice.npz", vad=np.round(vad * 255).astype(np.uint8))
    ap = aperture(to_mesh(np.asarray(landmarks, np.float32), landmark_index))
    fraction = float((vad > 0.5).mean()) if n_frames else 0.0
    spread = float(np.std(ap)) if n_frames else 0.0
    return {
        "fraction": round(fraction, 4),
        "aperture_std": round(spread, 5),
        "lipsync": bool(fraction >= MIN_SPEECH_FRACTION and spread >= MIN_APERTURE_STD),
    }


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence mediapipe/TFLite's C++ log lines (a dozen INFO/W0000 lines per clip that
    bypass Python): errors must stay one line, and a progress bar readable. Progress
    bars survive because the CLI draws them on its own duplicate of the terminal fd.
    """
    fd = 2  # the C++ libraries write to the process's fd 2, whatever sys.stderr is
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def _is_done(folder: Path, cfg: PrepareConfig) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("format") == FORMAT_NAME
        and meta.get("version") == FORMAT_VERSION
        and meta.get("complete") is True
        and meta.get("size") == cfg.size
    )


def check_settings(cfg: PrepareConfig) -> None:
    """One-line errors for a crop size or quality the writer cannot or should not use."""
    if cfg.size % 8 or not MIN_SIZE <= cfg.size <= MAX_SIZE:
        raise TCCPError(f"--size {cfg.size}: must be a multiple of 8 from {MIN_SIZE} to {MAX_SIZE}")
    if not 0 <= cfg.crf <= MAX_CRF:
        raise TCCPError(f"--crf {cfg.crf}: must be 0..{MAX_CRF} (H.264 quality; lower = better, bigger)")


def _other_source(folder: Path, src: Path) -> str | None:
    """The clip a prepared folder was made from, when that is not `src` (two clips
    with the same stem would otherwise share one folder)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        source = meta.get("source") if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None
    if not isinstance(source, str):
        return None
    mine = Path(os.path.abspath(src))
    with contextlib.suppress(OSError):
        mine = mine.resolve()
    return None if Path(source) == mine else source


def _clean_stale_temps(out_dir: Path, name: str) -> None:
    """Remove temp folders an interrupted (killed) earlier run left for this clip."""
    for p in out_dir.glob(f".{name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in out_dir.glob(f".{name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def prepare_clip(
    clip: str | os.PathLike,
    out_dir: str | os.PathLike,
    size: int = 128,
    audio: str | os.PathLike | None = None,
    config: PrepareConfig | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Prepare one clip into `out_dir/<stem>/`; returns the folder.

    Skips a clip whose folder is already complete (same format, size and source clip)
    unless `force`. A folder prepared from another clip of the same name is an error
    unless `force` (then it is replaced), and so is a folder tccp prepare did not write
    (`tccp.io_utils.guard_output`). Raises `TCCPError` naming the clip for anything
    wrong with the input, `UnusableClip` (a TCCPError) for silent audio or a face in
    fewer than half of the frames; no folder (and no temp folder) is left behind on
    failure.
    """
    from tccp.io_utils import atomic_dir, ensure_writable_dir, guard_output

    cfg = config if config is not None else PrepareConfig(size=int(size))
    check_settings(cfg)
    src = Path(clip)
    out = ensure_writable_dir(out_dir)
    folder = out / _stem(src)
    done = _is_done(folder, cfg)
    other = _other_source(folder, src) if done or folder.is_dir() else None
    if other is not None and not force:
        raise TCCPError(f"{src}: {folder} already holds {other}, prepared under the same name; rename the "
                        "clip, use another --out, or pass --force to replace it")
    if not force and done:
        return folder
    if not src.exists():  # before any work: the commonest mistake
        raise TCCPError(f"{src}: file does not exist")
    # before any work: never over an input, never over a folder tccp prepare did not write
    guard_output(folder, folder=True, kind="prepare", inputs=(src, audio), force=force)
    data = _load(src, Path(audio) if audio is not None else None, cfg)
    _clean_stale_temps(out, folder.name)
    with atomic_dir(folder, kind="prepare", inputs=(src, audio), force=force) as tmp:
        _write_clip(src, tmp, data, cfg, progress)
        _fix_permissions(tmp)
    return folder


def _fix_permissions(folder: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; give the result the
    permissions a plain mkdir/open would have, so other users/processes can read it."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~mask)


def _worker(args: tuple) -> PrepareResult:
    clip, out_dir, audio, cfg, force = args
    t0 = time.perf_counter()
    import cv2

    # one OpenCV thread per clip: the pool provides the parallelism, and a clip's
    # prepared pixels then do not depend on --workers (some OpenCV results vary with the
    # thread count); the caller's setting comes back after (a clip prepared in process
    # left OpenCV at one thread for the rest of it)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        return _prepare_one(clip, out_dir, audio, cfg, force, t0)
    finally:
        cv2.setNumThreads(threads)


def _prepare_one(clip: str, out_dir: str, audio: str | None, cfg: PrepareConfig, force: bool, t0: float
                 ) -> PrepareResult:
    try:
        folder = prepare_clip(clip, out_dir, cfg.size, audio, cfg, force)
        meta = json.loads((folder / "meta.json").read_text())
        return PrepareResult(Path(clip), folder, "done", None, int(meta["n_frames"]), time.perf_counter() - t0)
    except UnusableClip as exc:
        return PrepareResult(Path(clip), None, "unusable", str(exc), 0, time.perf_counter() - t0)
    except TCCPError as exc:
        return PrepareResult(Path(clip), None, "failed", str(exc), 0, time.perf_counter() - t0)
    except MemoryError:
        return PrepareResult(Path(clip), None, "failed", f"{clip}: out of memory", 0, 0.0)


def prepare_clips(
    clips: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: PrepareConfig | None = None,
    audio: str | os.PathLike | None = None,
    workers: int = 1,
    force: bool = False,
    on_result: Callable[[PrepareResult], None] | None = None,
) -> list[PrepareResult]:
    """Prepare many clips (in a process pool when `workers > 1`); never raises for a
    bad clip: each result says done/skipped/failed with the one-line error."""
    from tccp.io_utils import ensure_writable_dir

    cfg = config or PrepareConfig()
    check_settings(cfg)
    out = ensure_writable_dir(out_dir)
    results: list[PrepareResult] = []
    todo = []
    claimed: dict[str, Path] = {}  # output folder -> the clip that gets it
    for c in clips:
        p = Path(c)
        folder = out / _stem(p)
        first = claimed.setdefault(folder.name, p)
        if first is not p:
            # two clips with one stem would share one folder: the later one is refused
            why = "is listed twice" if _same_file(first, p) else f"has the same name as {first}"
            r = PrepareResult(p, None, "failed", f"{p}: {why} (both would be {folder}); rename one, or "
                              "prepare them into different --out folders")
        elif not force and _is_done(folder, cfg) and _other_source(folder, p) is None:
            r = PrepareResult(p, folder, "skipped")
        else:
            todo.append((str(p), str(out), str(audio) if audio is not None else None, cfg, force))
            continue
        results.append(r)
        if on_result:
            on_result(r)
    # longest clips first so that the pool does not end on one long straggler
    todo.sort(key=lambda a: -_size_or_zero(a[0]))
    if workers <= 1 or len(todo) <= 1:
        for args in todo:
            r = _worker(args)
            results.append(r)
            if on_result:
                on_result(r)
        return results
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn: mediapipe's and OpenCV's threads do not survive fork reliably
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_worker, a) for a in todo]
        for fut in as_completed(futures):
            r = fut.result()
            results.append(r)
            if on_result:
                on_result(r)
    return results


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _size_or_zero(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def folder_size(path: str | os.PathLike) -> int:
    """Bytes of all files under `path` (what the 40 MiB budget counts)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def config_dict(cfg: PrepareConfig) -> dict:
    return asdict(cfg)
