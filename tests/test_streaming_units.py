"""Streaming building blocks without a network: timestamp grid, track clock, audio
resampling, the pass-through test double, the mp4 sink and the audio sources."""

from __future__ import annotations

import sys
import types
from fractions import Fraction

import numpy as np
import pytest

from conftest import make_wav
from streaming.passthrough import PassthroughSession
from streaming.resample import AudioTo16k, FrameGrid, TrackClock, video_frame_to_rgb
from tccp.errors import TCCPError


# --------------------------------------------------------------------------- grid / clock


def _grid_times(fps_in: float, seconds: float, fps_out: float = 25.0) -> list[float]:
    grid = FrameGrid(fps_out)
    out: list[float] = []
    for i in range(int(seconds * fps_in)):
        out += grid.push(i / fps_in)
    return out


@pytest.mark.parametrize("fps_in", [30.0, 25.0, 15.0, 50.0])
def test_grid_resamples_any_rate_to_25fps(fps_in):
    times = _grid_times(fps_in, 4.0)
    # every slot of the covered span exactly once, strictly increasing, 40 ms apart
    assert np.allclose(np.diff(times), 0.04)
    assert abs(len(times) - 4.0 * 25) <= 2


def test_grid_drops_early_frames_and_repeats_for_slow_input():
    g = FrameGrid(25.0)
    assert g.push(0.0) == [0.0]
    assert g.push(0.01) == []  # nearer to slot 0 than to slot 1: dropped
    assert g.dropped == 1
    assert g.push(0.125) == pytest.approx([0.04, 0.08, 0.12])  # a late frame fills the hole
    assert g.repeated == 2


def test_grid_does_not_fill_long_gaps():
    g = FrameGrid(25.0, max_gap_s=0.5)
    g.push(0.0)
    out = g.push(3.0)  # 3 s of silence from the camera
    assert out == pytest.approx([3.0])  # no 74 copies of a frozen frame


def test_track_clock_anchors_first_frame_and_follows_stream_time():
    now = [100.0]
    clock = TrackClock(origin=99.0, resync_s=1.0, now=lambda: now[0])
    assert clock(5000.0) == pytest.approx(1.0)  # random RTP start -> arrival time
    now[0] = 100.5
    assert clock(5000.4) == pytest.approx(1.4)  # stream spacing kept, arrival jitter ignored
    now[0] = 110.0
    assert clock(5000.8) == pytest.approx(11.0)  # far off the wall clock: re-anchored
    assert clock.resyncs == 1


# --------------------------------------------------------------------------- audio


def test_audio_to_16k_keeps_pitch_and_length():
    import av

    sr, f0 = 48000, 440.0
    conv = AudioTo16k()
    out = []
    for k in range(50):  # 50 x 20 ms Opus-like stereo s16 frames
        t = (np.arange(960) + 960 * k) / sr
        tone = (0.5 * np.sin(2 * np.pi * f0 * t) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]).T.reshape(1, -1), format="s16",
                                           layout="stereo")
        frame.sample_rate = sr
        frame.pts = 960 * k
        frame.time_base = Fraction(1, sr)
        out.append(conv(frame))
    audio = np.concatenate(out)
    assert audio.dtype == np.float32
    assert abs(audio.size - 16000) < 400  # 1 s (minus the resampler's look-ahead)
    spec = np.abs(np.fft.rfft(audio[2000:14000]))
    peak_hz = np.argmax(spec) * 16000 / 12000
    assert abs(peak_hz - f0) < 3
    assert 0.3 < np.abs(audio[2000:]).max() < 0.6


def test_video_frame_to_rgb_caps_size():
    import av

    img = np.zeros((720, 1280, 3), np.uint8)
    img[:, :640] = 255
    frame = av.VideoFrame.from_ndarray(img, format="rgb24")
    small = video_frame_to_rgb(frame, max_side=640)
    assert small.shape == (360, 640, 3)
    assert small[:, :300].mean() > 240 and small[:, 340:].mean() < 15
    assert video_frame_to_rgb(frame).shape == (720, 1280, 3)


# --------------------------------------------------------------------------- pass-through


async def test_passthrough_session_echoes_frames_and_ends_with_none():
    s = PassthroughSession(live=True)
    frames = [np.full((8, 8, 3), i, np.uint8) for i in range(10)]
    for i, f in enumerate(frames):
        await s.push_video(f, i * 0.04)
    await s.push_audio(np.zeros(640, np.float32), 0.0)
    await s.close()
    got = []
    while (out := await s.get()) is not None:
        got.append(out)
    assert [o.frame[0, 0, 0] for o in got] == list(range(10))
    assert all(not o.generated and o.reason == "passthrough" for o in got)
    assert await s.get() is None
    assert s.stats.windows_total == 2 and s.stats.frames_out == 10


async def test_passthrough_live_drops_oldest_when_nobody_reads():
    s = PassthroughSession(live=True, queue_size=4)
    for i in range(10):
        await s.push_video(np.full((4, 4, 3), i, np.uint8), i * 0.04)
    first = await s.get()
    assert first.frame[0, 0, 0] == 6  # frames 0..5 were dropped, never blocked
    assert s.stats.dropped_output == 6


