"""Stage 1 adapted to the person (`engine.adapt`): a fine-tuned copy of the pack's stage 1
on the source video's own speech, used by that run only. Mechanics on the bundled sample
with the bundled pack; the gain is measured in docs/lipsync.md ("Adapting to the person")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.adapt import AdaptConfig, adapt_from_video, face_runs
from tccp.media import io as media

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pack():
    from tccp.pack import DEFAULT_PACK, load_pack

    return load_pack(DEFAULT_PACK, device="cpu", dtype=torch.float32)


def _state(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_face_runs():
    ok = np.array([1, 1, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1], bool)
    assert face_runs(ok, 3) == [(3, 7), (9, 12)]
    assert face_runs(ok, 5) == []
    assert face_runs(np.ones(4, bool), 4) == [(0, 4)]


def test_adapting_on_the_sample_fits_its_mouth_and_leaves_the_pack_alone(pack):
    video, _ = media.sample_paths()
    gen = pack.stage1
    before = _state(gen.net)
    seen: list = []
    cfg = AdaptConfig(steps=30, lr=3e-4, seconds=5.0, progress=lambda d, t, p: seen.append((p, d, t)))
    res = adapt_from_video(video, gen, pack.whisper, cfg)
    # progress: the tracked frames, then every training step up to (30, 30)
    assert seen[0][0] == "tracking" and seen[-1] == ("training", 30, 30)
    assert [d for p, d, _ in seen if p == "training"] == list(range(31))
    assert res.generator is not None, res.note
    assert res.frames >= 100 and res.speech_s >= 3.0 and "adapted" in res.note
    assert res.summary()["adapted"] and len(res.losses) == 30
    # the copy learned the clip (its loss falls), the pack's network did not move
    assert np.mean(res.losses[-10:]) < np.mean(res.losses[:10])
    after = _state(gen.net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert res.generator.net is not gen.net and res.generator.codec is gen.codec
    changed = [k for k, v in res.generator.net.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    # deterministic for a seed
    again = adapt_from_video(video, gen, pack.whisper, AdaptConfig(steps=30, lr=3e-4, seconds=5.0))
    assert all(torch.equal(v, again.generator.net.state_dict()[k]) for k, v in res.generator.net.state_dict().items())


def test_nothing_to_learn_from_is_a_note_not_an_error(tmp_path, pack):
    from tccp.media.io import write_video

    video, _ = media.sample_paths()
    clip = media.load_clip(video, max_frames=100)
    mute = tmp_path / "mute.mp4"
    write_video(mute, clip.frames)  # no audio track
    res = adapt_from_video(mute, pack.stage1, pack.whisper, AdaptConfig(steps=5))
    assert res.generator is None and "no audio" in res.note and "beside it" not in res.note
    # the shared clips' convention: x_noaudio.mp4 with its speech in x.wav beside it
    noaudio = tmp_path / "talk_noaudio.mp4"
    write_video(noaudio, clip.frames)
    (tmp_path / "talk.wav").write_bytes(b"RIFF")  # only its name matters to the hint
    res = adapt_from_video(noaudio, pack.stage1, pack.whisper, AdaptConfig(steps=5))
    assert res.generator is None and "--adapt-audio talk.wav" in res.note
    quiet = tmp_path / "quiet.mp4"
    write_video(quiet, clip.frames, audio=np.zeros(4 * 16000, np.float32))
    res = adapt_from_video(quiet, pack.stage1, pack.whisper, AdaptConfig(steps=5))
    assert res.generator is None and "of speech" in res.note
    res = adapt_from_video(video, pack.stage1, pack.whisper, AdaptConfig(steps=0))
    assert res.generator is None and res.note == "adaptation off"
    res = adapt_from_video(video, pack.stage1, pack.whisper, AdaptConfig(steps=5), start_s=4.8)
    assert res.generator is None and "under a second" in res.note


def test_the_videos_own_speech_may_come_as_a_separate_file(tmp_path, pack):
    """A video without a track of its own (stems: x_noaudio.mp4 + x.wav) adapts on the
    separate file of its own speech (EngineConfig.adapt_audio / --adapt-audio)."""
    import wave

    from tccp.media.io import write_video

    video, _ = media.sample_paths()
    clip = media.load_clip(video)
    mute = tmp_path / "x_noaudio.mp4"
    write_video(mute, clip.frames)
    own = media.read_audio(video, sr=16000)
    with wave.open(str(tmp_path / "x.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(own, -1, 1) * 32767).astype("<i2").tobytes())
    res = adapt_from_video(mute, pack.stage1, pack.whisper, AdaptConfig(steps=3), audio_path=tmp_path / "x.wav")
    assert res.generator is not None and res.speech_s >= 3.0, res.note


def test_a_file_run_uses_its_adapted_stage1_and_batches_it_alone(tmp_path):
    from engine.config import EngineConfig
    from engine.filerun import run_file
    from engine.model import load_model
    from engine.runner import WindowRequest

    video, speech = media.sample_paths()
    model = load_model(None, "cpu")
    try:
        pack_net = model.runner.pipeline.stage1.net
        before = _state(pack_net)
        cfg = EngineConfig(adapt_steps=20, adapt_seconds=5.0)
        res = run_file(video, tmp_path / "a.mp4", model, audio=speech, config=cfg, max_seconds=1.5)
        assert res.summary["adapt"]["adapted"] and res.stage1 is not None
        assert res.stage1.net is not pack_net
        # the session replayed the frames the adaptation had tracked instead of tracking them again
        assert res.summary["adapt"]["frames_replayed"] == res.frames
        assert all(torch.equal(before[k], v) for k, v in pack_net.state_dict().items())
        plain = run_file(video, tmp_path / "b.mp4", model, audio=speech, config=cfg.with_(adapt_steps=0),
                         max_seconds=1.5)
        assert plain.stage1 is None and "adapt" not in plain.summary  # off: not attempted
        # the adapted network drives the mouth: the outputs differ in the lower face
        a = media.load_clip(tmp_path / "a.mp4", require_audio=False).frames
        b = media.load_clip(tmp_path / "b.mp4", require_audio=False).frames
        assert np.abs(a.astype(int) - b.astype(int)).max() > 20
        # a session's own stage 1 never shares a batch with another session's
        base = dict(mode="generated", steps=0, sampler="ddim", guidance=1.0, window=8,
                    crops=np.zeros((7, 128, 128, 3), np.uint8), meshes=np.zeros((7, 478, 2), np.float32),
                    tokens=np.zeros((7, 1, 1), np.float32), vad=np.zeros(7, np.float32),
                    mel=np.zeros((7, 16, 80), np.float32), refs=None, state=None)
        k0 = model.runner.batch_key(WindowRequest(**base))
        k1 = model.runner.batch_key(WindowRequest(**base, stage1=res.stage1))
        assert k0 != k1 and k1 == model.runner.batch_key(WindowRequest(**base, stage1=res.stage1))
    finally:
        model.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4"]


def test_bad_adapt_options_are_one_line_errors(tmp_path, capsys):
    from tccp.cli import main

    video, _ = media.sample_paths()
    assert main(["run", "--video", str(video), "--out", str(tmp_path / "o.mp4"), "--adapt-steps", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --adapt-steps -1")
    assert list(tmp_path.iterdir()) == []


def test_live_run_on_a_video_file_adapts_when_asked(tmp_path, capsys):
    """`run --live --video FILE --adapt-steps N`: stage 1 adapted to the looping video's own
    speech before the call (a camera adapts during the call: see the session test below)."""
    from tccp.cli import main

    video, speech = media.sample_paths()
    out = tmp_path / "live.mp4"
    assert main(["run", "--live", "--video", str(video), "--audio", str(speech), "--out", str(out),
                 "--max-seconds", "2", "--adapt-steps", "5"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "stage 1 adapted to the person: 5 steps" in text and out.is_file()
    # a camera adapts in the call, on its own microphone: a file of "its own speech" is an error
    assert main(["run", "--live", "--video", "0", "--audio", str(speech), "--adapt-steps", "5",
                 "--adapt-audio", str(speech), "--out", str(tmp_path / "c.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a camera call adapts on its own microphone" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.mp4"]


async def test_a_live_call_adapts_stage1_to_the_caller_and_uses_it():
    """`EngineConfig(live=True, live_adapt=True)`: after the call's first `adapt_seconds`
    with a face, a copy of stage 1 is fine-tuned on the caller's tracked mouth and own
    voice in a background thread, and the session's later windows run on it (the pack's
    network is untouched, and so is a session without `live_adapt`)."""
    import asyncio
    import time

    from engine.config import EngineConfig
    from engine.model import load_model
    from engine.session import Session

    video, _ = media.sample_paths()
    clip = media.load_clip(video)  # the caller: their face and their own voice
    fps, hop = clip.fps, int(round(clip.sr / clip.fps))
    model = load_model(None, "cpu")
    seen: list = []
    submit = model.submit

    async def spy(req):
        seen.append(req.stage1)
        return await submit(req)

    model.submit = spy
    try:
        pack_net = model.runner.pipeline.stage1.net
        before = _state(pack_net)
        assert Session(model, EngineConfig(live=True)).adapter is None  # opt-in
        cfg = EngineConfig(live=True, live_adapt=True, adapt_steps=10, adapt_seconds=4.0, degrade=False)
        sess = Session(model, cfg)
        outs: list = []

        async def drain():
            while (o := await sess.get()) is not None:
                outs.append(o)

        reader = asyncio.create_task(drain())

        async def play(i0: int, frames: int) -> int:
            """Frames i0.. of the call (the clip, looped) in real time; returns the next index."""
            for i in range(i0, i0 + frames):
                k = i % clip.n_frames
                await sess.push_video(clip.frames[k], i / fps)
                await sess.push_audio(clip.audio[k * hop:(k + 1) * hop], i / fps)
                await asyncio.sleep(1 / fps)
            return i0 + frames

        i = 0
        while sess.adapter.state == "collecting" and i < 20 * fps:  # the call goes on
            i = await play(i, 25)
        assert sess.adapter.state in ("adapting", "adapted"), sess.adapter.summary()
        end = time.monotonic() + 90
        while sess.adapter.state == "adapting" and time.monotonic() < end:
            await asyncio.sleep(0.2)
        summary = sess.adapter.summary()
        assert sess.adapter.state == "adapted" and summary["adapted"], summary
        assert "adapted to the caller: 10 steps" in summary["note"] and summary["speech_s"] >= 3.0
        n_before = len(seen)
        await play(i, 50)  # the call goes on: its windows run on the adapted copy
        await sess.close()
        await reader
        gen = sess.adapter.generator
        assert gen.net is not pack_net
        assert seen and seen[0] is None  # before: the pack's stage 1
        assert any(s is gen for s in seen[n_before:])
        assert sess.stats.error is None and sum(o.generated for o in outs) > 0
        assert all(torch.equal(before[k], v) for k, v in pack_net.state_dict().items())
    finally:
        model.close()


def test_a_silent_call_is_not_adapted_and_says_why(pack):
    """A call without speech in its first seconds keeps the pack's stage 1 (a note, no
    error), and the collection stops at `seconds` of the call (bounded memory)."""
    import time

    from engine.adapt import LiveAdapter

    ad = LiveAdapter(pack.stage1, pack.whisper, AdaptConfig(steps=5, seconds=2.0), fps=25.0)
    mesh = np.tile(pack.stage1.codec.template[None] * 40 + 64, (8, 1, 1)).astype(np.float32)
    for w in range(8):  # 64 frames = 2.56 s of face, 8 at a time, with silence under them
        pts = (w * 8 + np.arange(8)) / 25.0
        ad.add_audio(np.zeros(8 * 640, np.float32), float(pts[0]))
        ad.add_window(pts, np.ones(8, bool), mesh)
    end = time.monotonic() + 30
    while ad.state in ("collecting", "adapting") and time.monotonic() < end:
        time.sleep(0.05)
    assert ad.state == "not adapted" and ad.generator is None
    assert "of speech in the first 2 s of the call" in ad.summary()["note"]
    assert ad._audio.end_time - ad._audio._start / 16000 <= 3.5  # what it kept: ~1 s before + 2 s


def test_serve_adapt_options(capsys):
    """`tccp serve --adapt-steps N`: every call's sessions adapt (checked before any model
    loads: bad values are one line)."""
    from streaming.server import ModelSessions
    from tccp.cli import main

    assert main(["serve", "--adapt-steps", "-3", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --adapt-steps -3")
    from engine.model import SharedModel
    from engine.runner import PipelineRunner

    shared = SharedModel(PipelineRunner.random())
    try:
        on = ModelSessions(None, "cpu", model=shared, adapt_steps=40, adapt_seconds=9.0, trackers=1)
        assert on.cfg.live_adapt and on.cfg.adapt_steps == 40 and on.cfg.adapt_seconds == 9.0
        plain = ModelSessions(None, "cpu", model=shared, trackers=1).cfg
        assert not plain.live_adapt and plain.silence_motion is None  # the gate's default floor
        # --silence-motion reaches every call's config
        assert ModelSessions(None, "cpu", model=shared, trackers=1, silence_motion=0.0).cfg.silence_motion == 0.0
    finally:
        shared.close()


def test_calls_adapt_one_at_a_time(pack):
    """A server's calls share the CPU: a second call's adaptation waits for the first's,
    and a call that ends while waiting gives up its turn."""
    import time

    from engine import adapt as ad_mod

    ad = ad_mod.LiveAdapter(pack.stage1, pack.whisper, AdaptConfig(steps=5, seconds=1.0), fps=25.0)
    mesh = np.tile(pack.stage1.codec.template[None] * 40 + 64, (8, 1, 1)).astype(np.float32)
    assert ad_mod._TRAINING.acquire(timeout=5)  # another call is training
    try:
        for w in range(4):
            pts = (w * 8 + np.arange(8)) / 25.0
            ad.add_audio(np.zeros(8 * 640, np.float32), float(pts[0]))
            ad.add_window(pts, np.ones(8, bool), mesh)
        time.sleep(1.2)
        assert ad.state == "adapting" and ad.result is None  # waiting for its turn
        ad.close()
        end = time.monotonic() + 5
        while ad.state == "adapting" and time.monotonic() < end:
            time.sleep(0.05)
        assert ad.state == "not adapted" and "before its adaptation's turn" in ad.summary()["note"]
    finally:
        ad_mod._TRAINING.release()


def test_the_replayed_start_is_what_tracking_all_along_gives():
    """A file run's session replays the adaptation's tracking of the source's start and
    continues with the same tracker (engine.prep.ReplayTracker): the observations equal
    a fresh tracker's over the whole stream; a frame that is not the recorded one ends
    the replay and is tracked from scratch."""
    from engine.adapt import _track
    from tccp.face.track import FaceTracker, FaceTrackerConfig

    video, _ = media.sample_paths()
    frames = list(media.iter_video(video, fps=25.0, max_frames=50))
    _, ok, start = _track(video, 0, 30, 25.0, keep=True)
    assert ok.all() and len(start.observations) == 30
    replay = start.replay()
    try:
        with FaceTracker(FaceTrackerConfig(fps=25.0)) as ref:
            for t, f in frames:
                a, b = replay.update(f, t), ref.update(f, t)
                assert np.array_equal(a.landmarks, b.landmarks) and np.array_equal(a.face_box, b.face_box)
        assert replay.replayed == 30
    finally:
        replay.close()
    # another stream: the first frame differs from the recording -> tracked, not replayed
    _, _, start = _track(video, 0, 10, 25.0, keep=True)
    replay = start.replay()
    try:
        with FaceTracker(FaceTrackerConfig(fps=25.0)) as ref:
            for t, f in frames[20:26]:
                a, b = replay.update(f, t), ref.update(f, t)
                assert np.array_equal(a.landmarks, b.landmarks)
        assert replay.replayed == 0
    finally:
        replay.close()
    assert _track(video, 5, 10, 25.0, keep=True)[2] is None  # only a start from frame 0 is kept


def _delayed_audio(tmp_path, video, frames: int, fps: float = 25.0):
    """The video's own speech, `frames` video frames late, as a separate 16 kHz wav."""
    import wave

    a = media.read_audio(video, sr=16000)
    d = int(round(frames / fps * 16000))
    late = np.concatenate([np.zeros(d, np.float32), a[: len(a) - d]])
    path = tmp_path / f"late{frames}.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(late, -1, 1) * 32767).astype(np.int16).tobytes())
    return path


