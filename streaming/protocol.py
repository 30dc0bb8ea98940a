"""What the streaming layer needs from an engine session, written down as a Protocol.

The WebRTC server and the live microphone path only ever talk to an object with this
shape (see docs/ARCHITECTURE.md, "Engine session contract"). Keeping it as a Protocol
lets the transport layers be tested without a model (`streaming.passthrough`) while
production code passes `engine.session.Session` unchanged.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Protocol, Union, runtime_checkable

import numpy as np

__all__ = ["SessionLike", "OutputFrameLike", "SessionFactory"]


@runtime_checkable
class OutputFrameLike(Protocol):
    pts: float
    frame: np.ndarray
    generated: bool
    reason: str | None
    window: int


@runtime_checkable
class SessionLike(Protocol):
    stats: Any

    async def push_video(self, frame: np.ndarray, pts: float) -> None: ...

    async def push_audio(self, samples: np.ndarray, pts: float) -> None: ...

    async def get(self) -> OutputFrameLike | None: ...

    async def close(self) -> None: ...


SessionFactory = Callable[[], Union[SessionLike, Awaitable[SessionLike]]]
"""Makes one session per peer / live run; may be sync or async (model sessions may
need to await the shared model's worker)."""
