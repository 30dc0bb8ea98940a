"""Session behaviour: order and completeness, faces leaving the frame, bounded latency
under a slow generator, a slow consumer in live mode, and two sessions on one model
where one fails.

Timing-dependent cases use the engine's fast stand-ins (`tests/fakes.py`) so they test
the queueing policy, not the speed of this machine; the model-backed cases use a
random-weight tiny TCCP pipeline and real face tracking on the bundled sample.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.model import SharedModel
from engine.session import EngineError, Session
from fakes import FakeRunner, FakeTracker, FaultyRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FPS = 25.0


@pytest.fixture(scope="module")
def sample():
    """First 1.2 s of the bundled sample: frames (N, H, W, 3) and 16 kHz audio."""
    from tccp.media import io as media

    video, _ = media.sample_paths()
    clip = media.load_clip(video, max_frames=30)
    return clip.frames, clip.audio


@pytest.fixture(scope="module")
def tiny_model():
    from engine.runner import PipelineRunner

    model = SharedModel(PipelineRunner.random(size=64))  # 64 px crops
    yield model
    model.close()


def _frames(n: int, size: int = 96, dark: set[int] = frozenset()) -> list[np.ndarray]:
    """Synthetic frames: textured, frame index in pixel (0, 0); dark frames = no face."""
    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, (size, size, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        f = np.zeros_like(base) if i in dark else base.copy()
        f[0, 0] = i % 256
        out.append(f)
    return out


async def _run(sess: Session, frames, audio=None, realtime: bool = False, read: bool = True,
               pace: float = 0.0):
    """Push everything (at 25 fps wall-clock if `realtime`, else `pace` s apart),
    close, and collect outputs."""
    outs = []

    async def produce():
        if audio is not None:
            await sess.push_audio(audio, 0.0)
        for i, f in enumerate(frames):
            await sess.push_video(f, i / FPS)
            if realtime or pace:
                await asyncio.sleep(1 / FPS if realtime else pace)
        await sess.close()

    task = asyncio.ensure_future(produce())
    if read:
        while (o := await sess.get()) is not None:
            outs.append(o)
    await task
    return outs


# --------------------------------------------------------------------------- real model


async def test_file_session_generates_every_frame_in_order(sample, tiny_model):
    frames, audio = sample
    frames = frames[:17]  # a first-frame window, one full window, a partial one
    sess = Session(tiny_model, EngineConfig(steps=1), keep_debug=True)
    outs = await asyncio.wait_for(_run(sess, frames, audio[: 17 * 640]), 240)
    assert len(outs) == 17
    assert np.allclose([o.pts for o in outs], np.arange(17) / FPS)
    assert all(o.generated for o in outs), [o.reason for o in outs]
    assert [o.window for o in outs] == [0] * 7 + [1] * 7 + [2] * 3
    for o, f in zip(outs, frames):
        assert o.frame.shape == f.shape
        assert o.crop is not None and o.crop.shape == (tiny_model.size, tiny_model.size, 3)
        diff = np.abs(o.frame.astype(int) - f.astype(int)).sum(-1)
        assert diff.max() > 0  # the face was replaced...
        x0, y0, x1, y1 = o.box
        outside = np.ones_like(diff, bool)  # ...and nothing outside its box changed
        outside[max(0, int(y0) - 2):int(np.ceil(y1)) + 2, max(0, int(x0) - 2):int(np.ceil(x1)) + 2] = False
        assert outside.any() and diff[outside].max() == 0
    st = sess.stats
    assert st.frames_generated == 17 and st.passed_through == 0
    assert st.windows_total == 3 and all(w.stage2 > 0 and w.e2e > 0 for w in st.windows)
    assert st.summary()["latency"]["e2e"]["p95"] > 0


async def test_face_leaving_the_frame_passes_through_and_is_counted(sample, tiny_model):
    """Frames 8..21 are shifted almost out of the picture (no face): they come back
    unchanged with reason 'no_face' (after at most max_gap held frames) and the face
    is generated again once it returns."""
    frames, audio = sample
    frames = frames[:30].copy()
    w = frames.shape[2]
    absent = range(8, 22)
    for i in absent:
        shifted = np.empty_like(frames[i])
        shifted[:] = frames[i][:, :1]  # edge colour
        shifted[:, int(0.9 * w):] = frames[i][:, : w - int(0.9 * w)]
        frames[i] = shifted
    sess = Session(tiny_model, EngineConfig(steps=1))
    outs = await asyncio.wait_for(_run(sess, list(frames), audio), 240)
    assert len(outs) == 30
    passed = [i for i, o in enumerate(outs) if not o.generated]
    assert all(o.reason == "no_face" for o in outs if not o.generated)
    assert set(passed) <= set(absent)
    assert len(passed) >= len(absent) - sess._preparer.max_gap
    for i in passed:
        assert np.array_equal(outs[i].frame, frames[i])
    assert all(outs[i].generated for i in range(24, 30))  # back after the gap
    assert sess.stats.passthrough["no_face"] == len(passed)


async def test_two_sessions_share_one_model_and_one_failure_stays_local(sample, tiny_model):
    """Both sessions run on one SharedModel at once (their windows batched); session
    A's model calls fail (injected), session B finishes every frame."""
    frames, audio = sample
    frames = list(frames[:15])
    faulty = FaultyRunner(tiny_model.runner, fail=lambda r: r.seed >= 1000)
    model = SharedModel(faulty, coalesce_s=1.0)  # first windows wait on Whisper + the bank
    try:
        a = Session(model, EngineConfig(steps=1, seed=1000), tracker=FakeTracker(), name="A")
        b = Session(model, EngineConfig(steps=1, seed=0), tracker=FakeTracker(), name="B")
        res_a, res_b = await asyncio.wait_for(
            asyncio.gather(_run(a, frames, audio), _run(b, frames, audio), return_exceptions=True), 240
        )
        assert isinstance(res_a, EngineError) and "injected" in str(res_a)
        assert a.failed and "injected" in a.stats.error
        assert not isinstance(res_b, BaseException), res_b
        assert len(res_b) == 15 and all(o.generated for o in res_b)
        assert model.stats.max_batch_seen >= 2  # the first windows went in one call
        assert model.stats.failures >= 1
    finally:
        model.close()


