"""Running a command's coroutine so that Ctrl-C and SIGTERM always end it as interrupted.

Why not plain `asyncio.run`: its SIGINT handler is a Python-level signal handler, which
CPython runs between bytecodes of the main thread, wherever that is, including inside
a garbage collector pass or an object finaliser, where an exception it raises is
reported as "ignored" and lost. A `tccp run` of a minute of audio is mostly such
moments (thousands of frame arrays freed), and the test suite saw a Ctrl-C lost in 2 of
9 runs: the run went on and exited 0. Here the signals go through the loop's own
`add_signal_handler`: the C handler writes the signal number to the loop's wake-up pipe
and the loop calls the handler as an ordinary callback, never inside a finaliser. The
first signal cancels the main task (its cleanup runs: temp outputs removed, sessions
closed); a second one raises at once.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import Any, Coroutine, TypeVar

__all__ = ["run_interruptible"]

T = TypeVar("T")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum: int) -> KeyboardInterrupt:
    """The exception a signal ends a command with (the CLI maps it to 130 / 143)."""
    if signum == signal.SIGTERM:
        from tccp.cli import Terminated

        return Terminated()
    return KeyboardInterrupt()


def run_interruptible(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(coro)`, but Ctrl-C / SIGTERM cancel it from a loop callback.

    Raises KeyboardInterrupt (`tccp.cli.Terminated` for SIGTERM) once the cancelled
    coroutine has cleaned up; a coroutine that must not finish after a cancellation
    it did not see checks `asyncio.current_task().cancelling()` before committing. Off the main thread (no signals there) it is
    `asyncio.run`. The previous handlers of both signals are restored afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(coro)
    with asyncio.Runner() as runner:
        loop = runner.get_loop()
        task = loop.create_task(coro)
        got: list[int] = []

        def on_signal(signum: int) -> None:
            got.append(signum)
            if len(got) == 1 and not task.done():
                task.cancel()
                return
            raise _interrupt(signum)

        previous = {}
        for sig in _SIGNALS:
            try:
                previous[sig] = signal.getsignal(sig)
                loop.add_signal_handler(sig, on_signal, sig)
            except (ValueError, RuntimeError, NotImplementedError):  # pragma: no cover
                previous.pop(sig, None)
        try:
            result = loop.run_until_complete(task)
        except asyncio.CancelledError:
            if got:
                raise _interrupt(got[0]) from None
            raise
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        return result  # a signal after the work finished (its output committed)
