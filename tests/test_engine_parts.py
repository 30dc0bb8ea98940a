"""Unit tests of the engine's building blocks: compositing, A/V alignment, the
degradation ladder, stats and the shared model's batching/failure isolation."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from engine.align import AudioBuffer, FrameAligner, mel_for_frames
from engine.composite import CompositeSettings, colour_match, crop_box, feather_mask, paste_back
from engine.config import EngineConfig
from engine.degrade import DegradeController, ladder
from engine.filerun import pingpong_index
from engine.model import SharedModel
from engine.stats import SessionStats, WindowTiming
from tccp.face import geometry as fg
from tccp.media.audio import log_mel, mel_windows


# --------------------------------------------------------------------------- composite


def _disc_mask(size: int, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] + 0.5
    return (((xx - size / 2) ** 2 + (yy - size / 2) ** 2) <= r * r).astype(np.float32)


def test_crop_matches_face_geometry_crop():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    box = np.array([30.5, 20.25, 94.5, 84.25], np.float32)  # 64 px, maps 1:1
    ours = crop_box(frame, box, 64)
    theirs = fg.crop(frame, box, 64)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_paste_back_identity_crop_is_lossless_and_local():
    """Pasting back the unmodified crop of an integer-aligned 1:1 box changes nothing,
    and a modified crop changes pixels only inside the box."""
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)
    box = (20.0, 10.0, 84.0, 74.0)
    crop = crop_box(frame, box, 64)
    mask = _disc_mask(64, 24)
    same = paste_back(frame, crop, box, mask, CompositeSettings(colour_match=False))
    assert np.abs(same.astype(int) - frame.astype(int)).max() <= 1

    white = np.full_like(crop, 255)
    out = paste_back(frame, white, box, mask, CompositeSettings(colour_match=False))
    diff = np.abs(out.astype(int) - frame.astype(int)).sum(-1) > 0
    ys, xs = np.nonzero(diff)
    assert ys.min() >= 10 and ys.max() < 74 and xs.min() >= 20 and xs.max() < 84
    # the centre of the head region is fully replaced, the box corners untouched
    assert (out[42, 52] == 255).all()
    assert (out[11, 21] == frame[11, 21]).all()


def test_paste_back_scaled_box_and_box_outside_frame():
    frame = np.zeros((200, 200, 3), np.uint8)
    crop = np.full((32, 32, 3), 200, np.uint8)
    mask = np.ones((32, 32), np.float32)
    out = paste_back(frame, crop, (50, 50, 150, 150), mask, CompositeSettings(colour_match=False))
    assert out[100, 100].min() > 190  # centre replaced at 3x scale
    assert out[52, 52].max() < 100  # the feathered edge fades to the original
    # a box partly outside the frame is clipped, one fully outside is a no-op
    paste_back(frame, crop, (-40, -40, 40, 40), mask)
    assert (paste_back(frame, crop, (300, 300, 400, 400), mask) == frame).all()


def test_feather_mask_soft_edge_and_zero_border():
    m = feather_mask(np.ones((64, 64), np.float32), 4.0)
    assert m[0].max() < 0.2 and m[:, 0].max() < 0.2
    assert m[32, 32] > 0.99
    hard = _disc_mask(64, 20)
    soft = feather_mask(hard, 3.0)
    assert 0.05 < soft[32, 32 + 20] < 0.95  # soft at the edge


def test_colour_match_moves_stats_to_reference():
    rng = np.random.default_rng(2)
    ref = np.clip(rng.normal(150, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
    gen = np.clip(rng.normal(90, 10, (64, 64, 3)), 0, 255).astype(np.uint8)
    region = np.ones((64, 64), bool)
    out = colour_match(gen, ref, region)
    assert abs(out.mean() - ref.mean()) < 6 < abs(gen.mean() - ref.mean())
    assert colour_match(gen, ref, np.zeros((64, 64), bool)) is gen  # no statistics


# --------------------------------------------------------------------------- align


def test_aligner_passes_25fps_through_exactly():
    al = FrameAligner(25.0)
    out = []
    for i in range(10):
        out += al.push(i / 25, np.full((2, 2, 3), i, np.uint8), 0.0)
    assert [g.index for g in out] == list(range(10))
    assert [int(g.frame[0, 0, 0]) for g in out] == list(range(10))
    assert np.allclose([g.pts for g in out], np.arange(10) / 25)


def test_aligner_30fps_to_25fps_uses_latest_frame_before_slot():
    al = FrameAligner(25.0)
    out = []
    for j in range(31):  # 1 s at 30 fps
        out += al.push(j / 30, np.full((1, 1, 3), j, np.uint8), 0.0)
    got = [int(g.frame[0, 0, 0]) for g in out]
    want = [int(np.floor(k / 25 * 30 + 1e-6)) for k in range(len(got))]
    assert got == want and len(got) >= 25


def test_aligner_stall_skips_instead_of_freezing():
    al = FrameAligner(25.0, max_gap=3)
    out = al.push(0.0, np.zeros((1, 1, 3), np.uint8), 0.0)
    out += al.push(2.0, np.ones((1, 1, 3), np.uint8), 0.0)  # 2 s stall
    # one slot of the old frame, then the grid jumps to the new frame's time
    assert [g.index for g in out] == [0, 1, 50] and al.skipped == 48


def test_audio_buffer_gaps_overlap_and_trim():
    ab = AudioBuffer(100)
    ab.push(np.ones(50, np.float32), 0.0)
    ab.push(np.full(10, 2.0, np.float32), 1.0)  # gap 0.5..1.0 -> silence
    ab.push(np.full(5, 3.0, np.float32), None)  # appended
    x = ab.read(0.4, 1.2)
    assert x.size == 80 and (x[:10] == 1).all() and (x[10:60] == 0).all() and (x[60:70] == 2).all()
    assert ab.end_time == pytest.approx(1.15)
    ab.trim_before(0.9)
    assert ab.read(0.0, 0.5).max() == 0  # trimmed samples read as silence


def test_mel_for_frames_matches_whole_track_windows():
    rng = np.random.default_rng(3)
    audio = (0.2 * rng.standard_normal(16000 * 2)).astype(np.float32)
    ab = AudioBuffer(16000)
    ab.push(audio, 0.0)
    whole = mel_windows(log_mel(audio), 50)
    times = np.arange(10, 17) / 25
    part = mel_for_frames(ab, times)
    assert part.shape == (7, 16, 80)
    assert np.abs(part - whole[10:17]).max() < 0.15  # same audio, edges differ slightly
    assert np.abs(part - whole[10:17]).mean() < 0.02


# --------------------------------------------------------------------------- degrade


def test_ladder_order():
    rungs = ladder(8, 1)
    assert [(r.mode, r.steps) for r in rungs] == [
        ("generated", 8), ("generated", 4), ("generated", 2), ("generated", 1),
        ("generated", 0), ("passthrough", 0),
    ]
    assert [(r.mode, r.steps) for r in ladder(1, 1)] == [("generated", 1), ("generated", 0), ("passthrough", 0)]
    # a warp-only session (--steps 0) can only pass through below that
    assert [(r.mode, r.steps) for r in ladder(0, 1)] == [("generated", 0), ("passthrough", 0)]


def test_controller_degrades_recovers_and_backs_off():
    cfg = EngineConfig(steps=2, live=True, latency_budget_s=0.1, recover_after=2)
    c = DegradeController(cfg)
    assert c.rung.steps == 2
    changes = [c.observe(i, 0.5) for i in range(5)]
    assert [ch.to_level for ch in changes if ch] == [1, 2, 3]
    assert c.rung.mode == "passthrough"
    assert c.observe(5, 0.01) is None
    up = c.observe(6, 0.01)
    assert up is not None and up.to_level == 2 and up.reason == "recovered"
    c.observe(7, 0.5)  # the climb failed at once: back down, and wait longer
    assert c.level == 3 and c._hold[3] == 4
    assert not DegradeController(EngineConfig()).enabled  # files: no budget by default


# --------------------------------------------------------------------------- stats


def test_stats_summary_and_metrics():
    s = SessionStats()
    s.started, s.finished = 1.0, 3.0
    for i in range(10):
        s.add_window(WindowTiming(window=i, frames=7, level=0, steps=2, mode="generated", e2e=0.1 * (i + 1)))
    s.frames_out = 70
    s.passthrough["no_face"] += 3
    summ = s.summary()
    assert summ["fps"] == pytest.approx(35.0)
    assert summ["latency"]["e2e"]["p50"] == pytest.approx(0.55)
    m = s.as_metrics()
    assert m["tccp_engine_frames_passthrough_no_face_total"] == 3
    assert m["tccp_engine_e2e_seconds_p95"] > 0.9


def test_pingpong_index():
    assert [pingpong_index(i, 4) for i in range(9)] == [0, 1, 2, 3, 2, 1, 0, 1, 2]
    assert pingpong_index(5, 1) == 0


# --------------------------------------------------------------------------- SharedModel


@dataclass
class _Req:
    key: int
    value: int
    fail: bool = False


@dataclass
class _Res:
    value: int
    batch: int = 1


class _FakeRunner:
    size = 8

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def batch_key(self, r: _Req):
        return r.key

    def run_batch(self, reqs):
        self.gate.wait(5)
        self.calls.append([r.value for r in reqs])
        time.sleep(self.delay)
        if any(r.fail for r in reqs):
            raise ValueError("injected")
        return [_Res(r.value * 10) for r in reqs]


async def test_shared_model_batches_same_key_and_isolates_failures():
    runner = _FakeRunner()
    with SharedModel(runner) as sm:
        runner.gate.clear()  # hold the worker so requests pile up
        first = asyncio.ensure_future(sm.submit(_Req(0, 0)))
        await asyncio.sleep(0.05)
        futs = [asyncio.ensure_future(sm.submit(_Req(1, v, fail=(v == 3)))) for v in (1, 2, 3)]
        other = asyncio.ensure_future(sm.submit(_Req(2, 9)))
        await asyncio.sleep(0.05)
        runner.gate.set()
        assert (await first).value == 0
        r1, r2 = await futs[0], await futs[1]
        assert (r1.value, r2.value) == (10, 20)
        with pytest.raises(ValueError, match="injected"):
            await futs[2]
        assert (await other).value == 90
        # one batched call of three (failed), then each retried alone
        assert [1, 2, 3] in runner.calls and [1] in runner.calls and [3] in runner.calls
        assert sm.stats.failures == 1
        # the worker survives and keeps serving
        assert (await sm.submit(_Req(0, 5))).value == 50


def test_ladder_tracked_mode_keeps_its_mode():
    from engine.degrade import ladder

    rungs = ladder(4, 1, "tracked")
    assert [r.mode for r in rungs] == ["tracked", "tracked", "tracked", "tracked", "passthrough"]
    assert [r.steps for r in rungs][:4] == [4, 2, 1, 0]
    assert ladder(4, 1)[0].mode == "generated"


def test_paste_mouth_takes_float_masks_that_round_above_one():
    """A float mask whose maximum rounds to 1.0000001 is still a [0, 1] mask (it used to
    be mistaken for a 0-255 one, and the frame came out unedited)."""
    from engine.composite import paste_mouth

    frame = np.full((200, 200, 3), 100, np.uint8)
    crop = np.full((64, 64, 3), 200, np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[30:60, 16:48] = np.float32(1.0000001)
    out = paste_mouth(frame, crop, (20.0, 20.0, 180.0, 180.0), mask, settings=CompositeSettings(colour_match=False))
    assert out[150, 100].tolist() == [200, 200, 200]
    assert out[40, 40].tolist() == [100, 100, 100]  # outside the mask: the frame


def test_source_skin_keeps_the_source_frame_around_the_mouth():
    """`paste_mouth(source_skin=True)`: inside the region, away from the mouth, the frame
    shows the source warped onto the target landmarks (here the same landmarks: the
    source itself), not the edited crop; at the mouth both show the edited crop."""
    import cv2

    from engine.composite import SKIN_FEATHER, SKIN_MARGIN, paste_mouth
    from engine.runner import default_template
    from tccp.face.regions import lips_mask, region_mask
    from tccp.face.sketch import SKETCH_INDICES
    from tccp.face.warp import triangulate

    t = default_template().astype(np.float64)
    mesh = (t - t.mean(0)) / np.linalg.norm(t[33] - t[263]) * 26 + [64, 60]  # a face in a 128 px crop
    tri = triangulate(default_template(), SKETCH_INDICES)
    frame = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8), (0, 0), 2)
    crop = np.full((128, 128, 3), 40, np.uint8)
    mask = region_mask(mesh, (128, 128), "mouth", dilate=0.06, feather=0.02)
    box, s = (0.0, 0.0, 256.0, 256.0), CompositeSettings(colour_match=False)
    off = paste_mouth(frame, crop, box, mask, mesh, None, -1, tri, s, detail=False, source_mesh=mesh)
    on = paste_mouth(frame, crop, box, mask, mesh, None, -1, tri, s, detail=False, source_mesh=mesh, source_skin=True)
    m = cv2.resize(mask, (256, 256))
    keep = lips_mask(mesh * 2, (256, 256), margin=SKIN_MARGIN, feather=SKIN_FEATHER)
    skin, mouth = (m > 0.99) & (keep < 0.01), (m > 0.99) & (keep > 0.99)
    assert skin.sum() > 2000 and mouth.sum() > 200
    assert np.abs(off[skin].astype(int) - 40).max() <= 1  # the crop's skin
    assert np.abs(on[skin].astype(int) - frame[skin].astype(int)).mean() < 2  # the source's
    assert np.abs(on[mouth].astype(int) - off[mouth].astype(int)).max() <= 1  # the edited mouth
    # by default it follows the bank: a bank of the source's own frames keeps its skin,
    # another person's picture (`--identity`, an avatar) does not
    from tccp.pipelines.faces import ReferenceBank

    bank = ReferenceBank.build(crop[None], mesh[None], default_template())
    assert np.array_equal(paste_mouth(frame, crop, box, mask, mesh, bank, -1, tri, s, source_mesh=mesh), off)
    bank.own = True
    assert np.array_equal(paste_mouth(frame, crop, box, mask, mesh, bank, -1, tri, s, source_mesh=mesh), on)


def test_paste_mouth_with_a_mask_too_faint_to_survive_the_resize_leaves_the_frame():
    """A mask whose only pixels are just above the cut (1e-3) can fall under it when the
    crop is upsampled to the box: the frame comes back unchanged (the detail step used to
    fail unpacking an empty support)."""
    from engine.composite import paste_mouth
    from engine.runner import default_template
    from tccp.face.sketch import SKETCH_INDICES
    from tccp.face.warp import triangulate
    from tccp.pipelines.faces import ReferenceBank

    t = default_template().astype(np.float64)
    mesh = (t - t.mean(0)) / np.linalg.norm(t[33] - t[263]) * 26 + [64, 60]
    tri = triangulate(default_template(), SKETCH_INDICES)
    crop = np.full((128, 128, 3), 40, np.uint8)
    bank = ReferenceBank.build(crop[None], mesh[None], default_template(), hires=[np.full((256, 256, 3), 40, np.uint8)])
    frame = np.full((256, 256, 3), 100, np.uint8)
    mask = np.zeros((128, 128), np.float32)
    mask[64, 64] = 0.0012  # upsampled 2x, at most 0.75 of it reaches a pixel: 0.0009
    box = (0.0, 0.0, 256.0, 256.0)
    out = paste_mouth(frame, crop, box, mask, mesh, bank, 0, tri, CompositeSettings(colour_match=False))
    assert np.array_equal(out, frame)


def test_bad_reference_images_are_one_line_errors():
    """`--identity` images: grayscale, tiny and face-less pictures are named, not traced."""
    from engine.refs import bank_from_image
    from tccp.errors import TCCPError

    template = np.zeros((478, 2), np.float32)
    with pytest.raises(TCCPError, match=r"^me.png: not a colour image$"):
        bank_from_image(np.zeros((200, 200), np.uint8), template, name="me.png")
    with pytest.raises(TCCPError, match=r"^me.png: too small \(40x30 px; at least 64 px\)$"):
        bank_from_image(np.zeros((30, 40, 3), np.uint8), template, name="me.png")
    with pytest.raises(TCCPError, match=r"^me.png: no face found$"):
        bank_from_image(np.full((128, 128, 3), 127, np.uint8), template, name="me.png")


def _ring_mesh(cx: float, cy: float, outer: float, inner: float) -> np.ndarray:
    """A 478-point mesh whose outer lip loop is a circle of radius `outer` and inner
    loop one of radius `inner` about (cx, cy)."""
    mesh = np.full((478, 2), (cx, cy), np.float32)
    for loop, r in ((fg.LIPS_OUTER_LOOP, outer), (fg.LIPS_INNER_LOOP, inner)):
        a = np.linspace(0, 2 * np.pi, len(loop), endpoint=False)
        mesh[list(loop)] = np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)
    return mesh


def test_lip_mask_is_the_ring_between_the_lip_contours():
    m = fg.lip_mask(_ring_mesh(32, 32, 20, 8), (64, 64))
    assert not m[32, 32] and m[32, 32 + 14] and not m[32, 32 + 24] and not m[2, 2]
    assert abs(m.sum() - np.pi * (20**2 - 8**2)) < 0.1 * np.pi * (20**2 - 8**2)


def test_match_lips_moves_the_lips_colour_to_the_source_s_and_nothing_else():
    from engine.composite import LIP_MAX_SHIFT, match_lips
    import cv2

    src_mesh, tgt_mesh = _ring_mesh(30, 34, 14, 5), _ring_mesh(34, 30, 16, 7)  # the lips moved between them
    original = np.full((64, 64, 3), (200, 160, 140), np.uint8)
    original[fg.lip_mask(src_mesh, (64, 64))] = (170, 90, 100)
    edited = np.full((64, 64, 3), (200, 160, 140), np.uint8)
    edited[fg.lip_mask(tgt_mesh, (64, 64))] = (150, 80, 95)  # a darker lip colour (another frame's)
    out = match_lips(edited, original, tgt_mesh, src_mesh)
    lab = lambda x: cv2.cvtColor(x.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)  # noqa: E731
    core = fg.lip_mask(tgt_mesh, (64, 64)) & (cv2.erode(fg.lip_mask(tgt_mesh, (64, 64)).astype(np.uint8), np.ones((5, 5))) > 0)
    want = np.median(lab(original)[fg.lip_mask(src_mesh, (64, 64))], 0)
    got = np.median(lab(out)[core], 0)
    before = np.median(lab(edited)[core], 0)
    assert np.all(np.abs(got - want) < 1.0) and np.abs(before - want).max() > 3
    far = np.ones((64, 64), bool)
    far[10:56, 10:56] = False
    assert np.array_equal(out[far], edited[far])  # skin away from the lips untouched
    # a wildly different source (a hand over the mouth) moves the lips by the clamp at most
    black = original.copy()
    black[fg.lip_mask(src_mesh, (64, 64))] = 0
    shift = np.median(lab(match_lips(edited, black, tgt_mesh, src_mesh))[core], 0) - before
    assert np.all(np.abs(shift) <= np.asarray(LIP_MAX_SHIFT) + 0.6)


def test_the_region_edge_does_not_draw_a_moved_chin_twice(monkeypatch):
    """A target that closes a jaw the source dropped: the region (the union of both lower
    faces) reaches down to the source's chin, and its feathered edge used to blend the
    chin the warp moved up with the frame's own chin below it, a faint second chin
    (`lp_d10` dubbed with calm speech). `SKIN_REACH`: along that edge, and past it
    wherever the warp moves the frame, the output is the warped frame (one geometry, no
    second chin); far from the face nothing changes. With the reference's skin as with
    the source's."""
    import cv2

    import engine.composite as comp
    from engine.runner import default_template
    from tccp.face.regions import region_mask
    from tccp.face.sketch import SKETCH_INDICES
    from tccp.face.warp import triangulate, warp_map

    t = default_template().astype(np.float64)
    target = (t - [0.0, 0.5]) * 22 + [64, 60]  # a face in a 128 px crop, chin at y 81
    source = target.copy()
    mid = target[[13, 14], 1].mean()
    below = target[:, 1] > mid
    source[below, 1] += 6.0 * np.clip((target[below, 1] - mid) / (target[152, 1] - mid), 0, 1)  # jaw dropped 6 px
    tri = triangulate(default_template(), SKETCH_INDICES)
    noise = cv2.GaussianBlur(np.random.default_rng(1).normal(0, 1, (512, 512, 3)).astype(np.float32), (0, 0), 1.5)
    frame = np.clip(128 + noise / noise.std() * 50, 0, 255).astype(np.uint8)  # skin texture, 50 grey levels
    box = (0.0, 0.0, 512.0, 512.0)
    mx, my, _ = warp_map(tri, source * 4, target * 4, (512, 512))
    warped = cv2.remap(frame, mx, my, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE).astype(int)
    moved = np.hypot(mx - np.arange(512)[None, :], my - np.arange(512)[:, None]) > comp.SKIN_STILL[1]
    mask = region_mask([source, target], (128, 128), "mouth", dilate=0.06, feather=0.02, inside_face=0.01,
                       below_nose=0.0)
    m = cv2.resize(mask, (512, 512))
    edge = (m > 0.02) & (m < 0.9) & moved  # the feathered edge where the warp moves the frame
    past = (m == 0) & moved
    assert edge.sum() > 100 and past.sum() > 100
    crop = comp.crop_box(frame, box, 128)
    s = CompositeSettings(colour_match=False)
    for skin in (True, False):
        outs = {}
        for reach in (False, True):
            monkeypatch.setattr(comp, "SKIN_REACH", reach)
            outs[reach] = comp.paste_mouth(frame, crop, box, mask, target, None, -1, tri, s, detail=False,
                                           source_mesh=source, source_skin=skin).astype(int)
        off, on = outs[False], outs[True]
        if skin:  # the region's skin is the warped frame; its edge blended it with the frame
            assert np.abs(off[edge] - warped[edge]).mean() > 12  # 23 grey levels here
            assert np.abs(on[edge] - warped[edge]).mean() < 2
        assert np.array_equal(off[past], frame[past])
        assert np.abs(on[past] - warped[past]).mean() < 2  # past the region: moved with the warp
        assert np.array_equal(on[:80], frame[:80])  # far from the mouth: untouched