# --------------------------------------------------------------------------- fast stand-ins


async def test_no_face_windows_skip_the_model():
    runner = FakeRunner()
    with SharedModel(runner) as model:
        frames = _frames(28, dark=set(range(7, 21)))  # the face is gone for 14 frames
        sess = Session(model, EngineConfig(), tracker=FakeTracker())
        outs = await _run(sess, frames)
    # the first 5 missing frames hold the last face (max_gap), then pass through
    assert [o.generated for o in outs] == [True] * 12 + [False] * 9 + [True] * 7
    assert {o.reason for o in outs[12:21]} == {"no_face"}
    assert all(np.array_equal(o.frame, f) for o, f in zip(outs[12:21], frames[12:21]))
    assert sum(runner.calls) == 3  # the window without any face never reached the model


async def test_slow_generator_degrades_and_latency_stays_bounded():
    """A model call takes 0.3 s, the live budget is 0.15 s per window: the session
    walks down the ladder to pass-through (recorded), every frame still comes out,
    and the queues never exceed their bounds."""
    delay = 0.3
    runner = FaultyRunner(FakeRunner(), delay=delay)
    cfg = EngineConfig(steps=4, live=True, latency_budget_s=0.15, recover_after=1000,
                       video_queue=8, job_queue=2, output_queue=200)
    with SharedModel(runner) as model:
        sess = Session(model, cfg, tracker=FakeTracker())
        n = 80
        frames = _frames(n)
        peak = {"in": 0, "job": 0}

        async def watch():
            while True:
                peak["in"] = max(peak["in"], sess._in_q.qsize())
                peak["job"] = max(peak["job"], sess._job_q.qsize())
                await asyncio.sleep(0.005)

        watcher = asyncio.ensure_future(watch())
        outs = await asyncio.wait_for(_run(sess, frames, realtime=True), 60)
        watcher.cancel()
    st = sess.stats
    levels = [d.to_level for d in st.degradations]
    assert levels == sorted(levels) and levels[-1] == len(sess.controller.rungs) - 1
    modes = [w.mode for w in st.windows]
    assert "tracked" in modes or any(w.steps < 4 for w in st.windows if w.mode == "generated")
    assert modes[-3:] == ["passthrough"] * 3
    # bounded: never more model calls than windows, late windows cheap again
    assert runner.calls <= len(sess.controller.rungs) + cfg.job_queue + 1
    assert max(w.e2e for w in list(st.windows)[-3:]) < delay
    assert peak["in"] <= cfg.video_queue and peak["job"] <= cfg.job_queue
    assert len(outs) + st.dropped_input + st.dropped_output == n
    assert st.passthrough["degraded"] > 0


