"""Reading and writing video/audio with PyAV.

Everything downstream works on one timeline: video at a fixed 25 fps and audio at
16 kHz mono float32, both starting at the first video frame. This module is where
arbitrary user files (any container/codec ffmpeg reads, variable frame rate, rotation
metadata, odd sizes, audio in a separate file) are turned into that timeline, and
where every way a user file can be wrong becomes a one-line `TCCPError`.

Decisions worth knowing:
- Video is resampled by *timestamp*, not by frame count: output frame k (time k/fps
  after the first frame) is the latest source frame whose pts <= k/fps. This handles
  VFR and 30 -> 25 fps without drift.
- Audio is aligned with the stream start times (audio that starts before the video is
  cut, audio that starts late is preceded by silence), so audio and video agree to
  well under a frame.
- A container that cannot be opened at all (text file named .mp4, mp4 cut before its
  `moov` index) is an error. A file whose index is intact but whose data stops early
  (a truncated "faststart" mp4, a stream with a damaged tail) returns the frames that
  decoded and emits a `MediaWarning`, because losing the whole video over a damaged
  last second is worse than a shorter result.
- Rotation (display matrix, which ffmpeg also derives from the legacy `rotate` tag)
  is applied to the pixels, so callers always get upright frames.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Container, Iterator, Sequence

import numpy as np

from tccp.errors import TCCPError
from tccp.io_utils import atomic_path

__all__ = [
    "FPS",
    "SR",
    "MIN_FRAMES",
    "MAX_SECONDS",
    "MAX_PIXELS",
    "MediaWarning",
    "MediaInfo",
    "VideoData",
    "Clip",
    "probe",
    "read_video",
    "iter_video",
    "read_audio",
    "load_clip",
    "write_video",
    "write_audio_file",
    "VideoWriter",
    "sample_paths",
]

FPS = 25.0
SR = 16000
MIN_FRAMES = 8  # one model window
MAX_SECONDS = 2 * 3600.0  # refuse longer inputs: hours of work for a likely mistake
MAX_PIXELS = 7680 * 4320  # 8K; larger frames would not fit the face tracker anyway
MAX_LOAD_BYTES = 8 * 1024**3  # read_video holds every frame; iter_video streams

_TS_EPS = 1e-4  # seconds; absorbs pts rounding in containers with coarse time bases


class MediaWarning(UserWarning):
    """A media file was usable but not entirely (damaged tail, missing frames)."""


@dataclass(frozen=True)
class MediaInfo:
    """What `probe` learns from the container headers without decoding."""

    path: Path
    duration: float  # seconds (container, falling back to stream durations)
    has_video: bool
    has_audio: bool
    width: int = 0  # displayed size, i.e. after rotation
    height: int = 0
    fps: float = 0.0  # average frame rate of the source (0 if unknown)
    n_frames: int = 0  # estimate at the source rate
    rotation: int = 0  # counter-clockwise degrees applied for display
    video_codec: str = ""
    audio_codec: str = ""
    audio_sr: int = 0
    audio_channels: int = 0
    format: str = ""
    video_start: float = 0.0  # pts of the first video frame: frame 0 of our timeline


@dataclass
class VideoData:
    frames: np.ndarray  # (N, H, W, 3) uint8 RGB, upright
    fps: float  # output rate (25 unless asked otherwise)
    src_fps: float  # average rate of the source
    duration: float  # seconds covered by `frames` = N / fps


@dataclass
class Clip:
    frames: np.ndarray  # (N, H, W, 3) uint8 RGB
    audio: np.ndarray | None  # (round(N / fps * sr),) float32 mono, aligned to frame 0
    fps: float
    sr: int
    path: Path | None = None
    audio_path: Path | None = None  # where the audio came from (the clip itself or --audio)

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def duration(self) -> float:
        return self.n_frames / self.fps


# --------------------------------------------------------------------------- opening


def _av():
    import av  # imported lazily: `tccp --help` must stay fast

    # PyAV's default (level None) drops ffmpeg's log lines, which is what we want: we
    # report problems ourselves, in one line. Do NOT call av.logging.set_level here:
    # routing ffmpeg logs through Python deadlocks when a frame-threaded decoder is
    # closed mid-stream (seen with PyAV 18 on h264).
    return av


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise TCCPError(f"{path}: file does not exist")
    if path.is_dir():
        raise TCCPError(f"{path}: is a folder, expected a media file")
    if path.stat().st_size == 0:
        raise TCCPError(f"{path}: file is empty")


def _open(path: str | os.PathLike):
    """Open a container for reading, turning every ffmpeg failure into one line."""
    p = Path(path)
    _check_exists(p)
    av = _av()
    try:
        return av.open(str(p), mode="r")
    except av.error.InvalidDataError:
        raise TCCPError(_unreadable_reason(p)) from None
    except av.error.PermissionError:
        raise TCCPError(f"{p}: permission denied") from None
    except av.error.FFmpegError as exc:
        raise TCCPError(f"{p}: cannot be opened as media ({_av_reason(exc)})") from None


def _unreadable_reason(p: Path) -> str:
    with open(p, "rb") as fh:
        head = fh.read(12)
    if head[4:8] == b"ftyp":  # an ISO-BMFF (mp4/mov) file that ffmpeg still rejects
        return f"{p}: mp4 is damaged or truncated (its index, the moov atom, is missing)"
    return f"{p}: not a media file (ffmpeg cannot read it)"


def _av_reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _video_stream(container, path: Path):
    av = _av()
    for s in container.streams.video:
        # cover art in mp3/m4a shows up as a one-picture "video" stream
        if s.disposition & av.stream.Disposition.attached_pic:
            continue
        if s.codec_context is None:
            continue
        return s
    raise TCCPError(f"{path}: has no video stream (is it an audio file?)")


def _audio_stream(container):
    return container.streams.audio[0] if container.streams.audio else None


def _seconds(value, time_base) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def _duration(container, *streams) -> float:
    if container.duration is not None and container.duration > 0:
        return container.duration / 1_000_000.0
    best = 0.0
    for s in streams:
        if s is not None:
            d = _seconds(s.duration, s.time_base)
            if d:
                best = max(best, d)
    return best


def _rate(stream) -> float:
    for r in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if r:
            return float(r)
    return 0.0


def _stream_rotation(stream) -> int:
    """Legacy `rotate` tag (clockwise degrees) as counter-clockwise degrees."""
    tag = stream.metadata.get("rotate") if stream.metadata else None
    try:
        return -int(round(float(tag))) % 360 if tag else 0
    except ValueError:
        return 0


def probe(path: str | os.PathLike) -> MediaInfo:
    """Read the headers of a media file plus its first video frame (fast).

    The first frame is decoded because ffmpeg exposes the display matrix (rotation)
    and the true start time only on decoded frames.
    """
    p = Path(path)
    av = _av()
    with _open(p) as c:
        vs = None
        for s in c.streams.video:
            if not (s.disposition & av.stream.Disposition.attached_pic):
                vs = s
                break
        aus = _audio_stream(c)
        info = dict(
            path=p,
            duration=_duration(c, vs, aus),
            has_video=vs is not None,
            has_audio=aus is not None,
            format=c.format.name if c.format else "",
        )
        if aus is not None:
            cc = aus.codec_context
            info.update(
                audio_codec=cc.name,
                audio_sr=cc.sample_rate or 0,
                audio_channels=cc.layout.nb_channels if cc.layout else 0,
            )
        if vs is not None:
            w, h = vs.codec_context.width, vs.codec_context.height
            rot = _stream_rotation(vs)
            start = _seconds(vs.start_time, vs.time_base) or 0.0
            try:
                for frame in c.decode(vs):
                    w, h = frame.width, frame.height
                    rot = frame.rotation if _has_matrix(frame) else rot
                    if frame.pts is not None and frame.time_base is not None:
                        start = float(frame.pts * frame.time_base)
                    break
            except av.error.FFmpegError:
                pass  # reported with a proper message by the readers
            if rot % 180 == 90:
                w, h = h, w
            fps = _rate(vs)
            n = vs.frames or int(round(info["duration"] * fps))
            info.update(
                width=w,
                height=h,
                fps=fps,
                n_frames=n,
                rotation=int(rot) % 360,
                video_codec=vs.codec_context.name,
                video_start=start,
            )
        return MediaInfo(**info)


def _has_matrix(frame) -> bool:
    return any("DISPLAYMATRIX" in str(sd.type) for sd in frame.side_data)


def _check_limits(path: Path, duration: float | None, width: int, height: int) -> None:
    """Refuse inputs that are almost certainly a mistake. `duration=None` skips the
    length check (the caller reads only the start of the file)."""
    if duration is not None and duration > MAX_SECONDS:
        raise TCCPError(
            f"{path}: is {duration / 3600:.1f} h long; the limit is "
            f"{MAX_SECONDS / 3600:.0f} h (cut it into parts first)"
        )
    if width * height > MAX_PIXELS:
        raise TCCPError(
            f"{path}: resolution {width}x{height} is above the 8K limit (7680x4320); "
            "scale it down first"
        )


# --------------------------------------------------------------------------- orientation


def _orientation(frame, fallback_ccw: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """How to make a decoded frame upright, following ffmpeg's `autorotate`.

    Reads the DISPLAYMATRIX side data (ffmpeg copies the container's matrix onto each
    frame) including mirrored matrices; falls back to the stream's `rotate` tag.
    """
    matrix = None
    for sd in frame.side_data:
        if "DISPLAYMATRIX" in str(sd.type):
            matrix = np.frombuffer(bytes(sd), dtype="<i4")[:9].astype(np.float64)
            break
    if matrix is None:
        k = (fallback_ccw // 90) % 4
        return (lambda img: np.rot90(img, k)) if k else None
    a, b, c, d = matrix[0] / 65536, matrix[1] / 65536, matrix[3] / 65536, matrix[4] / 65536
    s0, s1 = math.hypot(a, c), math.hypot(b, d)
    if s0 == 0 or s1 == 0:
        return None
    ccw = -math.degrees(math.atan2(b / s1, a / s0))  # av_display_rotation_get
    theta = (-round(ccw)) % 360  # clockwise, as fftools computes it
    if abs(theta - 90) < 1:
        if matrix[3] > 0:  # transpose=cclock_flip
            return lambda img: np.swapaxes(img, 0, 1)
        return lambda img: np.rot90(img, -1)  # transpose=clock
    if abs(theta - 270) < 1:
        if matrix[3] < 0:  # transpose=clock_flip
            return lambda img: np.rot90(img, -1)[::-1]
        return lambda img: np.rot90(img, 1)  # transpose=cclock
    if abs(theta - 180) < 1:
        hflip, vflip = matrix[0] < 0, matrix[4] < 0
    elif abs(theta) < 1 or abs(theta - 360) < 1:
        hflip, vflip = False, matrix[4] < 0
    else:
        return None  # arbitrary angles: not worth a resampling filter; keep as stored
    if hflip and vflip:
        return lambda img: img[::-1, ::-1]
    if hflip:
        return lambda img: img[:, ::-1]
    if vflip:
        return lambda img: img[::-1]
    return None


# --------------------------------------------------------------------------- video


class _Deferred:
    """A decoded frame converted to an upright RGB array only when asked (`()`): the
    YUV -> RGB conversion costs as much as decoding at 1080p, and a scan that keeps
    one frame in fifty need not pay it for the rest."""

    __slots__ = ("_frame", "_orient", "_img")

    def __init__(self, frame: Any, orient: Callable | None) -> None:
        self._frame, self._orient, self._img = frame, orient, None

    def __call__(self) -> np.ndarray:
        if self._img is None:
            img = self._frame.to_ndarray(format="rgb24")
            self._img = np.ascontiguousarray(self._orient(img)) if self._orient is not None else img
            self._frame = None
        return self._img


def _decode_video(path: Path, max_seconds: float | None, deferred: bool = False
                  ) -> Iterator[tuple[float, Any, float]]:
    """Yield `(pts_seconds, upright RGB frame, frame_duration)` in presentation order
    (`deferred`: a `_Deferred` in place of the frame).

    Decode errors after at least one frame end the stream with a `MediaWarning`;
    errors before any frame are `TCCPError`.
    """
    av = _av()
    with _open(path) as c:
        vs = _video_stream(c, path)
        info_dur = _duration(c, vs)
        stream_dur = _seconds(vs.duration, vs.time_base) or 0.0
        cc = vs.codec_context
        _check_limits(path, info_dur if max_seconds is None else None, cc.width or 0, cc.height or 0)
        vs.thread_type = "AUTO"
        rate = _rate(vs)
        default_dt = 1.0 / rate if rate > 0 else 1.0 / FPS
        fallback_rot = _stream_rotation(vs)
        orient: Callable | None | bool = False  # False: not determined yet
        first_pts: float | None = None
        last_pts: float | None = None
        n = 0
        try:
            for frame in c.decode(vs):
                if frame.pts is not None and frame.time_base is not None:
                    t = float(frame.pts * frame.time_base)
                elif last_pts is not None:
                    t = last_pts + default_dt
                else:
                    t = 0.0
                if first_pts is None:
                    first_pts = t
                if max_seconds is not None and t - first_pts >= max_seconds:
                    return
                if orient is False:
                    orient = _orientation(frame, fallback_rot)
                img = _Deferred(frame, orient)
                if not deferred:
                    img = img()
                dt = (
                    float(frame.duration * frame.time_base)
                    if frame.duration and frame.time_base is not None
                    else default_dt
                )
                last_pts = t
                n += 1
                yield t, img, dt
        except av.error.FFmpegError as exc:
            if n == 0:
                raise TCCPError(f"{path}: video cannot be decoded ({_av_reason(exc)})") from None
            warnings.warn(
                f"{path}: decoding stopped after {n} frames ({_av_reason(exc)}); "
                "using the frames that decoded",
                MediaWarning,
                stacklevel=3,
            )
        if n == 0:
            raise TCCPError(f"{path}: no video frame could be decoded (file damaged or empty)")
        expected = stream_dur * rate if stream_dur and rate else 0
        if max_seconds is None and expected and n < 0.9 * expected - 2:
            warnings.warn(
                f"{path}: only {n} of about {expected:.0f} frames decoded (file truncated?); "
                "using the frames that decoded",
                MediaWarning,
                stacklevel=3,
            )


def iter_video(
    path: str | os.PathLike,
    fps: float | None = FPS,
    max_frames: int | None = None,
    max_seconds: float | None = None,
    min_frames: int = MIN_FRAMES,
    keep: Container[int] | None = None,
) -> Iterator[tuple[float, np.ndarray | None]]:
    """Stream `(t_seconds, frame)` resampled to `fps` by timestamp.

    `t` is the output time relative to the first frame (k / fps). Holds at most two
    decoded frames, so it suits files of any length. `fps=None` yields the source
    frames with their own (start-relative) timestamps. `keep`: only output frames whose
    index is in it are converted to RGB, the others come as None (a scan that samples a
    few frames of a long video). Raises `TCCPError` before the
    first yield for unreadable inputs, and at the end if the file gave fewer than
    `min_frames` frames (or fewer than were asked for, if that is less).
    """
    p = Path(path)
    limit_s = max_seconds
    if max_frames is not None and fps:
        cap = max_frames / fps + 1.0  # decode a little beyond, then stop by count
        limit_s = cap if limit_s is None else min(limit_s, cap)
    wanted = min_frames
    if max_frames is not None:
        wanted = min(wanted, max_frames)
    if max_seconds is not None and fps:
        wanted = min(wanted, int(math.ceil(max_seconds * fps - 1e-9)))
    count = 0
    start: float | None = None
    src = _decode_video(p, limit_s, deferred=keep is not None)

    def out(img: Any, k: int) -> np.ndarray | None:
        return img if keep is None else (img() if k in keep else None)

    try:
        if not fps:
            for t, img, _ in src:
                if start is None:
                    start = t
                if max_frames is not None and count >= max_frames:
                    break
                yield t - start, out(img, count)
                count += 1
        else:
            prev: np.ndarray | None = None
            prev_t = 0.0
            end = 0.0
            full = False
            for t, img, dt in src:
                if start is None:
                    start = t
                t -= start
                if prev is not None:
                    # every output time before this frame's pts shows the previous frame
                    while count / fps < t - _TS_EPS:
                        if max_frames is not None and count >= max_frames:
                            full = True
                            break
                        yield count / fps, out(prev, count)
                        count += 1
                    if full:
                        break
                if prev is None or t > prev_t:
                    prev, prev_t = img, t
                elif t == prev_t:
                    prev = img  # duplicate pts: the later one wins
                end = max(end, t + dt)
            if prev is not None and not full:
                stop = end if max_seconds is None else min(end, max_seconds)
                while count / fps < stop - _TS_EPS and (max_frames is None or count < max_frames):
                    yield count / fps, out(prev, count)
                    count += 1
    finally:
        src.close()
    if count < wanted:
        raise TCCPError(
            f"{p}: clip is too short ({count} frames at {f'{fps:g}' if fps else 'source'} fps; "
            f"need at least {min_frames})"
        )


def read_video(
    path: str | os.PathLike,
    fps: float = FPS,
    max_frames: int | None = None,
    max_seconds: float | None = None,
    min_frames: int = MIN_FRAMES,
) -> VideoData:
    """Decode a whole video (or its first `max_frames` / `max_seconds`) into memory."""
    p = Path(path)
    info = probe(p)
    if not info.has_video:
        raise TCCPError(f"{p}: has no video stream (is it an audio file?)")
    bounded = max_frames is not None or max_seconds is not None
    _check_limits(p, None if bounded else info.duration, info.width, info.height)
    seconds = info.duration
    if max_seconds is not None:
        seconds = min(seconds, max_seconds)
    if max_frames is not None:
        seconds = min(seconds, max_frames / fps)
    need = seconds * fps * info.width * info.height * 3
    if need > MAX_LOAD_BYTES:
        raise TCCPError(
            f"{p}: {seconds:.0f} s at {info.width}x{info.height} needs "
            f"{need / 1024**3:.1f} GiB in memory; process it in a streaming way "
            "(tccp run) or pass a shorter --max-seconds"
        )
    frames = [f for _, f in iter_video(p, fps, max_frames, max_seconds, min_frames)]
    stack = np.stack(frames)
    return VideoData(frames=stack, fps=fps, src_fps=info.fps, duration=len(frames) / fps)


# --------------------------------------------------------------------------- audio


def _decode_audio(
    path: Path, sr: int, max_seconds: float | None = None
) -> tuple[np.ndarray, float]:
    """Decode the first audio stream to mono float32 at `sr`; return (samples, start_s)."""
    av = _av()
    with _open(path) as c:
        aus = _audio_stream(c)
        if aus is None:
            raise TCCPError(f"{path}: has no audio stream")
        if max_seconds is None:  # a long file is fine when only its start is wanted
            _check_limits(path, _duration(c, aus), 0, 0)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
        chunks: list[np.ndarray] = []
        total = 0
        limit = None if max_seconds is None else int(math.ceil(max_seconds * sr))
        start: float | None = None
        n_frames = 0
        try:
            for frame in c.decode(aus):
                if start is None and frame.pts is not None and frame.time_base is not None:
                    start = float(frame.pts * frame.time_base)
                n_frames += 1
                for out in resampler.resample(frame):
                    a = out.to_ndarray().reshape(-1)
                    chunks.append(a)
                    total += a.size
                if limit is not None and total >= limit:
                    break
        except av.error.FFmpegError as exc:
            if n_frames == 0:
                raise TCCPError(f"{path}: audio cannot be decoded ({_av_reason(exc)})") from None
            warnings.warn(
                f"{path}: audio decoding stopped early ({_av_reason(exc)})",
                MediaWarning,
                stacklevel=3,
            )
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
        if n_frames == 0:
            raise TCCPError(f"{path}: no audio could be decoded (file damaged or empty)")
        audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        if limit is not None:
            audio = audio[:limit]
        return audio, (start or 0.0)


def read_audio(
    path: str | os.PathLike, sr: int = SR, max_seconds: float | None = None
) -> np.ndarray:
    """Audio of any media file (wav, mp3, m4a, a video's track) as mono float32 at `sr`."""
    audio, _ = _decode_audio(Path(path), sr, max_seconds)
    return audio


def _fit(audio: np.ndarray, n: int) -> np.ndarray:
    if audio.size >= n:
        return audio[:n]
    return np.concatenate([audio, np.zeros(n - audio.size, np.float32)])


def load_clip(
    video: str | os.PathLike,
    audio: str | os.PathLike | None = None,
    fps: float = FPS,
    sr: int = SR,
    require_audio: bool = True,
    max_frames: int | None = None,
    max_seconds: float | None = None,
    min_frames: int = MIN_FRAMES,
) -> Clip:
    """Video frames plus the audio that plays under them, on one timeline.

    Audio comes from `audio` if given (starting with the first frame), else from the
    clip's own track aligned by stream start times; it is trimmed or padded with
    silence to exactly `round(N / fps * sr)` samples.
    """
    vpath = Path(video)
    info = probe(vpath)
    if not info.has_video:
        raise TCCPError(f"{vpath}: has no video stream (is it an audio file?)")
    apath = Path(audio) if audio is not None else None
    if apath is None and not info.has_audio and require_audio:
        raise TCCPError(f"{vpath}: has no audio stream; pass --audio FILE")
    if apath is not None:
        _check_exists(apath)
        a_info = probe(apath)
        if not a_info.has_audio:
            raise TCCPError(f"{apath}: has no audio stream")
    vd = read_video(vpath, fps, max_frames=max_frames, max_seconds=max_seconds, min_frames=min_frames)
    n = int(round(vd.frames.shape[0] / fps * sr))
    samples: np.ndarray | None = None
    if apath is not None:
        samples = _fit(_decode_audio(apath, sr, n / sr + 1.0)[0], n)
    elif info.has_audio:
        v0 = info.video_start
        # decode only as much as the video needs (plus any lead-in before the video)
        raw, a0 = _decode_audio(vpath, sr, n / sr + 1.0 + max(0.0, v0))
        offset = int(round((a0 - v0) * sr))
        if offset > 0:  # audio starts after the first frame: silence first
            raw = np.concatenate([np.zeros(offset, np.float32), raw])
        elif offset < 0:  # audio starts earlier: drop what plays before frame 0
            raw = raw[-offset:]
        samples = _fit(raw, n)
        apath = vpath
    return Clip(frames=vd.frames, audio=samples, fps=fps, sr=sr, path=vpath, audio_path=apath)


# --------------------------------------------------------------------------- writing


def _even(img: np.ndarray) -> np.ndarray:
    """Pad odd sizes by one edge-replicated pixel: yuv420p needs even dimensions."""
    h, w = img.shape[:2]
    ph, pw = h % 2, w % 2
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="edge")
    return img


