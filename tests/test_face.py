"""Face tracking, geometry, masks and sketches on real clips (first ~30 frames only)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tccp.errors import TCCPError
from tccp.face import (
    SKETCH_COLORS,
    SKETCH_INDICES,
    SKETCH_PARTS,
    MASK_GREY,
    FaceTracker,
    OneEuroFilter,
    box_to_affine,
    context_box,
    crop,
    crop_to_frame_affine,
    draw_sketch,
    face_box,
    fill_gaps,
    from_crop_coords,
    head_mask,
    inter_ocular,
    jitter,
    mask_context,
    mouth_aperture,
    require_face,
    sketch_thickness,
    to_crop_coords,
)

CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "clips"


def _read(name: str, n: int) -> np.ndarray:
    path = CLIPS / name
    if not path.exists():
        pytest.skip(f"shared clip {name} not available")
    av = pytest.importorskip("av")
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) >= n:
                break
    return np.stack(frames)


@pytest.fixture(scope="module")
def tracker():
    with FaceTracker() as t:
        yield t


@pytest.fixture(scope="module")
def closeup():
    return _read("vr_face3.mp4", 30)


@pytest.fixture(scope="module")
def closeup_track(tracker, closeup):
    return tracker.track(closeup)


# -- tracking on real clips --------------------------------------------------------------


def _check_plausible(track, frames):
    h, w = frames.shape[1:3]
    assert track.landmarks.shape == (len(frames), 478, 2)
    assert track.found.all() and not track.interpolated.any() and track.gaps() == []
    lm = track.landmarks
    assert np.isfinite(lm).all()
    assert (lm[..., 0] > -0.05 * w).all() and (lm[..., 0] < 1.05 * w).all()
    assert (lm[..., 1] > -0.05 * h).all() and (lm[..., 1] < 1.05 * h).all()
    # anatomy: the subject's right eye (33) is left of their left eye (263) in the image,
    # eyes above the mouth, mouth above the chin
    assert (lm[:, 33, 0] < lm[:, 263, 0]).all()
    assert (lm[:, [33, 263], 1].max(1) < lm[:, 13, 1]).all()
    assert (lm[:, 14, 1] < lm[:, 152, 1]).all()
    # boxes contain the face
    fb = track.face_boxes
    assert (fb[:, 0] < lm[..., 0].min(1)).all() and (fb[:, 2] > lm[..., 0].max(1)).all()
    assert (fb[:, 1] < lm[..., 1].min(1)).all() and (fb[:, 3] > lm[..., 1].max(1)).all()
    np.testing.assert_allclose(fb[:, 2] - fb[:, 0], fb[:, 3] - fb[:, 1], rtol=1e-5)


def test_closeup_landmarks(closeup, closeup_track):
    _check_plausible(closeup_track, closeup)
    extent = np.ptp(closeup_track.landmarks[..., 1], axis=1)
    assert (extent > 0.3 * closeup.shape[1]).all()  # it is a close-up
    ratio = inter_ocular(closeup_track.landmarks) / extent
    assert ((ratio > 0.3) & (ratio < 0.8)).all()
    ap = mouth_aperture(closeup_track.landmarks)
    assert ap.shape == (30,) and (ap >= 0).all() and ap.max() < 1.0


def _detector_eyes(frame):
    """Eye keypoints from mediapipe's full-range detector: an independent model (BlazeFace)."""
    import mediapipe as mp

    h, w = frame.shape[:2]
    with mp.solutions.face_detection.FaceDetection(model_selection=1) as det:
        res = det.process(frame)
    assert res.detections, "reference detector found no face"
    kp = res.detections[0].location_data.relative_keypoints
    return np.array([[kp[0].x * w, kp[0].y * h], [kp[1].x * w, kp[1].y * h]])


@pytest.mark.parametrize("name", ["lp_s18_scene.mp4", "lp_s13_fullbody.mp4"])
def test_wide_scene_small_face(tracker, name):
    frames = _read(name, 20)
    track = tracker.track(frames)
    _check_plausible(track, frames)
    h, w = frames.shape[1:3]
    assert np.ptp(track.raw[0, :, 1]) < 0.3 * max(h, w)  # small face in a wide frame
    # the mesh's eye centres agree with the detector's eye keypoints
    ref = _detector_eyes(frames[0])
    lm = track.raw[0]
    mesh_eyes = np.stack([lm[468], lm[473]])  # iris centres
    err = np.linalg.norm(np.sort(mesh_eyes, axis=0) - np.sort(ref, axis=0), axis=1)
    assert (err < 0.25 * inter_ocular(lm)).all(), err


