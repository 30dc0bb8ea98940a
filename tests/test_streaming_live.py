"""`run_live` (what `tccp run --live` calls): a looping context video + an audio source
in real time -> Session -> mp4. A file plays the microphone's part (CI has no mic)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from conftest import make_clip, make_wav
from streaming.mic import FileAudioSource, run_live
from streaming.passthrough import PassthroughSession
from tccp.errors import TCCPError


async def test_run_live_records_until_the_audio_ends(tmp_path):
    from engine.config import EngineConfig
    from tccp.media.io import probe, read_video

    video = make_clip(tmp_path / "ctx.mp4", n=10)  # 0.4 s: must loop to cover the audio
    wav = make_wav(tmp_path / "speech.wav", seconds=1.2)
    out = tmp_path / "live.mp4"
    seen = []
    res = await run_live(video, out, None, EngineConfig(live=True), audio=FileAudioSource(wav),
                         session_factory=PassthroughSession, on_frame=seen.append)
    assert res.output == out and res.stopped_by == "audio ended"
    info = probe(out)
    assert info.has_audio and info.has_video
    assert 20 <= info.n_frames <= 32  # ~1.2 s at 25 fps (first/last frames race the audio)
    frames = read_video(out, min_frames=1).frames
    # the 10-frame context loops: frame brightness ramps up, drops back, ramps again
    levels = frames.reshape(len(frames), -1).mean(axis=1)
    assert (np.diff(levels) < -100).sum() >= 1
    assert [o.pts for o in seen] == sorted(o.pts for o in seen)


async def test_run_live_stop_event_and_duration(tmp_path):
    from engine.config import EngineConfig

    video = make_clip(tmp_path / "ctx.mp4", n=10)
    wav = make_wav(tmp_path / "speech.wav", seconds=1.0)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.6, stop.set)
    res = await run_live(video, tmp_path / "a.mp4", None, EngineConfig(live=True),
                         audio=FileAudioSource(wav, loop=True), stop=stop,
                         session_factory=PassthroughSession)
    assert res.stopped_by == "stop requested" and 5 <= res.frames_out <= 25
    res = await run_live(video, tmp_path / "b.mp4", None, EngineConfig(live=True),
                         audio=FileAudioSource(wav, loop=True), duration_s=0.5,
                         session_factory=PassthroughSession)
    assert res.stopped_by == "duration"


async def test_run_live_bad_inputs_fail_before_starting(tmp_path):
    from engine.config import EngineConfig

    wav = make_wav(tmp_path / "speech.wav", seconds=0.5)
    with pytest.raises(TCCPError, match="nope.mp4: no such file"):
        await run_live(tmp_path / "nope.mp4", tmp_path / "o.mp4", None, EngineConfig(live=True),
                       audio=FileAudioSource(wav), session_factory=PassthroughSession)
    with pytest.raises(TCCPError, match=r"\.avi: output must be an \.mp4"):
        await run_live(make_clip(tmp_path / "c.mp4", n=10), tmp_path / "o.avi", None,
                       EngineConfig(live=True), audio=FileAudioSource(wav),
                       session_factory=PassthroughSession)
    assert not (tmp_path / "o.mp4").exists()


async def test_run_live_with_the_model(tmp_path):
    """The real Session on a random tiny model: the recording holds generated frames."""
    from conftest import shared_file
    from engine.config import EngineConfig
    from engine.model import SharedModel
    from engine.runner import PipelineRunner
    from tccp.media.io import probe

    video = shared_file("data", "clips", "vr_face3.mp4")
    wav = shared_file("data", "audio", "speech_5s_44k.wav")
    shared = SharedModel(PipelineRunner.random())
    try:
        cfg = EngineConfig(live=True, steps=1, degrade=False, job_queue=16)
        res = await run_live(video, tmp_path / "live.mp4", shared, cfg,
                             audio=FileAudioSource(wav), duration_s=0.8)
    finally:
        shared.close()
    assert res.stopped_by == "duration"
    assert res.frames_generated >= 1 and res.stats["error"] is None
    info = probe(res.output)
    assert info.has_audio and (info.width, info.height) == (590, 590)
    # how many frames 0.8 s of real time yields depends on the machine; every pushed
    # frame must be in the file (the sink fills dropped ones), at least one window
    assert info.n_frames >= res.frames_out >= res.frames_generated >= 1
