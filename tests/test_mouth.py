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


def test_keep_jaw_sides_takes_the_source_cheek_line_and_the_generated_chin():
    """The jaw contour's ends (by the ears) are the source's, the chin the generated
    one, the weights rise smoothly in between; lips and every other point stay."""
    from tccp.face.mouth import jaw_side_weights, keep_jaw_sides

    rng = np.random.default_rng(0)
    src = rng.normal(size=(3, 478, 2)).astype(np.float32)
    gen = src + rng.normal(size=src.shape).astype(np.float32)
    out = keep_jaw_sides(gen, src)
    jaw = list(hf.JAW)
    w = jaw_side_weights()
    assert w[0] == 0 and w[-1] == 0 and w[len(w) // 2] == pytest.approx(1)
    assert np.all(np.diff(w[: len(w) // 2 + 1]) > 0) and np.allclose(w, w[::-1])
    np.testing.assert_allclose(out[:, jaw[0]], src[:, jaw[0]])
    np.testing.assert_allclose(out[:, jaw[-1]], src[:, jaw[-1]])
    np.testing.assert_allclose(out[:, 152], gen[:, 152], atol=1e-6)  # the chin
    others = np.setdiff1d(np.arange(478), jaw)
    np.testing.assert_array_equal(out[:, others], gen[:, others])
    k = 4  # a point between: on the segment from the source's to the generated position
    np.testing.assert_allclose(out[:, jaw[k]], src[:, jaw[k]] + w[k] * (gen[:, jaw[k]] - src[:, jaw[k]]), atol=1e-6)


def test_yaw_reads_the_head_turn_and_steers_the_reference_choice():
    """`yaw` is 0 for a symmetric face, flips sign in the mirror, ignores scale and
    in-plane rotation; with `yaw_weight` a reference turned like the target wins over
    an equally shaped one turned the other way."""
    from tccp.pipelines.faces import ReferenceBank, yaw

    from engine.runner import default_template

    tpl = default_template().astype(np.float64)
    turned = tpl.copy()
    turned[1, 0] += 0.15 * (tpl[454, 0] - tpl[234, 0])  # the nose tip moved towards one cheek
    y0, y1 = float(yaw(tpl)), float(yaw(turned))
    assert abs(y1 - y0 - 0.15) < 1e-6
    mirrored = turned.copy()
    mirrored[:, 0] = 2 * tpl[:, 0].mean() - mirrored[:, 0]
    mirrored[[234, 454]] = mirrored[[454, 234]]
    assert float(yaw(mirrored)) == pytest.approx(-y1, abs=1e-9)
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    assert float(yaw(3 * turned @ rot.T + 7)) == pytest.approx(y1, abs=1e-9)
    bank = ReferenceBank.build(np.zeros((2, 8, 8, 3), np.uint8), np.stack([tpl, turned]).astype(np.float32),
                               default_template())
    heads, _ = hf.to_head(turned[None].astype(np.float32), default_template())
    assert bank.choose(heads)[0] in (0, 1)  # same lips: a tie on shape alone
    assert bank.choose(heads, target_yaw=yaw(turned[None]), yaw_weight=2.0)[0] == 1
    assert bank.choose(heads, target_yaw=yaw(tpl[None]), yaw_weight=2.0)[0] == 0
    # a turn within the tolerance is not weighed: the tie falls to the first reference
    assert bank.choose(heads, target_yaw=yaw(turned[None]), yaw_weight=2.0, yaw_tolerance=0.2)[0] == 0
    assert bank.choose(heads, target_yaw=yaw(turned[None]), yaw_weight=2.0, yaw_tolerance=0.1)[0] == 1