def test_smoothing_lowers_jitter_keeps_lips(closeup_track):
    t = closeup_track
    assert jitter(t.landmarks) < 0.8 * jitter(t.raw)
    raw_boxes = face_box(t.raw)
    box_jit = lambda b: np.abs(np.diff(b, 2, axis=0)).mean()  # noqa: E731
    assert box_jit(t.face_boxes) < 0.6 * box_jit(raw_boxes)
    # smoothing must not erase speech: the mouth opening still follows the raw mesh
    a, b = mouth_aperture(t.raw), mouth_aperture(t.landmarks)
    assert np.corrcoef(a, b)[0, 1] > 0.9


def test_streaming_matches_batch(tracker, closeup, closeup_track):
    tracker.reset()
    obs = [tracker.update(f) for f in closeup[:10]]
    assert all(o is not None for o in obs)
    np.testing.assert_allclose(
        np.stack([o.landmarks for o in obs]), closeup_track.landmarks[:10], atol=1e-3
    )
    np.testing.assert_allclose(
        np.stack([o.context_box for o in obs]), closeup_track.context_boxes[:10], atol=1e-3
    )


def test_short_gap_interpolated(tracker, closeup, closeup_track):
    frames = closeup.copy()
    frames[10:13] = 0
    track = tracker.track(frames)
    assert track.found.all() and track.gaps() == []
    assert np.flatnonzero(track.interpolated).tolist() == [10, 11, 12]
    assert not track.detected[10:13].any() and track.detected[13:].all()
    mid = (track.landmarks[9] + track.landmarks[13]) / 2
    np.testing.assert_allclose(track.landmarks[11], mid, atol=1e-3)


def test_long_gap_reported(tracker, closeup):
    frames = closeup.copy()
    frames[8:17] = 0
    track = tracker.track(frames)
    assert track.gaps() == [(8, 17)]
    assert not track.found[8:17].any() and track.found[:8].all() and track.found[17:].all()
    assert not track.interpolated.any()
    assert np.isfinite(track.landmarks).all()  # held values, crops never see NaN
    require_face(track, "clip.mp4")  # some face is enough


def test_no_face_raises(tracker):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (12, 160, 160, 3), dtype=np.uint8)
    track = tracker.track(frames)
    assert not track.found.any() and track.gaps() == [(0, 12)]
    with pytest.raises(TCCPError, match=r"^noise\.mp4: no face found in 12 frames$"):
        require_face(track, "noise.mp4")


