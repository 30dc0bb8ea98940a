"""Stage 1 in coordinates: the head frame, the landmark network and its training.

What the issue asks of stage 1, tested on small models: shapes in both modes, slot 0
returned exactly, per-frame cross-attention (frame j's audio cannot reach frame i's
cross-attention output), the control branch starts as a no-op, one batch can be
overfitted, and a trained tiny model rests the mouth in silence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tccp.diffusion.schedule import Schedule
from tccp.face import headframe as hf
from tccp.models.landmarks import LandmarkCodec, LandmarkNet, LandmarkNetConfig
from tccp.face.mouth import scale_opening
from tccp.pipelines.landmarks import GATE_FLOOR, LandmarkGenerator, apply_gate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LA, LAYERS, WIDTH = 10, 5, 16


def _template() -> np.ndarray:
    from engine.runner import default_template

    return default_template()


def _net(mode: str = "mouth", objective: str = "regress", seed: int = 0) -> tuple[LandmarkNet, LandmarkCodec]:
    codec = LandmarkCodec(_template(), mode)
    torch.manual_seed(seed)
    cfg = LandmarkNetConfig(mode=mode, gen_dim=codec.gen_dim, cv_dim=codec.cv_dim, ref_dim=codec.ref_dim,
                            audio_layers=LAYERS, audio_width=WIDTH, width=32, depth=2, control_depth=1, heads=2,
                            objective=objective, dropout=0.0)
    return LandmarkNet(cfg), codec


def _inputs(net: LandmarkNet, b: int = 2, n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = net.cfg
    return dict(
        audio=torch.randn(b, n, LA, LAYERS * WIDTH, generator=g), vad=torch.rand(b, n, generator=g),
        refs=torch.randn(b, 4, c.ref_dim, generator=g), cv=torch.randn(b, n, c.cv_dim, generator=g),
        x=torch.randn(b, n, c.gen_dim, generator=g),
    )


def test_head_frame_roundtrip_and_pose():
    t = _template()
    rng = np.random.default_rng(0)
    a = 120 * np.exp(1j * 0.3)
    img = hf.apply_similarity(np.full(3, a), np.full(3, 40 + 30j), np.repeat(t[None], 3, 0))
    img = img + rng.normal(0, 0.2, img.shape).astype(np.float32)
    heads, pose = hf.to_head(img, t)
    np.testing.assert_allclose(hf.to_image(heads, pose), img, atol=1e-3)
    # the similarity is removed: head-frame points sit on the template (up to the noise)
    assert np.abs(heads[:, list(hf.STABLE)] - t[list(hf.STABLE)]).max() < 0.01
    back = hf.Pose.from_params(pose.params())
    np.testing.assert_allclose(back.a, pose.a, rtol=1e-5)
    # head mode's unit (position / crop size) round-trips, and only the position scales
    p128 = pose.params(128.0)
    np.testing.assert_allclose(p128[:, :2], pose.params()[:, :2])
    np.testing.assert_allclose(p128[:, 2:] * 128.0, pose.params()[:, 2:], rtol=1e-5)
    back = hf.Pose.from_params(p128, 128.0)
    np.testing.assert_allclose(back.b, pose.b, rtol=1e-4)
    assert len(hf.MOUTH) == 57 and not set(hf.MOUTH) & set(hf.REST)


@pytest.mark.parametrize("mode", ["mouth", "head"])
def test_shapes_in_both_modes(mode):
    net, codec = _net(mode)
    d = _inputs(net)
    ctx = net.condition_tokens(d["audio"], d["vad"], d["refs"])
    assert ctx.shape == (2, 8, LA + 4, 32)
    out = net(d["x"], torch.zeros(2, dtype=torch.long), ctx, d["cv"], torch.zeros(2, 8))
    assert out.shape == (2, 8, codec.gen_dim)
    assert codec.gen_dim == (114 if mode == "mouth" else 2 * 160 + 4)


@pytest.mark.parametrize("objective", ["regress", "v"])
def test_slot0_is_returned_exactly(objective):
    net, codec = _net(objective=objective)
    gen = LandmarkGenerator(net, codec, Schedule(prediction="v"), steps=3)
    t = _template()
    refs = gen.references(np.repeat(t[None], 4, 0))
    d = _inputs(net, b=1)
    prev = np.random.default_rng(1).standard_normal((1, codec.gen_dim)).astype(np.float32)
    out = gen.window(d["audio"].numpy(), d["vad"].numpy(), d["cv"].numpy(), [refs], prev)
    np.testing.assert_array_equal(out[:, 0], prev)
    assert out.shape == (1, 8, codec.gen_dim)


def test_frame_j_audio_does_not_reach_frame_i_cross_attention():
    net, _ = _net()
    net.eval()
    d = _inputs(net, b=1)
    ctx = net.condition_tokens(d["audio"], d["vad"], d["refs"])
    audio2 = d["audio"].clone()
    audio2[:, 5] = torch.randn_like(audio2[:, 5])  # change frame 5's audio only
    ctx2 = net.condition_tokens(audio2, d["vad"], d["refs"])
    h = torch.randn(1, 8, 32)
    blk = net.blocks[0]
    a, b = blk.cross(h, ctx), blk.cross(h, ctx2)
    changed = (a - b).abs().amax(-1)[0]
    assert changed[5] > 1e-4
    assert torch.all(changed[[0, 1, 2, 3, 4, 6, 7]] == 0)


def test_control_branch_starts_as_a_no_op():
    net, _ = _net()
    net.eval()
    d = _inputs(net)
    ctx = net.condition_tokens(d["audio"], d["vad"], d["refs"])
    t = torch.zeros(2, dtype=torch.long)
    with_cv = net(d["x"], t, ctx, d["cv"], torch.zeros(2, 8))
    without = net(d["x"], t, ctx, None, torch.zeros(2, 8))
    other_cv = net(d["x"], t, ctx, d["cv"] * 5 + 1, torch.zeros(2, 8))
    assert torch.equal(with_cv, without) and torch.equal(with_cv, other_cv)


@pytest.mark.parametrize("objective", ["regress", "v"])
def test_overfits_one_batch(objective):
    from tccp.training.landmarks import LandmarkTrainConfig, _loss

    net, _ = _net(objective=objective, seed=3)
    d = _inputs(net, b=4, seed=5)
    batch = {"x": d["x"] * 0.5, "audio": d["audio"], "vad": d["vad"], "refs": d["refs"], "cv": d["cv"],
             "flags": torch.tensor([[1.0] + [0.0] * 7] * 4)}
    sched = Schedule(prediction="v")
    cfg = LandmarkTrainConfig(cond_dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = _loss(net, batch, sched, cfg, torch.Generator().manual_seed(0)).item()
    for _ in range(150):
        loss = _loss(net, batch, sched, cfg, torch.Generator().manual_seed(0))  # one batch: same t, same noise
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = _loss(net, batch, sched, cfg, torch.Generator().manual_seed(0)).item()
    assert last < 0.1 * first


def test_motion_loss_and_audio_mask_options():
    """The training options of docs/lipsync.md ("Where stage 1 stands"): the motion term
    adds the squared error of frame-to-frame steps; a mask of 1 blanks every audio token."""
    from tccp.training.landmarks import LandmarkTrainConfig, _loss

    net, _ = _net(seed=3)
    net.eval()
    d = _inputs(net, b=2, seed=5)
    batch = {"x": d["x"], "audio": d["audio"], "vad": d["vad"], "refs": d["refs"], "cv": d["cv"],
             "flags": torch.tensor([[1.0] + [0.0] * 7] * 2)}
    sched, g = Schedule(prediction="v"), lambda: torch.Generator().manual_seed(0)
    plain = _loss(net, batch, sched, LandmarkTrainConfig(cond_dropout=0.0), g()).item()
    moved = _loss(net, batch, sched, LandmarkTrainConfig(cond_dropout=0.0, motion_weight=1.0), g()).item()
    assert moved > plain * 1.05
    other = dict(batch, audio=torch.randn_like(batch["audio"]))
    masked = [_loss(net, b, sched, LandmarkTrainConfig(cond_dropout=0.0, audio_mask=1.0), g()).item() for b in (batch, other)]
    assert masked[0] == pytest.approx(masked[1], rel=1e-6)
    assert _loss(net, other, sched, LandmarkTrainConfig(cond_dropout=0.0), g()).item() != pytest.approx(plain, rel=1e-6)


def test_silence_rests_the_mouth_on_a_trained_tiny_model():
    """A tiny model trained for a few seconds on synthetic data where speech (vad 1,
    audio tokens with energy) opens the mouth by a random amount and silence (vad 0,
    zero tokens) closes it: in silence its mouth is closed, with the gate off."""
    from tccp.training.landmarks import LandmarkTrainConfig, _loss

    net, codec = _net(seed=7)
    t = _template()
    rest = t.copy()
    gen = LandmarkGenerator(net, codec, Schedule(prediction="v"))
    refs = gen.references(np.repeat(rest[None], 4, 0))
    rng = np.random.default_rng(0)
    lower = [i for i in hf.MOUTH if rest[i, 1] > rest[14, 1] - 1e-6]

    def batch(b=32):
        speech = rng.random((b, 8)) < 0.5
        amount = rng.uniform(0.05, 0.15, (b, 8)) * speech
        heads = np.repeat(rest[None, None], 8, 1).repeat(b, 0)
        heads[:, :, lower, 1] += amount[..., None]
        x = np.stack([codec.encode(h, refs.anchor) for h in heads])
        audio = rng.standard_normal((b, 8, LA, LAYERS * WIDTH)).astype(np.float32) * speech[..., None, None]
        flags = np.zeros((b, 8), np.float32)
        return {"x": torch.from_numpy(x), "audio": torch.from_numpy(audio),
                "vad": torch.from_numpy(speech.astype(np.float32)),
                "refs": refs.tokens[None].repeat(b, 1, 1), "cv": torch.from_numpy(
                    np.stack([codec.control(h) for h in heads])), "flags": torch.from_numpy(flags)}

    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = Schedule(prediction="v")
    cfg = LandmarkTrainConfig(cond_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss = _loss(net, batch(), sched, cfg, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    n = 8
    heads = np.repeat(rest[None], n, 0)
    out = gen.window(np.zeros((1, n, LA, LAYERS * WIDTH), np.float32), np.zeros((1, n), np.float32),
                     codec.control(heads)[None], [refs], None)
    meshes, _ = codec.decode(out[0], refs.anchor, heads)
    speaking = gen.window(rng.standard_normal((1, n, LA, LAYERS * WIDTH)).astype(np.float32) * 1.0,
                          np.ones((1, n), np.float32), codec.control(heads)[None], [refs], None)
    open_meshes, _ = codec.decode(speaking[0], refs.anchor, heads)
    rest_ap = hf.aperture(rest[None])[0]  # the template's mouth is slightly open
    opening_silent = hf.aperture(meshes).mean() - rest_ap
    opening_speech = hf.aperture(open_meshes).mean() - rest_ap
    assert opening_speech > 0.03 and abs(opening_silent) < 0.3 * opening_speech


def test_gate_and_mouth_opening_on_coordinates():
    t = _template()
    rest = t.copy()
    heads = np.repeat(t[None], 14, 0)
    lower = [i for i in hf.MOUTH if rest[i, 1] > rest[14, 1] - 1e-6]
    heads[:, lower, 1] += 0.1
    vad = np.array([0.0] * 8 + [1.0] * 5 + [0.3])
    gated = apply_gate(heads, rest, vad, floor=0.0)
    assert np.allclose(gated[2:8, list(hf.MOUTH)], rest[list(hf.MOUTH)])  # a silent stretch: at rest
    assert np.allclose(gated[8:], heads[8:])  # speech onset: open at once; 0.3 is not silence
    # the default keeps GATE_FLOOR of the motion in silence, and all of it in speech
    kept = apply_gate(heads, rest, vad)
    move = heads[2:8, lower, 1] - rest[lower, 1]
    np.testing.assert_allclose(kept[2:8, lower, 1] - rest[lower, 1], GATE_FLOOR * move, atol=1e-6)
    assert np.allclose(kept[8:], heads[8:])
    assert np.allclose(kept[:, [i for i in range(478) if i not in set(hf.MOUTH)]],
                       heads[:, [i for i in range(478) if i not in set(hf.MOUTH)]])  # only the mouth moves
    with pytest.raises(ValueError, match="floor"):
        apply_gate(heads, rest, vad, floor=1.5)
    ap = [hf.aperture(scale_opening(heads, rest, s)).mean() for s in (0.0, 1.0, 2.0)]
    np.testing.assert_allclose(ap[0], hf.aperture(rest[None])[0], atol=1e-6)  # 0: the rest mouth
    np.testing.assert_allclose(ap[2] - ap[0], 2 * (ap[1] - ap[0]), rtol=1e-4)  # 2: twice the opening


def test_speed_perturbation_moves_audio_and_landmarks_together(tmp_path):
    """A clip played 1.25x faster: frame j is the source's frame 1.25 j (landmarks
    interpolated) and the audio's events come 1.25x earlier in its Whisper features."""
    from types import SimpleNamespace

    from tccp.data.landmarks import LandmarkClip, speed_clip
    from tccp.media.whisper import full_features, load_whisper

    sr, fps, n = 16000, 25.0, 100
    t = np.arange(4 * sr) / sr
    audio = np.where(((t > 1.0) & (t < 1.4)) | ((t > 2.5) & (t < 2.9)), 0.3 * np.sin(2 * np.pi * 220 * t), 0.0)
    clip = SimpleNamespace(audio=audio.astype(np.float32), fps=fps, name="synthetic",
                           meta={"source": "synthetic", "created": "test"})
    rng = np.random.default_rng(0)
    heads = rng.normal(0, 0.1, (n, hf.N_MESH, 2)).astype(np.float32)
    pose = rng.normal(0, 0.1, (n, 4)).astype(np.float32)
    base = LandmarkClip("synthetic", heads, pose, {}, {}, heads[0], np.zeros(n, bool))
    enc = load_whisper()
    fast = speed_clip(clip, base, 1.25, enc, ("full",), tmp_path)
    assert fast.name == "synthetic@1.25" and fast.n == 80
    np.testing.assert_allclose(fast.heads[8], heads[10], atol=1e-6)  # 8 * 1.25 = 10
    np.testing.assert_allclose(fast.heads[1], 0.75 * heads[1] + 0.25 * heads[2], atol=1e-6)
    np.testing.assert_allclose(fast.pose[4], pose[5], atol=1e-6)
    f = fast.features["full"].astype(np.float32)[:, 0]  # (T50, width): the embedding layer
    assert abs(len(f) - 2 * fast.n) <= 2 and fast.vad["full"].shape == (fast.n,)
    silent = full_features(enc, np.zeros(int(len(audio) / 1.25), np.float32))[:, 0]  # same positions, no sound
    change = np.linalg.norm(f - silent[: len(f)], axis=1)
    burst = np.r_[41:55, 101:115]  # 0.82-1.1 s and 2.02-2.3 s: the bursts at 1.25x speed
    gap = np.r_[62:92]  # 1.24-1.84 s: silent at 1.25x speed (not at 1x: the first burst lasted to 1.4 s)
    assert change[burst].mean() > 1.5 * change[gap].mean()
    again = speed_clip(clip, base, 1.25, None, ("full",), tmp_path)  # from the cache: no encoder needed
    np.testing.assert_array_equal(again.features["full"], fast.features["full"])
    # the cache keys on the encoder: another encoder's features are computed, not served
    import copy

    other = copy.deepcopy(enc)
    other.name = "other"
    speed_clip(clip, base, 1.25, other, ("full",), tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2
