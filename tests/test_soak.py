"""Soak: one `tccp serve` process, rounds of clients that connect, stream a real
talking-head clip and vanish (no BYE, no DTLS close: the server finds out by its media
timeout). The server's RSS must stay flat after warm-up (within 50 MB).

Rounds: `TCCP_SOAK_ROUNDS` (default 10 in the suite, after 3 warm-up rounds: RSS is flat
from round 2, and before the fix it grew ~28 MB a round, ~200 MB over the 7 measured;
the 20-round run of docs/streaming.md: `TCCP_SOAK_ROUNDS=20 .venv/bin/python -m pytest -q
tests/test_soak.py`).

The server runs in a subprocess so that its RSS is its own. It is the real app
(`streaming.server.create_app`), with the same start-up memory settings as `tccp serve`
and real engine sessions, each with its own mediapipe face tracker (where the memory
went, see streaming/server.py "memory"); the model is the engine's test double
(`tests/fakes.FakeRunner`), shared by all sessions as a real model is, so the test
measures what each session adds rather than a model's speed.
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = int(os.environ.get("TCCP_SOAK_ROUNDS", "10"))
CLIENTS, WARMUP, FLAT_MB = 4, 3, 50.0
MEDIA_TIMEOUT_S = 0.6

SERVER = f"""
import asyncio, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from streaming.server import (ServerConfig, create_app, freeze_startup_objects, limit_malloc_arenas,
                              start_server)
limit_malloc_arenas()
from engine.config import EngineConfig
from engine.model import SharedModel
from engine.session import Session
from fakes import FakeRunner

model = SharedModel(FakeRunner())
cfg = EngineConfig(live=True, steps=1)
freeze_startup_objects()

async def main():
    app = create_app(ServerConfig(media_timeout_s={MEDIA_TIMEOUT_S}, max_sessions={CLIENTS}),
                     lambda: Session(model, cfg))
    runner, url = await start_server(app, "127.0.0.1", 0)
    print(url, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def clip():
    import cv2

    from tccp.media.io import read_audio, read_video

    path = shared_file("data", "clips", "vr_face3.mp4")
    frames = read_video(path, max_frames=50).frames
    frames = np.stack([cv2.resize(f, (256, 256), interpolation=cv2.INTER_AREA) for f in frames])
    return frames, read_audio(path, sr=48000, max_seconds=2.0)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS read from /proc")
def test_server_rss_is_flat_over_rounds_of_abandoned_sessions(clip):
    import aiohttp

    from streaming.client import ClipAudioTrack, ClipVideoTrack, connect

    frames, audio = clip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("MALLOC_ARENA_MAX", None)
    proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    rss: list[float] = []

    async def rounds(url: str) -> None:
        async with aiohttp.ClientSession() as http:
            async def metric(name: str) -> float:
                async with http.get(url + "/metrics") as r:
                    text = await r.text()
                return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(name))

            async def health() -> dict:
                async with http.get(url + "/healthz") as r:
                    return await r.json()

            async def active() -> int:
                return int((await health())["sessions"])

            for _ in range(ROUNDS):
                passes = (await health())["memory_passes"]
                before = await metric("tccp_frames_out_total")
                pcs = [c[0] for c in await asyncio.gather(
                    *(connect(url, ClipVideoTrack(frames), ClipAudioTrack(audio)) for _ in range(CLIENTS)))]
                end = time.monotonic() + 60  # frames went through the sessions' trackers and back
                while await metric("tccp_frames_out_total") - before < 2 * CLIENTS and time.monotonic() < end:
                    await asyncio.sleep(0.1)
                assert await metric("tccp_frames_out_total") - before >= 2 * CLIENTS, "no frames came back"
                for pc in pcs:
                    drop_transport(pc)
                end = time.monotonic() + 30
                while await active() and time.monotonic() < end:
                    await asyncio.sleep(0.1)
                assert await active() == 0, "the server kept a vanished peer"
                for pc in pcs:
                    try:
                        await asyncio.wait_for(pc.close(), 5)
                    except Exception:  # noqa: BLE001 - the transport is gone on purpose
                        pass
                # the server's memory pass (collection + trim) runs 0.5 s after the last close
                end = time.monotonic() + 10
                while (await health())["memory_passes"] == passes and time.monotonic() < end:
                    await asyncio.sleep(0.1)
                rss.append(rss_mb(proc.pid))

    try:
        line = proc.stdout.readline()
        match = re.match(r"(http://\S+)", line)
        assert match, f"server did not start: {line!r}"
        t0 = time.monotonic()
        asyncio.run(rounds(match.group(1)))
        elapsed = time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(10)
    after = rss[WARMUP:]
    spread = max(after) - min(after)
    print(f"server RSS per round (MB): {', '.join(f'{x:.0f}' for x in rss)}; "
          f"spread after warm-up {spread:.0f} MB; {elapsed:.0f} s")
    assert len(rss) == ROUNDS
    assert spread <= FLAT_MB, f"server RSS grew {spread:.0f} MB after warm-up: {rss}"