def test_picks_larger_face_and_keeps_it(tracker, closeup):
    """Two people: start with the larger; keep following it when the other grows."""
    h, w = closeup.shape[1:3]
    frames = []
    for i in range(8):
        big = closeup[i]
        other = cv2.resize(closeup[i], (w // 2, h // 2) if i < 4 else (w, h))
        canvas = np.full((h, 2 * w, 3), 90, np.uint8)
        canvas[:, :w] = big
        canvas[: other.shape[0], w : w + other.shape[1]] = other
        frames.append(canvas)
    track = tracker.track(np.stack(frames))
    assert track.found.all()
    assert (track.landmarks[..., 0].mean(1) < w).all()  # always the left person


# -- pure helpers ------------------------------------------------------------------------


def test_one_euro_filter():
    f = OneEuroFilter(min_cutoff=1.0, beta=0.0)
    x = np.full((3, 2), 5.0)
    assert np.allclose([f(x, i / 25) for i in range(5)], 5.0)
    f.reset()
    out = [f(np.array([0.0 if i == 0 else 1.0]), i / 25)[0] for i in range(100)]
    assert 0 < out[1] < 0.5 and abs(out[-1] - 1.0) < 1e-3  # smooths, then converges
    # higher beta follows a fast ramp more closely
    lags = []
    for beta in (0.0, 10.0):
        g = OneEuroFilter(1.0, beta)
        lags.append(max(abs(g(np.array([i * 0.2]), i / 25)[0] - i * 0.2) for i in range(25)))
    assert lags[1] < 0.5 * lags[0]


def test_fill_gaps_rules():
    found = np.array([0, 1, 0, 0, 1, 0, 0, 0, 1, 0], bool)
    vals = np.arange(10, dtype=np.float64)[:, None] * 10
    vals[~found] = -1
    f, interp = fill_gaps(found, [vals], max_gap=2)
    assert f.tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 1, 1]
    assert interp.tolist() == [1, 0, 1, 1, 0, 0, 0, 0, 0, 1]
    assert vals[:, 0].tolist()[:5] == [10, 10, 20, 30, 40]  # edge held, gap interpolated
    assert vals[9, 0] == 80 and set(vals[5:8, 0]) <= {40, 80}  # long gap holds neighbours


def test_boxes_square_and_concentric(closeup_track):
    lm = closeup_track.landmarks[0]
    fb, cb = face_box(lm), context_box(lm)
    assert np.isclose(fb[2] - fb[0], fb[3] - fb[1]) and np.isclose(cb[2] - cb[0], 2 * (fb[2] - fb[0]))
    np.testing.assert_allclose((fb[:2] + fb[2:]) / 2, (cb[:2] + cb[2:]) / 2, atol=1e-3)
    # centre above the landmark centre: more room for forehead/hair than below the chin
    assert (fb[1] + fb[3]) / 2 < (lm[:, 1].min() + lm[:, 1].max()) / 2
    assert face_box(closeup_track.landmarks).shape == (30, 4)


def test_crop_partly_outside_frame():
    h, w = 60, 80
    yy, xx = np.mgrid[0:h, 0:w]
    frame = np.stack([xx * 3, yy * 4, np.full_like(xx, 200)], -1).astype(np.uint8)
    # inside, integer box, no scaling: exactly the slice
    np.testing.assert_array_equal(crop(frame, np.array([10, 5, 42, 37], np.float32), 32), frame[5:37, 10:42])
    box = np.array([-20, -10, 20, 30], np.float32)  # left/top outside the frame
    rep = crop(frame, box, 40)
    const = crop(frame, box, 40, border="constant")
    assert rep.shape == const.shape == (40, 40, 3)
    np.testing.assert_array_equal(rep[10:, 20:], frame[:30, :20])
    assert (const[:10] == 0).all() and (const[:, :20] == 0).all()
    np.testing.assert_array_equal(rep[:10, 25], np.repeat(frame[:1, 5], 10, axis=0))  # replicated
    # big downscale (area-averaged path) keeps the mean colour
    big = crop(frame, np.array([0, 0, 60, 60], np.float32), 12)
    assert abs(big[..., 2].astype(int).mean() - 200) < 1


def test_affine_and_coords_roundtrip():
    box = np.array([13.3, -7.1, 113.3, 92.9], np.float32)
    m, inv = box_to_affine(box, 64), crop_to_frame_affine(box, 64)
    np.testing.assert_allclose(np.vstack([inv, [0, 0, 1]]) @ np.vstack([m, [0, 0, 1]]), np.eye(3), atol=1e-9)
    pts = np.random.default_rng(1).uniform(0, 100, (478, 2))
    np.testing.assert_allclose(from_crop_coords(to_crop_coords(pts, box, 64), box, 64), pts, atol=1e-3)
    # batched boxes
    boxes = np.stack([box, box + 5])
    out = to_crop_coords(np.stack([pts, pts]), boxes, 64)
    np.testing.assert_allclose(out[1], to_crop_coords(pts, box + 5, 64), atol=1e-4)
    # a bright pixel lands where to_crop_coords says (pixel centre convention)
    frame = np.zeros((120, 160, 3), np.uint8)
    frame[50, 70] = 255
    c = crop(frame, np.array([40.0, 20.0, 104.0, 84.0], np.float32), 64)
    u, v = to_crop_coords(np.array([[70.5, 50.5]]), np.array([40.0, 20.0, 104.0, 84.0]), 64)[0]
    assert c[int(v), int(u), 0] == 255
    # paste-back geometry: warping the crop back restores the frame region
    pasted = cv2.warpAffine(c, crop_to_frame_affine(np.array([40.0, 20.0, 104.0, 84.0]), 64), (160, 120))
    assert pasted[50, 70, 0] == 255


def test_sketch_colours_and_placement(closeup, closeup_track):
    assert sketch_thickness(128) == 1 and sketch_thickness(256) == 2
    size = 256
    box = closeup_track.face_boxes[5]
    lm = to_crop_coords(closeup_track.landmarks[5], box, size)
    img = draw_sketch(lm, size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    assert not img[:8, :8].any() and not img[-8:, -8:].any()  # black background
    seen = {
        name for name, col in SKETCH_COLORS.items()
        if (np.abs(img.astype(int) - col).sum(-1) < 40).sum() >= 3
    }
    assert len(seen) >= 8 and {"lips_inner", "lips_outer", "face_oval"} <= seen
    x0, y0 = np.floor(lm.min(0)).astype(int)
    x1, y1 = np.ceil(lm.max(0)).astype(int)
    inside = img[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1].any(-1).sum()
    assert inside > 500
    # nothing drawn well outside the landmarks' extent
    mask = np.zeros((size, size), bool)
    mask[max(y0 - 3, 0) : y1 + 4, max(x0 - 3, 0) : x1 + 4] = True
    assert not img[~mask].any()
    # the sketch covers the mouth where the landmarks say
    mx, my = lm[13].astype(int)
    assert img[my - 3 : my + 4, mx - 3 : mx + 4].any()


def test_sketch_connections_match_mediapipe():
    conn = pytest.importorskip("mediapipe.python.solutions.face_mesh_connections")
    norm = lambda edges: {tuple(e) for e in edges}  # noqa: E731
    pairs = {
        "face_oval": conn.FACEMESH_FACE_OVAL, "left_brow": conn.FACEMESH_LEFT_EYEBROW,
        "right_brow": conn.FACEMESH_RIGHT_EYEBROW, "left_eye": conn.FACEMESH_LEFT_EYE,
        "right_eye": conn.FACEMESH_RIGHT_EYE, "left_iris": conn.FACEMESH_LEFT_IRIS,
        "right_iris": conn.FACEMESH_RIGHT_IRIS, "nose": conn.FACEMESH_NOSE,
    }
    for name, ref in pairs.items():
        assert norm(SKETCH_PARTS[name]) == norm(ref), name
    outer, inner = norm(SKETCH_PARTS["lips_outer"]), norm(SKETCH_PARTS["lips_inner"])
    assert outer | inner == norm(conn.FACEMESH_LIPS) and not outer & inner
    assert {13, 14} <= {i for e in inner for i in e} and {61, 291} <= {i for e in outer for i in e}
    assert np.all(np.diff(SKETCH_INDICES) > 0)
    assert {33, 133, 362, 263, 61, 291, 13, 14} <= set(SKETCH_INDICES.tolist())


def test_head_mask_and_context(closeup, closeup_track):
    size = 128
    lm = closeup_track.landmarks[0]
    cbox = closeup_track.context_boxes[0]
    mask = head_mask(lm, cbox, size)
    assert mask.shape == (size, size) and mask.dtype == np.float32
    assert set(np.unique(mask).tolist()) <= {0.0, 1.0}
    cx, cy = to_crop_coords(lm, cbox, size).mean(0).astype(int)
    assert mask[cy, cx] == 1.0
    assert mask[0, 0] == mask[0, -1] == mask[-1, 0] == mask[-1, -1] == 0.0
    # covers the forehead above the mesh, and is larger than the bare oval
    top = to_crop_coords(lm, cbox, size)[10]
    assert mask[max(int(top[1]) - 3, 0), int(top[0])] == 1.0
    assert 0.08 < mask.mean() < 0.5
    ctx = crop(closeup[0], cbox, size)
    masked = mask_context(ctx, mask)
    assert (masked[mask == 1] == MASK_GREY).all()
    np.testing.assert_array_equal(masked[mask == 0], ctx[mask == 0])
    soft = head_mask(lm, cbox, size, feather=0.05)
    assert soft.min() >= 0.0 and soft.max() <= 1.0 and ((soft > 0.05) & (soft < 0.95)).any()
    assert soft[cy, cx] > 0.99 and soft[0, 0] < 0.01


def test_mouth_measures_synthetic():
    lm = np.zeros((478, 2))
    lm[33], lm[263] = (0, 0), (10, 0)
    lm[13], lm[14] = (5, 5), (5, 8)
    assert inter_ocular(lm) == pytest.approx(10)
    assert mouth_aperture(lm) == pytest.approx(0.3)
    assert mouth_aperture(np.stack([lm, lm * 2])).shape == (2,)
