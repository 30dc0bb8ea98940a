"""A pass-through session: a TEST DOUBLE and a `--passthrough` debug mode, not the model.

It honours the engine session contract (push_video / push_audio / get / close / stats)
but returns every input frame unchanged (`generated=False, reason="passthrough"`).
Why it exists: the signaling, transport, watchdog and metrics code of the server can
be exercised (and debugged in a browser with `tccp serve --passthrough`) without
loading a model, and a network problem can be told apart from a model problem.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from engine.stats import SessionStats, WindowTiming

__all__ = ["PassthroughSession", "PassthroughFrame"]


@dataclass
class PassthroughFrame:
    """Same fields as `engine.session.OutputFrame`."""

    pts: float
    frame: np.ndarray
    generated: bool = False
    reason: str | None = "passthrough"
    window: int = 0


class PassthroughSession:
    """Echo session. `live=True` drops the oldest queued frame instead of blocking."""

    def __init__(self, live: bool = True, queue_size: int = 64, window_new_frames: int = 7) -> None:
        self.live = live
        self.stats = SessionStats()
        self.stats.started = time.monotonic()
        self._queue: asyncio.Queue[PassthroughFrame | None] = asyncio.Queue(queue_size)
        self._new = window_new_frames
        self._closed = False
        self._n = 0
        self._last_push = 0.0
        self.audio_samples = 0

    async def push_video(self, frame: np.ndarray, pts: float) -> None:
        if self._closed:
            raise RuntimeError("session is closed")
        self.stats.frames_in += 1
        out = PassthroughFrame(float(pts), frame, window=self._n // self._new)
        self._last_push = time.monotonic()
        if self.live:
            while self._queue.full():
                self._queue.get_nowait()
                self.stats.dropped_output += 1
            self._queue.put_nowait(out)
        else:
            await self._queue.put(out)
        self._n += 1
        if self._n % self._new == 0:
            self._record_window(self._new)

    async def push_audio(self, samples: np.ndarray, pts: float) -> None:
        if self._closed:
            raise RuntimeError("session is closed")
        self.audio_samples += int(np.asarray(samples).size)

    async def get(self) -> PassthroughFrame | None:
        """Next frame; None once the session is closed and drained."""
        if self._closed and self._queue.empty():
            return None
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # keep answering None to later callers
            return None
        self.stats.frames_out += 1
        self.stats.passthrough["passthrough"] += 1
        return item

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._n % self._new:
            self._record_window(self._n % self._new)
        while self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(None)
        self.stats.finished = time.monotonic()

    def _record_window(self, frames: int) -> None:
        self.stats.add_window(
            WindowTiming(
                window=self.stats.windows_total, frames=frames, level=0, steps=0,
                mode="passthrough", e2e=time.monotonic() - self._last_push,
            )
        )
