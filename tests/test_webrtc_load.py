"""Load: one `tccp serve` process holds 4 concurrent WebRTC calls for a while.

Every call keeps receiving video the whole time (whatever share of it the model
manages to edit on this machine): no pause as long as the server's own media timeout,
and no call starved beside the others; the server's RSS stays flat after warm-up (within
50 MB), a 5th caller gets 503 with a one-line reason, and a caller that vanishes
mid-call (its UDP sockets closed: no BYE, no DTLS close) frees its slot within the
watchdog time, after which a new caller gets in.

The server runs in a subprocess, so its RSS is its own, with what `tccp serve` runs:
`ModelSessions` on the bundled pack (loaded and warmed at start, a pool of ready
face trackers), real engine sessions, the live playout. Loopback only, bounded loops.

Duration: `TCCP_LOAD_SECONDS` (default 40 in the suite: past the ~30 s at which ICE
consent expired on asyncio's loop, docs/streaming.md; the issue's 60 s run:
`TCCP_LOAD_SECONDS=60 .venv/bin/python -m pytest -q tests/test_webrtc_load.py`).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import drop_transport, rss_mb, shared_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
SECONDS = float(os.environ.get("TCCP_LOAD_SECONDS", "40"))
CALLS, FLAT_MB, MEDIA_TIMEOUT_S = 4, 50.0, 2.0
SIZE = 256

SERVER = f"""
import asyncio, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from streaming.server import (ServerConfig, create_app, freeze_startup_objects, limit_malloc_arenas,
                              set_threads, start_server, ModelSessions)
limit_malloc_arenas()
set_threads(None)
from engine.runner import default_pack_missing
model = None
if default_pack_missing():
    from engine.model import SharedModel
    from fakes import FakeRunner
    model = SharedModel(FakeRunner())
factory = ModelSessions(None, "cpu", trackers={CALLS}, model=model)
factory.warm()
freeze_startup_objects()

async def main():
    cfg = ServerConfig(media_timeout_s={MEDIA_TIMEOUT_S}, max_sessions={CALLS}, window_s=factory.window_s)
    app = create_app(cfg, factory)
    runner, url = await start_server(app, "127.0.0.1", 0)
    print(url, factory.window_s, flush=True)
    await asyncio.Event().wait()

