"""The real page in a real browser: headless Chromium sends a fake camera (a shared clip
as .y4m) and microphone (its audio as .wav) to `tccp serve`, and the page, in its
`?report=1` test mode, POSTs what it received to /test-report.

The sessions are the real engine `Session` on a random-weight tiny model, so the
page shows model output (noise faces pasted into the clip), not an echo.
Needs Debian's chromium (`apt-get install -y chromium`); skipped without it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_file
from streaming.server import ServerConfig, create_app, start_server, state_of

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "browser-token"
W, H = 320, 240
FRAMES = 30

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)"
)


def write_y4m(path: Path, frames: np.ndarray, fps: int = 25) -> Path:
    """Raw I420 frames in a YUV4MPEG2 file (Chromium's fake-camera input format)."""
    import av

    h, w = frames.shape[1:3]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for img in frames:
            yuv = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24").reformat(
                format="yuv420p"
            )
            f.write(b"FRAME\n")
            f.write(yuv.to_ndarray().tobytes())  # (h * 3/2, w): Y, U, V planes, no padding
    return path


def write_wav(path: Path, audio: np.ndarray, sr: int) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def fake_media(tmp_path_factory):
    import cv2

    from tccp.media.io import read_audio, read_video

    clip = shared_file("data", "clips", "vr_face3.mp4")
    folder = tmp_path_factory.mktemp("fake_media")
    frames = read_video(clip, max_frames=75).frames
    side = min(frames.shape[1:3])
    frames = np.stack([cv2.resize(f[:side, :side], (H, H), interpolation=cv2.INTER_AREA) for f in frames])
    pad = (W - H) // 2  # 4:3 like a webcam, face in the middle
    frames = np.pad(frames, ((0, 0), (0, 0), (pad, W - H - pad), (0, 0)), mode="edge")
    y4m = write_y4m(folder / "camera.y4m", frames)
    wav = write_wav(folder / "mic.wav", read_audio(clip, sr=48000, max_seconds=3.0), 48000)
    return y4m, wav


async def _launch(url: str, y4m: Path, wav: Path, profile: Path, log: Path):
    args = [
        str(CHROMIUM), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={y4m}", f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required", "--enable-logging=stderr",
        url,
    ]
    with open(log, "wb") as out:
        return await asyncio.create_subprocess_exec(
            *args, stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True
        )


def _kill(proc) -> None:
    """Hard-kill the browser we started (its own process group), like a crashed tab."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def model_sessions():
    from engine.config import EngineConfig
    from engine.model import SharedModel
    from engine.runner import PipelineRunner
    from engine.session import Session

    shared = SharedModel(PipelineRunner.random())
    # always run the model (no skipping on a slow CI core): 1 step, no degradation. The
    # default 2-window job queue: the browser streams without end, so a deeper queue only
    # grows a backlog (16 windows of ~0.8 s on a loaded 2-core CPU made every edited
    # frame ~13 s late, past any playout delay, and none reached the page)
    cfg = EngineConfig(live=True, steps=1, degrade=False)
    yield lambda: Session(shared, cfg)
    shared.close()


async def _wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return predicate()


async def test_browser_page_round_trip(fake_media, model_sessions, tmp_path):
    y4m, wav = fake_media
    # a generous playout delay: a window of the random model takes ~1 s on a slow shared
    # core, and an edited frame later than the delay is replaced by the original
    cfg = ServerConfig(token=TOKEN, test_report=True, media_timeout_s=5.0, delay_s=4.0, max_delay_s=8.0)
    app = create_app(cfg, model_sessions)
    state = state_of(app)
    runner, url = await start_server(app, "127.0.0.1", 0)
    log = tmp_path / "chromium.log"
    proc = await _launch(f"{url}/?report=1&frames={FRAMES}&token={TOKEN}", y4m, wav,
                         tmp_path / "profile", log)
    try:
        try:
            await asyncio.wait_for(state.report_event.wait(), 150)
        except asyncio.TimeoutError:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(f"the page sent no report within 150 s; chromium log tail:\n{tail}")
        report = state.reports[-1]
        peer = next(iter(state.peers.values()))
        assert report["framesReceived"] >= FRAMES
        # edited frames come back at the size the server received; that is the camera's
        # 320x240 unless Chrome's CPU-overuse adaptation scaled its upload down
        w, h = report["width"], report["height"]
        assert (w, h) == peer._size, (report, peer._size)
        assert w * 3 == h * 4 and w <= W, report
        assert report["fps"] is not None  # shown on the page; its value is machine speed
        assert report["serverFramesOut"] and report["serverFramesOut"] >= 1  # stats channel works
        assert report["e2eEstimateMs"] is not None and report["e2eEstimateMs"] > 0
        assert peer.frames_in >= FRAMES and peer.audio_samples > 16000
        generated = state.metrics.frames_out.labels("true")
        got = await _wait_for(
            lambda: generated._value.get() >= 1 or peer.session.stats.error is not None, 120)
        assert peer.session.stats.error is None  # a failing model says why, first
        st = peer.session.stats
        assert got, (f"the browser never got a model-generated frame ({st.frames_generated} generated, "
                     f"e2e {st.latency()})")
        # the browser dies without a goodbye: the server frees the slot by itself
        _kill(proc)
        t0 = time.monotonic()
        while state.active and time.monotonic() - t0 < 15:
            await asyncio.sleep(0.1)
        assert state.active == 0
    finally:
        _kill(proc)
        await proc.wait()
        await runner.cleanup()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)
