"""Live-call building blocks without a network: the playout (never silent, edited
frames only when in time, an adaptive delay), the audio delay line that keeps sound
with picture, the track clock under restarting timestamps, the live controller
(skip what cannot make its slot, never park in pass-through), the tracker pool, the
probe's frame code, and `streaming.live.replay` on the test double."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest

from streaming.playout import AudioDelayLine, DelayedAudioReader, Playout, auto_delay
from streaming.resample import FrameGrid, TrackClock, audio_frame_to_mono


@dataclass
class Out:
    pts: float
    frame: np.ndarray
    generated: bool = True
    reason: str | None = None
    window: int = 0


def _img(v: int) -> np.ndarray:
    return np.full((4, 4, 3), v, np.uint8)


# --------------------------------------------------------------------------- playout


async def test_playout_sends_first_frame_at_once_then_on_schedule_with_edits_in_time():
    origin = time.monotonic()
    p = Playout(origin, delay_s=0.15, min_delay_s=0.1, max_delay_s=0.5, adapt=False)
    for k in range(4):
        p.add_input(k * 0.04, _img(k))
    # an edited frame that arrives before its slot replaces the original
    assert p.add_output(Out(0.04, _img(100)))
    got = []
    for _ in range(4):
        slot = await asyncio.wait_for(p.next(), 2)
        while slot.repeat:  # the held frame is repeated until the next one is due
            slot = await asyncio.wait_for(p.next(), 2)
        got.append((slot, time.monotonic() - origin))
    assert got[0][1] < 0.05  # the caller's own first frame goes back at once
    assert [int(s.frame[0, 0, 0]) for s, _ in got] == [0, 100, 2, 3]
    assert [s.generated for s, _ in got] == [False, True, False, False]
    for slot, t in got[1:]:
        assert t >= slot.pts + 0.15 - 0.01  # not before its time
    assert p.sent == 4 and p.sent_generated == 1 and p.reasons["pending"] == 3
    assert p.repeats >= 2  # the first frame was held (repeated) while slot 1 was not due
    # an edited frame for a slot that already went out is dropped and counted
    assert not p.add_output(Out(0.08, _img(200)))
    assert p.late == 1
    p.close()
    assert await p.next() is None


async def test_playout_delay_grows_for_a_late_generated_frame_and_relaxes_back():
    clock = [100.0]
    p = Playout(100.0, delay_s=0.3, min_delay_s=0.2, max_delay_s=1.0, relax_s=2.0, now=lambda: clock[0])
    p.add_input(0.0, _img(0))
    first = await p.next()
    assert first.pts == 0.0
    clock[0] = 100.0 + 0.3 + 0.25  # the edited frame 0 comes 0.25 s after it was sent
    assert not p.add_output(Out(0.0, _img(1)))
    assert p.delay == pytest.approx(0.3 + 0.25 + 0.02)
    clock[0] = 105.0
    assert not p.add_output(Out(0.0, _img(1)))  # far too late: as late as allowed, no later
    assert p.delay == 1.0 and p.late == 2
    # every generated frame in time with time to spare: the delay comes back (not below min)
    for k in range(1, 300):
        t = 5.0 + k * 0.04
        clock[0] = 100.0 + t
        p.add_input(t, _img(k))
        p.add_output(Out(t, _img(k)), ready=clock[0] + 0.01)
        clock[0] = p.due(t)
        slot = p._take(clock[0])  # noqa: SLF001 - the sender's step without its sleep
        assert slot.generated
    assert p.min_delay <= p.delay < 0.3


async def test_playout_skips_ahead_when_the_sender_fell_behind_and_stays_bounded():
    clock = [0.0]
    p = Playout(0.0, delay_s=0.2, max_delay_s=0.5, now=lambda: clock[0])
    for k in range(200):  # 8 s of frames while nobody sent anything
        p.add_input(k * 0.04, _img(k % 250))
    assert p.pending() <= (0.5 + 2.0) * 25 + 2  # bounded whatever the sender does
    await p.next()  # the first frame at once
    clock[0] = 8.0
    slot = await p.next()
    assert slot.pts == pytest.approx(7.8, abs=0.05)  # the newest due slot, not a backlog
    assert p.skipped > 100


def test_auto_delay_covers_a_window_and_its_work_within_bounds():
    assert auto_delay(0.2) == pytest.approx(0.24 + 0.14 + 0.2 + 0.05)
    assert auto_delay(5.0) == 0.9 and auto_delay(None) == 0.9 and auto_delay(0.0, lo=0.5) == 0.5


# --------------------------------------------------------------------------- audio


def test_audio_delay_line_reads_back_by_time_with_silence_for_gaps():
    line = AudioDelayLine(sr=1000, keep_s=2.0)
    line.push(np.arange(100, dtype=np.float32), 1.0)
    line.push(np.arange(100, 200, dtype=np.float32), 1.1003)  # jitter: placed right after
    assert line.end_time == pytest.approx(1.2)
    x = line.read(0.95, 100)
    assert np.all(x[:50] == 0) and x[50] == 0 and x[51] == 1 and x[99] == 49
    assert np.array_equal(line.read(1.05, 100), np.arange(50, 150, dtype=np.float32))
    line.push(np.ones(100, np.float32), 5.0)  # a gap: silence between, old audio trimmed
    assert np.all(line.read(1.25, 50) == 0) and line.read(5.0, 10).sum() == 10
    assert len(line._starts) == 1  # noqa: SLF001 - memory is bounded
    line.push(np.full(10, 7, np.float32), 0.5)  # the clock went back: start over
    assert line.read(0.5, 10).sum() == 70


def test_delayed_audio_reader_follows_the_video_delay():
    line = AudioDelayLine(sr=1000)
    line.push(np.arange(10000, dtype=np.float32) % 1000, 0.0)
    delay = [0.5]
    r = DelayedAudioReader(line, origin=10.0, delay=lambda: delay[0], frame_s=0.02)
    x, t = r.read(11.0)  # session time 1.0 - 0.5
    assert t == pytest.approx(0.5) and x[0] == 500
    x, t = r.read(11.02)
    assert t == pytest.approx(0.52)
    delay[0] = 0.7  # the video was pushed 0.2 s later: the audio pauses...
    x, t = r.read(11.04)
    assert t is None and not x.any() and r.paused == 1
    for k in range(3, 12):
        x, t = r.read(11.0 + 0.02 * k)
    assert t == pytest.approx(0.54, abs=0.021)  # ...and resumes where it stopped
    delay[0] = 0.2  # the video came forward: skip ahead with it
    x, t = r.read(12.0)
    assert t == pytest.approx(1.8) and r.skips == 1


def test_audio_frame_to_mono_averages_channels_of_any_format():
    import av

    st = np.stack([np.full(480, 8000, np.int16), np.full(480, -8000, np.int16)], 1).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(st, format="s16", layout="stereo")
    frame.sample_rate = 48000
    mono, rate = audio_frame_to_mono(frame)
    assert rate == 48000 and mono.shape == (480,) and np.allclose(mono, 0)
    planar = av.AudioFrame.from_ndarray(np.full((2, 160), 0.25, np.float32), format="fltp", layout="stereo")
    planar.sample_rate = 16000
    mono, rate = audio_frame_to_mono(planar)
    assert rate == 16000 and np.allclose(mono, 0.25)


# --------------------------------------------------------------------------- clock


def test_track_clock_survives_restarting_and_jumping_timestamps():
    now = [0.0]
    clock = TrackClock(origin=0.0, now=lambda: now[0])
    grid = FrameGrid(25.0)
    out = []
    for k in range(100):  # a 0.6 s clip looped: its timestamps restart every 15 frames
        now[0] = k * 0.04
        t = clock((k % 15) * 0.04)
        out.append(t)
        grid.push(t)
    assert all(b > a for a, b in zip(out, out[1:]))  # never back
    assert abs(out[-1] - now[0]) < 0.1  # and never far from the arrival time
    assert clock.resyncs == 6
    now[0] = 4.04
    assert clock(1000.0) == pytest.approx(4.04)  # a jump forward: re-anchored
    assert grid.dropped < 10


# --------------------------------------------------------------------------- controller


def test_live_controller_never_parks_in_passthrough_and_skips_only_hopeless_windows():
    from engine.config import EngineConfig
    from engine.stats import SessionStats, WindowTiming
    from streaming.live import LiveController

    stats = SessionStats()
    cfg = EngineConfig(live=True, steps=4)
    ctl = LiveController(cfg, slack=lambda: 0.5, stats=stats)
    assert all(r.mode != "passthrough" for r in ctl.rungs) and ctl.rungs[-1].steps == 0
    for w in range(30):
        ctl.observe(w, 5.0)  # hopelessly slow, window after window
    assert ctl.rung.mode != "passthrough" and ctl.rung.steps == 0
    assert ctl.budget == 0.5 and ctl.enabled
    assert not ctl.skip(0.2, waiting=False)  # nothing measured: the engine's own rule
    assert ctl.skip(0.6, waiting=True)
    for w in range(8):
        stats.add_window(WindowTiming(window=w, frames=7, level=0, steps=0, mode="generated",
                                      features=0.05, stage1=0.01, stage2=0.1, composite=0.14))
    # first frame ready ~0.18 s after the model call starts: late if started after ~0.4 s
    assert not ctl.skip(0.1, waiting=True) and not ctl.skip(0.35, waiting=False)
    assert ctl.skip(0.45, waiting=False)
    assert ctl.skipped == 2
    single = LiveController(EngineConfig(live=True, steps=0))
    assert [r.steps for r in single.rungs] == [0]
    assert single.budget == pytest.approx(cfg.budget_s)  # without a playout: the engine's budget


def test_live_controller_drops_detail_while_behind_then_tries_again():
    from engine.config import EngineConfig
    from engine.stats import SessionStats, WindowTiming
    from streaming.live import LiveController

    stats = SessionStats()
    ctl = LiveController(EngineConfig(live=True, steps=0), slack=lambda: 0.5, stats=stats)
    ctl.DETAIL_HOLD = 5
    assert ctl.detail

    def add(composite: float, n: int = 1) -> None:
        for _ in range(n):
            stats.add_window(WindowTiming(window=stats.windows_total, frames=7, level=0, steps=0,
                                          mode="generated", features=0.05, stage2=0.05, composite=composite))

    add(0.1, 3)
    assert ctl.detail
    add(0.4, 8)  # the compositor is slower than real time
    assert not ctl.detail
    add(0.05, 8)  # fast again, and the hold has passed
    assert ctl.detail and ctl.detail_switches == 2


def test_tracker_pool_lends_ready_trackers_and_takes_them_back_reset():
    from streaming.live import TrackerPool

    class T:
        built = 0

        def __init__(self) -> None:
            T.built += 1
            self.resets = 0
            self.closed = False

        def update(self, frame, t=None):
            return "obs"

        def reset(self) -> None:
            self.resets += 1

        def close(self) -> None:
            self.closed = True

    pool = TrackerPool(2, factory=T)
    pool.wait_ready(10)
    assert T.built == 2 and pool.available == 2
    a, b = pool.take(), pool.take()
    assert pool.take() is None  # empty: the session builds its own
    assert a.update(None) == "obs"
    a.close()
    a.close()  # idempotent
    assert pool.available == 1
    pool.close()
    b.close()  # given back after the pool closed: really closed
    assert pool.available == 0 and T.built == 2


# --------------------------------------------------------------------------- probe code


@pytest.mark.parametrize("i", [0, 1, 77, 4095, 4096 + 5])
def test_probe_frame_code_round_trips_and_survives_vp8(i):
    import av

    from streaming.probe import read_stamp, stamp

    rng = np.random.default_rng(i)
    img = stamp(rng.integers(0, 255, (128, 160, 3), np.uint8), i)
    assert read_stamp(img) == i % 4096
    enc = av.CodecContext.create("libvpx", "w")
    enc.width, enc.height, enc.pix_fmt, enc.bit_rate = 160, 128, "yuv420p", 300_000
    enc.time_base = Fraction(1, 25)
    dec = av.CodecContext.create("libvpx", "r")
    frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
    frame.pts = 0
    out = [f for p in list(enc.encode(frame)) + list(enc.encode(None)) for f in dec.decode(p)]
    assert out and read_stamp(out[0].to_ndarray(format="rgb24")) == i % 4096
    assert read_stamp(np.zeros((64, 64, 3), np.uint8)) in (None, 0)


# --------------------------------------------------------------------------- replay


async def test_replay_reports_what_a_live_call_sends():
    """`replay` (tccp bench --live) on the engine's test doubles: every frame goes out,
    the edited ones are in time, sound and picture share one delay."""
    from engine.config import EngineConfig
    from engine.model import SharedModel
    from fakes import FakeRunner, FakeTracker
    from streaming.live import live_config, replay, warm_up

    frames = np.stack([np.full((96, 96, 3), 120, np.uint8)] * 25)
    audio = (0.1 * np.sin(np.arange(16000) / 5)).astype(np.float32)
    with SharedModel(FakeRunner()) as model:
        cfg = live_config(model, EngineConfig(steps=1))
        warm = await asyncio.get_running_loop().run_in_executor(
            None, lambda: warm_up(model, cfg, tracker=FakeTracker(), frames=14))
        assert warm.windows == 2 and warm.window_s is not None and warm.seconds > 0
        rep = await replay(model, frames, audio, cfg, 2.0, delay_s=0.5, tracker=FakeTracker())
    assert rep["frames_in"] == 50
    assert 45 <= rep["frames_sent"] <= 50 and rep["first_frame_ms"] < 100
    assert rep["generated_share"] > 0.5 and rep["first_generated_ms"] < 1000
    assert rep["frame_latency_ms"]["p50"] == pytest.approx(500, abs=100)
    assert abs(rep["av_offset_ms"]) <= 25
    assert rep["engine"]["error"] is None and rep["engine"]["frames_generated"] > 0
