"""File to file: a context video plus driving audio -> an edited mp4 (H.264 + AAC).

The output always covers the whole driving audio (the audio decides the length, as in
dubbing): a context video that is shorter is played forwards and backwards
(ping-pong, so there is no jump cut at the loop point), a longer one is cut. The
output carries the driving audio, not the video's own track, and appears only when
complete (atomic write).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from engine.config import EngineConfig
from engine.model import SharedModel
from engine.session import EngineError, OutputFrame, Session
from tccp.errors import TCCPError

__all__ = ["RunResult", "run_file", "run_file_async", "pingpong_index", "load_image", "context_frames"]


@dataclass
class RunResult:
    out: Path
    frames: int
    duration: float
    """Seconds of output (= driving audio, to within a frame)."""
    summary: dict
    """`SessionStats.summary()` of the run."""
    metrics: dict
    """`SessionStats.as_metrics()` of the run."""
    context_frames: int
    """Frames the context video had (before ping-pong / cut)."""
    looped: bool
    preview: list | None = None
    """With preview_frames: (original, target sketch, output frame, face box) of a few frames."""
    stage1: Any = field(default=None, repr=False)
    """The run's own stage 1 when it was adapted to the person (`engine.adapt`), else None."""


def _preview_row(original: np.ndarray, of, size: int) -> tuple:
    """(original, sketch of the target landmarks, output frame, face box or None)."""
    from tccp.face.sketch import draw_sketch

    if of.targets is not None:
        sketch = draw_sketch(of.targets, size)
    else:
        sketch = np.zeros((size, size, 3), np.uint8)
    return (original, sketch, of.frame, of.box)


