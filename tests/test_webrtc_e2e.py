"""WebRTC end to end with an in-process aiortc client: a real clip (video + its audio)
goes to `tccp serve`'s app, edited frames come back; a peer that vanishes mid-stream
is cleaned up by the server within seconds."""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest

from conftest import shared_file
from streaming.client import ClipAudioTrack, ClipVideoTrack, connect
from streaming.passthrough import PassthroughSession
from streaming.server import ServerConfig, create_app, start_server, state_of

SIZE = 256  # the clip is sent at 256x256 to keep two VP8 encoders cheap on CI cores


@pytest.fixture(scope="module")
def clip():
    """vr_face3 (a real talking face): 2 s of frames at SIZE and its audio at 48 kHz."""
    import cv2

    from tccp.media import read_audio, read_video

    path = shared_file("data", "clips", "vr_face3.mp4")
    frames = read_video(path, max_frames=50).frames
    frames = np.stack([cv2.resize(f, (SIZE, SIZE), interpolation=cv2.INTER_AREA) for f in frames])
    audio = read_audio(path, sr=48000, max_seconds=2.0)
    return frames, audio


async def _serve(factory, **cfg):
    app = create_app(ServerConfig(**cfg), factory)
    runner, url = await start_server(app, "127.0.0.1", 0)
    return app, runner, url


async def test_passthrough_round_trip_returns_the_sent_frames(clip):
    """Transport only: what comes back is the clip itself (through VP8 twice)."""
    frames, audio = clip
    app, runner, url = await _serve(PassthroughSession)
    try:
        pc, rec, _ = await connect(url, ClipVideoTrack(frames), ClipAudioTrack(audio), want_frames=40)
        try:
            await asyncio.wait_for(rec.done.wait(), 30)
            assert rec.sizes == {(SIZE, SIZE)}
            back = rec.last_frame.astype(np.float32)
            # the returned frame is one of the clip's frames (lossy codec: nearest by MSE)
            mse = min(float(np.mean((back - f.astype(np.float32)) ** 2)) for f in frames)
            assert 10 * np.log10(255**2 / mse) > 24
            peer = next(iter(state_of(app).peers.values()))
            assert peer.audio_samples > 8000  # the audio track reached the session at 16 kHz
            assert rec.stats and rec.stats[-1]["frames_out"] > 0  # the page's stats channel
        finally:
            await pc.close()
    finally:
        await runner.cleanup()


def _drop_transport(pc) -> None:
    """Make the client vanish: close its UDP sockets; no DTLS close_notify, no BYE."""
    for transceiver in pc.getTransceivers():
        ice = transceiver.sender.transport.transport
        for proto in list(ice._connection._protocols):
            proto.transport.close()


async def test_vanished_peer_is_cleaned_up_within_seconds(clip):
    frames, audio = clip
    timeout = 2.0
    app, runner, url = await _serve(PassthroughSession, media_timeout_s=timeout)
    state = state_of(app)
    try:
        pc, rec, _ = await connect(url, ClipVideoTrack(frames), ClipAudioTrack(audio), want_frames=10)
        await asyncio.wait_for(rec.done.wait(), 30)
        assert state.active == 1
        _drop_transport(pc)
        t0 = time.monotonic()
        while state.active and time.monotonic() - t0 < 15:
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - t0
        assert state.active == 0, "the server kept a vanished peer"
        assert elapsed < timeout + 3.0
        peer_reasons = state.metrics.sessions_closed.labels("media_timeout")._value.get()
        assert peer_reasons == 1
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pc.close(), 5)
    finally:
        await runner.cleanup()
