"""`tccp prepare`: bad inputs fail with one line and leave nothing; a real clip
produces a complete, compact, readable folder; reruns resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    list_files,
    make_audio_as_video,
    make_cut_tail_mp4,
    make_noise_clip,
    make_short_clip,
    make_text_as_mp4,
    make_truncated_mp4,
    make_wav,
    shared_file,
)
from tccp.cli import main as cli_main
from tccp.data import prepare as prep
from tccp.errors import TCCPError

ROOT = Path(__file__).resolve().parents[1]
N_FACE = 40


@pytest.fixture(scope="module")
def face_frames() -> np.ndarray:
    """40 frames of a real close-up (vr_face3), 256 px to keep tracking quick."""
    import cv2

    from tccp.media.io import read_video

    src = shared_file("data", "clips", "vr_face3.mp4")
    frames = read_video(src, max_frames=N_FACE).frames
    return np.stack([cv2.resize(f, (256, 256), interpolation=cv2.INTER_AREA) for f in frames])


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    from tccp.media.io import read_audio

    return read_audio(shared_file("data", "clips", "vr_face3.mp4"))[: int(N_FACE / 25 * 16000)]


@pytest.fixture(scope="module")
def face_clip(tmp_path_factory, face_frames, speech) -> Path:
    from tccp.media.io import write_video

    path = tmp_path_factory.mktemp("clips") / "talk.mp4"
    write_video(path, face_frames, audio=speech, crf=12)
    return path


def _run(argv: list[str], capfd) -> tuple[int, list[str]]:
    code = cli_main(["prepare", *argv])
    err = capfd.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


# --------------------------------------------------------------------------- bad inputs


def _bad_silent_clip(d: Path, face_frames) -> Path:
    from tccp.media.io import write_video

    return write_video(d / "silent.mp4", face_frames[:10])


BAD_CASES = {
    "nonexistent": lambda d, f: d / "missing.mp4",
    "text_as_mp4": lambda d, f: make_text_as_mp4(d / "notes.mp4"),
    "truncated_no_index": lambda d, f: make_truncated_mp4(d / "cut.mp4"),
    "truncated_tail": lambda d, f: make_cut_tail_mp4(d / "tail.mp4"),
    "no_audio": _bad_silent_clip,
    "audio_as_video": lambda d, f: make_audio_as_video(d / "voice.wav"),
    "no_face": lambda d, f: make_noise_clip(d / "noise.mp4", n=12),
    "too_short": lambda d, f: make_short_clip(d / "five.mp4", n=5),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_one_line_no_output(case: str, tmp_path: Path, face_frames, capfd) -> None:
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    clip = BAD_CASES[case](src_dir, face_frames)
    capfd.readouterr()
    out = tmp_path / "out"
    code, lines = _run([str(clip), "--out", str(out)], capfd)
    assert code != 0
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and str(clip) in lines[0], lines[0]
    assert "Traceback" not in lines[0]
    assert not out.exists() or list_files(out) == [], list_files(out)


def test_no_audio_message_names_the_fix(tmp_path: Path, face_frames, capfd) -> None:
    clip = _bad_silent_clip(tmp_path, face_frames)
    capfd.readouterr()
    _, lines = _run([str(clip), "--out", str(tmp_path / "o")], capfd)
    assert "no audio" in lines[0] and "--audio" in lines[0]


def test_unwritable_output(tmp_path: Path, face_clip: Path, capfd) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a folder is needed: unwritable even as root
    code, lines = _run([str(face_clip), "--out", str(blocker / "out")], capfd)
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ")
    assert str(blocker / "out") in lines[0]


def test_bad_input_subprocess_no_traceback(tmp_path: Path) -> None:
    bad = make_text_as_mp4(tmp_path / "bad.mp4")
    r = subprocess.run(
        [sys.executable, "-m", "tccp.cli", "prepare", str(bad), "--out", str(tmp_path / "o")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(f"error: {bad}")


# --------------------------------------------------------------------------- real clip


def test_real_clip_end_to_end(tmp_path: Path, face_clip: Path, face_frames) -> None:
    out = tmp_path / "prepared"
    cmd = [sys.executable, "-m", "tccp.cli", "prepare", str(face_clip), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    folder = out / "talk"
    names = (".tccp-output", "audio.m4a", "context.mp4", "face.mp4", "mel.npz", "meta.json", "track.npz",
             "voice.npz")  # .tccp-output: tccp.io_utils' marker (this folder is a `tccp prepare` output)
    assert list_files(out) == sorted(["talk"] + [f"talk/{n}" for n in names])
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["complete"] is True and meta["version"] == prep.FORMAT_VERSION
    assert meta["n_frames"] == N_FACE and meta["size"] == 128 and meta["fps"] == 25.0
    assert Path(meta["source"]) == face_clip.resolve() and Path(meta["audio_source"]) == face_clip.resolve()
    assert meta["n_found"] == N_FACE
    assert meta["audio"]["rms"] > 0.01 and abs(meta["audio"]["signal_seconds"] - N_FACE / 25) < 0.05
    assert set(meta["speech"]) == {"fraction", "aperture_std", "lipsync"}
    # compact: well under the ~3.4 KB/frame that 48 clips in 40 MiB allow
    assert prep.folder_size(folder) < 2500 * N_FACE

    from tccp.data.datasets import PreparedClip
    from tccp.face import crop

    clip = PreparedClip(folder)
    assert clip.faces.shape == (N_FACE, 128, 128, 3) and clip.contexts.shape == (N_FACE, 128, 128, 3)
    # the stored crop is the source frame cropped at the stored box (codec error only)
    ref = crop(face_frames[7], clip.face_boxes[7], 128)
    mse = np.mean((clip.faces[7].astype(float) - ref) ** 2)
    assert 10 * np.log10(255**2 / mse) > 32
    # the face fills the crop: landmarks spread over much of it, centred
    lm = clip.landmarks[7]
    assert lm.min() > 0 and lm.max() < 128
    assert 50 < np.ptp(lm[:, 1]) < 120 and abs(lm[:, 0].mean() - 64) < 16
    # the head is greyed out in the context crop, the surroundings are not
    from tccp.face import MASK_GREY

    centre = clip.contexts[7, 56:72, 56:72].astype(int)
    assert np.abs(centre - MASK_GREY).max() <= 6
    assert np.abs(clip.contexts[7].astype(int) - MASK_GREY).max() > 60
    # mel covers the clip: 80 frames/s
    assert abs(clip.mel.shape[0] - N_FACE / 25 * 80) <= 2
    assert clip.mel.std() > 0.3  # speech, not silence
    sk = clip.sketch(7)
    assert (sk.max(-1) > 0).sum() > 300


def test_resume_skip_force_and_multi_clip(tmp_path: Path, face_frames, speech, capfd) -> None:
    """A clip with no audio track takes the same-stem .wav beside it; a bad clip in a
    batch is reported and the batch goes on; a rerun skips finished clips."""
    from tccp.media.io import write_video

    src = tmp_path / "in"
    src.mkdir()
    silent = write_video(src / "talk_noaudio.mp4", face_frames[:32])
    wav = make_wav(src / "talk.wav", seconds=0.8)  # shorter than the video: padded
    bad = make_text_as_mp4(src / "bad.mp4")
    out = tmp_path / "out"
    import cv2

    threads = cv2.getNumThreads()
    code, lines = _run([str(silent), str(bad), "--out", str(out), "--workers", "1"], capfd)
    assert code != 0
    assert cv2.getNumThreads() == threads  # preparing in process leaves OpenCV's threads as they were
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: "), lines
    folder = out / "talk_noaudio"
    meta = json.loads((folder / "meta.json").read_text())
    assert Path(meta["audio_source"]) == wav.resolve() and meta["n_frames"] == 32
    assert abs(meta["audio"]["signal_seconds"] - 0.8) < 0.01  # the padding is not signal
    assert sorted(p.name for p in out.iterdir()) == ["talk_noaudio"]  # no temp leftovers
    stamp = (folder / "meta.json").stat().st_mtime_ns

    code = cli_main(["prepare", str(silent), "--out", str(out)])
    assert code == 0 and (folder / "meta.json").stat().st_mtime_ns == stamp  # skipped
    code = cli_main(["prepare", str(silent), "--out", str(out), "--force"])
    assert code == 0 and (folder / "meta.json").stat().st_mtime_ns != stamp


def test_resolve_audio_order(tmp_path: Path) -> None:
    clip = tmp_path / "a_noaudio.mp4"
    clip.write_bytes(b"")
    given = tmp_path / "given.wav"
    assert prep.resolve_audio(clip, given, has_audio=True) is None  # own track wins
    assert prep.resolve_audio(clip, given, has_audio=False) == given
    make_wav(tmp_path / "a_noaudio.wav")
    assert prep.resolve_audio(clip, given, has_audio=False) == tmp_path / "a_noaudio.wav"
    make_wav(tmp_path / "a.wav")
    assert prep.resolve_audio(clip, given, has_audio=False) == tmp_path / "a.wav"
    with pytest.raises(TCCPError, match="pass --audio"):
        prep.resolve_audio(tmp_path / "b.mp4", None, has_audio=False)


def test_interrupted_write_leaves_nothing(tmp_path: Path, face_clip: Path, monkeypatch) -> None:
    def crash(clip, tmp, data, cfg, progress):
        (tmp / "face.mp4").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_write_clip", crash)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_clip(face_clip, out)
    assert list_files(out) == []