# --------------------------------------------------------------------------- file sink


def test_file_sink_fills_gaps_and_aligns_audio(tmp_path):
    from streaming.sinks import FileSink
    from tccp.media.io import probe, read_audio, read_video

    out = tmp_path / "live.mp4"
    sink = FileSink(out, fps=25.0, sr=16000)
    # audio starts 0.5 s before the first frame: the file must start at the frame
    sink.add_audio(np.zeros(8000, np.float32), 9.5)
    sink.add_audio(np.full(8000, 0.5, np.float32), 10.0)
    for k, pts in enumerate([10.0, 10.04, 10.16, 10.20]):  # 10.08 and 10.12 were dropped
        sink.write(np.full((32, 32, 3), 60 * k, np.uint8), pts)
    sink.write(np.full((32, 32, 3), 250, np.uint8), 10.20)  # duplicate pts: ignored
    assert sink.close() == out
    assert sink.frames == 6 and sink.repeated == 2
    info = probe(out)
    assert info.has_audio and info.n_frames == 6
    frames = read_video(out, min_frames=1).frames
    levels = [int(round(f.mean() / 60)) for f in frames]
    assert levels == [0, 1, 1, 1, 2, 3]
    audio = read_audio(out)
    assert audio[200:1500].mean() > 0.3  # the 0.5 s of silence before frame 0 is cut


def test_file_sink_without_frames_leaves_nothing(tmp_out):
    from streaming.sinks import FileSink

    sink = FileSink(tmp_out / "x.mp4")
    with pytest.raises(TCCPError, match="no frames"):
        sink.close()
    assert list(tmp_out.iterdir()) == []


def test_sink_rejects_non_mp4(tmp_out):
    from streaming.sinks import open_sink

    with pytest.raises(TCCPError, match=r"x\.avi: output must be an \.mp4"):
        open_sink(tmp_out / "x.avi")


# --------------------------------------------------------------------------- audio sources


def test_mic_source_without_portaudio_or_device_is_one_line_error(monkeypatch):
    from streaming.mic import MicSource

    class NoInput:
        @staticmethod
        def query_devices(device=None, kind=None):
            raise ValueError("No input device matching ''")

    monkeypatch.setitem(sys.modules, "sounddevice", types.SimpleNamespace(**vars(NoInput)))
    with pytest.raises(TCCPError) as err:
        MicSource()
    msg = str(err.value)
    assert msg.startswith("no microphone found: ") and "\n" not in msg


def test_mic_source_on_this_machine_works_or_says_no_microphone():
    from streaming.mic import MicSource

    try:
        mic = MicSource()
    except TCCPError as exc:
        assert str(exc).startswith("no microphone found: ")
        assert "\n" not in str(exc)
    else:  # a machine with a microphone: it has an input and the 16 kHz block size
        assert mic.sr == 16000 and mic.block == 320


async def test_file_audio_source_delivers_the_whole_file_in_blocks(tmp_path):
    from streaming.mic import FileAudioSource
    from tccp.media.io import read_audio

    wav = make_wav(tmp_path / "a.wav", seconds=0.5, sr=16000)
    src = FileAudioSource(wav, realtime=False)
    blocks = [b async for b in src.blocks(origin=0.0)]
    assert all(b.samples.dtype == np.float32 for b in blocks)
    assert [b.samples.size for b in blocks[:-1]] == [320] * (len(blocks) - 1)
    starts = np.array([b.pts for b in blocks])
    assert np.allclose(np.diff(starts), 0.02)
    assert np.array_equal(np.concatenate([b.samples for b in blocks]), read_audio(wav))


def test_file_audio_source_missing_file(tmp_path):
    from streaming.mic import FileAudioSource

    with pytest.raises(TCCPError, match="nope.wav: no such file"):
        FileAudioSource(tmp_path / "nope.wav")


def test_video_source_specs(tmp_path):
    from streaming.sources import open_video_source

    with pytest.raises(TCCPError, match="missing.mp4: no such file"):
        open_video_source(tmp_path / "missing.mp4")
    with pytest.raises(TCCPError, match="camera index must be a number"):
        open_video_source("camera:front")


def test_window_feed_observes_each_window_once():
    from engine.stats import SessionStats, WindowTiming
    from streaming.metrics import ServerMetrics, WindowFeed

    metrics = ServerMetrics()
    stats = SessionStats(max_windows=3)
    feed = WindowFeed(metrics)

    def add(n):
        for _ in range(n):
            stats.add_window(WindowTiming(window=stats.windows_total, frames=7, level=0, steps=1,
                                          mode="generated", stage2=0.5, e2e=0.25))

    add(2)
    assert feed.poll(stats) == 2 and feed.poll(stats) == 0
    add(5)  # more than the stats keep: only what is still there can be observed
    assert feed.poll(stats) == 3
    body = metrics.render()[0].decode()
    assert "tccp_window_latency_seconds_count 5.0" in body
    assert 'tccp_window_stage_seconds_sum{step="stage2"} 2.5' in body
