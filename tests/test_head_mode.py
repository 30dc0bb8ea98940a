"""Head mode (`--region head`, TCCP's whole-head setting): stage 1 generating every
sketch point and the head pose from audio + the head-masked context, and stage 2's
whole-head warp. Mechanics on real inputs (the bundled sample) with random-weight tiny
networks; what trained weights do is measured in docs/lipsync.md and docs/faces.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.runner import PipelineRunner, SessionRefs, WindowRequest
from tccp.errors import TCCPError
from tccp.face import geometry as fg
from tccp.face import headframe as hf
from tccp.face.context import CONTEXT_DIM, context_tokens, masked_context, mirror_tokens
from tccp.face.sketch import SKETCH_INDICES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sample():
    from tccp.face.track import FaceTracker
    from tccp.media import io as media

    video, _ = media.sample_paths()
    c = media.load_clip(video, max_frames=16)
    with FaceTracker() as tr:
        track = tr.track(c.frames)
    return c, track


def test_context_tokens_hide_the_head_and_mirror_with_the_image(sample):
    c, track = sample
    ctx = np.stack([masked_context(f, lm, b, 128) for f, lm, b in zip(c.frames, track.landmarks, track.context_boxes)])
    # the head is greyed out: the crop's centre (where the face is) is flat grey
    assert np.abs(ctx[:, 60:68, 60:68].astype(int) - fg.MASK_GREY).max() <= 2
    tok = context_tokens(ctx)
    assert tok.shape == (len(ctx), CONTEXT_DIM) and tok.dtype == np.float32 and np.abs(tok).max() <= 1.0
    np.testing.assert_allclose(mirror_tokens(tok), context_tokens(np.ascontiguousarray(ctx[:, :, ::-1])), atol=2 / 127.5)


def test_mirrored_pose_is_the_pose_of_the_mirrored_face(sample):
    from engine.runner import default_template
    from tccp.data.landmarks import mirror_pose

    _, track = sample
    t = default_template()
    size = 128
    meshes = np.stack([fg.to_crop_coords(lm, b, size) for lm, b in zip(track.landmarks, track.face_boxes)])
    _, pose = hf.to_head(meshes, t)
    p = pose.params()
    p[:, 2:] /= size
    perm = hf.mirror_permutation(t, SKETCH_INDICES)
    flipped = meshes[:, perm] * np.array([-1.0, 1.0]) + np.array([size, 0.0])
    _, pose_m = hf.to_head(flipped, t)
    pm = pose_m.params()
    pm[:, 2:] /= size
    got = mirror_pose(p)
    assert np.abs(got[:, [0, 2, 3]] - pm[:, [0, 2, 3]]).max() < 0.02
    assert np.abs(np.degrees(got[:, 1] - pm[:, 1])).max() < 1.5  # the template is only nearly symmetric


def test_head_mode_training_windows_carry_pose_and_context():
    from engine.runner import default_template
    from tccp.data.landmarks import LandmarkClip, LandmarkWindows
    from tccp.models.landmarks import LandmarkCodec

    t = default_template()
    codec = LandmarkCodec(t, "head")
    rng = np.random.default_rng(0)
    n = 40
    heads = np.repeat(t[None], n, 0) + rng.normal(0, 0.005, (n, 478, 2)).astype(np.float32)
    pose = np.tile(np.array([-3.7, 0.0, 0.5, 0.4], np.float32), (n, 1))
    pose[:, 1] = np.linspace(-0.1, 0.1, n)
    feats = {"full": rng.normal(size=(2 * n + 10, 5, 16)).astype(np.float16)}
    clip = LandmarkClip("x", heads, pose, {"full": np.ones(n, np.float32)}, feats, t, np.zeros(n, bool),
                        rng.uniform(-1, 1, (n, CONTEXT_DIM)).astype(np.float32))
    from tccp.data.landmarks import LandmarkDataConfig

    data = LandmarkWindows([clip], codec, LandmarkDataConfig(mix={"full": 1.0}, p_mirror=0.0))
    b = data.sample(3)
    assert b["x"].shape == (3, 8, 2 * len(SKETCH_INDICES) + 4) and b["cv"].shape == (3, 8, CONTEXT_DIM)
    assert b["x"][:, :, -3].abs().max() > 0  # the angle moves with the clip's, relative to the references
    with pytest.raises(ValueError, match="context"):
        LandmarkWindows([LandmarkClip("x", heads, pose, {"full": np.ones(n, np.float32)}, feats, t,
                                      np.zeros(n, bool))], codec)
    with pytest.raises(ValueError, match="context"):
        codec.control(heads)


@pytest.fixture(scope="module")
def head_runner(sample):
    from engine.refs import BankBuilder
    from tccp.models.landmarks import LandmarkCodec, LandmarkNet, LandmarkNetConfig
    from tccp.pipelines.landmarks import LandmarkGenerator

    runner = PipelineRunner.random(size=64, stage2=False)
    torch.manual_seed(1)
    codec = LandmarkCodec(runner.template, "head")
    net = LandmarkNet(LandmarkNetConfig(mode="head", gen_dim=codec.gen_dim, cv_dim=codec.cv_dim, ref_dim=codec.ref_dim,
                                        width=32, depth=1, control_depth=1, heads=2)).requires_grad_(False)
    with torch.no_grad():
        net.out[1].weight.mul_(0.01)  # random but small motion: a head that stays near the references'
    runner.pipeline.stage1_head = LandmarkGenerator(net.eval(), codec)
    c, track = sample
    s = runner.size
    crops = np.stack([fg.crop(f, b, s) for f, b in zip(c.frames, track.face_boxes)])
    meshes = np.stack([fg.to_crop_coords(lm, b, s) for lm, b in zip(track.landmarks, track.face_boxes)])
    bank = BankBuilder.from_frames(c.frames, track.landmarks, track.face_boxes, runner.template, 4, s).bank
    ctx = context_tokens(np.stack([masked_context(f, lm, b, 128) for f, lm, b in
                                   zip(c.frames, track.landmarks, track.context_boxes)]))
    return runner, {"crops": crops, "meshes": meshes.astype(np.float32), "bank": bank, "contexts": ctx}


def _req(clip, start=0, n=7, mode="generated", state=None, refs=None, region="head"):
    sl = slice(start, start + n)
    return WindowRequest(
        mode=mode, steps=0, sampler="ddim", guidance=1.0, window=8, crops=clip["crops"][sl],
        meshes=clip["meshes"][sl], tokens=np.zeros((n, 10, 5 * 384), np.float32), vad=np.ones(n, np.float32),
        mel=np.zeros((n, 16, 80), np.float32), refs=refs or SessionRefs(clip["bank"]), state=state,
        region=region, contexts=clip["contexts"][sl])


def test_head_region_generates_pose_and_edits_only_the_head(head_runner):
    runner, clip = head_runner
    res = runner.run_batch([_req(clip)])[0]
    s = runner.size
    assert res.faces.shape == (7, s, s, 3) and res.masks.shape == (7, s, s)
    # the whole head is edited: eyes and forehead too (the mouth region keeps them)
    for k in range(7):
        for i in (33, 263, 10, 152):
            x, y = np.clip(np.round(res.targets[k, i]).astype(int), 0, s - 1)
            assert res.masks[k, y, x] > 0.5, (k, i)
    # outside the region the crop is the source's
    out = res.masks < 1e-4
    assert np.array_equal(res.faces[out], clip["crops"][:7][out])
    # the head pose is generated, not the source's: targets differ from the tracked
    # points also where mouth mode would keep them (eye corners)
    assert np.abs(res.targets[:, [33, 263]] - clip["meshes"][:7, [33, 263]]).max() > 0.05
    nxt = runner.run_batch([_req(clip, start=7, state=res.state)])[0]
    assert nxt.faces.shape[0] == 7 and res.state.cv.shape == (CONTEXT_DIM,)


def test_head_region_with_tracked_landmarks_warps_the_reference_onto_them(head_runner):
    runner, clip = head_runner
    from tccp.pipelines.heads import EYES

    res = runner.run_batch([_req(clip, mode="tracked")])[0]
    rest = [i for i in SKETCH_INDICES if i not in EYES]
    np.testing.assert_allclose(res.targets[:, rest], clip["meshes"][:7, rest], atol=1e-3)
    # the eyes are the chosen reference's own (in the head frame): a reference with open
    # eyes is never squashed onto closing lids
    t = runner.template
    _, pose = hf.to_head(clip["meshes"][:7], t)
    ref, _ = hf.to_head(clip["bank"].meshes[res.ref_index], t)
    np.testing.assert_allclose(res.targets[:, list(EYES)], hf.to_image(ref, pose)[:, list(EYES)], atol=1e-2)
    assert (res.masks > 0.5).mean() > 0.2  # a head, not a mouth


def test_align_moves_what_lies_around_the_face_with_the_head(sample):
    """A reference that stands elsewhere in the crop: with `align` a point beside the
    face (an earring, hair) lands where the head's similarity puts it; without it the
    anchor ring pins it in place."""
    from tccp.face.warp import triangulate, warp_image

    c, track = sample
    src = fg.to_crop_coords(track.landmarks[0], track.face_boxes[0], 256).astype(np.float64)
    ang, sc, shift = 0.12, 1.08, np.array([9.0, -6.0])
    ctr = src.mean(0)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]]) * sc
    dst = (src - ctr) @ rot.T + ctr + shift
    tri = triangulate(src, SKETCH_INDICES)
    p = src[234] + (src[234] - src[454]) * 0.12  # beside the face, past the left cheek
    q = (p - ctr) @ rot.T + ctr + shift
    yy, xx = np.mgrid[0:256, 0:256]
    img = np.exp(-(((xx + 0.5 - p[0]) ** 2 + (yy + 0.5 - p[1]) ** 2) / (2 * 2.0 ** 2))).astype(np.float32)

    def centre(out):
        ys, xs = np.nonzero(out > 0.05)
        w = out[ys, xs]
        return np.array([(xs * w).sum(), (ys * w).sum()]) / w.sum() + 0.5

    assert np.linalg.norm(centre(warp_image(img, tri, src, dst, align=True)) - q) < 1.0
    assert np.linalg.norm(centre(warp_image(img, tri, src, dst)) - q) > 2.0


def test_pack_round_trip_with_a_head_stage1_and_a_one_line_error_without(tmp_path):
    from engine.model import check_region
    from tccp.models.landmarks import LandmarkCodec, LandmarkNet, LandmarkNetConfig
    from tccp.pack import load_pack, save_pack

    runner = PipelineRunner.random(size=64, stage2=False)
    pipe = runner.pipeline
    hc = LandmarkCodec(runner.template, "head")
    hn = LandmarkNet(LandmarkNetConfig(mode="head", gen_dim=hc.gen_dim, cv_dim=hc.cv_dim, ref_dim=hc.ref_dim,
                                       width=32, depth=1, control_depth=1, heads=2))
    with_head = save_pack(tmp_path / "with", pipe.stage1.net, pipe.stage1.codec, None, stage1_head=(hn, hc))
    without = save_pack(tmp_path / "without", pipe.stage1.net, pipe.stage1.codec, None)
    loaded = load_pack(with_head, with_autoencoder=False)
    assert loaded.stage1_head is not None and loaded.stage1_head.codec.mode == "head"
    for k, v in hn.state_dict().items():
        torch.testing.assert_close(loaded.stage1_head.net.state_dict()[k], v.half().float())
    assert check_region(PipelineRunner(loaded), "head") == "head"
    bare = PipelineRunner(load_pack(without, with_autoencoder=False))
    with pytest.raises(TCCPError, match="no head-mode stage 1") as e:
        check_region(bare, "head")
    assert "\n" not in str(e.value)
    assert check_region(bare, "head", landmarks="tracked") == "head"  # the tracked head needs no stage 1
    # the pack records the encoder each network reads; the engine runs one, so a pack
    # whose two networks read different encoders is refused when written
    from tccp.pack import read_pack_config

    cfg = read_pack_config(with_head)
    assert cfg["stage1"]["audio"]["name"] == cfg["stage1_head"]["audio"]["name"] == "tiny.en"
    hn.cfg.audio_encoder = "base"
    with pytest.raises(TCCPError, match="one encoder") as e:
        save_pack(tmp_path / "mixed", pipe.stage1.net, pipe.stage1.codec, None, stage1_head=(hn, hc))
    assert "\n" not in str(e.value) and not (tmp_path / "mixed").exists()


def test_run_region_head_without_a_head_stage1_is_one_line_and_writes_nothing(tmp_path, capfd):
    from tccp.cli import main as cli_main
    from tccp.media.io import sample_paths
    from tccp.pack import save_pack

    runner = PipelineRunner.random(size=64, stage2=False)
    pack = save_pack(tmp_path / "pack", runner.pipeline.stage1.net, runner.pipeline.stage1.codec, None)
    out = tmp_path / "out.mp4"
    video, speech = sample_paths()
    code = cli_main(["run", "--video", str(video), "--audio", str(speech), "--out", str(out), "--model", str(pack),
                     "--region", "head", "--max-seconds", "1", "--quiet"])
    lines = [x for x in capfd.readouterr().err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "no head-mode stage 1" in lines[0], lines
    assert not out.exists()


def test_export_pack_carries_a_packs_stages_including_the_head_stage1(tmp_path):
    from safetensors.torch import load_file

    from tccp.models.landmarks import LandmarkCodec, LandmarkNet, LandmarkNetConfig
    from tccp.pack import read_pack_config, save_pack
    from tccp.training.trainer import export_pack

    runner = PipelineRunner.random(size=64)
    pipe = runner.pipeline
    hc = LandmarkCodec(runner.template, "head")
    hn = LandmarkNet(LandmarkNetConfig(mode="head", gen_dim=hc.gen_dim, cv_dim=hc.cv_dim, ref_dim=hc.ref_dim,
                                       width=32, depth=1, control_depth=1, heads=2))
    a = save_pack(tmp_path / "a", pipe.stage1.net, pipe.stage1.codec, pipe.stage2.model, stage1_head=(hn, hc),
                  crop_size=64, articulation=1.3)
    b = export_pack(a, a, tmp_path / "b")
    for name in ("stage1", "stage2", "stage1_head"):
        x, y = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), name
    ca, cb = read_pack_config(a), read_pack_config(b)
    assert {k: v for k, v in ca.items() if k != "card"} == {k: v for k, v in cb.items() if k != "card"}


def test_references_caught_mid_blink_are_not_used_for_the_head(sample):
    from tccp.pipelines.heads import eye_openness, open_eyes

    _, track = sample
    meshes = np.repeat(track.landmarks[:1].astype(np.float64), 4, 0)
    blink = meshes[2]
    for up, down in ((159, 145), (386, 374)):
        mid = (blink[up] + blink[down]) / 2
        blink[up], blink[down] = mid + 0.1 * (blink[up] - mid), mid + 0.1 * (blink[down] - mid)
    o = eye_openness(meshes)
    assert o[2] < 0.2 * o[0]
    assert open_eyes(meshes).tolist() == [True, True, False, True]
    assert open_eyes(meshes[2:3]).all()  # never an empty choice


def test_bundled_pack_runs_the_head_region_end_to_end(tmp_path, capfd):
    """`tccp run --region head` with the bundled pack on the sample: the eyes are edited
    (whole head) where mouth mode keeps them as the source has them."""
    from tccp.cli import main as cli_main
    from tccp.media import io as media
    from tccp.metrics.evaluate import track_frames

    video, speech = media.sample_paths()
    diffs = {}
    for region in ("mouth", "head"):
        out = tmp_path / f"{region}.mp4"
        assert cli_main(["run", "--video", str(video), "--audio", str(speech), "--out", str(out), "--region", region,
                         "--max-seconds", "1.2", "--quiet"]) == 0
        got = media.read_video(out).frames
        src = media.read_video(video, max_frames=len(got)).frames
        t = track_frames(src)
        d = []
        for k in range(8, len(got)):
            lm = t.landmarks[k]
            x0, y0 = np.floor(lm[[33, 263, 159, 386]].min(0)).astype(int) - 4
            x1, y1 = np.ceil(lm[[33, 263, 145, 374]].max(0)).astype(int) + 4
            d.append(np.abs(got[k, y0:y1, x0:x1].astype(float) - src[k, y0:y1, x0:x1].astype(float)).mean())
        diffs[region] = float(np.mean(d))
    capfd.readouterr()
    assert diffs["mouth"] < 6.0  # the codec's own change (~3 levels)
    assert diffs["head"] > 3 * diffs["mouth"], diffs  # ~35 levels: another picture of the eyes


def test_head_with_hair_takes_the_hair_not_the_neck_or_background(sample):
    from tccp.face.segment import PersonSegmenter, head_with_hair

    c, track = sample
    s = 128
    box = track.face_boxes[0]
    crop = fg.crop(c.frames[0], box, s)
    mesh = fg.to_crop_coords(track.landmarks[0], box, s).astype(np.float64)
    seg = PersonSegmenter()
    try:
        m = head_with_hair(seg(crop), mesh)
    finally:
        seg.close()
    up = mesh[10] - mesh[152]

    def at(p):
        x, y = np.clip(np.round(p).astype(int), 0, s - 1)
        return float(m[y, x])

    assert at(mesh[10] + 0.12 * up) > 0.5  # hair above the forehead, beyond the face mesh
    assert at(mesh[152] - 0.2 * up) == 0.0  # the neck stays the source's
    assert m[:4, :4].max() == 0.0 and m[:4, -4:].max() == 0.0  # background corners


def test_the_hair_feather_stays_inside_the_hair():
    from tccp.pipelines.heads import _inner_feather

    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 20:44] = 1.0
    soft = _inner_feather(mask, 2.0)
    assert soft[mask == 0].max() < 0.02  # no halo of the reference's background
    assert soft[32, 32] > 0.99


def test_the_head_warp_does_not_stretch_a_closed_reference_open(sample, monkeypatch):
    """Head mode chooses its reference with mouth mode's gap rules: for a target that
    opens wide, a closed reference sitting where the target's lips sit (nearest by
    shape) is ruled out for an open one; without the rules it is the one drawn."""
    import tccp.pipelines.faces as faces
    from engine.runner import default_template
    from tccp.face.geometry import LOWER_INNER
    from tccp.pipelines.faces import ReferenceBank
    from tccp.pipelines.heads import HeadWarper

    c, track = sample
    s = 64
    t = default_template().astype(np.float32)
    crop = fg.crop(c.frames[0], track.face_boxes[0], s)
    mesh = fg.to_crop_coords(track.landmarks[0], track.face_boxes[0], s).astype(np.float32)
    head, pose = hf.to_head(mesh[None], t)
    lower = list(LOWER_INNER[1:-1]) + [146, 91, 181, 84, 17, 314, 405, 321, 375]

    def opened(dy: float, dx: float = 0.0) -> np.ndarray:
        h = head.copy()
        h[0, lower, 1] += dy
        h[0, list(hf.LIPS), 0] += dx
        return hf.to_image(h, pose)[0]

    closed, wide = opened(-0.07), opened(0.10, dx=0.1)
    bank = ReferenceBank.build(np.stack([crop, crop]), np.stack([closed, wide]), t)
    target = opened(0.06)[None]
    warper = HeadWarper(t, s)
    assert warper.inputs(crop[None], target, mesh[None], bank)["ref"].tolist() == [1]
    monkeypatch.setattr(faces, "REF_MAX_DEFICIT", None)
    assert warper.inputs(crop[None], target, mesh[None], bank)["ref"].tolist() == [0]