def _as_rgb(frame: np.ndarray) -> np.ndarray:
    f = np.asarray(frame)
    if f.ndim == 2:
        f = np.repeat(f[:, :, None], 3, axis=2)
    if f.ndim != 3 or f.shape[2] not in (3, 4):
        raise ValueError(f"frame must be (H, W, 3) RGB, got shape {f.shape}")
    if f.shape[2] == 4:
        f = f[:, :, :3]
    if f.dtype != np.uint8:
        if np.issubdtype(f.dtype, np.floating):
            raise ValueError("frames must be uint8 RGB (got floats; scale to 0..255 first)")
        f = np.clip(f, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(f)


class VideoWriter:
    """Incremental H.264 (yuv420p) + AAC mp4 writer; the file appears only on success.

    Use as a context manager. Audio may be given whole up front (`audio=`) or fed in
    chunks with `write_audio`; either way it is interleaved as video arrives and, at
    close, trimmed or padded with silence to the video's duration so both tracks end
    together. An exception inside the `with` block removes the temporary file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float = FPS,
        audio: np.ndarray | None = None,
        sr: int = SR,
        *,
        has_audio: bool | None = None,
        crf: int = 20,
        preset: str = "veryfast",
        audio_bitrate: int = 96_000,
    ) -> None:
        self.path = Path(path)
        self.fps = fps
        self.sr = int(sr)
        self.crf = crf
        self.preset = preset
        self.audio_bitrate = audio_bitrate
        self.has_audio = (audio is not None) if has_audio is None else bool(has_audio)
        self._pending = np.zeros(0, np.float32)
        if audio is not None:
            self._pending = np.asarray(audio, np.float32).reshape(-1)
        self._atomic = atomic_path(self.path)
        self._tmp: Path = self._atomic.__enter__()
        self._container = None
        self._vs = None
        self._as = None
        self._size: tuple[int, int] | None = None
        self.n_frames = 0
        self._audio_written = 0
        self._closed = False

    # -- setup on the first frame (size is only known then)
    def _start(self, h: int, w: int) -> None:
        av = _av()
        from fractions import Fraction

        self._container = av.open(
            str(self._tmp), mode="w", format="mp4", options={"movflags": "+faststart"}
        )
        rate = Fraction(self.fps).limit_denominator(1001)
        self._frame_tb = 1 / rate
        vs = self._container.add_stream("libx264", rate=rate)
        vs.width, vs.height = w, h
        vs.pix_fmt = "yuv420p"
        vs.options = {"crf": str(self.crf), "preset": self.preset}
        vs.codec_context.color_range = 1  # limited ("tv") range, what players assume
        self._vs = vs
        if self.has_audio:
            a = self._container.add_stream("aac", rate=self.sr)
            a.layout = "mono"
            a.bit_rate = self.audio_bitrate
            self._as = a
        self._size = (h, w)

    def write(self, frame: np.ndarray) -> None:
        """Append one `(H, W, 3)` uint8 RGB frame (all frames must share one size)."""
        av = _av()
        img = _even(_as_rgb(frame))
        if self._size is None:
            self._start(*img.shape[:2])
        elif img.shape[:2] != self._size:
            raise ValueError(f"frame size {img.shape[:2]} differs from the first frame's {self._size}")
        vf = av.VideoFrame.from_ndarray(img, format="rgb24")
        vf.pts = self.n_frames
        vf.time_base = self._frame_tb
        for pkt in self._vs.encode(vf):
            self._container.mux(pkt)
        self.n_frames += 1
        self._flush_audio(final=False)

    def write_frames(self, frames: Sequence[np.ndarray] | np.ndarray) -> None:
        for f in frames:
            self.write(f)

    def write_audio(self, samples: np.ndarray) -> None:
        """Queue mono float32 samples at `sr` (written as the video catches up)."""
        if not self.has_audio:
            raise ValueError("VideoWriter was created without audio (pass has_audio=True)")
        self._pending = np.concatenate([self._pending, np.asarray(samples, np.float32).reshape(-1)])
        self._flush_audio(final=False)

    def _flush_audio(self, final: bool) -> None:
        if self._as is None:
            return
        av = _av()
        target = int(round(self.n_frames / self.fps * self.sr))  # audio the video has covered
        if final:
            need = target - self._audio_written - self._pending.size
            if need > 0:
                self._pending = np.concatenate([self._pending, np.zeros(need, np.float32)])
        avail = min(self._pending.size, target - self._audio_written)
        chunk = 1024  # one AAC frame; partial chunks only at the very end
        while avail >= chunk or (final and avail > 0):
            k = min(chunk, avail)
            data = np.clip(self._pending[:k], -1.0, 1.0).reshape(1, -1)
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format="flt", layout="mono")
            af.sample_rate = self.sr
            af.pts = self._audio_written
            for pkt in self._as.encode(af):
                self._container.mux(pkt)
            self._pending = self._pending[k:]
            self._audio_written += k
            avail -= k

    def close(self) -> Path:
        """Finish the file and move it into place; returns the final path."""
        if self._closed:
            return self.path
        self._closed = True
        try:
            if self.n_frames == 0:
                raise TCCPError(f"{self.path}: no frames were written")
            self._flush_audio(final=True)
            for pkt in self._vs.encode():
                self._container.mux(pkt)
            if self._as is not None:
                for pkt in self._as.encode():
                    self._container.mux(pkt)
            self._container.close()
            self._container = None
        except BaseException as exc:
            self._abort(exc)
            raise
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Discard everything written so far (no file is left behind)."""
        if not self._closed:
            self._closed = True
            self._abort(None)

    def _abort(self, exc: BaseException | None) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:
                pass
            self._container = None
        err = exc if exc is not None else RuntimeError("aborted")
        try:
            self._atomic.__exit__(type(err), err, None)
        except BaseException:
            pass  # atomic_path re-raises; we only want its cleanup

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:  # a forgotten writer must not leave a temp file
        try:
            self.abort()
        except Exception:
            pass


def write_audio_file(path: str | os.PathLike, audio: np.ndarray, sr: int = SR, bitrate: int = 32000) -> Path:
    """Mono float32 audio -> an AAC `.m4a` file (written to a temp name, then renamed)."""
    from tccp.io_utils import atomic_path

    av = _av()
    a = np.clip(np.asarray(audio, np.float32).reshape(-1), -1.0, 1.0)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as c:
            st = c.add_stream("aac", rate=sr)
            st.layout = "mono"
            st.bit_rate = int(bitrate)
            for k in range(0, max(len(a), 1), 1024):
                chunk = a[k : k + 1024]
                if chunk.size == 0:
                    chunk = np.zeros(1024, np.float32)
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk.reshape(1, -1)), format="flt", layout="mono")
                af.sample_rate = sr
                af.pts = k
                for pkt in st.encode(af):
                    c.mux(pkt)
            for pkt in st.encode():
                c.mux(pkt)
    return Path(path)


def write_video(
    path: str | os.PathLike,
    frames: Sequence[np.ndarray] | np.ndarray,
    fps: float = FPS,
    audio: np.ndarray | None = None,
    sr: int = SR,
    **kwargs,
) -> Path:
    """Write frames (+ optional mono audio) as an H.264/AAC mp4, atomically."""
    with VideoWriter(path, fps=fps, audio=audio, sr=sr, **kwargs) as w:
        w.write_frames(frames)
    return Path(path)


# --------------------------------------------------------------------------- assets


def sample_paths() -> tuple[Path, Path]:
    """The bundled demo clip (with a visible face and its own audio) and a speech file."""
    root = Path(__file__).resolve().parents[1] / "assets" / "sample"
    return root / "sample.mp4", root / "speech.wav"
