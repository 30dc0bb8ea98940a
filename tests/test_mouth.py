"""Mouth-opening factor (`tccp.face.mouth`): exact on landmarks, measurable and monotone on
sketch images (what drives stage 2), and wired into the runner on both paths."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_file
from tccp import face
from tccp.face.mouth import check_scale, find_mouth, scale_mouth_landmarks, sketch_aperture, warp_mouth
from tccp.face.sketch import LIPS_INNER, LIPS_OUTER, draw_sketch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCALES = (0.0, 0.5, 1.0, 1.5)


@pytest.fixture(scope="module")
def speech_track():
    """Tracked landmarks and face boxes of 2 s of a real speaker (mouth opening and closing)."""
    from tccp.media import io as media

    clip = shared_file("data", "clips", "vr_face5.mp4")
    frames = media.read_video(clip, max_frames=50).frames
    with face.FaceTracker() as tr:
        track = tr.track(frames)
    assert track.found.all()
    return frames, track.landmarks, track.face_boxes


def _crop_lm(track, size):
    _, lm, boxes = track
    return face.to_crop_coords(lm, boxes, size)


def test_check_scale_bounds():
    assert check_scale(0) == 0.0 and check_scale(1.5) == 1.5
    for bad in (-0.1, 4.5, float("nan")):
        with pytest.raises(ValueError):
            check_scale(bad)


def test_landmark_scale_multiplies_the_aperture_and_keeps_the_rest(speech_track):
    lm = _crop_lm(speech_track, 128)
    a = face.mouth_aperture(lm)
    assert a.max() > 0.1  # the clip really opens its mouth
    for s in SCALES + (2.0,):
        out = scale_mouth_landmarks(lm, s)
        np.testing.assert_allclose(face.mouth_aperture(out), s * a, rtol=1e-4, atol=1e-5)
        moved = np.abs(out - lm).max(axis=(0, 2)) > 1e-6
        corners = {61, 291, 78, 308}
        lip_points = {i for e in LIPS_INNER + LIPS_OUTER for i in e}
        assert set(np.flatnonzero(moved)) <= lip_points - corners  # corners and non-lip points stay
    closed = scale_mouth_landmarks(lm, 0.0)
    np.testing.assert_allclose(closed[:, 13], closed[:, 14], atol=1e-5)


def test_sketch_aperture_measures_the_drawn_mouth(speech_track):
    """The colour-based measure on a 128 px sketch follows the landmark aperture."""
    lm = _crop_lm(speech_track, 128)
    lms = np.concatenate([lm, scale_mouth_landmarks(lm, 2.0)])
    true = face.mouth_aperture(lms)
    meas = np.array([sketch_aperture(draw_sketch(x, 128)) for x in lms])
    assert np.isfinite(meas).all()
    assert np.corrcoef(true, meas)[0, 1] > 0.9
    assert np.median(np.abs(meas - true)) < 0.03


@pytest.mark.parametrize("size", [64, 128])
def test_mouth_scale_changes_mean_aperture_monotonically(speech_track, size):
    """The acceptance check: mean aperture of the sketches that drive stage 2 for
    factors 0, 0.5, 1, 1.5 is strictly increasing, ~closed at 0, unchanged at 1; the
    same with sketches drawn from scaled landmarks (the reference for the warp)."""
    lm = _crop_lm(speech_track, size)
    sketches = [draw_sketch(x, size) for x in lm]
    warped = {s: np.nanmean([sketch_aperture(warp_mouth(sk, s)) for sk in sketches]) for s in SCALES}
    drawn = {s: np.nanmean([sketch_aperture(draw_sketch(x, size)) for x in scale_mouth_landmarks(lm, s)])
             for s in SCALES}
    for series in (warped, drawn):
        vals = [series[s] for s in SCALES]
        assert all(b > a for a, b in zip(vals, vals[1:])), series
        assert vals[0] < 0.04  # closed (the sub-pixel estimate's floor at 64 px is ~0.03)
        assert vals[3] > 1.25 * vals[2]
    assert warped[1.0] == pytest.approx(np.nanmean([sketch_aperture(sk) for sk in sketches]))


def test_warp_touches_only_the_mouth(speech_track):
    lm = _crop_lm(speech_track, 128)
    i = int(np.argmax(face.mouth_aperture(lm)))
    sk = draw_sketch(lm[i], 128)
    m = find_mouth(sk)
    out = warp_mouth(sk, 1.5)
    changed = np.abs(out.astype(int) - sk.astype(int)).max(axis=2) > 8
    ys, xs = np.nonzero(changed)
    assert len(ys) > 0
    assert xs.min() >= m.x0 - 3 and xs.max() <= m.x1 + 3  # not the face oval's sides, eyes, brows
    eyes_y = lm[i, [33, 263], 1].max()
    assert ys.min() > eyes_y
    assert np.array_equal(warp_mouth(sk, 1.0), sk)
    blank = np.zeros_like(sk)
    assert np.array_equal(warp_mouth(blank, 0.0), blank)  # no lips found: unchanged
