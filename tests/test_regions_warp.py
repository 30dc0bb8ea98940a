"""Issue #12's geometry tests: the mouth region covers what it claims on a real face, the
warp maps reference landmarks onto target landmarks, and pasting the edit changes
nothing outside the region."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from tccp.data.faces import MASK_DILATE, MASK_FEATHER, MASK_INSIDE
from tccp.face.geometry import OVAL_INDICES
from tccp.face.headframe import LIPS
from tccp.face.regions import region_mask
from tccp.face.warp import triangulate, warp_image, warp_points


@pytest.fixture(scope="module")
def face():
    """(frame, 478 x 2 landmarks in px) of the bundled sample's first frame."""
    from tccp.media.io import read_video, sample_paths
    from tccp.metrics.evaluate import track_frames

    frame = read_video(sample_paths()[0], max_frames=1).frames[0]
    t = track_frames(frame[None])
    assert t.found[0]
    return frame, np.asarray(t.landmarks[0], np.float64)


def _at(mask: np.ndarray, p) -> float:
    return float(mask[int(round(p[1])), int(round(p[0]))])


def test_mouth_region_covers_the_lower_face_and_nothing_above_or_beyond(face):
    frame, mesh = face
    h, w = frame.shape[:2]
    m = region_mask(mesh, (h, w), "mouth", dilate=MASK_DILATE, feather=MASK_FEATHER, inside_face=MASK_INSIDE)
    assert all(_at(m, mesh[i]) > 0.99 for i in LIPS)  # the lips, all of them
    assert _at(m, mesh[152]) > 0.3  # down to the chin (its tip is the mask's soft edge)
    for i in (6, 197, 33, 133, 263, 362, 10, 168):  # nose bridge, eyes, forehead: kept
        assert _at(m, mesh[i]) < 1e-3, i
    # nothing beyond the face's edge: outside the oval grown by 3% of the face height
    height = np.linalg.norm(mesh[10] - mesh[152])
    oval = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(oval, cv2.convexHull(np.round(mesh[OVAL_INDICES]).astype(np.int32)), 1)
    grown = cv2.dilate(oval, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * int(0.03 * height) + 1,) * 2))
    assert m[grown == 0].max() == 0.0
    # without the clip the dilation does reach past the jaw (what the clip is for)
    loose = region_mask(mesh, (h, w), "mouth", dilate=MASK_DILATE, feather=MASK_FEATHER)
    assert loose[grown == 0].max() > 0.1


def test_below_the_nose_the_nose_is_the_source_s(face):
    """`below_nose`: the region stops at the nose's lower edge; the lips and the skin
    between them and the nose stay in it."""
    frame, mesh = face
    h, w = frame.shape[:2]
    kw = dict(dilate=MASK_DILATE, feather=MASK_FEATHER, inside_face=MASK_INSIDE)
    loose = region_mask(mesh, (h, w), "mouth", **kw)
    m = region_mask(mesh, (h, w), "mouth", below_nose=0.0, **kw)
    assert _at(loose, mesh[4]) > 0.5  # the dilation alone reaches up the nose (what the clip is for)
    assert _at(m, mesh[4]) < 0.1 and _at(m, mesh[5]) < 0.01  # nose tip and above: the source's
    assert all(_at(m, mesh[i]) > 0.99 for i in LIPS) and _at(m, mesh[164]) > 0.99  # lips, philtrum: edited
    assert np.all(m <= loose + 1e-6)  # it only takes away


