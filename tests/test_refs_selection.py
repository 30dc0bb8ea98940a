"""Reference-bank selection (`engine.refs.select_references`): typical shapes, not outliers."""

from __future__ import annotations

import numpy as np
import pytest

from tccp.face import headframe as hf
from engine.refs import select_references


def _heads(n: int = 120, seed: int = 0) -> tuple[np.ndarray, int]:
    """Synthetic head-frame meshes: the inner lips open by a per-frame amount, small
    tracking noise; frame `odd` is a pressed, twisted closed mouth (an outlier)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (hf.N_MESH, 2)).astype(np.float32)
    base[263], base[33] = (1.0, 0.0), (-1.0, 0.0)  # eye corners one unit apart each side
    base[13], base[14] = (0.0, 1.0), (0.0, 1.0)
    opening = np.abs(rng.normal(0.15, 0.1, n))
    heads = np.repeat(base[None], n, 0) + rng.normal(0, 0.002, (n, hf.N_MESH, 2)).astype(np.float32)
    heads[:, 14, 1] += opening
    odd = int(np.argmin(opening))
    heads[odd, list(hf.LIPS), 0] += np.linspace(-0.3, 0.3, len(hf.LIPS))  # twisted lips, still the most closed
    return heads, odd


def test_typical_bank_spans_openings_without_the_outlier() -> None:
    heads, odd = _heads()
    picks = select_references(heads, 8, "typical")
    assert len(picks) == 8 and len(set(picks)) == 8
    ap = hf.aperture(heads[picks])
    assert np.all(np.diff(ap) >= -1e-9)  # most closed first, then more and more open
    assert ap[0] <= np.quantile(hf.aperture(heads), 0.06)  # a closed mouth is in the bank
    assert ap[-1] >= np.quantile(hf.aperture(heads), 0.8)  # and a wide one
    assert odd not in picks


def test_extremes_keeps_the_outlier_and_typical_prefers_sharp_frames() -> None:
    heads, odd = _heads()
    assert odd in select_references(heads, 8, "extremes")  # why typical is the default
    sharp = np.ones(len(heads))
    plain = select_references(heads, 8, "typical")
    sharp[plain] = 0.1  # make the plain picks blurred: each group must pick another of its frames
    picks = select_references(heads, 8, "typical", sharpness=sharp)
    assert not set(picks) & set(plain[1:])


def test_small_and_bad_inputs() -> None:
    heads, _ = _heads(3)
    assert sorted(select_references(heads, 8, "typical")) == [0, 1, 2]
    assert select_references(heads[:0], 8, "typical") == []
    with pytest.raises(ValueError):
        select_references(heads, 8, "nearest")


def test_live_builder_pools_and_rechooses() -> None:
    """`BankBuilder` (live): a bank from the first offer, re-chosen as the pool grows,
    the typical choice over the whole pool at the end; versions bump on change only."""
    from engine.refs import BankBuilder
    from tccp.face import geometry as fg

    heads, odd = _heads(150, seed=1)
    # put the meshes in a 256 px frame: scale the head frame into pixels
    lms = (heads * 30 + 128).astype(np.float32)
    frames = np.random.default_rng(0).integers(0, 255, (len(heads), 256, 256, 3), np.uint8)
    box = np.array([40, 40, 216, 216], np.float32)
    template = heads.mean(0)
    b = BankBuilder(template, size=8, crop=64, pool=40, every=3)
    versions = []
    for k in range(len(heads)):
        b.offer(frames[k], lms[k], box)
        if b.bank is not None:
            versions.append(b.bank.version)
    assert versions[0] == 0 and b.full and len(b.bank) == 8
    assert versions == sorted(versions) and versions[-1] < 40  # rebuilt as the pool grew, not per frame
    assert not b.offer(frames[0], lms[0], box)  # complete: nothing more joins
    # the final bank is the typical choice over the pool (frames 0..7, then every 3rd offer)
    pool_idx = list(range(8)) + list(range(8, 150))[2::3]
    pool_idx = pool_idx[:40]
    meshes = np.stack([fg.to_crop_coords(lms[k], box, 64) for k in pool_idx])
    ph, _ = hf.to_head(meshes, template)
    want = select_references(ph, 8, "typical", sharpness=np.array(b.sharp))
    np.testing.assert_allclose(b.bank.meshes, meshes[want], atol=1e-5)

