"""Real-time video sources for live runs: a looping context video or a camera.

Both stamp frames on the run's shared monotonic clock (`origin`), the same clock the
audio sources use, so the engine can align lips to sound without knowing where either
came from. A file is paced to real time (frame k is released at origin + k / fps) so it
behaves like a camera; it loops because the live context video is usually a short
take that has to last as long as the speaker talks.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import AsyncIterator, Protocol

import numpy as np

from tccp.errors import TCCPError

__all__ = ["VideoSource", "LoopingVideoSource", "CameraSource", "open_video_source"]


class VideoSource(Protocol):
    fps: float

    def frames(self, origin: float) -> AsyncIterator[tuple[float, np.ndarray]]:
        """`(pts_seconds_since_origin, rgb_uint8)` in real time until stopped."""


class LoopingVideoSource:
    """A video file played at `fps` in real time, looped `loops` times (None: forever)."""

    def __init__(self, path: str | Path, fps: float = 25.0, loops: int | None = None,
                 realtime: bool = True) -> None:
        from tccp.media.io import probe

        self.path = Path(path)
        if not self.path.exists():
            raise TCCPError(f"{self.path}: no such file")
        info = probe(self.path)
        if not info.has_video:
            raise TCCPError(f"{self.path}: has no video stream (is it an audio file?)")
        self.fps = float(fps)
        self.loops = loops
        self.realtime = realtime
        self.sent = 0

    async def frames(self, origin: float) -> AsyncIterator[tuple[float, np.ndarray]]:
        from tccp.media.io import iter_video

        loop = asyncio.get_running_loop()
        start = time.monotonic() - origin  # session time of this source's frame 0
        done = 0
        while self.loops is None or done < self.loops:
            it = iter_video(self.path, fps=self.fps)
            try:
                while True:
                    # decoding is CPU work: keep it off the event loop
                    item = await loop.run_in_executor(None, next, it, None)
                    if item is None:
                        break
                    pts = start + self.sent / self.fps
                    if self.realtime:
                        wait = origin + pts - time.monotonic()
                        if wait > 0:
                            await asyncio.sleep(wait)
                    self.sent += 1
                    yield pts, item[1]
            finally:
                it.close()
            done += 1


class CameraSource:
    """A local camera through OpenCV (V4L2 on Linux); frames stamped on arrival."""

    def __init__(self, index: int = 0, fps: float = 25.0, width: int | None = None,
                 height: int | None = None) -> None:
        import cv2

        self.index = index
        self.fps = float(fps)
        self._cap = cv2.VideoCapture(index)
        if not self._cap.isOpened():
            self._cap.release()
            raise TCCPError(f"camera {index}: cannot open (no camera, or it is in use)")
        if width:
            self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        if height:
            self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self._cap.set(cv2.CAP_PROP_FPS, fps)
        self.sent = 0

    def _read(self) -> np.ndarray | None:
        import cv2

        ok, bgr = self._cap.read()
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if ok else None

    async def frames(self, origin: float) -> AsyncIterator[tuple[float, np.ndarray]]:
        loop = asyncio.get_running_loop()
        try:
            while True:
                img = await loop.run_in_executor(None, self._read)
                if img is None:
                    raise TCCPError(f"camera {self.index}: stopped delivering frames")
                self.sent += 1
                yield time.monotonic() - origin, img
        finally:
            self._cap.release()


def open_video_source(spec: str | int | Path, fps: float = 25.0) -> LoopingVideoSource | CameraSource:
    """`3`, `"3"`, `"camera"`, `"camera:3"` -> a camera; anything else -> a looping file."""
    if isinstance(spec, int):
        return CameraSource(spec, fps)
    s = str(spec)
    if s.isdigit():
        return CameraSource(int(s), fps)
    if s in ("camera", "cam"):
        return CameraSource(0, fps)
    for prefix in ("camera:", "cam:"):
        if s.startswith(prefix):
            idx = s[len(prefix):]
            if not idx.isdigit():
                raise TCCPError(f"{s}: camera index must be a number (e.g. camera:0)")
            return CameraSource(int(idx), fps)
    return LoopingVideoSource(s, fps)
