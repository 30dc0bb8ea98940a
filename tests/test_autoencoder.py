"""TAEF2: the vendored weights are the published ones and reconstruct real faces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tccp.models.autoencoder import (
    ASSET_DIR,
    DOWNSCALE,
    LATENT_CHANNELS,
    TinyAutoencoder,
    load_autoencoder,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
PTH_DIR = SHARED / "assets" / "taef2"
CLIP = SHARED / "data" / "clips" / "vr_face3.mp4"


@pytest.fixture(scope="module")
def ae() -> TinyAutoencoder:
    return load_autoencoder()


def _face_crops(n: int = 4, size: int = 128) -> np.ndarray:
    """Centre crops of a close-up clip: the face fills the middle half of the frame."""
    av = pytest.importorskip("av")
    import cv2

    if not CLIP.is_file():
        pytest.skip(f"{CLIP} not available")
    with av.open(str(CLIP)) as container:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(8 * n), container.decode(video=0))]
    out = []
    for frame in frames[::8][:n]:
        h, w = frame.shape[:2]
        s = min(h, w) // 2
        y, x = (h - s) // 2, (w - s) // 2
        out.append(cv2.resize(frame[y : y + s, x : x + s], (size, size), interpolation=cv2.INTER_AREA))
    return np.stack(out)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def test_vendored_files_present() -> None:
    for name in ("encoder.safetensors", "decoder.safetensors", "LICENSE", "README.md"):
        assert (ASSET_DIR / name).is_file(), name
    assert "MIT" in (ASSET_DIR / "LICENSE").read_text()


@pytest.mark.parametrize("half", ["encoder", "decoder"])
def test_weights_equal_published_pth(ae: TinyAutoencoder, half: str) -> None:
    pth = PTH_DIR / f"taef2_{half}.pth"
    if not pth.is_file():
        pytest.skip(f"{pth} not available")
    ref = torch.load(pth, map_location="cpu", weights_only=True)
    ours = getattr(ae, half).state_dict()
    assert set(ours) == set(ref)
    for key, value in ref.items():
        assert torch.equal(ours[key], value), key


def test_shapes_and_range(ae: TinyAutoencoder) -> None:
    x = torch.rand(2, 3, 64, 96)
    z = ae.encode(x)
    assert z.shape == (2, LATENT_CHANNELS, 64 // DOWNSCALE, 96 // DOWNSCALE)
    y = ae.decode(z * 10)  # out-of-range latents still decode to valid pixels
    assert y.shape == x.shape
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    with pytest.raises(ValueError):
        ae.encode(torch.rand(1, 3, 60, 64))


def test_round_trip_psnr_on_real_faces(ae: TinyAutoencoder) -> None:
    faces = _face_crops()
    z = ae.encode_images(faces)
    assert z.shape == (len(faces), LATENT_CHANNELS, 16, 16) and z.dtype == torch.float32
    assert 0.5 < float(z.std()) < 3.0  # a real latent, not a degenerate constant
    recon = ae.decode_latents(z)
    assert recon.dtype == np.uint8 and recon.shape == faces.shape
    assert _psnr(recon, faces) >= 29.0
    # a random latent must not "reconstruct" the faces: guards a PSNR that passes by accident
    noise = ae.decode_latents(torch.randn_like(z))
    assert _psnr(noise, faces) < 20.0


def test_half_precision_matches(ae: TinyAutoencoder) -> None:
    x = torch.rand(1, 3, 32, 32)
    ref = ae.encode(x)
    bf = load_autoencoder(dtype=torch.bfloat16).encode(x).float()
    assert torch.allclose(ref, bf, atol=0.25, rtol=0.1)
