"""Media layer: round trips, timestamp resampling, rotation, audio alignment, and one
clear error per kind of bad input (naming the file, leaving no output behind)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    list_files,
    make_clip,
    make_cut_tail_mp4,
    make_rotated_clip,
    make_vfr_clip,
    make_wav,
    shared_file,
)
from tccp.errors import TCCPError
from tccp.io_utils import atomic_dir, atomic_path
from tccp.media import io as media


def _brightness(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(len(frames), -1).mean(axis=1)


# --------------------------------------------------------------------------- round trips


def test_round_trip_frames_fps_and_audio_length(tmp_out: Path) -> None:
    n, sr = 40, 16000
    frames = np.zeros((n, 48, 64, 3), np.uint8)
    for i in range(n):
        frames[i] = i * 6
    audio = (0.2 * np.sin(np.arange(int(n / 25 * sr)) * 0.05)).astype(np.float32)
    out = media.write_video(tmp_out / "rt.mp4", frames, fps=25, audio=audio)
    assert list_files(tmp_out) == ["rt.mp4"]  # no temp file left next to it

    info = media.probe(out)
    assert (info.width, info.height) == (64, 48)
    assert info.fps == pytest.approx(25.0)
    assert info.has_audio and info.audio_sr == sr and info.audio_channels == 1

    clip = media.load_clip(out)
    assert clip.frames.shape == (n, 48, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.fps == 25.0 and clip.sr == sr
    assert clip.audio is not None and clip.audio.dtype == np.float32
    assert clip.audio.shape == (int(round(n / 25 * sr)),)
    # the raw track (no trimming) also lasts the video's duration, within one frame
    raw = media.read_audio(out)
    assert abs(len(raw) / sr - n / 25) <= 1 / 25
    # frames come back in order and close to what was written (lossy codec)
    assert np.abs(_brightness(clip.frames) - np.arange(n) * 6).max() < 4


def test_audio_video_alignment_within_one_frame(tmp_out: Path) -> None:
    """A flash at frame 25 and a click at 1.0 s must still coincide after a round trip."""
    n, sr = 60, 16000
    frames = np.zeros((n, 32, 32, 3), np.uint8)
    frames[25] = 255
    audio = np.zeros(int(n / 25 * sr), np.float32)
    audio[sr: sr + 160] = 0.9
    out = media.write_video(tmp_out / "sync.mp4", frames, audio=audio)
    clip = media.load_clip(out)
    flash = int(np.argmax(_brightness(clip.frames)))
    click = float(np.argmax(np.abs(clip.audio))) / sr * 25
    assert flash == 25
    assert abs(click - flash) < 1.0


def test_odd_size_is_padded_to_even(tmp_out: Path) -> None:
    frames = np.full((10, 33, 45, 3), 100, np.uint8)
    out = media.write_video(tmp_out / "odd.mp4", frames)
    v = media.read_video(out)
    assert v.frames.shape == (10, 34, 46, 3)
    assert abs(float(v.frames[:, -1].mean()) - 100) < 4  # padding repeats the edge


def test_video_writer_incremental_with_streamed_audio(tmp_out: Path) -> None:
    sr = 16000
    with media.VideoWriter(tmp_out / "inc.mp4", fps=25, sr=sr, has_audio=True) as w:
        for i in range(30):
            w.write(np.full((32, 32, 3), i * 8, np.uint8))
            w.write_audio(np.full(640, 0.1, np.float32))  # exactly one frame of audio
    assert list_files(tmp_out) == ["inc.mp4"]
    clip = media.load_clip(tmp_out / "inc.mp4")
    assert clip.n_frames == 30
    assert len(media.read_audio(tmp_out / "inc.mp4")) == pytest.approx(30 * 640, abs=640)


def test_writer_pads_short_audio_and_trims_long_audio(tmp_out: Path) -> None:
    frames = np.zeros((25, 32, 32, 3), np.uint8)
    for name, secs in (("short.mp4", 0.3), ("long.mp4", 3.0)):
        media.write_video(tmp_out / name, frames, audio=np.full(int(secs * 16000), 0.1, np.float32))
        raw = media.read_audio(tmp_out / name)
        assert abs(len(raw) / 16000 - 1.0) <= 1 / 25, name


def test_writer_removes_temp_file_on_exception(tmp_out: Path) -> None:
    with pytest.raises(RuntimeError):
        with media.VideoWriter(tmp_out / "boom.mp4") as w:
            for i in range(5):
                w.write(np.zeros((32, 32, 3), np.uint8))
            raise RuntimeError("engine failed")
    assert list_files(tmp_out) == []


def test_writer_abort_and_no_frames_leave_nothing(tmp_out: Path) -> None:
    w = media.VideoWriter(tmp_out / "a.mp4")
    w.write(np.zeros((16, 16, 3), np.uint8))
    w.abort()
    with pytest.raises(TCCPError, match="no frames"):
        media.VideoWriter(tmp_out / "b.mp4").close()
    assert list_files(tmp_out) == []


def test_writer_rejects_unwritable_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TCCPError, match="not writable") as e:
        media.write_video(blocker / "out.mp4", np.zeros((8, 16, 16, 3), np.uint8))
    assert "out.mp4" in str(e.value)


def test_writer_replaces_existing_output_only_on_success(tmp_out: Path) -> None:
    target = tmp_out / "keep.mp4"
    make_clip(target, n=10, audio=False)
    before = target.read_bytes()
    with pytest.raises(ValueError):
        with media.VideoWriter(target) as w:
            w.write(np.zeros((16, 16, 3), np.uint8))
            w.write(np.zeros((32, 32, 3), np.uint8))  # size change: refused
    assert target.read_bytes() == before
    assert list_files(tmp_out) == ["keep.mp4"]


# --------------------------------------------------------------------------- resampling


def test_vfr_resampled_by_timestamp(tmp_path: Path) -> None:
    times = [0.0, 0.03, 0.05, 0.20, 0.21, 0.50, 0.52, 0.90, 1.00, 1.10, 1.15, 1.30]
    path = make_vfr_clip(tmp_path / "vfr.mp4", times)
    v = media.read_video(path)
    assert v.fps == 25.0
    got = _brightness(v.frames)
    # output frame k shows the latest source frame with pts <= k / 25
    for k in range(len(got)):
        t = k / 25
        if t > times[-1]:
            break
        j = max(i for i, s in enumerate(times) if s <= t + 1e-9)
        assert abs(got[k] - 10 * (j + 1)) < 4, (k, t, j, got[k])
    # covers the source duration: up to the last frame plus at most a couple of frames
    assert math.floor(times[-1] * 25) + 1 <= len(got) <= math.ceil(times[-1] * 25) + 3


@pytest.mark.parametrize(
    "fmt, ext, codec, pix",
    [
        ("webm", "webm", "libvpx", "yuv420p"),
        ("matroska", "mkv", "libx264", "yuv420p"),
        ("avi", "avi", "mpeg4", "yuv420p"),
        ("gif", "gif", "gif", "rgb8"),
        ("mov", "mov", "mjpeg", "yuvj420p"),
    ],
)
def test_other_containers_and_codecs_at_30fps(tmp_path: Path, fmt, ext, codec, pix) -> None:
    import av

    if codec not in av.codecs_available:
        pytest.skip(f"ffmpeg build has no {codec} encoder")
    path = tmp_path / f"clip.{ext}"
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=30)
        s.width = s.height = 32
        s.pix_fmt = pix
        for i in range(30):
            img = np.full((32, 32, 3), i * 8, np.uint8)
            for pk in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    v = media.read_video(path)
    assert v.frames.shape == (25, 32, 32, 3)  # 1 s at 25 fps
    got = _brightness(v.frames)
    # output frame k shows source frame floor(k * 30 / 25)
    want = np.array([(k * 30 // 25) * 8 for k in range(25)], float)
    assert np.abs(got - want).max() < 6


def test_streaming_iterator_matches_read_video(tmp_path: Path) -> None:
    times = [0.0, 0.07, 0.1, 0.33, 0.4, 0.41, 0.6, 0.61, 0.8]
    path = make_vfr_clip(tmp_path / "vfr.mp4", times)
    whole = media.read_video(path).frames
    stream = list(media.iter_video(path))
    assert len(stream) == len(whole)
    assert [t for t, _ in stream] == pytest.approx([k / 25 for k in range(len(whole))])
    assert all(np.array_equal(a, f) for (_, a), f in zip(stream, whole))
    # fps=None: native frames with their own timestamps
    native = list(media.iter_video(path, fps=None))
    assert [t for t, _ in native] == pytest.approx(times, abs=1e-3)


def test_kept_frames_only_are_converted_and_equal_the_full_stream(tmp_path: Path) -> None:
    """`iter_video(keep=...)` (a scan sampling a long video): the same frames at the same
    indices, None for the others; also for a rotated clip and at native rate."""
    times = [0.0, 0.07, 0.1, 0.33, 0.4, 0.41, 0.6, 0.61, 0.8]
    for path in (make_vfr_clip(tmp_path / "vfr.mp4", times), make_rotated_clip(tmp_path / "rot.mp4", 90)):
        for fps in (25, None):
            full = list(media.iter_video(path, fps=fps))
            keep = {0, 3, len(full) - 1}
            part = list(media.iter_video(path, fps=fps, keep=keep))
            assert [t for t, _ in part] == [t for t, _ in full]
            assert all((f is None) == (i not in keep) for i, (_, f) in enumerate(part))
            assert all(np.array_equal(part[i][1], full[i][1]) for i in keep)


def test_thirty_fps_shared_clip_resampled_to_25() -> None:
    path = shared_file("data", "clips", "vx_emo_emotion.mp4")  # 30 fps, 4.6 s
    info = media.probe(path)
    v = media.read_video(path)
    assert info.fps == pytest.approx(30.0, abs=0.1)
    assert abs(len(v.frames) - info.n_frames / info.fps * 25) <= 1
    assert v.src_fps == pytest.approx(info.fps)


def test_max_frames_and_max_seconds(small_clip: Path) -> None:
    assert media.read_video(small_clip, max_frames=10).frames.shape[0] == 10
    assert media.read_video(small_clip, max_seconds=0.5).frames.shape[0] == 13  # ceil(12.5)
    assert len(list(media.iter_video(small_clip, max_frames=3))) == 3


# --------------------------------------------------------------------------- rotation


@pytest.mark.parametrize(
    "degrees, shape, corner",
    [
        (90, (64, 32), "bottom-left"),  # counter-clockwise
        (-90, (64, 32), "top-right"),  # clockwise (a phone held upright)
        (180, (32, 64), "bottom-right"),
    ],
)
def test_rotation_metadata_is_applied(tmp_path: Path, degrees: int, shape, corner: str) -> None:
    path = make_rotated_clip(tmp_path / f"rot{degrees}.mp4", degrees)
    info = media.probe(path)
    assert (info.height, info.width) == shape
    frame = media.read_video(path).frames[0]
    assert frame.shape[:2] == shape
    ys, xs = np.nonzero(frame[..., 0] > 128)
    cy, cx = ys.mean(), xs.mean()
    h, w = shape
    want = {
        "bottom-left": (cy > h / 2 and cx < w / 2),
        "top-right": (cy < h / 2 and cx > w / 2),
        "bottom-right": (cy > h / 2 and cx > w / 2),
    }[corner]
    assert want, (cy, cx)


# --------------------------------------------------------------------------- audio sources


@pytest.mark.parametrize("name", ["speech_5s_44k.wav", "speech_33s_48k.mp3"])
def test_separate_audio_file(silent_clip: Path, name: str) -> None:
    audio = shared_file("data", "audio", name)
    clip = media.load_clip(silent_clip, audio=audio)
    assert clip.audio_path == audio
    assert clip.audio.shape == (int(round(clip.n_frames / 25 * 16000)),)
    assert np.abs(clip.audio).max() > 0.01  # real speech, not padding
    full = media.read_audio(audio)
    assert abs(len(full) / 16000 - media.probe(audio).duration) < 0.05


def test_separate_audio_shorter_than_video_is_padded(tmp_path: Path, silent_clip: Path) -> None:
    wav = make_wav(tmp_path / "short.wav", seconds=0.4, sr=22050)
    clip = media.load_clip(silent_clip, audio=wav)
    n = int(round(clip.n_frames / 25 * 16000))
    assert clip.audio.shape == (n,)
    assert np.abs(clip.audio[: int(0.3 * 16000)]).max() > 0.1
    assert np.abs(clip.audio[int(0.45 * 16000):]).max() == 0.0


def test_m4a_audio_is_read(tmp_path: Path) -> None:
    import av

    path = tmp_path / "voice.m4a"
    with av.open(str(path), "w", format="ipod") as c:
        s = c.add_stream("aac", rate=24000)
        s.layout = "stereo"
        for i in range(30):
            data = np.full((1, 2 * 1024), 0.2, np.float32)
            f = av.AudioFrame.from_ndarray(data, format="flt", layout="stereo")
            f.sample_rate, f.pts = 24000, i * 1024
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    a = media.read_audio(path)
    assert a.dtype == np.float32 and a.ndim == 1
    assert abs(len(a) / 16000 - 30 * 1024 / 24000) < 0.1


def test_silent_clip_without_audio_allowed_when_not_required(silent_clip: Path) -> None:
    clip = media.load_clip(silent_clip, require_audio=False)
    assert clip.audio is None and clip.n_frames == 30


# --------------------------------------------------------------------------- bad inputs


def _assert_clean_error(exc: pytest.ExceptionInfo, path: Path, fragment: str) -> None:
    msg = str(exc.value)
    assert str(path) in msg, msg
    assert fragment in msg, msg
    assert "\n" not in msg


def test_missing_file(tmp_out: Path) -> None:
    path = tmp_out / "nope.mp4"
    for fn in (media.probe, media.read_video, media.load_clip, media.read_audio):
        with pytest.raises(TCCPError) as e:
            fn(path)
        _assert_clean_error(e, path, "does not exist")
    assert list_files(tmp_out) == []


def test_text_file_named_mp4(text_as_mp4: Path) -> None:
    with pytest.raises(TCCPError) as e:
        media.load_clip(text_as_mp4)
    _assert_clean_error(e, text_as_mp4, "not a media file")


def test_truncated_mp4_without_index(truncated_mp4: Path) -> None:
    with pytest.raises(TCCPError) as e:
        media.read_video(truncated_mp4)
    _assert_clean_error(e, truncated_mp4, "truncated")


def test_mp4_with_cut_tail_returns_what_decodes_with_warning(tmp_path: Path) -> None:
    path = make_cut_tail_mp4(tmp_path / "cut.mp4", n=50, keep=0.6)
    with pytest.warns(media.MediaWarning, match="cut.mp4"):
        v = media.read_video(path)
    assert 8 <= len(v.frames) < 50


def test_audio_file_given_as_video(audio_as_video: Path) -> None:
    with pytest.raises(TCCPError) as e:
        media.load_clip(audio_as_video)
    _assert_clean_error(e, audio_as_video, "has no video stream (is it an audio file?)")


def test_clip_without_audio_and_no_audio_file(silent_clip: Path) -> None:
    with pytest.raises(TCCPError) as e:
        media.load_clip(silent_clip)
    _assert_clean_error(e, silent_clip, "has no audio stream; pass --audio FILE")


def test_separate_audio_that_is_a_silent_video(silent_clip: Path, tmp_path: Path) -> None:
    other = make_clip(tmp_path / "other.mp4", audio=False)
    with pytest.raises(TCCPError) as e:
        media.load_clip(silent_clip, audio=other)
    _assert_clean_error(e, other, "has no audio stream")


def test_clip_too_short(short_clip: Path) -> None:
    for fn in (media.read_video, media.load_clip, lambda p: list(media.iter_video(p))):
        with pytest.raises(TCCPError) as e:
            fn(short_clip)
        _assert_clean_error(e, short_clip, "too short")


def test_huge_inputs_are_refused(monkeypatch: pytest.MonkeyPatch, small_clip: Path) -> None:
    monkeypatch.setattr(media, "MAX_SECONDS", 0.5)
    with pytest.raises(TCCPError) as e:
        media.read_video(small_clip)
    _assert_clean_error(e, small_clip, "limit")
    monkeypatch.setattr(media, "MAX_SECONDS", 7200.0)
    monkeypatch.setattr(media, "MAX_PIXELS", 32 * 32)
    with pytest.raises(TCCPError) as e:
        list(media.iter_video(small_clip))
    _assert_clean_error(e, small_clip, "8K limit")


def test_folder_given_as_file(tmp_out: Path) -> None:
    with pytest.raises(TCCPError) as e:
        media.read_video(tmp_out)
    _assert_clean_error(e, tmp_out, "folder")


def test_noise_clip_reads_fine(noise_clip: Path) -> None:
    """No face is not the media layer's business: the clip must load normally."""
    clip = media.load_clip(noise_clip)
    assert clip.n_frames == 30 and clip.audio is not None


