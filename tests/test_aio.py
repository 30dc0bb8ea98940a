"""engine.aio.run_interruptible: Ctrl-C and SIGTERM cancel the command's coroutine
(its cleanup runs) and end as KeyboardInterrupt / Terminated; handlers are restored."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from engine.aio import run_interruptible
from tccp.cli import Terminated


async def _work(cleaned: list, sig: int) -> str:
    asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), sig)
    try:
        await asyncio.sleep(10)
    finally:
        cleaned.append(True)
    return "finished"


@pytest.mark.parametrize("sig, exc", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_signal_cancels_then_interrupts(sig, exc):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    cleaned: list = []
    with pytest.raises(exc) as info:
        run_interruptible(_work(cleaned, sig))
    assert cleaned == [True]
    assert (type(info.value) is Terminated) == (sig == signal.SIGTERM)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert signal.set_wakeup_fd(-1) == -1  # the loop's wake-up fd was released


def test_result_and_errors_pass_through():
    async def ok():
        await asyncio.sleep(0)
        return 7

    async def bad():
        raise ValueError("boom")

    assert run_interruptible(ok()) == 7
    with pytest.raises(ValueError, match="boom"):
        run_interruptible(bad())


def test_cancellation_swallowed_by_the_coroutine_is_its_own_choice():
    """A coroutine that catches the cancellation and returns gives its result (as
    asyncio.run does); file runs guard their commit with `cancelling()` instead."""
    seen = {}

    async def stubborn():
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGINT)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen["cancelling"] = asyncio.current_task().cancelling()
        return "kept"

    assert run_interruptible(stubborn()) == "kept"
    assert seen == {"cancelling": 1}