def test_warp_puts_reference_landmarks_on_the_target_within_a_pixel(face):
    _, src = face
    rng = np.random.default_rng(0)
    # target: the face turned, scaled and its jaw dropped (a non-rigid change)
    a = np.array([[1.05, 0.08], [-0.06, 0.97]])
    dst = (src - src.mean(0)) @ a.T + src.mean(0) + [7.3, -4.6]
    below = src[:, 1] > src[13, 1]
    dst[below, 1] += 9.0 * (src[below, 1] - src[13, 1]) / (src[152, 1] - src[13, 1])
    index = sorted(set(LIPS) | set(OVAL_INDICES) | {1, 4, 33, 263, 152, 13, 14})
    tri = triangulate(src, index)
    pts = warp_points(tri, src, dst, src[index])
    assert np.abs(pts - dst[index]).max() < 1e-3  # exact at every vertex
    # in pixels: dots drawn at reference landmarks land on the target's after warping
    size = 640
    picks = rng.choice(LIPS, 6, replace=False)
    for i in picks:
        img = np.zeros((size, size), np.float32)
        yy, xx = np.mgrid[0:size, 0:size]
        img = np.exp(-(((xx + 0.5 - src[i, 0]) ** 2 + (yy + 0.5 - src[i, 1]) ** 2) / (2 * 1.5 ** 2))).astype(np.float32)
        out = warp_image(img, tri, src, dst)
        ys, xs = np.nonzero(out > 0.05)
        wts = out[ys, xs]
        c = np.array([(xs * wts).sum(), (ys * wts).sum()]) / wts.sum() + 0.5
        assert np.linalg.norm(c - dst[i]) < 1.0, (i, c, dst[i])


