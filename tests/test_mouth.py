"""Mouth-opening factor (`tccp.face.mouth`): bounds, and the edit on real head-frame
landmarks (the coordinate test through the runner is in test_engine_runner.py)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_file
from tccp import face
from tccp.face import headframe as hf
from tccp.face.mouth import check_scale, scale_opening


def test_check_scale_bounds():
    assert check_scale(0) == 0.0 and check_scale(1.5) == 1.5
    for bad in (-0.1, 4.5, float("nan")):
        with pytest.raises(ValueError):
            check_scale(bad)


def test_scale_opening_on_a_real_speaker():
    """2 s of a real speaker in the head frame: the mean opening above the most closed
    frame scales with the factor; points outside the mouth never move."""
    from engine.runner import default_template
    from tccp.media import io as media

    clip = shared_file("data", "clips", "vr_face5.mp4")
    frames = media.read_video(clip, max_frames=50).frames
    with face.FaceTracker() as tr:
        track = tr.track(frames)
    heads, _ = hf.to_head(track.landmarks, default_template())
    rest = heads[int(np.argmin(hf.aperture(heads)))]
    gap = lambda m: m[..., 14, 1] - m[..., 13, 1]  # noqa: E731  vertical inner-lip gap, head units
    base = gap(rest)
    opening = {s: float((gap(scale_opening(heads, rest, s)) - base).mean()) for s in (0.0, 0.5, 1.0, 2.0)}
    assert opening[1.0] > 0.02
    assert abs(opening[0.0]) < 1e-6
    assert opening[0.5] == pytest.approx(0.5 * opening[1.0], rel=1e-3)
    assert opening[2.0] == pytest.approx(2.0 * opening[1.0], rel=1e-3)
    rest_pts = list(hf.REST)
    np.testing.assert_array_equal(scale_opening(heads, rest, 2.0)[:, rest_pts], heads[:, rest_pts])
