"""Live audio in (microphone or a file played in real time) and the `run --live` loop.

`MicSource` wraps a `sounddevice` input stream: the PortAudio callback thread hands
blocks to the event loop, each stamped on the run's shared monotonic clock by sample
count (sample-accurate, unlike per-callback wall time, which jitters). `FileAudioSource`
has the same interface and pacing so the live path can be tested on machines without
a microphone (CI). `run_live` wires a video source, an audio source, one engine
`Session` and a sink (mp4 file or window) together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np

from tccp.errors import TCCPError

__all__ = ["AudioBlock", "MicSource", "FileAudioSource", "LiveResult", "run_live", "list_input_devices"]

log = logging.getLogger("tccp.live")

SR = 16000


@dataclass
class AudioBlock:
    samples: np.ndarray
    """Mono float32 at 16 kHz."""
    pts: float
    """Session time (seconds since the run's origin) of the first sample."""


def _sounddevice():
    try:
        import sounddevice as sd
    except OSError as exc:  # the wheel imports but libportaudio is missing
        raise TCCPError(f"no microphone found: audio system unavailable ({exc}; "
                        "install libportaudio2)") from None
    except ImportError:
        raise TCCPError("no microphone found: the 'sounddevice' package is not installed") from None
    return sd


def list_input_devices() -> list[dict[str, Any]]:
    """Input-capable devices as sounddevice reports them (empty when there is none)."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
    except Exception:
        return []
    return [dict(d, index=i) for i, d in enumerate(devices) if d.get("max_input_channels", 0) > 0]


class MicSource:
    """The default (or a chosen) microphone as 16 kHz mono float32 `AudioBlock`s.

    Checks for an input device on construction, so a machine without one fails before
    any model is loaded: `TCCPError("no microphone found: ...")`. Use as
    `async with MicSource() as mic: async for block in mic.blocks(origin): ...`.
    """

    def __init__(self, device: int | str | None = None, sr: int = SR, block_s: float = 0.02,
                 max_buffer_s: float = 2.0) -> None:
        sd = self._sd = _sounddevice()
        try:
            info = sd.query_devices(device, kind="input")
        except Exception as exc:
            raise TCCPError(f"no microphone found: {' '.join(str(exc).split())}") from None
        if not info or info.get("max_input_channels", 0) < 1:
            raise TCCPError(f"no microphone found: device {device!r} has no input channels")
        self.device = device
        self.name = info.get("name", str(device))
        self.sr = int(sr)
        self.block = max(1, int(round(block_s * sr)))
        self.max_blocks = max(1, int(max_buffer_s / block_s))
        self.overflows = 0
        self.dropped_blocks = 0
        self._stream = None
        self._queue: asyncio.Queue | None = None

    async def __aenter__(self) -> "MicSource":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.stop()
                self._stream.close()
            self._stream = None
        if self._queue is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)

    async def blocks(self, origin: float) -> AsyncIterator[AudioBlock]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._queue = q

        def deliver(data: np.ndarray, t: float) -> None:
            # runs on the loop; bounded so a stalled consumer cannot grow memory
            if q.qsize() >= self.max_blocks:
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
                    self.dropped_blocks += 1
            q.put_nowait((data, t))

        def callback(indata, frames, time_info, status) -> None:  # PortAudio thread
            if status:
                self.overflows += 1
            loop.call_soon_threadsafe(deliver, indata[:, 0].copy(), time.monotonic())

        try:
            self._stream = self._sd.InputStream(
                samplerate=self.sr, channels=1, dtype="float32", blocksize=self.block,
                device=self.device, callback=callback,
            )
            self._stream.start()
        except Exception as exc:
            raise TCCPError(f"no microphone found: cannot open {self.name!r} "
                            f"({' '.join(str(exc).split())})") from None
        start: float | None = None
        n = 0
        try:
            while True:
                item = await q.get()
                if item is None:
                    return
                data, arrived = item
                if start is None:  # the first block ended when its callback ran
                    start = arrived - origin - data.size / self.sr
                yield AudioBlock(data.astype(np.float32, copy=False), start + n / self.sr)
                n += data.size
        finally:
            self.stop()


class FileAudioSource:
    """Any audio (or video) file's sound, delivered like a microphone.

    `realtime=True` paces blocks to the clock; `loop=True` repeats the file until
    stopped; otherwise iteration ends with the file, which ends a live run.
    """

    def __init__(self, path: str | Path, sr: int = SR, block_s: float = 0.02,
                 realtime: bool = True, loop: bool = False) -> None:
        from tccp.media.io import read_audio

        self.path = Path(path)
        if not self.path.exists():
            raise TCCPError(f"{self.path}: no such file")
        self.audio = read_audio(self.path, sr=sr)
        if self.audio.size == 0:
            raise TCCPError(f"{self.path}: contains no audio samples")
        self.sr = int(sr)
        self.block = max(1, int(round(block_s * sr)))
        self.realtime = realtime
        self.loop = loop
        self._stopped = False

    async def __aenter__(self) -> "FileAudioSource":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopped = True

    async def blocks(self, origin: float) -> AsyncIterator[AudioBlock]:
        start = time.monotonic() - origin
        n = 0
        total = self.audio.size
        while not self._stopped and (self.loop or n < total):
            i = n % total
            chunk = self.audio[i:min(i + self.block, total)]
            pts = start + n / self.sr
            if self.realtime:
                # a block is released when its last sample would have been captured
                wait = origin + pts + chunk.size / self.sr - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            else:
                await asyncio.sleep(0)
            yield AudioBlock(chunk, pts)
            n += chunk.size


@dataclass
class LiveResult:
    output: Path | None
    frames_out: int
    frames_generated: int
    seconds: float
    stats: dict = field(default_factory=dict)
    stopped_by: str = ""


async def run_live(
    video_or_camera: str | int | Path,
    out_path_or_window: str | Path | None,
    shared_model: Any,
    config: Any,
    *,
    audio: MicSource | FileAudioSource | None = None,
    duration_s: float | None = None,
    stop: asyncio.Event | None = None,
    session_factory: Callable[[], Any] | None = None,
    on_frame: Callable[[Any], None] | None = None,
) -> LiveResult:
    """Edit a live talking head until stopped; returns what was produced.

    `video_or_camera`: a video file (looped in real time as the context video) or a
    camera (`0`, `"camera:0"`). `out_path_or_window`: an .mp4 path (written atomically
    with the captured audio) or `"window"`/None for an on-screen window. `audio`:
    defaults to the microphone (`MicSource()`, which raises
    `TCCPError("no microphone found: ...")` where there is none). Stops at the first of:
    `duration_s`, `stop` set, the audio source ending (a non-looping file), the window's
    q/Esc key, or cancellation (Ctrl-C); the last partial window is flushed and the file
    finished in every case, and a cancellation is re-raised after that.
    `session_factory` replaces `streaming.live.new_session(shared_model, config)` (tests,
    debugging).
    """
    from streaming.sinks import open_sink
    from streaming.sources import open_video_source

    cfg = config
    if cfg is not None and not getattr(cfg, "live", True):
        cfg = cfg.with_(live=True)  # a live source must never apply backpressure
    fps = float(getattr(cfg, "fps", 25.0))
    video = open_video_source(video_or_camera, fps)
    if audio is None:
        audio = MicSource()
    sink = open_sink(out_path_or_window, fps=fps, sr=SR)
    if session_factory is not None:
        session = session_factory()
    else:
        from streaming.live import new_session

        # the live policy of calls (streaming.live.LiveController): a slow first window
        # (tracker and model warm-up) must not park the session in pass-through for good
        session = new_session(shared_model, cfg)

    origin = time.monotonic()
    done = asyncio.Event()
    why: list[str] = []

    def finish(reason: str) -> None:
        if not done.is_set():
            why.append(reason)
            done.set()

    async def pump_video() -> None:
        async for pts, frame in video.frames(origin):
            await session.push_video(frame, pts)
        finish("video ended")

    async def pump_audio() -> None:
        async for block in audio.blocks(origin):
            await session.push_audio(block.samples, block.pts)
            sink.add_audio(block.samples, block.pts)
        finish("audio ended")

    counts = {"out": 0, "generated": 0}

    async def drain() -> None:
        while True:
            out = await session.get()
            if out is None:
                return
            sink.write(out.frame, out.pts)
            counts["out"] += 1
            counts["generated"] += bool(out.generated)
            if on_frame is not None:
                on_frame(out)
            if sink.wants_stop:
                finish("window closed")

    async def watch_stop() -> None:
        if stop is not None:
            await stop.wait()
            finish("stop requested")

    loop = asyncio.get_running_loop()
    producers = [loop.create_task(c) for c in (pump_video(), pump_audio(), watch_stop())]
    drainer = loop.create_task(drain())
    for t in producers + [drainer]:
        t.add_done_callback(lambda t: t.cancelled() or t.exception() is None or finish("error"))
    cancelled = False
    try:
        await asyncio.wait_for(done.wait(), duration_s) if duration_s else await done.wait()
    except asyncio.TimeoutError:
        finish("duration")
    except asyncio.CancelledError:
        cancelled = True
        finish("cancelled")
    failure: BaseException | None = None
    for t in producers + [drainer]:
        if t.done() and not t.cancelled() and t.exception() is not None:
            failure = failure or t.exception()
    audio.stop()
    for t in producers:
        t.cancel()
    await asyncio.gather(*producers, return_exceptions=True)
    try:
        await session.close()  # flush the last partial window
        await asyncio.wait_for(drainer, 30.0)
    except Exception as exc:
        failure = failure or exc
    finally:
        drainer.cancel()
    stats = session.stats.summary() if hasattr(session.stats, "summary") else {}
    if getattr(session, "adapter", None) is not None:
        stats["adapt"] = session.adapter.summary()
    if failure is not None:
        sink.abort()
        if isinstance(failure, TCCPError):
            raise failure
        raise TCCPError(f"live run failed: {type(failure).__name__}: {failure}") from failure
    output = sink.close()
    result = LiveResult(output, counts["out"], counts["generated"], time.monotonic() - origin,
                        stats, why[0] if why else "")
    if cancelled:
        raise asyncio.CancelledError
    return result