def test_bad_input_leaves_no_output(tmp_out: Path, text_as_mp4: Path) -> None:
    out = tmp_out / "result.mp4"
    with pytest.raises(TCCPError):
        with media.VideoWriter(out) as w:
            for f in media.read_video(text_as_mp4).frames:
                w.write(f)
    assert list_files(tmp_out) == []


# --------------------------------------------------------------------------- io_utils


def test_atomic_path_keeps_suffix_and_cleans_up(tmp_out: Path) -> None:
    final = tmp_out / "x.npz"
    with pytest.raises(KeyError):
        with atomic_path(final) as tmp:
            assert tmp.parent == tmp_out and tmp.name.endswith(".npz") and tmp.name.startswith(".x.tmp-")
            tmp.write_bytes(b"partial")
            raise KeyError("stop")
    assert list_files(tmp_out) == []
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"done")
    assert final.read_bytes() == b"done" and list_files(tmp_out) == ["x.npz"]


def test_atomic_path_creates_missing_folder(tmp_out: Path) -> None:
    final = tmp_out / "a" / "b" / "c.txt"
    with atomic_path(final) as tmp:
        tmp.write_text("ok")
    assert final.read_text() == "ok"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_atomic_path_read_only_folder(tmp_out: Path) -> None:
    ro = tmp_out / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(TCCPError, match="not writable"):
            with atomic_path(ro / "x.mp4"):
                pass
    finally:
        ro.chmod(0o700)


