"""File-to-file runs: muxed driving audio, ping-pong / cut context video, identity
images, atomic output on failure, the `tccp run` CLI and `tccp demo`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.filerun import pingpong_index, run_file
from engine.model import SharedModel
from fakes import FakeRunner, FakeTracker, FaultyRunner
from tccp.errors import TCCPError
from tccp.media import io as media

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LEVELS = np.arange(12) * 20 + 20  # corner brightness that encodes the context frame index


def _marked_clip(path: Path, n: int, size: int = 160) -> Path:
    """A clip whose frame k has a flat corner block of brightness LEVELS[k] (outside
    any face box), so the output tells which context frame it was made from."""
    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, (size, size, 3), dtype=np.uint8)
    frames = []
    for k in range(n):
        f = base.copy()
        f[:32, :32] = LEVELS[k % len(LEVELS)]
        frames.append(f)
    t = np.arange(int(n / 25 * 16000)) / 16000
    media.write_video(path, np.stack(frames), audio=(0.1 * np.sin(2 * np.pi * 300 * t)).astype(np.float32))
    return path


def _corner_indices(path: Path) -> list[int]:
    frames = media.read_video(path, min_frames=1).frames
    means = frames[:, 8:24, 8:24].reshape(len(frames), -1).mean(axis=1)
    return [int(np.argmin(np.abs(LEVELS - m))) for m in means]


def _speech(path: Path, seconds: float, sr: int = 16000) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(1)
    t = np.arange(int(seconds * sr)) / sr
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)  # syllable-like bursts
    x = (0.3 * env * np.sin(2 * np.pi * 180 * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return path, x


def _best_corr(a: np.ndarray, b: np.ndarray, max_lag: int = 2048) -> float:
    n = min(a.size, b.size) - max_lag
    best = 0.0
    for lag in range(0, max_lag, 16):
        x, y = a[lag:lag + n], b[:n]
        best = max(best, float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-9)))
        x, y = a[:n], b[lag:lag + n]
        best = max(best, float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-9)))
    return best


@pytest.fixture(scope="module")
def fake_model():
    model = SharedModel(FakeRunner())
    yield model
    model.close()


def test_shorter_context_plays_pingpong_and_output_follows_audio(tmp_path, fake_model):
    ctx = _marked_clip(tmp_path / "ctx.mp4", 10)
    audio, _ = _speech(tmp_path / "speech.wav", 1.0)
    out = tmp_path / "out" / "dub.mp4"
    res = run_file(ctx, out, fake_model, audio=audio, tracker=FakeTracker())
    assert res.looped and res.context_frames == 10 and res.frames == 25
    assert _corner_indices(out) == [pingpong_index(i, 10) for i in range(25)]
    info = media.probe(out)
    assert info.has_audio and info.duration == pytest.approx(1.0, abs=0.05)


def test_longer_context_is_cut(tmp_path, fake_model):
    ctx = _marked_clip(tmp_path / "ctx.mp4", 12)
    audio, _ = _speech(tmp_path / "speech.wav", 0.32)  # 8 frames
    out = tmp_path / "dub.mp4"
    res = run_file(ctx, out, fake_model, audio=audio, tracker=FakeTracker())
    assert not res.looped and res.frames == 8
    assert _corner_indices(out) == list(range(8))


def test_failure_mid_run_leaves_no_output(tmp_path):
    ctx = _marked_clip(tmp_path / "ctx.mp4", 12)
    audio, _ = _speech(tmp_path / "speech.wav", 1.0)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with SharedModel(FaultyRunner(FakeRunner(), fail=lambda r: r.state is not None)) as model:
        with pytest.raises(Exception, match="injected"):
            run_file(ctx, out_dir / "dub.mp4", model, audio=audio, tracker=FakeTracker())
    assert list(out_dir.iterdir()) == []  # no output, no temp file


def test_identity_image_face_is_the_only_reference(tmp_path):
    """`--identity IMAGE`: the image's face is the session's one reference; without it
    the references come from the input's own tracked frames."""
    import cv2

    from engine.refs import bank_from_image

    video, _ = media.sample_paths()
    face_img = media.read_video(video, max_frames=8).frames[5]
    png = tmp_path / "me.png"
    cv2.imwrite(str(png), face_img[:, :, ::-1])
    ctx = _marked_clip(tmp_path / "ctx.mp4", 10)
    audio, _ = _speech(tmp_path / "speech.wav", 0.3)
    runner = FakeRunner()
    with SharedModel(runner) as model:
        run_file(ctx, tmp_path / "a.mp4", model, audio=audio, identity=png, tracker=FakeTracker())
        bank = runner.last_request.refs.bank
        want = bank_from_image(face_img, runner.template, runner.size)
        assert len(bank) == 1 and np.abs(bank.crops[0].astype(int) - want.crops[0].astype(int)).max() <= 1
        assert not bank.own  # another picture: the skin around the mouth is not the source's to keep
        # default: references from the input's own tracked frames
        run_file(ctx, tmp_path / "b.mp4", model, audio=audio, tracker=FakeTracker())
        bank = runner.last_request.refs.bank
        first = media.read_video(ctx, max_frames=1, min_frames=1).frames[0]
        obs = FakeTracker().update(first, 0.0)
        from tccp.face import geometry as fg

        assert np.abs(bank.crops[0].astype(int) - fg.crop(first, obs.face_box, runner.size).astype(int)).max() <= 1
        assert bank.own