from streaming.eventloop import run
run(main())
"""


@pytest.fixture(scope="module")
def clip():
    import cv2

    from tccp.media.io import read_audio, read_video

    path = shared_file("data", "clips", "vr_face3.mp4")
    frames = read_video(path, max_frames=125).frames
    frames = np.stack([cv2.resize(f, (SIZE, SIZE), interpolation=cv2.INTER_AREA) for f in frames])
    return frames, read_audio(path, sr=48000, max_seconds=5.0)


class _Watch:
    """Arrival times of one client's video frames."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []

    async def consume(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                self.arrivals.append(time.monotonic())

    def gaps_since(self, t0: float) -> float:
        a = [t for t in self.arrivals if t >= t0]
        return float(np.max(np.diff(a))) if len(a) > 1 else float("inf")

    def worst_gap(self, t0: float) -> tuple[float, float]:
        """(longest gap, when it started, s after t0)."""
        a = np.array([t for t in self.arrivals if t >= t0])
        if len(a) < 2:
            return float("inf"), 0.0
        d = np.diff(a)
        k = int(np.argmax(d))
        return float(d[k]), float(a[k] - t0)


async def _call(url: str, clip):
    """A caller: (pc, watch); video + audio of the clip, looping, in real time."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    from streaming.client import ClipAudioTrack, ClipVideoTrack, post_offer

    frames, audio = clip
    pc = RTCPeerConnection()
    watch = _Watch()
    pc.on("track", lambda track: asyncio.ensure_future(watch.consume(track)))
    pc.addTrack(ClipVideoTrack(frames))
    pc.addTrack(ClipAudioTrack(audio))
    await pc.setLocalDescription(await pc.createOffer())
    try:
        answer = await post_offer(url + "/offer", {"sdp": pc.localDescription.sdp, "type": "offer"})
    except BaseException:
        await pc.close()
        raise
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    return pc, watch


# real time on a shared 2-core CPU: when other jobs load it, a frame can miss by a few ms;
# rerun once (pytest-rerunfailures) -- a real regression fails both times
@pytest.mark.flaky(reruns=1, reruns_delay=5)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS read from /proc")
def test_four_calls_held_under_load(clip):
    import aiohttp

    from streaming.client import OfferRefused
    from streaming.peer import PeerLimits

    close_timeout_s = PeerLimits().close_timeout_s  # what `tccp serve` runs with

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("MALLOC_ARENA_MAX", None)
    proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    rss: list[tuple[float, float]] = []
    report: dict = {}

    async def run(url: str) -> None:
        async with aiohttp.ClientSession() as http:
            async def health() -> dict:
                async with http.get(url + "/healthz") as r:
                    return await r.json()

            calls = [await _call(url, clip) for _ in range(CALLS)]
            t_start = time.monotonic()
            # a 5th caller while all 4 are in: 503, one line
            with pytest.raises(OfferRefused) as err:
                extra = await _call(url, clip)
                await extra[0].close()
            assert err.value.status == 503
            reason = err.value.body["error"]
            assert reason.startswith(f"server is full: {CALLS} of {CALLS} sessions") and "\n" not in reason
            end = t_start + SECONDS
            while time.monotonic() < end:
                rss.append((time.monotonic() - t_start, rss_mb(proc.pid)))
                await asyncio.sleep(1.0)
            t_end = time.monotonic()
            h = await health()
            report["shares"] = [c["generated_share"] for c in h["calls"]]
            assert len(h["calls"]) == CALLS, f"the server dropped a call: {h['calls']}"
            # every call received video all along (after its first second)
            for pc, watch in calls:
                assert watch.arrivals, "a caller never received video"
                first = watch.arrivals[0]
                assert first - t_start < 3.0
                report.setdefault("max_gap_s", []).append(watch.gaps_since(first))
                report.setdefault("worst", []).append(watch.worst_gap(t_start))
                report.setdefault("frames", []).append(len(watch.arrivals))
                # a stall is what the server itself would call dead media: no frame for its
                # media timeout. Shorter pauses are the machine's: here the server and the 4
                # callers (each encoding and decoding VP8) share 2 cores, longest gaps 0.6-1.0 s
                assert watch.gaps_since(first) < MEDIA_TIMEOUT_S, f"a caller's video stalled: {report}"
                assert t_end - watch.arrivals[-1] < MEDIA_TIMEOUT_S, f"a caller's video stopped: {report}"
            # no call starved beside the others, and none reduced to a trickle. The rate itself is
            # the machine's, measured in `tccp bench --live`, not asserted here: with server and
            # callers on the same 2 cores it went 6+ fps per call on a quiet day to 2.4 on a slow
            # one (2026-12-01, same streaming code), so the floor is 1 fps
            frames = report["frames"]
            assert min(frames) >= 0.5 * max(frames), f"a call starved beside the others: {report}"
            assert min(frames) >= 1.0 * SECONDS, f"a caller got too few frames: {report}"
            # one caller vanishes: its slot is free within the watchdog time
            gone, _ = calls.pop()
            drop_transport(gone)
            t0 = time.monotonic()
            while (await health())["sessions"] > CALLS - 1 and time.monotonic() - t0 < MEDIA_TIMEOUT_S + 10:
                await asyncio.sleep(0.1)
            report["freed_after_s"] = time.monotonic() - t0
            assert (await health())["sessions"] == CALLS - 1, "the server kept a vanished caller"
            # the watchdog's doing (ICE consent alone would take ~30 s): the server notices within
            # the media timeout and gives the slot back when the peer starts closing (aiortc's
            # close of the vanished peer, 1.9 s under this load, no longer holds it; the close
            # timeout bounds it anyway), plus the event loop's lag on a loaded 2-core machine
            # (freed after 2.8 s measured; 3.3-6.0 s while the close still held the slot)
            assert report["freed_after_s"] < MEDIA_TIMEOUT_S + close_timeout_s + 3.0, report
            late = await _call(url, clip)  # the freed slot takes a new caller
            t1 = time.monotonic()
            while not late[1].arrivals and time.monotonic() - t1 < 10:
                await asyncio.sleep(0.1)
            assert late[1].arrivals, "the new caller got no video"
            calls.append(late)
            for pc, _ in calls:
                await pc.close()
            with_timeout = time.monotonic() + 15
            while (await health())["sessions"] and time.monotonic() < with_timeout:
                await asyncio.sleep(0.2)
            assert (await health())["sessions"] == 0
            try:
                await asyncio.wait_for(gone.close(), 5)
            except Exception:  # noqa: BLE001 - its transport is gone on purpose
                pass

    try:
        line = proc.stdout.readline()
        match = re.match(r"(http://\S+)", line)
        assert match, f"server did not start: {line!r}"
        from streaming.eventloop import run as run_loop

        run_loop(run(match.group(1)))  # the callers are aiortc peers too: same loop as a server
    finally:
        proc.terminate()
        proc.wait(10)
    warm = max(8.0, SECONDS / 3)
    after = [m for t, m in rss if t >= warm]
    growth = max(after) - after[0] if after else 0.0
    print(f"{CALLS} calls for {SECONDS:.0f} s: frames received {report.get('frames')}, longest gaps "
          f"{[round(g, 2) for g in report.get('max_gap_s', [])]} s, generated shares {report.get('shares')}; "
          f"server RSS {rss[0][1]:.0f} -> {rss[-1][1]:.0f} MB, growth after {warm:.0f} s {growth:.0f} MB; "
          f"vanished caller freed after {report.get('freed_after_s', 0):.1f} s")
    assert growth <= FLAT_MB, f"server RSS grew {growth:.0f} MB after warm-up: {rss}"
