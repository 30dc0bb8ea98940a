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
    cfg = AdaptConfig(steps=30, lr=3e-4, seconds=5.0)
    res = adapt_from_video(video, gen, pack.whisper, cfg)
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
    again = adapt_from_video(video, gen, pack.whisper, cfg)
    assert all(torch.equal(v, again.generator.net.state_dict()[k]) for k, v in res.generator.net.state_dict().items())


def test_nothing_to_learn_from_is_a_note_not_an_error(tmp_path, pack):
    from tccp.media.io import write_video

    video, _ = media.sample_paths()
    clip = media.load_clip(video, max_frames=100)
    mute = tmp_path / "mute.mp4"
    write_video(mute, clip.frames)  # no audio track
    res = adapt_from_video(mute, pack.stage1, pack.whisper, AdaptConfig(steps=5))
    assert res.generator is None and "no audio" in res.note
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
    speech before the call; a camera has none to learn from (one line)."""
    from tccp.cli import main

    video, speech = media.sample_paths()
    out = tmp_path / "live.mp4"
    assert main(["run", "--live", "--video", str(video), "--audio", str(speech), "--out", str(out),
                 "--max-seconds", "2", "--adapt-steps", "5"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "stage 1 adapted to the person: 5 steps" in text and out.is_file()
    assert main(["run", "--live", "--video", "0", "--audio", str(speech), "--adapt-steps", "5",
                 "--out", str(tmp_path / "c.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a camera brings no speech" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.mp4"]