def test_bad_inputs_are_one_line_errors(tmp_path, fake_model):
    silent = tmp_path / "silent.mp4"
    media.write_video(silent, np.full((10, 32, 32, 3), 90, np.uint8))
    with pytest.raises(TCCPError, match="no audio track"):
        run_file(silent, tmp_path / "o.mp4", fake_model)
    with pytest.raises(TCCPError, match="no such file"):
        run_file(tmp_path / "missing.mp4", tmp_path / "o.mp4", fake_model)
    ctx = _marked_clip(tmp_path / "ctx.mp4", 10)
    with pytest.raises(TCCPError, match=r"\.mp4"):
        run_file(ctx, tmp_path / "o.avi", fake_model)
    noise = tmp_path / "noise.png"
    import cv2

    cv2.imwrite(str(noise), np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(TCCPError, match="noise.png: no face"):
        run_file(ctx, tmp_path / "o.mp4", fake_model, identity=noise, tracker=FakeTracker())
    assert not (tmp_path / "o.mp4").exists()


# --------------------------------------------------------------------------- CLI / demo


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory):
    from engine.runner import PipelineRunner
    from tccp.pack import save_pack

    r = PipelineRunner.random(size=64)  # 64 px crops
    p = r.pipeline
    return save_pack(tmp_path_factory.mktemp("pack") / "tiny", p.stage1.net, p.stage1.codec, p.stage2.model,
                     crop_size=r.size)