def pingpong_index(i: int, n: int) -> int:
    """Frame of an `n`-frame clip shown at output frame `i` when played back and forth
    (0 1 2 .. n-1 n-2 .. 1 0 1 ...): the end frames are not doubled, so the motion
    reverses smoothly."""
    if n <= 1:
        return 0
    period = 2 * (n - 1)
    k = i % period
    return k if k < n else period - k


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB uint8 image from a still image (or the first frame of a video)."""
    import cv2

    p = Path(path)
    if not p.exists():
        raise TCCPError(f"{p}: no such file")
    img = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if img is not None:
        return np.ascontiguousarray(img[:, :, ::-1])
    from tccp.media import io as media

    try:
        for _, frame in media.iter_video(p, fps=None, max_frames=1, min_frames=1):
            return frame
    except TCCPError:
        pass
    raise TCCPError(f"{p}: cannot read an image from this file")


def context_frames(video: Path, n_out: int, fps: float) -> tuple[Iterator[np.ndarray], int, bool]:
    """Frames 0..n_out-1 of the context video on the output timeline.

    Returns (iterator, number of source frames used or known, looped). A video at
    least as long as the audio is streamed and cut (constant memory); a shorter one is
    decoded once and played ping-pong.
    """
    from tccp.media import io as media

    info = media.probe(video)
    if not info.has_video:
        raise TCCPError(f"{video}: has no video stream (is it an audio file?)")
    expected = int(np.floor(info.duration * fps + 1e-6))
    if expected >= n_out + 2:
        src = media.iter_video(video, fps=fps, max_frames=n_out)
        first = next(src, None)  # surfaces decode errors before any work starts
        if first is None:
            raise TCCPError(f"{video}: no frames could be decoded")

        def cut() -> Iterator[np.ndarray]:
            last = first[1]
            yield last
            count = 1
            for _, f in src:
                last = f
                yield f
                count += 1
            while count < n_out:  # a damaged tail: hold the last frame
                yield last
                count += 1

        return cut(), n_out, False
    vd = media.read_video(video, fps=fps)
    frames = vd.frames
    n = int(frames.shape[0])

    def pingpong() -> Iterator[np.ndarray]:
        for i in range(n_out):
            yield frames[pingpong_index(i, n)]

    return pingpong(), n, n < n_out


def _driving_audio(video: Path, audio: Path | None, sr: int, max_seconds: float | None) -> tuple[np.ndarray, Path]:
    from tccp.media import io as media

    src = audio if audio is not None else video
    if not src.exists():
        raise TCCPError(f"{src}: no such file")
    info = media.probe(src)
    if not info.has_audio:
        if audio is None:
            from tccp.data.prepare import sibling_audio

            near = sibling_audio(video)
            hint = f" ({near.name} lies beside it)" if near is not None else ""
            raise TCCPError(f"{video}: has no audio track to drive the face; pass --audio FILE{hint}")
        raise TCCPError(f"{src}: has no audio stream")
    samples = media.read_audio(src, sr=sr, max_seconds=max_seconds)
    if max_seconds is not None:
        samples = samples[: int(round(max_seconds * sr))]
    if samples.size < sr // 10:
        raise TCCPError(f"{src}: audio is too short ({samples.size / sr:.2f} s)")
    return samples, src


async def run_file_async(
    video: str | os.PathLike,
    out: str | os.PathLike,
    model: SharedModel,
    *,
    audio: str | os.PathLike | None = None,
    config: EngineConfig | None = None,
    identity: str | os.PathLike | np.ndarray | None = None,
    max_seconds: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    tracker=None,
    preview_frames: int = 0,
    adapt_progress: Callable[[int, int, str], None] | None = None,
) -> RunResult:
    """Edit `video` so the face speaks `audio` (default: the video's own track).

    `identity` is an image (path or RGB array) whose face is the identity reference;
    by default the video's own face is used. `preview_frames` > 0 keeps that many
    (original, sketch, generated) triples spread over the run for a preview image.
    `adapt_progress(done, total, phase)` follows the adaptation before the first frame
    (`engine.adapt.AdaptConfig.progress`).
    """
    from tccp.media import io as media

    from tccp.face.track import MIN_FACE_FRACTION, no_face_message
    from tccp.io_utils import guard_output

    video, out = Path(video), Path(out)
    if not video.exists():
        raise TCCPError(f"{video}: no such file")
    if out.suffix.lower() not in (".mp4", ".m4v", ".mov"):
        raise TCCPError(f"{out}: output must be an .mp4 file")
    guard_output(out, inputs=(video, audio, identity if not isinstance(identity, np.ndarray) else None))
    cfg = (config or EngineConfig()).with_(live=False)
    # backpressure makes deep input buffering pointless for files: one window of slack
    # keeps tracking ahead of the model without inflating per-window latency
    cfg = cfg.with_(video_queue=min(cfg.video_queue, cfg.window))
    if max_seconds is not None and max_seconds <= 0:
        raise TCCPError(f"--max-seconds {max_seconds}: must be positive")
    samples, audio_src = _driving_audio(video, Path(audio) if audio is not None else None, cfg.sr, max_seconds)
    n_out = int(round(samples.size / cfg.sr * cfg.fps))
    if n_out < 1:
        raise TCCPError(f"{audio_src}: audio is shorter than one frame")
    frames_it, n_ctx, looped = context_frames(video, n_out, cfg.fps)

    loop = asyncio.get_running_loop()
    template = getattr(model.runner, "template", None)
    if identity is not None:
        from engine.refs import bank_from_image

        name = str(identity) if not isinstance(identity, np.ndarray) else "identity image"
        img = identity if isinstance(identity, np.ndarray) else load_image(identity)
        bank = await loop.run_in_executor(None, bank_from_image, img, template, model.size, name)
        cfg = cfg.with_(references=bank, identity=None)
    elif cfg.references is None and tracker is None and template is not None \
            and getattr(model.runner, "references", None) is None:
        # the bank from frames spread over the whole context video (not just its start)
        from engine.refs import scan_video

        builder = await loop.run_in_executor(None, scan_video, video, template, 8, model.size)
        if builder is not None:
            cfg = cfg.with_(references=builder.bank)

    from engine.adapt import AdaptConfig, adapt_from_video, adaptable_pipeline, trainable_stage1

    adapt = None
    pipe = adaptable_pipeline(model, cfg) if cfg.adapt_start_s is not None and tracker is None else None
    if pipe is not None:
        # keep_track: the session replays the start the adaptation tracked (engine.prep.ReplayTracker)
        acfg = AdaptConfig(steps=cfg.adapt_steps, seconds=cfg.adapt_seconds, seed=cfg.seed,
                           keep_track=cfg.replay_tracking, progress=adapt_progress)
        gen1 = await loop.run_in_executor(None, trainable_stage1, pipe)
        adapt = await loop.run_in_executor(None, adapt_from_video, video, gen1, pipe.whisper, acfg,
                                           cfg.adapt_start_s, cfg.fps, cfg.adapt_audio)
        if adapt.generator is not None:
            cfg = cfg.with_(stage1=adapt.generator)
        if adapt.track is not None:
            tracker = adapt.track.replay()  # the session closes it

    keep = preview_frames > 0
    try:
        sess = Session(model, cfg, tracker=tracker, keep_debug=keep, name=f"file:{video.name}")
    except BaseException:
        if adapt is not None and tracker is not None:
            tracker.close()
        raise
    preview: list = []
    preview_at = set(np.linspace(0, n_out - 1, preview_frames).round().astype(int).tolist()) if keep else set()
    originals: dict[int, np.ndarray] = {}

    async def produce() -> None:
        await sess.push_audio(samples, 0.0)
        for i, frame in enumerate(frames_it):
            if i >= n_out:
                break
            if i in preview_at:
                originals[i] = frame
            await sess.push_video(frame, i / cfg.fps)
        await sess.close()

    writer = media.VideoWriter(out, fps=cfg.fps, audio=samples, sr=cfg.sr)
    written = 0
    # a clip that mostly shows no face is refused, not copied through (exit 2): stop
    # as soon as more than (1 - MIN_FACE_FRACTION) of the output can have no face
    no_face, allowed = 0, int(np.floor(n_out * (1.0 - MIN_FACE_FRACTION) + 1e-9))
    producer = asyncio.get_running_loop().create_task(produce())
    try:
        while True:
            of: OutputFrame | None = await sess.get()
            if of is None:
                break
            if of.reason == "no_face":
                no_face += 1
                if no_face > allowed:
                    seen = written + 1
                    raise TCCPError(
                        no_face_message(str(video), n_out, n_out) if no_face >= n_out else
                        f"{video}: no face in {no_face} of the first {seen} frames ({n_out} in all); a face "
                        f"must be visible in at least {MIN_FACE_FRACTION:.0%} of them")
            writer.write(of.frame)
            if written in preview_at and written in originals:
                preview.append(_preview_row(originals.pop(written), of, model.size))
            written += 1
            if progress is not None:
                progress(written, n_out)
        await producer
        if written != n_out:
            raise RuntimeError(f"engine produced {written} frames for {n_out} inputs")
        if asyncio.current_task().cancelling():  # a Ctrl-C swallowed on the way: still no output
            raise asyncio.CancelledError
        writer.close()
    except BaseException as exc:
        writer.abort()
        producer.cancel()
        sess.abort()
        if isinstance(exc, EngineError) and isinstance(exc.__cause__, TCCPError):
            raise exc.__cause__ from None
        raise
    stats = sess.stats
    summary = stats.summary()
    if adapt is not None:
        summary["adapt"] = adapt.summary()
        summary["adapt"]["frames_replayed"] = int(getattr(tracker, "replayed", 0))  # tracked once, not twice
    return RunResult(
        out=out,
        frames=written,
        duration=written / cfg.fps,
        summary=summary,
        metrics=stats.as_metrics(),
        context_frames=n_ctx,
        looped=looped,
        preview=preview if keep else None,
        stage1=cfg.stage1 if adapt is not None and adapt.generator is not None else None,
    )


def run_file(video, out, model: SharedModel, **kwargs) -> RunResult:
    """Synchronous wrapper of `run_file_async` (its own event loop; Ctrl-C and SIGTERM
    cancel it and end as KeyboardInterrupt, `engine.aio`)."""
    from engine.aio import run_interruptible

    return run_interruptible(run_file_async(video, out, model, **kwargs))