async def test_live_slow_consumer_drops_oldest_output_instead_of_growing():
    cfg = EngineConfig(live=True, output_queue=8, video_queue=4)
    with SharedModel(FakeRunner()) as model:
        sess = Session(model, cfg, tracker=FakeTracker())
        n = 70
        # nobody reads while we push: pushes must not block
        await asyncio.wait_for(_run(sess, _frames(n), read=False, pace=0.01), 30)
        assert sess._out_q.qsize() <= cfg.output_queue
        outs = []
        while (o := await sess.get()) is not None:
            outs.append(o)
    st = sess.stats
    assert st.dropped_output > 0 and len(outs) < n
    assert len(outs) + st.dropped_output + st.dropped_input == n
    # what survived is the newest frames, in order
    idx = [int(o.frame[0, 0, 0]) for o in outs]
    assert idx == sorted(idx) and idx[-1] == n - 1


async def test_live_input_overflow_drops_oldest_frames():
    """Frames pushed faster than the session can even track them: the input queue
    drops the oldest and counts them; push_video never blocks."""
    cfg = EngineConfig(live=True, video_queue=2, output_queue=500)

    class SlowTracker(FakeTracker):
        def update(self, frame, t=None):
            import time

            time.sleep(0.01)
            return super().update(frame, t)

    with SharedModel(FakeRunner()) as model:
        sess = Session(model, cfg, tracker=SlowTracker())
        n = 60

        async def burst():
            for i, f in enumerate(_frames(n)):
                await sess.push_video(f, i / FPS)
            await sess.close()

        await asyncio.wait_for(burst(), 30)
        outs = []
        while (o := await sess.get()) is not None:
            outs.append(o)
    assert sess.stats.dropped_input > 0
    assert len(outs) + sess.stats.dropped_input == n


async def test_push_after_close_and_bad_frames_are_rejected():
    with SharedModel(FakeRunner()) as model:
        sess = Session(model, EngineConfig(), tracker=FakeTracker())
        with pytest.raises(ValueError):
            await sess.push_video(np.zeros((8, 8), np.uint8), 0.0)
        await sess.push_video(_frames(1)[0], 0.0)
        await sess.close()
        with pytest.raises(RuntimeError, match="closed"):
            await sess.push_video(_frames(1)[0], 0.04)
        outs = [o async for o in _drain(sess)]
        assert len(outs) == 1
        assert await sess.get() is None  # keeps answering None


async def _drain(sess):
    while (o := await sess.get()) is not None:
        yield o


async def test_stalled_live_input_ends_the_window_at_the_gap():
    """A 2 s stall in a live stream: the grid jumps instead of repeating a frozen frame,
    and no window spans the jump."""
    with SharedModel(FakeRunner()) as model:
        sess = Session(model, EngineConfig(live=True, max_gap_frames=3), tracker=FakeTracker())
        frames = _frames(20)
        pts = [i / FPS for i in range(10)] + [3.0 + i / FPS for i in range(10)]

        async def push():
            for f, t in zip(frames, pts):
                await sess.push_video(f, t)
                await asyncio.sleep(0.005)
            await sess.close()

        task = asyncio.ensure_future(push())
        outs = [o async for o in _drain(sess)]
        await task
    times = np.array([o.pts for o in outs])
    assert times.max() == pytest.approx(3.0 + 9 / FPS)
    assert np.diff(times).max() > 1.0  # skipped, not filled with 70 frozen frames
    before = {o.window for o in outs if o.pts < 1.0}
    after = {o.window for o in outs if o.pts > 2.0}
    assert not before & after