def test_cli_run_file_to_file_with_driving_audio_muxed(tmp_path, tiny_pack, capsys):
    """`tccp run` on the bundled sample with a tiny pack: H.264 + AAC, one frame per
    25th of a second of the *driving* audio, which is what the output track carries."""
    from tccp.cli import main

    video, _ = media.sample_paths()
    speech, samples = _speech(tmp_path / "speech.wav", 0.8)
    out = tmp_path / "run.mp4"
    code = main(["run", "--video", str(video), "--audio", str(speech), "--out", str(out),
                 "--model", str(tiny_pack), "--steps", "1", "--quiet"])
    text = capsys.readouterr().out
    assert code == 0
    assert "p50" in text and "passed through" in text and "20 frames" in text
    info = media.probe(out)
    assert info.video_codec == "h264" and info.audio_codec == "aac"
    assert media.read_video(out, min_frames=1).frames.shape[0] == 20
    assert info.duration == pytest.approx(0.8, abs=0.05)
    got = media.read_audio(out)
    assert _best_corr(got, samples) > 0.9  # the driving audio, not the sample's own
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_256_px_pack_runs_end_to_end(tmp_path, capsys):
    """The 256 px option (issue: "256 px as an option for GPU"): a pack saved for 256 px
    crops (20 x 20 mouth-patch latents) drives `tccp run` with its denoiser; the frames
    come out edited around the mouth and untouched away from the face."""
    from engine.runner import PipelineRunner
    from tccp.cli import main
    from tccp.pack import load_pack, save_pack

    r = PipelineRunner.random(size=256)
    p = r.pipeline
    pack = save_pack(tmp_path / "p256", p.stage1.net, p.stage1.codec, p.stage2.model, crop_size=r.size)
    assert load_pack(pack, with_autoencoder=False).pack_config["crop_size"] == 256
    video, _ = media.sample_paths()
    speech, _ = _speech(tmp_path / "speech.wav", 0.4)
    out = tmp_path / "run256.mp4"
    assert main(["run", "--video", str(video), "--audio", str(speech), "--out", str(out), "--model", str(pack),
                 "--steps", "1", "--adapt-steps", "0", "--quiet"]) == 0
    assert "generated" in capsys.readouterr().out
    got = media.read_video(out, min_frames=1).frames.astype(np.float32)
    src = media.load_clip(video, max_frames=got.shape[0]).frames.astype(np.float32)
    assert got.shape == src.shape and got.shape[0] == 10
    h, w = got.shape[1:3]
    diff = np.abs(got - src).mean(axis=(0, 3))
    assert diff[int(0.55 * h):int(0.75 * h), int(0.35 * w):int(0.65 * w)].mean() > 2.0  # the mouth was edited
    assert diff[: h // 8].mean() < 3.0  # above the head: the source up to the codec (~1.5 here)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from tccp.cli import main

    assert main(["run", "--video", str(tmp_path / "nope.mp4"), "--out", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nope.mp4" in err[0]
    video, _ = media.sample_paths()
    assert main(["run", "--video", str(video), "--out", str(tmp_path / "o.mp4"),
                 "--model", str(tmp_path / "nopack")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nopack" in err[0]
    # a video without a track: the error names the same-stem .wav beside it, if any
    mute = tmp_path / "talk_noaudio.mp4"
    media.write_video(mute, media.load_clip(video, max_frames=10).frames)
    (tmp_path / "talk.wav").write_bytes(b"RIFF")
    assert main(["run", "--video", str(mute), "--out", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --audio FILE (talk.wav lies beside it)" in err[0]
    assert not (tmp_path / "o.mp4").exists()


def test_demo_writes_video_and_preview(tmp_path, capsys):
    from tccp.cli import main

    code = main(["demo", "--out-dir", str(tmp_path), "--max-seconds", "0.4", "--steps", "1",
                 "--preview-frames", "2", "--quiet"])
    assert code == 0
    assert media.probe(tmp_path / "demo.mp4").has_audio
    import cv2

    png = cv2.imread(str(tmp_path / "demo_preview.png"))
    assert png is not None and png.shape[0] > 2 * 200 and png.shape[1] > 3 * 200
    # the demo adapts the bundled stage 1 to the sample's own speech first (engine.adapt)
    assert "stage 1 adapted to the person" in " ".join(capsys.readouterr().out.split())


def test_bundled_pack_rests_the_mouth_on_silent_audio_and_takes_odd_rates(tmp_path):
    """The bundled pack end to end: digital silence gives a resting mouth (the gate and
    the model's own silence training), speech opens it; 8 kHz audio is resampled."""
    import wave

    from engine.model import load_model
    from tccp.metrics.evaluate import track_frames

    video, speech = media.sample_paths()

    def wav(path, x, sr):
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sr)
            w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
        return path

    silent = wav(tmp_path / "silent.wav", np.zeros(16000 * 2), 16000)
    speech8k = media.read_audio(speech, sr=8000)[: 8000 * 2]
    low = wav(tmp_path / "speech8k.wav", speech8k, 8000)

    model = load_model(None, "cpu")
    try:
        aps, cfg = {}, EngineConfig()
        for name, audio in (("silent", silent), ("speech", speech), ("speech8k", low)):
            out = tmp_path / f"{name}.mp4"
            res = run_file(video, out, model, audio=audio, max_seconds=2.0, config=cfg)
            # as shipped: stage 1 adapted to the sample's own speech (once; the later runs reuse it)
            cfg = cfg.with_(stage1=res.stage1 or cfg.stage1)
            assert cfg.stage1 is not None
            aps[name] = track_frames(media.read_video(out).frames).aperture
    finally:
        model.close()
    assert np.nanmean(aps["silent"]) < 0.5 * np.nanmean(aps["speech"])
    assert np.nanstd(aps["silent"]) < 0.5 * np.nanstd(aps["speech"])
    assert np.nanstd(aps["speech8k"]) > 0.5 * np.nanstd(aps["speech"])