def test_a_source_whose_audio_runs_late_is_learned_back_in_sync(tmp_path, pack):
    """The sync probe (the pack's stage 1 drawing mouths from the audio, cross-correlated
    with the tracked ones) finds the sample in sync and the same video with its speech
    6 frames late off by -6 (mouth before sound); adaptation then learns from pairs
    shifted back (docs/lipsync.md: a source off by 6 frames taught the copy its offset)."""
    from engine.adapt import clips_from_video, shift_clip, sync_offset

    video, _ = media.sample_paths()
    gen = pack.stage1
    clips, _, _, _ = clips_from_video(video, gen.codec, pack.whisper, 5.0)
    lag, r0, r_lag = sync_offset(gen, clips)
    assert abs(lag) <= 1 and r0 > 0.4, (lag, r0, r_lag)
    late = _delayed_audio(tmp_path, video, 6)
    clips6, _, _, _ = clips_from_video(video, gen.codec, pack.whisper, 5.0, audio_path=late)
    lag6, r06, r_lag6 = sync_offset(gen, clips6)
    assert lag6 in (-7, -6, -5) and r_lag6 - r06 > 0.15, (lag6, r06, r_lag6)
    # shifting pairs frame i's mouth with the sound of frame i + 6
    c = clips6[0]
    s = shift_clip(c, -6)
    assert s.n == c.n - 6
    np.testing.assert_array_equal(s.heads, c.heads[:-6])
    np.testing.assert_array_equal(s.features["full"], c.features["full"][12: 12 + 2 * s.n])
    np.testing.assert_array_equal(shift_clip(c, 4).heads, c.heads[4:])
    res = adapt_from_video(video, gen, pack.whisper, AdaptConfig(steps=2, seconds=5.0), audio_path=late)
    assert res.generator is not None and res.sync_lags == [lag6]
    assert res.note.count("before its own sound") == 1 and "\n" not in res.note
    plain = adapt_from_video(video, gen, pack.whisper, AdaptConfig(steps=2, seconds=5.0))
    assert plain.sync_lags == [0] and "sync" not in plain.note
