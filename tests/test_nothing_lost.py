"""Nothing lost (issue #15): no command writes over, deletes or moves what it did not
write in this run, and every bad input ends with one `error:` line and exit 2.

Each reported case has a test here: output == input (also as ./x, a symlink, a hard
link), export/prepare/avatar/train folders that hold other files, `--out .`, two clips
with one stem, `eval --max-seconds 0`, clips without a face (none, noise, too few
frames), silent clips, SIGTERM and SIGINT mid-run, `prepare --size/--crf` bounds, an
avatar budget too small for one step, `info --json | head`, `info`'s speed. The
server's memory under abandoned sessions is tests/test_soak.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import list_files, make_noise_clip, make_wav, shared_file
from tccp.cli import main as cli_main
from tccp.errors import TCCPError
from tccp.io_utils import MARKER, atomic_dir, claim_dir, command_scope, guard_output, read_marker

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]


def _cli(argv: list[str], capfd) -> tuple[int, list[str]]:
    code = cli_main(argv)
    err = capfd.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def _one_error(code: int, lines: list[str], *needles: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def face_clip(tmp_path_factory) -> Path:
    """2 s of a real talking close-up (vr_face3) at 256 px with its own audio."""
    import cv2

    from tccp.media.io import read_audio, read_video, write_video

    src = shared_file("data", "clips", "vr_face3.mp4")
    frames = read_video(src, max_frames=50).frames
    frames = np.stack([cv2.resize(f, (256, 256), interpolation=cv2.INTER_AREA) for f in frames])
    path = tmp_path_factory.mktemp("face") / "talk.mp4"
    write_video(path, frames, audio=read_audio(src)[: 2 * 16000], crf=14)
    return path


def _blurred_noise(path: Path, n: int = 75, size: int = 64, seed: int = 2) -> Path:
    """Smooth colour noise: the input on which the tracker found false faces (13 of 75
    frames detected, 31 of 75 `found` with gap filling, for this seed)."""
    import cv2

    from tccp.media.io import write_video

    rng = np.random.default_rng(seed)
    frames = np.stack([cv2.GaussianBlur(f, (0, 0), 2) for f in rng.integers(0, 256, (n, size, size, 3), np.uint8)])
    audio = (0.1 * np.random.default_rng(seed + 1).standard_normal(int(n / 25 * 16000))).astype(np.float32)
    write_video(path, frames, audio=audio)
    return path


# --------------------------------------------------------------------------- the guard


def test_output_equal_to_an_input_is_refused_however_it_is_spelled(tmp_path, monkeypatch):
    src = tmp_path / "a.mp4"
    src.write_bytes(b"the user's video")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.mp4").symlink_to(src)
    os.link(src, tmp_path / "hard.mp4")
    for out in ("a.mp4", "./a.mp4", str(src), "sub/../a.mp4", "link.mp4", "hard.mp4"):
        with pytest.raises(TCCPError, match=r"is also an input"):
            guard_output(out, inputs=["a.mp4"])
    guard_output("b.mp4", inputs=["a.mp4"])  # anything else is fine
    with pytest.raises(TCCPError, match="holds the input"):
        guard_output(".", folder=True, inputs=["a.mp4"])
    assert src.read_bytes() == b"the user's video"


def test_atomic_dir_never_replaces_a_folder_of_other_files(tmp_path):
    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("keep me")
    before = _snapshot(user)
    with pytest.raises(TCCPError, match=r"mine: is not empty \(notes.txt, sub\)"):
        with atomic_dir(user) as tmp:
            (tmp / "x").write_text("new")
    assert _snapshot(user) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp or .old- folder
    # --force adds beside the user's files and replaces nothing it did not write
    with atomic_dir(user, force=True) as tmp:
        (tmp / "x").write_text("new")
    assert (user / "notes.txt").read_text() == "keep me" and (user / "sub").is_dir()
    assert read_marker(user)["entries"] == ["x"]
    with atomic_dir(user, force=True) as tmp:  # a later output replaces x, and only x
        (tmp / "y").write_text("newer")
    assert sorted(os.listdir(user)) == [MARKER, "notes.txt", "sub", "y"]
    # a clash with a name tccp did not write is an error, and nothing changes
    with pytest.raises(TCCPError, match="notes.txt, not written by tccp"):
        with atomic_dir(user, force=True) as tmp:
            (tmp / "notes.txt").write_text("overwritten?")
    assert (user / "notes.txt").read_text() == "keep me" and (user / "y").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_atomic_dir_replaces_its_own_earlier_output_only(tmp_path):
    out = tmp_path / "export"
    with command_scope("export"):
        with atomic_dir(out) as tmp:
            (tmp / "a.onnx").write_text("1")
            (tmp / "manifest.json").write_text("{}")
        (out / "my_notes.txt").write_text("written by the user since")
        with atomic_dir(out) as tmp:
            (tmp / "b.onnx").write_text("2")
            (tmp / "manifest.json").write_text("{}")
    assert sorted(os.listdir(out)) == [MARKER, "b.onnx", "manifest.json", "my_notes.txt"]
    assert read_marker(out) == {"format": "tccp-output", "version": 1, "command": "export",
                                "entries": ["b.onnx", "manifest.json"]}
    with command_scope("prepare"):  # another command's output is not "ours"
        with pytest.raises(TCCPError, match="holds the output of `tccp export`"):
            with atomic_dir(out) as tmp:
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_atomic_dir_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with command_scope("export"):
        with atomic_dir(".") as tmp:  # empty: filled in place (the shell's cwd stays valid)
            (tmp / "a").write_text("1")
        with atomic_dir(".") as tmp:
            (tmp / "b").write_text("2")
    assert sorted(os.listdir(tmp_path)) == [MARKER, "b"]
    assert Path.cwd() == tmp_path


def test_claimed_folder_and_legacy_outputs(tmp_path):
    legacy = tmp_path / "old_export"  # written before markers existed: known by its manifest
    legacy.mkdir()
    (legacy / "manifest.json").write_text(json.dumps({"format": "tccp-export", "version": 1}))
    (legacy / "g.onnx").write_text("old")
    with command_scope("export"):
        with atomic_dir(legacy) as tmp:
            (tmp / "manifest.json").write_text("{}")
    assert sorted(os.listdir(legacy)) == [MARKER, "manifest.json"]
    demo = tmp_path / "out"  # a marker-less folder holding only the command's own names
    demo.mkdir()
    (demo / "demo.mp4").write_bytes(b"old")
    claim_dir(demo, kind="demo", known=("demo.mp4", "demo_preview.png"))
    assert read_marker(demo)["command"] == "demo"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("x")
    with pytest.raises(TCCPError, match="was not written by `tccp demo`"):
        claim_dir(tmp_path / "docs", kind="demo", known=("demo.mp4", "demo_preview.png"))
    assert sorted(os.listdir(tmp_path / "docs")) == ["thesis.tex"]


# --------------------------------------------------------------------------- commands


def test_run_refuses_to_write_over_its_input(tmp_path, capfd, monkeypatch):
    video = tmp_path / "a.mp4"
    video.write_bytes(b"8 s of the user's only take")
    monkeypatch.chdir(tmp_path)
    for out in ("a.mp4", "./a.mp4"):
        code, lines = _cli(["run", "--video", "a.mp4", "--out", out], capfd)
        _one_error(code, lines, out, "is also an input")
    (tmp_path / "voice.m4a").write_bytes(b"audio")
    code, lines = _cli(["run", "--video", "a.mp4", "--audio", "voice.m4a", "--out", "voice.m4a"], capfd)
    assert code == 2  # refused (not an .mp4, and an input)
    assert video.read_bytes() == b"8 s of the user's only take"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "voice.m4a"]


def test_run_refuses_a_silence_motion_outside_0_to_1(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.mp4").write_bytes(b"the user's video")
    for bad in ("-0.1", "1.5", "nan"):
        code, lines = _cli(["run", "--video", "a.mp4", "--out", "o.mp4", "--silence-motion", bad], capfd)
        _one_error(code, lines, "--silence-motion", "between 0 and 1")
    assert sorted(os.listdir(tmp_path)) == ["a.mp4"]
    code, lines = _cli(["serve", "--port", "0", "--silence-motion", "2"], capfd)  # before any model loads
    _one_error(code, lines, "--silence-motion 2", "between 0 and 1")


def test_eval_refuses_json_over_the_video_and_a_bad_max_seconds(tmp_path, capfd):
    gen = tmp_path / "v.mp4"
    gen.write_bytes(b"video bytes")
    code, lines = _cli(["eval", "--generated", str(gen), "--json", str(gen)], capfd)
    _one_error(code, lines, "v.mp4: is also an input")
    assert gen.read_bytes() == b"video bytes"
    for bad in ("0", "-1", "nan"):
        code, lines = _cli(["eval", "--generated", str(gen), "--json", str(tmp_path / "m.json"),
                            "--max-seconds", bad], capfd)
        _one_error(code, lines, "--max-seconds")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "paper.pdf").write_text("x")
    code, lines = _cli(["eval", "--generated", str(gen), "--report", str(tmp_path / "report")], capfd)
    _one_error(code, lines, "report: is not empty (paper.pdf)")
    assert sorted(os.listdir(tmp_path)) == ["report", "v.mp4"]


def test_export_refuses_a_folder_of_other_files_and_the_current_folder(tmp_path, capfd, monkeypatch):
    out = tmp_path / "DIR"
    (out / "subfolder").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    code, lines = _cli(["export", "--config", "tiny", "--no-parity", "--out", str(out)], capfd)
    _one_error(code, lines, "DIR: is not empty (notes.txt, subfolder)", "--force")
    assert _snapshot(out) == before
    monkeypatch.chdir(out)
    code, lines = _cli(["export", "--config", "tiny", "--no-parity", "--out", "."], capfd)
    _one_error(code, lines, ".: is not empty")
    assert _snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["DIR"]  # no ..old-XXXX
    pack = tmp_path / "pack"
    pack.mkdir()
    code, lines = _cli(["export", "--model", str(pack), "--out", str(pack)], capfd)
    _one_error(code, lines, "is also an input")


def test_train_and_avatar_refuse_folders_of_other_files(tmp_path, capfd):
    user = tmp_path / "stuff"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"jpg")
    code, lines = _cli(["train", "--stage", "landmarks", "--data", str(tmp_path), "--out", str(user)], capfd)
    _one_error(code, lines, "stuff: is not empty (holiday.jpg)")
    code, lines = _cli(["train", "--export-pack", str(user), "--stage1", "a", "--stage2", "b"], capfd)
    _one_error(code, lines, "stuff: is not empty")
    clip = tmp_path / "me.mp4"
    clip.write_bytes(b"x")
    for extra in (["--out", str(user)], ["--out", str(tmp_path / "avatars" / "me"), "--work", str(user)]):
        code, lines = _cli(["avatar", "create", "--video", str(clip), *extra], capfd)
        _one_error(code, lines, "stuff: is not empty")
    code, lines = _cli(["demo", "--out-dir", str(user)], capfd)
    _one_error(code, lines, "stuff: is not empty", "--force")
    assert sorted(os.listdir(user)) == ["holiday.jpg"] and sorted(os.listdir(tmp_path)) == ["me.mp4", "stuff"]


# --------------------------------------------------------------------------- prepare


def test_prepare_two_clips_with_one_stem_do_not_collapse(tmp_path, face_clip, capfd):
    d1, d2, out = tmp_path / "d1", tmp_path / "d2", tmp_path / "P"
    d1.mkdir()
    d2.mkdir()
    a, b = d1 / "clip.mp4", d2 / "clip.mp4"
    a.write_bytes(face_clip.read_bytes())
    b.write_bytes(face_clip.read_bytes())
    code = cli_main(["prepare", str(a), str(b), "--out", str(out)])
    captured = capfd.readouterr()
    assert code == 2
    errors = [x for x in captured.err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and str(b) in errors[0] and str(a) in errors[0] and "same name" in errors[0]
    assert "prepared 1," in captured.out and "failed 1 of 2" in captured.out
    assert json.loads((out / "clip" / "meta.json").read_text())["source"] == str(a.resolve())
    # preparing d2's clip alone does not report success while keeping d1's data
    code, lines = _cli(["prepare", str(b), "--out", str(out)], capfd)
    _one_error(code, lines, str(b), "already holds", str(a.resolve()))
    code = cli_main(["prepare", str(b), "--out", str(out), "--force"])  # replaced on request
    assert code == 0
    assert json.loads((out / "clip" / "meta.json").read_text())["source"] == str(b.resolve())
    assert [p.name for p in out.iterdir()] == ["clip"]  # no temp folders


def test_prepare_never_replaces_a_folder_it_did_not_write(tmp_path, face_clip, capfd):
    out = tmp_path / "P"
    (out / "talk").mkdir(parents=True)
    (out / "talk" / "my_thesis.tex").write_text("x")
    code, lines = _cli(["prepare", str(face_clip), "--out", str(out)], capfd)
    _one_error(code, lines, "talk: is not empty (my_thesis.tex)")
    assert sorted(list_files(out)) == ["talk", "talk/my_thesis.tex"]
    # the clip inside the folder it would be prepared into
    inside = tmp_path / "data" / "talk"
    inside.mkdir(parents=True)
    (inside / "talk.mp4").write_bytes(face_clip.read_bytes())
    code, lines = _cli(["prepare", str(inside / "talk.mp4"), "--out", str(tmp_path / "data")], capfd)
    _one_error(code, lines, "holds the input")
    assert (inside / "talk.mp4").is_file()


def test_prepare_skips_silent_and_faceless_clips_with_a_warning(tmp_path, face_clip, capfd):
    from tccp.media.io import read_video, write_video

    silent = tmp_path / "silent.mp4"
    write_video(silent, read_video(face_clip).frames, audio=np.zeros(2 * 16000, np.float32))
    noise = make_noise_clip(tmp_path / "noise.mp4", n=40)
    fake_faces = _blurred_noise(tmp_path / "blurred.mp4")
    out = tmp_path / "P"
    code = cli_main(["prepare", str(face_clip), str(silent), str(noise), str(fake_faces), "--out", str(out)])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    warnings = [x for x in captured.err.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 3 and not [x for x in captured.err.splitlines() if x.startswith("error:")]
    assert any("silent.mp4: the audio is silent" in w for w in warnings)
    assert any("noise.mp4: no face found in 40 frames" in w for w in warnings)
    assert any("blurred.mp4: no face in" in w and "at least 50%" in w for w in warnings)
    assert "prepared 1," in captured.out and "unusable 3 (silent or no face)" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["talk"]
    # one clip alone: the same problem is the command's error
    code, lines = _cli(["prepare", str(silent), "--out", str(tmp_path / "Q")], capfd)
    _one_error(code, lines, "silent.mp4: the audio is silent")
    assert not (tmp_path / "Q").exists()


def test_prepare_size_and_crf_bounds(tmp_path, face_clip, capfd):
    for args, needle in ((["--size", "4096"], "--size 4096: must be a multiple of 8 from 32 to 512"),
                         (["--size", "12"], "--size 12"), (["--crf", "99"], "--crf 99: must be 0..51"),
                         (["--crf", "-1"], "--crf -1")):
        code, lines = _cli(["prepare", str(face_clip), "--out", str(tmp_path / "P"), *args], capfd)
        _one_error(code, lines, needle)
    assert not (tmp_path / "P").exists()


# --------------------------------------------------------------------------- no face


def test_tracker_on_noise_stays_far_below_half(tmp_path):
    """Measured face fractions on noise (the no-face rule's margin): none on plain colour
    noise, under half on the blurred noise that produces false detections."""
    from tccp.face import MIN_FACE_FRACTION, FaceTracker, face_fraction, require_face
    from tccp.media.io import read_video

    with FaceTracker() as tracker:
        plain = tracker.track(read_video(make_noise_clip(tmp_path / "n.mp4", n=40)).frames)
        blurred = tracker.track(read_video(_blurred_noise(tmp_path / "b.mp4")).frames)
    assert face_fraction(plain.found) == 0.0
    assert 0.0 < face_fraction(blurred.found) < MIN_FACE_FRACTION
    with pytest.raises(TCCPError, match=r"^b.mp4: no face in \d+ of 75 frames; a face must be visible"):
        require_face(blurred, "b.mp4")


def test_run_refuses_a_clip_without_a_face_and_keeps_short_gaps(tmp_path):
    """Whole clip without a face: exit 2, no output (was: a copy of the input, exit 0).
    A face in most frames with a gap passes the gap through, as before."""
    from engine.filerun import run_file
    from engine.model import SharedModel
    from fakes import FakeRunner, FakeTracker
    from tccp.media.io import write_video

    rng = np.random.default_rng(0)
    t = np.arange(2 * 16000) / 16000
    audio = (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    bright = rng.integers(60, 200, (50, 96, 96, 3), dtype=np.uint8)
    dark = np.zeros_like(bright)  # FakeTracker: frames darker than 8 have no face
    with SharedModel(FakeRunner()) as model:
        faceless = tmp_path / "dark.mp4"
        write_video(faceless, dark, audio=audio)
        with pytest.raises(TCCPError, match=r"dark.mp4: no face in (\d+) of the first \1 frames \(5\d in all\)"):
            run_file(faceless, tmp_path / "o.mp4", model, tracker=FakeTracker())
        mostly = bright.copy()
        mostly[20:40] = 0  # a face in 60 % of the frames
        write_video(tmp_path / "gap.mp4", mostly, audio=audio)
        res = run_file(tmp_path / "gap.mp4", tmp_path / "ok.mp4", model, tracker=FakeTracker())
        assert res.frames >= 50 and res.summary["passthrough_reasons"].get("no_face", 0) >= 15
        noise = make_noise_clip(tmp_path / "noise.mp4", n=50)  # the real tracker on noise
        with pytest.raises(TCCPError, match="noise.mp4: no face"):
            run_file(noise, tmp_path / "o.mp4", model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dark.mp4", "gap.mp4", "noise.mp4", "ok.mp4"]


# --------------------------------------------------------------------------- signals


_RUN_WITH_FAKE_MODEL = """
import sys
sys.path.insert(0, {tests!r})
import engine.model
from fakes import FakeRunner
engine.model.load_model = lambda *a, **k: engine.model.SharedModel(FakeRunner())
from tccp.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_signals_mid_run_leave_nothing_behind(tmp_path, sig, code, word):
    """`tccp run` killed mid-write (SIGTERM from a supervisor, or Ctrl-C) removes its
    temp file: nothing named like the output remains (was: .OUT.tmp-XXXX.mp4)."""
    from tccp.media.io import sample_paths

    video, _ = sample_paths()
    speech = make_wav(tmp_path / "long.wav", seconds=60.0)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    script = _RUN_WITH_FAKE_MODEL.format(tests=str(Path(__file__).resolve().parent))
    proc = subprocess.Popen([sys.executable, "-c", script, "run", "--video", str(video), "--audio", str(speech),
                             "--out", str(out / "dub.mp4"), "--quiet"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 120
        while not list(out.glob(".dub.tmp-*")) and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        assert list(out.glob(".dub.tmp-*")), "the run never started writing"
        time.sleep(1.0)  # well into the run: frames are being written
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == f"error: {word}"
    assert "Traceback" not in err
    assert list_files(out) == []


# --------------------------------------------------------------------------- avatar, info


def test_avatar_budget_too_small_for_a_step_is_an_error(tmp_path, monkeypatch):
    """--minutes 0.5 used to fine-tune for 0 steps and write a worse "avatar"; a
    budget-only run no longer shows a 10,000,000-step bar. (--minutes 0 asks for no
    fine-tuning: a bank-only avatar, tests/test_avatar.py.)"""
    from tccp.avatars import create
    from tccp.training import trainer

    seen = {}

    class NoTimeTrainer:
        def __init__(self, cfg, log=None):
            seen["progress"], seen["minutes"] = cfg.progress, cfg.minutes

        def run(self):
            return trainer.TrainResult(0, None, "time budget", None, None, None)

        def close(self):
            pass

    monkeypatch.setattr(trainer, "Trainer", NoTimeTrainer)
    cfg = create.AvatarConfig(videos=["me.mp4"], out=str(tmp_path / "me"), minutes=0.5, progress=False)
    base_cfg = {"stage2": {"model": {}, "latent_norm": {}, "schedule": {"prediction": "v"}}}
    with pytest.raises(TCCPError, match=r"--minutes 0.5: too short, stage-2 fine-tuning got 0 steps"):
        create._train_stage2(cfg, tmp_path, tmp_path / "run", tmp_path / "c", tmp_path, base_cfg, lambda m: None)
    assert seen == {"progress": False, "minutes": 0.5}


def test_avatar_worse_than_its_base_warns(tmp_path, capfd, monkeypatch):
    from tccp.avatars import create

    class Result:
        path = tmp_path / "me"
        meta = {"fine_tuned": True, "refs": [{}] * 8, "training": {"steps": 100},
                "validation": {"summary": {"psnr_mouth": [14.7, 13.8], "aperture_corr": [0.5, 0.5]}}}

    monkeypatch.setattr(create, "create_avatar", lambda cfg: Result())
    clip = tmp_path / "me.mp4"
    clip.write_bytes(b"x")
    assert cli_main(["avatar", "create", "--video", str(clip), "--out", str(tmp_path / "me")]) == 0
    err = capfd.readouterr().err
    assert "warning: the avatar reconstructs the held-out tail worse than the base pack" in err
    assert "14.70 -> 13.80 dB" in err


def test_info_into_a_closed_pipe_and_its_speed():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tccp.cli", "info", "--config", "tiny", "--json"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `| head` that has already exited
    err = proc.stderr.read().decode()
    proc.wait(60)
    assert proc.returncode == 141 and err == "", err
    from tccp.commands.info import _measure
    from tccp.models.config import get_config

    t0 = time.perf_counter()
    m = _measure(get_config("paper"))  # was a real forward pass per count: minutes on CPU
    assert time.perf_counter() - t0 < 20
    assert 140e6 < m["params"]["total"] < 160e6 and m["flops_window"] > 4 * m["flops_first"] > 0
