"""The event loop WebRTC processes run on: uvloop where it is installed.

Why: asyncio's own datagram transport reads one datagram per socket per loop turn. A
server holding several calls turns its loop every few milliseconds at best (sessions'
threads share the GIL with it), while each call's socket brings ~150 packets a second
(video + 50 audio packets): the kernel queue grows until it drops, and the late
replies to ICE consent checks (answered within 0.5 s or not at all) closed 3 of 4
calls after 30 s (measured, 2-core CPU, `tests/test_webrtc_load.py` at 45-60 s).
libuv drains up to 32 datagrams per readiness event, so the same server ingests every
packet at 25 fps and keeps its calls. Falls back to asyncio where uvloop is absent.
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, TypeVar

__all__ = ["run", "loop_name"]

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on uvloop when available."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def loop_name() -> str:
    """'uvloop' or 'asyncio': what `run` uses here."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"
