"""Shared test fixtures: where the shared data lives, a scratch output folder, one torch
thread for the tiny-model modules, and makers of the bad or odd inputs users bring (so
every module tests the same cases). Test doubles of the engine are in `fakes.py`.

`load_script(name)` loads `scripts/<name>.py` as a module. The `make_*` functions are
plain functions (importable as `from conftest import ...`) and each also has a fixture
of the same name without the prefix that builds the file in the test's temp folder.
"""

from __future__ import annotations

import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
CLIPS = SHARED / "data" / "clips"
AUDIO = SHARED / "data" / "audio"


def load_script(name: str):
    """`scripts/<name>.py` as a module (the scripts are not a package), for testing
    their functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def shared_file(*parts: str) -> Path:
    """Path inside ../shared, skipping the test when it is not there."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not available: {p}")
    return p


@pytest.fixture
def shared() -> Path:
    if not SHARED.exists():
        pytest.skip("../shared is not available")
    return SHARED


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module (`pytestmark = pytest.mark.usefixtures(
    "one_torch_thread")`): the tiny models are too small to gain from intra-op threads,
    and on a busy 2-core machine OpenMP threads oversubscribe it (10x slower calls)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tmp_out(tmp_path: Path) -> Path:
    """An empty folder for outputs; tests can assert it holds nothing unexpected."""
    out = tmp_path / "out"
    out.mkdir()
    return out


def list_files(folder: Path) -> list[str]:
    """Every entry (hidden temp files included) under `folder`, relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------- makers


def make_text_as_mp4(path: Path) -> Path:
    """A text file with a video extension."""
    path.write_text("this is not a video\n" * 20)
    return path


def make_wav(path: Path, seconds: float = 1.0, sr: int = 16000, freq: float = 220.0) -> Path:
    """A mono 16-bit sine wav."""
    t = np.arange(int(seconds * sr)) / sr
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())
    return path


def make_audio_as_video(path: Path) -> Path:
    """An audio-only file (wav) that a user might pass where a video is expected."""
    return make_wav(path, seconds=1.0)


def _gradient_frames(n: int, h: int = 64, w: int = 64) -> np.ndarray:
    """Frames whose brightness encodes the frame index (to check which frame came back)."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i] = (i * 255) // max(1, n - 1)
    return frames


def make_clip(path: Path, n: int = 30, fps: float = 25.0, h: int = 64, w: int = 64,
              audio: bool = True) -> Path:
    """A small valid clip: frame i has brightness ~ i, with a sine track if `audio`."""
    from tccp.media.io import write_video

    sound = None
    if audio:
        t = np.arange(int(round(n / fps * 16000))) / 16000
        sound = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    write_video(path, _gradient_frames(n, h, w), fps=fps, audio=sound)
    return path


def make_short_clip(path: Path, n: int = 5) -> Path:
    """A valid clip too short for one 8-frame window."""
    return make_clip(path, n=n)


def make_noise_clip(path: Path, n: int = 30, size: int = 96, seed: int = 0) -> Path:
    """A valid clip (with audio) of colour noise: no face anywhere."""
    from tccp.media.io import write_video

    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(int(round(n / 25 * 16000)))).astype(np.float32)
    write_video(path, frames, fps=25.0, audio=audio)
    return path


def _mp4_boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """Top-level ISO-BMFF boxes as (type, start, end)."""
    out, pos = [], 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        if size == 1:
            size = int.from_bytes(data[pos + 8:pos + 16], "big")
        elif size == 0:
            size = len(data) - pos
        out.append((kind, pos, pos + size))
        pos += size
    return out


def make_truncated_mp4(path: Path, n: int = 50) -> Path:
    """An mp4 cut off mid-recording: `ftyp` and half the `mdat`, no `moov` index.

    This is what a crashed recorder or an interrupted download of a non-faststart
    file leaves behind; ffmpeg cannot read it at all.
    """
    full = path.with_name(path.stem + ".full.mp4")
    make_noise_clip(full, n=n)
    data = full.read_bytes()
    full.unlink()
    boxes = {kind: (a, b) for kind, a, b in _mp4_boxes(data)}
    ftyp, mdat = boxes[b"ftyp"], boxes[b"mdat"]
    half = mdat[0] + (mdat[1] - mdat[0]) // 2
    path.write_bytes(data[ftyp[0]:ftyp[1]] + data[mdat[0]:half])
    return path


def make_cut_tail_mp4(path: Path, n: int = 50, keep: float = 0.6) -> Path:
    """A faststart mp4 (index first) whose media data stops at `keep` of the file."""
    full = path.with_name(path.stem + ".full.mp4")
    make_noise_clip(full, n=n)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def make_vfr_clip(path: Path, times: list[float], size: int = 32) -> Path:
    """A variable-frame-rate mp4: frame j shown at `times[j]` seconds (ms precision).

    Frame j's brightness is 10 * (j + 1), so readers can tell which source frame they
    got.
    """
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        s.time_base = Fraction(1, 1000)
        for j, t in enumerate(times):
            img = np.full((size, size, 3), min(255, 10 * (j + 1)), np.uint8)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = int(round(t * 1000))
            f.time_base = Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def make_rotated_clip(path: Path, degrees: int, n: int = 10, h: int = 32, w: int = 64) -> Path:
    """A clip stored landscape with a display-matrix rotation (`degrees` counter-clockwise);
    the top-left 8x8 corner is white so the applied orientation can be checked."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height = w, h
        s.pix_fmt = "yuv420p"
        s.set_display_rotation(degrees)
        for i in range(n):
            img = np.zeros((h, w, 3), np.uint8)
            img[:8, :8] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def text_as_mp4(tmp_path: Path) -> Path:
    return make_text_as_mp4(tmp_path / "notes.mp4")


@pytest.fixture
def truncated_mp4(tmp_path: Path) -> Path:
    return make_truncated_mp4(tmp_path / "truncated.mp4")


@pytest.fixture
def audio_as_video(tmp_path: Path) -> Path:
    return make_audio_as_video(tmp_path / "voice.wav")


@pytest.fixture
def short_clip(tmp_path: Path) -> Path:
    return make_short_clip(tmp_path / "five_frames.mp4")


@pytest.fixture
def noise_clip(tmp_path: Path) -> Path:
    return make_noise_clip(tmp_path / "noise.mp4")


@pytest.fixture
def small_clip(tmp_path: Path) -> Path:
    return make_clip(tmp_path / "small.mp4")


@pytest.fixture
def silent_clip(tmp_path: Path) -> Path:
    return make_clip(tmp_path / "silent.mp4", audio=False)


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def drop_transport(pc) -> None:
    """Make an aiortc client vanish: close its UDP sockets; no DTLS close_notify, no BYE."""
    for transceiver in pc.getTransceivers():
        ice = transceiver.sender.transport.transport
        for proto in list(ice._connection._protocols):
            proto.transport.close()


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory: pytest.TempPathFactory):
    """The export tests' shared cache folder (tiny packs, real clip, ONNX exports),
    reused across modules and runs (`test_export.shared_cache`), with the environment
    pointing the engine's export cache at it for the module."""
    from test_export import cached_env, shared_cache

    path = shared_cache(tmp_path_factory)
    mp = cached_env(path)
    yield path
    mp.undo()