def test_atomic_dir_replaces_only_on_success(tmp_out: Path) -> None:
    final = tmp_out / "pack"
    with atomic_dir(final) as d:
        (d / "a.txt").write_text("1")
    assert (final / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as d:
            (d / "b.txt").write_text("2")
            raise RuntimeError
    assert sorted(os.listdir(final)) == [".tccp-output", "a.txt"]
    with atomic_dir(final) as d:
        (d / "c.txt").write_text("3")
    assert sorted(os.listdir(final)) == [".tccp-output", "c.txt"]
    assert list_files(tmp_out) == ["pack", "pack/.tccp-output", "pack/c.txt"]


# --------------------------------------------------------------------------- bundled sample


def test_bundled_sample() -> None:
    video, speech = media.sample_paths()
    assert video.exists() and speech.exists()
    assert video.stat().st_size < 1_000_000 and speech.stat().st_size < 200_000
    clip = media.load_clip(video)
    assert 4.0 <= clip.duration <= 6.0 and clip.fps == 25.0
    assert np.abs(clip.audio).max() > 0.05
    info = media.probe(speech)
    assert not info.has_video and info.audio_sr == 16000 and info.audio_channels == 1
    assert 4.0 <= info.duration <= 6.0


@pytest.mark.timeout(120)
def test_stopping_early_on_threaded_h264_does_not_hang() -> None:
    """Regression (timing dependent): closing a frame-threaded decoder mid-stream can
    deadlock when ffmpeg logs are routed through Python (av.logging.set_level; PyAV
    issues #751/#909), so the media layer must leave PyAV logging off."""
    path = shared_file("data", "clips", "lp_d0_noaudio.mp4")
    for _ in range(3):
        frames = list(media.iter_video(path, max_frames=10))
        assert len(frames) == 10


def test_length_limit_only_applies_when_reading_everything(
    monkeypatch: pytest.MonkeyPatch, small_clip: Path
) -> None:
    monkeypatch.setattr(media, "MAX_SECONDS", 0.5)
    assert len(media.read_video(small_clip, max_frames=10).frames) == 10
    assert len(list(media.iter_video(small_clip, max_frames=10))) == 10
    assert len(media.read_audio(small_clip, max_seconds=0.4)) == 6400
    with pytest.raises(TCCPError, match="limit"):
        media.read_audio(small_clip)


def test_atomic_outputs_get_normal_permissions(tmp_out: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    with atomic_path(tmp_out / "f.txt") as tmp:
        tmp.write_text("x")
    with atomic_dir(tmp_out / "d") as d:
        (d / "a").write_text("x")
    assert (tmp_out / "f.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_out / "d").stat().st_mode & 0o777 == 0o777 & ~mask
