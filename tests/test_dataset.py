"""Training loader: prepared folders -> windows, splits, and the latent cache.

Most tests build small prepared folders directly with the writers `tccp prepare` uses
(synthetic crops, known landmarks and mel), so they are fast and know the truth; the
end-to-end path from a real clip is covered in test_prepare.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tccp.data import datasets as ds
from tccp.data import prepare as prep
from tccp.face.sketch import SKETCH_INDICES, draw_sketch
from tccp.media.io import write_video

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
S = 64


def _frames(n: int, seed: int) -> np.ndarray:
    """Smooth frames whose mean brightness encodes the frame index (survives H.264)."""
    yy, xx = np.mgrid[0:S, 0:S]
    base = (np.sin(xx / 7.0 + seed) * 15 + np.cos(yy / 5.0) * 15).astype(np.float32)
    out = np.empty((n, S, S, 3), np.uint8)
    for i in range(n):  # n <= 40 keeps every pixel inside 0..255
        out[i] = np.clip(base[..., None] + 40 + 4 * i, 0, 255).astype(np.uint8)
    return out


def make_prepared(
    root: Path, name: str, n: int = 30, found: np.ndarray | None = None, seed: int = 0,
    signal_seconds: float | None = None,
) -> Path:
    """A prepared clip folder with known content, written by the production writers."""
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    write_video(folder / "face.mp4", _frames(n, seed), crf=10)
    write_video(folder / "context.mp4", _frames(n, seed + 1)[:, ::-1], crf=10)
    # landmarks: a ring around the crop centre that drifts with i (sub-pixel)
    p = len(SKETCH_INDICES)
    ang = np.linspace(0, 2 * np.pi, p, endpoint=False)
    lm = np.stack([S / 2 + 20 * np.cos(ang), S / 2 + 20 * np.sin(ang)], -1)
    lm = lm[None] + (np.arange(n)[:, None, None] * 0.37) + rng.normal(0, 0.01, (n, p, 2))
    found = np.ones(n, bool) if found is None else found
    boxes = np.tile(np.array([10, 20, 74, 84], np.float32), (n, 1))
    prep.write_track(folder, lm, SKETCH_INDICES, boxes, boxes * 2, found, np.zeros(n, bool))
    mel = rng.uniform(-4, 4, (int(n / 25 * 80) + 1, 80)).astype(np.float32)
    mel_meta = prep.write_mel(folder, mel)
    meta = {
        "format": prep.FORMAT_NAME, "version": prep.FORMAT_VERSION, "source": f"/x/{name}.mp4",
        "fps": 25.0, "n_frames": n, "size": S, "landmark_scale": prep.LANDMARK_SCALE,
        "mel": mel_meta, "created": "t", "complete": True,
        "audio": {"rms": 0.1, "signal_seconds": n / 25 if signal_seconds is None else signal_seconds},
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    np.save(folder / "_truth_lm.npy", lm.astype(np.float32))
    np.save(folder / "_truth_mel.npy", mel)
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("prepared")
    make_prepared(r, "clip_a", n=40, seed=0)
    found = np.ones(30, bool)
    found[12] = False  # one undetected frame: windows over it must be skipped
    make_prepared(r, "clip_b", n=30, found=found, seed=3)
    make_prepared(r, "vr_face5", n=20, seed=5)  # a validation clip name
    (r / ".clip_c.tmp-xyz").mkdir()  # an interrupted run's leftovers are ignored
    incomplete = r / "clip_d"
    incomplete.mkdir()
    (incomplete / "meta.json").write_text(json.dumps({"format": prep.FORMAT_NAME, "version": 1}))
    return r


def test_format_constants_agree() -> None:
    assert ds.FORMAT_NAME == prep.FORMAT_NAME and ds.FORMAT_VERSION == prep.FORMAT_VERSION


def test_find_prepared_skips_partial(root: Path) -> None:
    assert [p.name for p in ds.find_prepared(root)] == ["clip_a", "clip_b", "vr_face5"]
    assert not ds.is_complete(root / "clip_d")


def test_prepared_clip_contents(root: Path) -> None:
    clip = ds.PreparedClip(root / "clip_a")
    assert clip.n_frames == 40 and clip.size == S and clip.name == "clip_a"
    assert clip.faces.shape == (40, S, S, 3) and clip.faces.dtype == np.uint8
    assert clip.contexts.shape == (40, S, S, 3)
    # frames come back in order (brightness rises 4 per frame) and close to what was written
    means = clip.faces.reshape(40, -1).mean(1)
    assert np.all(np.diff(means) > 2)
    assert np.abs(clip.faces.astype(float) - _frames(40, 0)).mean() < 3
    truth = np.load(root / "clip_a" / "_truth_lm.npy")
    assert clip.landmarks.shape == truth.shape
    assert np.abs(clip.landmarks - truth).max() <= 0.5 / prep.LANDMARK_SCALE + 1e-4
    assert list(clip.landmark_index) == list(SKETCH_INDICES)
    mesh = clip.mesh_landmarks(3)
    assert mesh.shape == (478, 2) and np.allclose(mesh[SKETCH_INDICES], clip.landmarks[3])
    mel = np.load(root / "clip_a" / "_truth_mel.npy")
    assert np.abs(clip.mel - mel).max() <= 8 / 255 / 2 + 1e-5
    assert clip.mel_windows.shape == (40, 16, 80) and clip.mel_windows.dtype == np.float32
    assert clip.face_boxes.shape == (40, 4) and clip.found.all()


def test_sketch_drawn_from_landmarks(root: Path) -> None:
    clip = ds.PreparedClip(root / "clip_a")
    sk = clip.sketch(0)
    assert sk.shape == (S, S, 3) and sk.dtype == np.uint8
    ink = sk.max(-1) > 0
    # lines join points inside the radius-20 ring: ink there, none in the corners
    assert ink.sum() > 50 and not ink[:8, :8].any() and not ink[-8:, -8:].any()
    # same picture as drawing the true full-mesh landmarks (up to quantisation)
    full = np.zeros((478, 2), np.float32)
    full[SKETCH_INDICES] = np.load(root / "clip_a" / "_truth_lm.npy")[0]
    ref = draw_sketch(full, S)
    assert np.abs(sk.astype(int) - ref).mean() < 1.0
    assert not np.array_equal(sk, clip.sketch(30))  # the face moved


def test_split_clips_fixed_validation() -> None:
    names = ["lp_d20", "vr_face3", "vx_vasa_17.mp4", "/d/vx_emo_yomir", "vr_face5", "vx_vasa_3"]
    train, val = ds.split_clips(names)
    assert train == ["vr_face3", "vx_vasa_3"]
    assert val == ["lp_d20", "vx_vasa_17.mp4", "/d/vx_emo_yomir", "vr_face5"]
    manifest = SHARED / "data" / "MANIFEST.tsv"
    if not manifest.is_file():
        pytest.skip("shared MANIFEST not available")
    kinds = {}
    for line in manifest.read_text().splitlines()[1:]:
        cols = line.split("\t")
        kinds[cols[0].rsplit(".", 1)[0]] = cols[-1]
    assert all(v in kinds for v in ds.VALIDATION_CLIPS)
    real = [v for v in ds.VALIDATION_CLIPS if kinds[v].startswith("real")]
    generated = [v for v in ds.VALIDATION_CLIPS if "generated" in kinds[v]]
    assert len(real) >= 2 and len(generated) >= 2


def test_dataset_imports_no_mediapipe_or_av() -> None:
    code = (
        "import sys, tccp.data.datasets; "
        "bad = [m for m in ('mediapipe', 'av', 'librosa', 'scipy') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