def test_a_warp_map_of_part_of_the_frame_is_that_part_of_the_whole_map(face):
    """warp_map only draws the triangles that reach its output rectangle and solves
    their affines in one batch: a sub-rectangle's map equals the same slice of the
    whole frame's (to float32 rounding), and every triangle's affine takes its target
    corners onto its reference corners."""
    from tccp.face.warp import _affines, _with_anchors, warp_map

    frame, src = face
    h, w = frame.shape[:2]
    dst = src.copy()
    dst[LIPS, 1] += 6.0  # the mouth opens
    tri = triangulate(src, sorted(set(LIPS) | set(OVAL_INDICES) | {1, 4, 33, 263, 152, 13, 14}))
    mx, my, inside = warp_map(tri, src, dst, (h, w))
    x0, y0 = int(dst[LIPS, 0].min()) - 20, int(dst[LIPS, 1].min()) - 15
    sx, sy, sin = warp_map(tri, src, dst, (60, 140), (float(x0), float(y0)))
    assert np.array_equal(sin, inside[y0:y0 + 60, x0:x0 + 140])
    # a pixel on an edge two triangles share may be drawn by either (rasterisation of a
    # polygon clipped at the image border differs): their maps agree there to ~0.1 px
    for part, whole in ((sx, mx), (sy, my)):
        diff = np.abs(part - whole[y0:y0 + 60, x0:x0 + 140])
        assert np.percentile(diff, 99.5) < 1e-3 and diff.max() < 0.2
    d, r = _with_anchors(tri, dst)[tri.triangles[:5]], _with_anchors(tri, src)[tri.triangles[:5]]
    mats, live = _affines(d, r)
    assert live.all()
    ones = np.concatenate([d, np.ones((5, 3, 1))], axis=2)
    assert np.abs(np.einsum("tij,tkj->tki", mats, ones) - r).max() < 1e-9
    flat = np.array([[[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]])  # degenerate: flagged, zero map
    m0, l0 = _affines(flat, flat)
    assert not l0[0] and not m0.any()


def test_a_coarse_warp_map_is_the_exact_one_inside_its_triangles(face):
    """`warp_map(step=2)` (the source skin's): the map computed every 2 px and
    interpolated equals the exact one inside each triangle (the field is affine there)
    and differs only near triangle edges, by a fraction of a pixel on a real face whose
    jaw drops; the pixel grid is the same (no half-pixel shift), at any offset and size."""
    from tccp.face.sketch import SKETCH_INDICES
    from tccp.face.warp import warp_map

    frame, src = face
    tri = triangulate(src, SKETCH_INDICES)
    dst = src.copy()
    jaw = dst[:, 1] > dst[[13, 14], 1].mean()
    dst[jaw, 1] -= 8.0 * (dst[jaw, 1] - dst[jaw, 1].min()) / np.ptp(dst[jaw, 1])  # the target closes the jaw
    x0, y0 = float(dst[:, 0].min()) - 7.3, float(dst[13, 1]) - 40.6
    for shape in ((121, 150), (120, 151)):
        fx, fy, _ = warp_map(tri, src, dst, shape, (x0, y0))
        cx, cy, _ = warp_map(tri, src, dst, shape, (x0, y0), step=2)
        err = np.hypot(cx - fx, cy - fy)
        assert np.median(err) < 1e-3  # most pixels: exact
        assert np.percentile(err, 99) < 0.5 and err.mean() < 0.05, (np.percentile(err, 99), err.mean())


def test_pasting_the_edit_changes_nothing_outside_the_region(face):
    from engine.composite import CompositeSettings, crop_box, paste_mouth

    frame, mesh = face
    lo, hi = mesh.min(0), mesh.max(0)
    c, side = (lo + hi) / 2, float((hi - lo).max()) * 1.6
    box = (c[0] - side / 2, c[1] - side / 2, c[0] + side / 2, c[1] + side / 2)
    size = 128
    crop_mesh = (mesh - [box[0], box[1]]) * (size / side)
    mask = region_mask(crop_mesh, (size, size), "mouth", dilate=MASK_DILATE, feather=MASK_FEATHER,
                       inside_face=MASK_INSIDE)
    edited = np.full((size, size, 3), 255, np.uint8) - crop_box(frame, box, size)  # very different
    out = paste_mouth(frame, edited, box, mask, settings=CompositeSettings(colour_match=False))
    h, w = frame.shape[:2]
    full = region_mask(mesh, (h, w), "mouth", dilate=MASK_DILATE, feather=MASK_FEATHER, inside_face=MASK_INSIDE)
    # the mask lives on the 128 px grid: allow 1.5 of its pixels (in source px) around it
    r = int(np.ceil(1.5 * side / size))
    near = cv2.dilate((full > 0).astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0
    diff = np.abs(out.astype(int) - frame.astype(int)).max(-1)
    assert diff[~near].max() == 0
    assert diff[full > 0.99].mean() > 40  # and the region itself was edited


def test_reference_choice_keeps_the_reference_in_use_between_near_ties():
    from tccp.face import headframe as hf
    from tccp.pipelines.faces import ReferenceBank

    lips = list(hf.LIPS)
    shapes = np.stack([np.full(len(lips) * 2, v, np.float32) for v in (0.0, 1.0, 10.0)])
    bank = ReferenceBank(np.zeros((3, 8, 8, 3), np.uint8), np.zeros((3, 478, 2), np.float32), shapes)
    targets = np.zeros((5, 478, 2), np.float32)
    for k, v in enumerate((0.45, 0.55, 0.45, 0.58, 9.0)):  # near ties between 0 and 1, then far
        targets[k, lips] = v
    assert bank.choose(targets).tolist() == [0, 1, 0, 1, 2]  # per frame: flickers
    assert bank.choose(targets, prev=0, stick=0.5).tolist() == [0, 0, 0, 0, 2]  # kept, then switched
    assert bank.choose(targets, prev=1, stick=0.5).tolist() == [1, 1, 1, 1, 2]  # carried from the last window


def test_reference_choice_keeps_to_the_allowed_references():
    from tccp.pipelines.faces import ReferenceBank

    from engine.runner import default_template

    t = default_template()
    meshes = np.repeat(t[None], 3, 0).astype(np.float32)
    meshes[1, list(LIPS), 1] += 0.02
    meshes[2, list(LIPS), 1] += 0.2
    bank = ReferenceBank.build(np.zeros((3, 8, 8, 3), np.uint8), meshes, t)
    heads = meshes[[1, 1]]
    assert bank.choose(heads).tolist() == [1, 1]
    assert bank.choose(heads, allowed=np.array([True, False, True])).tolist() == [0, 0]
    assert bank.choose(heads, prev=1, stick=0.5, allowed=np.array([True, False, True])).tolist() == [0, 0]


def test_reference_choice_can_rule_out_references_that_open_far_less_or_more_than_the_target():
    """`max_deficit`: a closed reference nearest by lip shape is not stretched open to a
    wide target when a reference that opens is there; small openings keep the nearest;
    a target wider than every reference gets the most open one. `max_excess`: an open
    reference is not squeezed shut for a near-closed target when a closed one is there."""
    from tccp.face.geometry import LOWER_INNER
    from tccp.pipelines.faces import ReferenceBank, _lip_gap

    from engine.runner import default_template

    t = default_template().astype(np.float32)
    lower = list(LOWER_INNER[1:-1]) + [146, 91, 181, 84, 17, 314, 405, 321, 375]

    def opened(dy: float, dx: float = 0.0) -> np.ndarray:
        m = t.copy()
        m[lower, 1] += dy
        m[list(LIPS), 0] += dx
        return m

    closed, wide = opened(-0.07), opened(0.10, dx=0.1)  # the open one also sits elsewhere
    bank = ReferenceBank.build(np.zeros((2, 8, 8, 3), np.uint8), np.stack([closed, wide]), t)
    width = float(np.linalg.norm(t[61] - t[291]))
    gaps = _lip_gap(np.stack([closed, wide])[:, list(LIPS)])
    assert gaps[0] < 0.02 < 0.15 < gaps[1]
    target = opened(0.06)[None]  # gap ~0.14, 0.23 of the mouth's width more than the closed one's
    assert bank.choose(target).tolist() == [0]  # nearest shape: the closed mouth, stretched open
    assert bank.choose(target, max_deficit=0.15).tolist() == [1]
    assert bank.choose(target, prev=0, stick=0.5, max_deficit=0.15).tolist() == [1]  # the one in use too
    assert bank.choose(target, max_deficit=0.3).tolist() == [0]  # within the allowed shortfall
    small = opened(-0.05)[None]  # a small opening: the closed one is within the deficit
    assert bank.choose(small, max_deficit=0.15).tolist() == [0]
    huge = opened(0.25, dx=-0.2)[None]  # wider than any reference, and nearer the closed one by position
    assert (_lip_gap(huge[:, list(LIPS)]) - gaps[1]) > 0.15 * width
    assert bank.choose(huge).tolist() == [0]
    assert bank.choose(huge, max_deficit=0.15).tolist() == [1]  # the most open reference
    # max_excess: the other way round, a near-closed target sitting where the open one sits
    shut = opened(-0.04, dx=0.1)[None]
    assert bank.choose(shut).tolist() == [1]
    assert bank.choose(shut, max_excess=0.15).tolist() == [0]
    assert bank.choose(shut, prev=1, stick=0.5, max_deficit=0.15, max_excess=0.15).tolist() == [0]
    assert bank.choose(shut, max_excess=0.15, allowed=np.array([False, True])).tolist() == [1]  # the least open left


def test_teeth_move_with_their_lip_instead_of_stretching_with_the_opening(face, monkeypatch):
    """Inside the mouth opening a band next to each lip moves rigidly with that lip
    (`rigid_mouth`): a target that opens 40 px wider than the reference (the sample's
    mouth, ~57 px open) moves what lies 15 px under the upper lip by nothing and what
    lies 15 px over the lower lip by 40 px, where the piecewise-affine warp stretches
    both; a target that opens 30 px less cuts the bands in the middle instead of
    squashing them."""
    from tccp.face import warp
    from tccp.face.warp import LOWER_INNER, UPPER_INNER, warp_map

    frame, mesh = face
    h, w = frame.shape[:2]
    tri = triangulate(mesh, sorted(set(LIPS) | set(OVAL_INDICES) | {1, 4, 33, 263, 152, 13, 14}))
    lower = np.zeros(len(mesh), bool)
    lower[[i for i in LIPS if i not in UPPER_INNER] + list(LOWER_INNER[1:-1]) + [152]] = True
    lower[[61, 291, 185, 40, 39, 37, 0, 267, 269, 270, 409]] = False  # the upper outer lip stays

    def opened(px: float) -> np.ndarray:
        m = mesh.copy()
        m[lower, 1] += px
        return m

    src = opened(10.0)
    top, bot = src[13], src[14]
    gap = bot[1] - top[1]
    assert gap > 40.0, gap
    x = int(round(top[0]))
    for name, dst, rows in (("wider", opened(50.0), {15.0: 0.0, -15.0: -40.0}),
                            ("narrower", opened(-20.0), {8.0: 0.0, -8.0: 30.0})):
        t, b = dst[13, 1], dst[14, 1]
        for rigid in (True, False):
            monkeypatch.setattr(warp, "RIGID_TEETH", rigid)
            _, my, _ = warp_map(tri, src, dst, (h, w))
            for d, shift in rows.items():
                y = int(round((t + d) if d > 0 else (b + d)))  # d px under the upper / over the lower lip
                want = y + shift  # rigid: where the same point of the reference lies (its lip's motion undone)
                if rigid:
                    assert abs(my[y, x] - want) < 0.75, (name, d, my[y, x], want)
                else:  # the piecewise-affine warp stretches instead (this test can tell the two apart)
                    assert abs(my[y, x] - want) > 1.0, (name, d, my[y, x], want)


def test_a_mouth_opened_far_past_its_reference_darkens_inside(face):
    """`cavity`: where the target opens far wider than the reference (the middle of the
    opening is then a smear of the few pixels between the reference's lips), the middle
    gets a darkening weight that peaks mid-opening and is 0 next to the lips (the teeth
    bands); a target that opens no wider gets none; `warp_image` darkens a picture by it
    and leaves a mask alone."""
    from tccp.face import warp
    from tccp.face.warp import LOWER_INNER, UPPER_INNER, warp_image, warp_map

    frame, mesh = face
    h, w = frame.shape[:2]
    tri = triangulate(mesh, sorted(set(LIPS) | set(OVAL_INDICES) | {1, 4, 33, 263, 152, 13, 14}))
    lower = np.zeros(len(mesh), bool)
    lower[[i for i in LIPS if i not in UPPER_INNER] + list(LOWER_INNER[1:-1]) + [152]] = True
    lower[[61, 291, 185, 40, 39, 37, 0, 267, 269, 270, 409]] = False

    def opened(px: float) -> np.ndarray:
        m = mesh.copy()
        m[lower, 1] += px
        return m

    src = opened(-45.0)  # nearly closed: ~2 px between the inner lips (the sample's mouth is ~47 px open)
    x = int(round(src[13, 0]))
    for ref, dst, expect in ((src, opened(40.0), "dark"), (src, src, "none"), (opened(10.0), opened(-20.0), "none"),
                             (opened(10.0), opened(15.0), "light")):  # 57 -> 62 px: little the reference lacks
        cav = np.zeros((h, w), np.float32)
        warp.rigid_mouth(*warp_map(tri, ref, dst, (h, w))[:2], ref, dst, cavity=cav, strength=0.8)
        col = cav[:, x]
        if expect != "dark":
            assert cav.max() <= (0.0 if expect == "none" else 0.3), (expect, cav.max())
            continue
        t, b = dst[13, 1], dst[14, 1]
        mid = int(round((t + b) / 2))
        assert col[mid] > 0.5 and col.max() <= 0.8 + 1e-6
        assert col[int(round(t)) + 2] < 0.25 * col[mid] and col[int(round(b)) - 2] < 0.25 * col[mid]
        assert (cav[: int(t) - 2] == 0).all() and (cav[int(b) + 3 :] == 0).all()  # only inside the opening
    pic = np.full((h, w, 3), 200, np.uint8)
    old = warp.MOUTH_CAVITY
    try:
        warp.MOUTH_CAVITY = 0.8
        dark = warp_image(pic, tri, src, opened(40.0))
        mask = warp_image(pic, tri, src, opened(40.0), picture=False)
    finally:
        warp.MOUTH_CAVITY = old
    assert dark[mid, x].max() < 100 and (mask == 200).all()
    # a tone: the faded middle goes to that share of the colour under it, not to black
    cav = np.zeros((4, 4), np.float32)
    cav[1:3, 1:3] = 1.0
    img = np.full((4, 4, 3), (200, 100, 50), np.uint8)
    assert warp.darken(img, cav, tone=0.5)[1, 1].tolist() == [100, 50, 25]
    assert warp.darken(img, cav, tone=0.0)[1, 1].tolist() == [0, 0, 0] and warp.darken(img, cav)[0, 0].tolist() == [200, 100, 50]


def test_reference_choice_options_centre_and_gap():
    """The measured alternatives (off by default, docs/faces.md "Which reference"):
    `centre` compares lip shapes without their position, `gap_weight` adds the
    inner-lip gap difference to the distance."""
    from tccp.face import headframe as hf
    from tccp.pipelines.faces import ReferenceBank

    from engine.runner import default_template

    t = default_template().astype(np.float32)
    lips = list(hf.LIPS)
    closed = t.copy()
    opened = t.copy()
    opened[14, 1] += 0.1  # the lower inner lip drops: a gap of 0.1 more
    closed_low = closed.copy()
    closed_low[lips, 1] += 0.05  # the same closed lips, lower in the head
    bank = ReferenceBank.build(np.zeros((2, 8, 8, 3), np.uint8), np.stack([closed_low, opened]), t)
    target = closed[None]
    # by position the open reference is nearer (one point off vs every point 0.05 off) ...
    assert bank.choose(target).tolist() == [1]
    # ... by shape alone, or with the gap counted, the closed one
    assert bank.choose(target, centre=True).tolist() == [0]
    assert bank.choose(target, gap_weight=6.0).tolist() == [0]


def test_bank_size_is_one_setting(monkeypatch):
    """`engine.refs.BANK_SIZE` sizes every bank that is not given a size (a call's
    growing bank, a file's pre-scan, the suite's)."""
    import engine.refs as refs
    from engine.runner import default_template

    monkeypatch.setattr(refs, "BANK_SIZE", 5)
    assert refs.BankBuilder(default_template()).size == 5
    assert refs.BankBuilder(default_template(), size=3).size == 3


def test_training_pairs_take_the_reference_the_engine_would():
    """Stage 2's training pairs (`tccp.training.mouth_cache.training_references`) use the engine's
    bank (typical shapes) and its choice (the same distances and gap rules), never a
    bank frame within `min_gap` frames of the target; far from every bank frame the
    choice is exactly the engine's (`ReferenceBank.choose` without hysteresis)."""
    from tccp.training.mouth_cache import training_references
    from tccp.face.geometry import LOWER_INNER
    from tccp.pipelines import faces as pf

    from engine.runner import default_template

    t = default_template().astype(np.float32)
    lower = list(LOWER_INNER[1:-1]) + [146, 91, 181, 84, 17, 314, 405, 321, 375]
    n = 300
    rng = np.random.default_rng(3)
    opening = np.clip(0.12 * np.sin(np.arange(n) / 7.0) + rng.normal(0, 0.02, n), -0.07, 0.15)
    heads = np.repeat(t[None], n, 0)
    heads[:, lower, 1] += opening[:, None]
    heads[:, list(LIPS), 0] += rng.normal(0, 0.1, n)[:, None]  # the mouth sits left or right
    faces = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    bank, refs = training_references(heads, faces, size=8, min_gap=12)
    assert len(bank) == 8 and sorted(bank.tolist()) == sorted(pf.select_references(
        heads, 8, sharpness=np.array([pf.crop_sharpness(f) for f in faces])))
    assert (np.abs(refs - np.arange(n)) > 12).all()  # never the answer's neighbourhood
    engine_bank = pf.ReferenceBank.build(faces[bank], heads[bank], t)
    engine = bank[engine_bank.choose(heads, target_yaw=pf.yaw(heads), yaw_weight=pf.REF_YAW_WEIGHT,
                                     yaw_tolerance=pf.REF_YAW_TOLERANCE, max_deficit=pf.REF_MAX_DEFICIT,
                                     max_excess=pf.REF_MAX_EXCESS)]
    far = (np.abs(bank[None] - np.arange(n)[:, None]) > 12).all(1)
    assert far.sum() > 100 and np.array_equal(refs[far], engine[far])
    # the gap rules act here: the nearest shape alone would differ for some frames
    plain = bank[engine_bank.choose(heads)]
    assert (plain[far] != engine[far]).any()
