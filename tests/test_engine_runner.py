"""PipelineRunner on random-weight tiny models (mechanics, not quality) with real
inputs: the bundled sample's tracked face crops, Whisper tokens and a reference bank.
First-frame restart, the autoregressive carry, short windows, the 'tracked' mode,
batching, samplers, the warp-only rung and the mouth-opening factor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.runner import PipelineRunner, SessionRefs, WindowRequest
from tccp.face import geometry as fg
from tccp.face import headframe as hf

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runner():
    return PipelineRunner.random(size=64)


@pytest.fixture(scope="module")
def clip(runner):
    from engine.refs import BankBuilder
    from tccp.face.track import FaceTracker
    from tccp.media import io as media
    from tccp.media.whisper import frame_tokens, full_features

    video, speech = media.sample_paths()
    c = media.load_clip(video, max_frames=40)
    with FaceTracker() as tr:
        track = tr.track(c.frames)
    s = runner.size
    crops = np.stack([fg.crop(f, b, s) for f, b in zip(c.frames, track.face_boxes)])
    meshes = np.stack([fg.to_crop_coords(lm, b, s) for lm, b in zip(track.landmarks, track.face_boxes)])
    feats = full_features(runner.pipeline.whisper, c.audio)
    tokens = frame_tokens(feats, 0, len(crops)).astype(np.float32)
    bank = BankBuilder.from_frames(c.frames, track.landmarks, track.face_boxes, runner.template, 4, s).bank
    return {"crops": crops, "meshes": meshes.astype(np.float32), "tokens": tokens, "bank": bank}


def _req(runner, clip, start=0, n=7, mode="generated", state=None, seed=0, sampler="ddim", steps=1,
         mouth_scale=1.0, refs=None):
    sl = slice(start, start + n)
    return WindowRequest(
        mode=mode, steps=steps, sampler=sampler, guidance=1.0, window=8,
        crops=clip["crops"][sl], meshes=clip["meshes"][sl], tokens=clip["tokens"][sl],
        vad=np.ones(n, np.float32), mel=np.zeros((n, 16, 80), np.float32),
        refs=refs or SessionRefs(clip["bank"]), state=state, seed=seed, mouth_scale=mouth_scale,
    )


def test_restart_then_continue_carries_the_last_frame(runner, clip, monkeypatch):
    # the patch as the decoded latent, so that it can be checked against the carried latent
    # (with PIXEL_RESIDUAL it is the warp plus the decoded change: test_pipeline.py)
    monkeypatch.setattr("engine.runner.PIXEL_RESIDUAL", False)
    s = runner.size
    first = runner.run_batch([_req(runner, clip)])[0]
    assert first.faces.shape == (7, s, s, 3) and first.faces.dtype == np.uint8
    assert first.masks.shape == (7, s, s) and first.targets.shape == (7, 478, 2)
    st = first.state
    lat = runner.pipeline.stage2.patch
    side = (lat[2] - lat[0]) // 8
    assert st.latent.shape == (32, side, side) and st.x.shape == (runner.pipeline.stage1.codec.gen_dim,)
    again = runner.run_batch([_req(runner, clip)])[0]
    assert np.array_equal(first.faces, again.faces)  # seeded: reproducible
    # outside the region mask the crop is the source's, untouched
    out = first.masks == 0
    assert np.array_equal(first.faces[out], clip["crops"][:7][out])
    assert (first.masks > 0).sum() > 0.05 * first.masks.size
    # the carried latent is exactly what frame 6's patch decodes from
    patch = runner.pipeline.stage2.decode(st.latent[:, None][None])[0, 0]
    x0, y0, x1, y1 = lat
    m = first.masks[6, y0:y1, x0:x1] > 0.999
    assert np.abs(patch[m].astype(int) - first.faces[6, y0:y1, x0:x1][m].astype(int)).max() <= 1
    nxt = runner.run_batch([_req(runner, clip, start=7, state=st)])[0]
    assert nxt.faces.shape == (7, s, s, 3)
    assert first.stage1_s > 0 and first.stage2_s > 0


def test_short_window_is_padded_and_trimmed(runner, clip):
    res = runner.run_batch([_req(runner, clip, n=3)])[0]
    assert res.faces.shape[0] == 3 and res.targets.shape[0] == 3 and len(res.ref_index) == 3


def test_tracked_mode_follows_the_tracked_landmarks(runner, clip):
    res = runner.run_batch([_req(runner, clip, mode="tracked")])[0]
    np.testing.assert_allclose(res.targets, clip["meshes"][:7], atol=1e-3)
    gen = runner.run_batch([_req(runner, clip)])[0]
    assert not np.allclose(gen.targets[:, list(hf.MOUTH)], clip["meshes"][:7][:, list(hf.MOUTH)], atol=1e-2)
    # stage 1 moves only the mouth points; the rest is the source's
    np.testing.assert_allclose(gen.targets[:, list(hf.REST)], clip["meshes"][:7][:, list(hf.REST)], atol=1e-3)


def test_batched_requests_get_their_own_results(runner, clip):
    a, b = _req(runner, clip, n=7, start=0), _req(runner, clip, n=4, start=20)
    assert runner.batch_key(a) == runner.batch_key(b)
    ra, rb = runner.run_batch([a, b])
    assert ra.faces.shape[0] == 7 and rb.faces.shape[0] == 4
    assert ra.batch == rb.batch == 2
    alone = runner.run_batch([_req(runner, clip, n=4, start=20)])[0]
    assert np.abs(alone.faces.astype(int) - rb.faces.astype(int)).max() <= 2


@pytest.mark.parametrize("sampler", ["dpmpp", "ddpm"])
def test_other_samplers_run(runner, clip, sampler):
    res = runner.run_batch([_req(runner, clip, n=2, sampler=sampler)])[0]
    assert res.faces.shape[0] == 2


def test_warp_only_rung_pastes_the_warped_reference(runner, clip):
    res = runner.run_batch([_req(runner, clip, steps=0)])[0]
    editor = runner.pipeline.stage2
    d = editor.inputs(clip["crops"][:7], res.targets, clip["meshes"][:7], clip["bank"])
    x0, y0, x1, y1 = editor.patch
    m = d["mask"][3] > 0.999
    assert np.abs(res.faces[3, y0:y1, x0:x1][m].astype(int) - d["warped"][3][m].astype(int)).max() <= 1
    assert res.state.latent is None  # nothing to carry: the next window restarts stage 2
    nxt = runner.run_batch([_req(runner, clip, start=7, state=res.state)])[0]
    assert nxt.faces.shape[0] == 7


def test_mouth_scale_acts_on_the_coordinates(runner, clip):
    aps = {}
    for scale in (0.0, 1.0, 2.0):
        res = runner.run_batch([_req(runner, clip, mode="tracked", mouth_scale=scale, steps=0)])[0]
        aps[scale] = float(hf.aperture(res.targets).mean())
    assert aps[0.0] < aps[1.0] < aps[2.0]
    assert aps[2.0] > 1.5 * aps[1.0] - 0.01


def test_silence_motion_sets_how_much_of_the_mouth_moves_in_silence(runner, clip):
    """In silence (voice activity 0) the gate keeps `silence_motion` of the generated
    lips' motion about the rest mouth: 0 rests them, 1 keeps all of it (as with the
    gate off), the default (None) GATE_FLOOR of it; nothing but the mouth changes."""
    from tccp.pipelines.landmarks import GATE_FLOOR

    def run(**kw):
        req = _req(runner, clip, steps=0)
        req.vad = np.zeros(req.n, np.float32)
        for k, v in kw.items():
            setattr(req, k, v)
        return runner.run_batch([req])[0].targets

    rest, full, off, default = run(silence_motion=0.0), run(silence_motion=1.0), run(gate=False), run()
    np.testing.assert_allclose(full, off, atol=1e-4)
    mouth = list(hf.MOUTH)
    assert np.abs(full[:, mouth] - rest[:, mouth]).max() > 0.05  # the untrained net moves the lips
    np.testing.assert_allclose(default[:, mouth] - rest[:, mouth], GATE_FLOOR * (full[:, mouth] - rest[:, mouth]),
                               atol=1e-3)
    others = [i for i in range(default.shape[1]) if i not in set(mouth)]
    np.testing.assert_allclose(default[:, others], rest[:, others], atol=1e-5)


def test_pack_articulation_scales_generated_lips_only(runner, clip):
    """`stage1.articulation` of a pack's config multiplies --mouth-scale on generated
    lips (the bundled pack's 1.25 undoes stage 1's damping) and leaves tracked ones."""
    pipe = runner.pipeline
    saved = getattr(pipe, "pack_config", None)
    try:
        pipe.pack_config = {"stage1": {"articulation": 2.0}}
        assert runner.articulation == 2.0
        gain2 = runner.run_batch([_req(runner, clip, steps=0)])[0].targets
        tracked2 = runner.run_batch([_req(runner, clip, mode="tracked", steps=0)])[0].targets
        pipe.pack_config = {"stage1": {}}
        assert runner.articulation == 1.0
        scale2 = runner.run_batch([_req(runner, clip, steps=0, mouth_scale=2.0)])[0].targets
        plain = runner.run_batch([_req(runner, clip, steps=0)])[0].targets
        tracked1 = runner.run_batch([_req(runner, clip, mode="tracked", steps=0)])[0].targets
    finally:
        pipe.pack_config = saved
    np.testing.assert_allclose(gain2, scale2, atol=1e-4)
    assert np.abs(gain2 - plain).max() > 0.05
    np.testing.assert_allclose(tracked2, tracked1, atol=1e-6)


def test_audio_window_follows_the_stage1_network(runner, clip):
    """A stage 1 trained with a wider audio window (+-4 frames, 18 tokens) gets that
    window from the engine's feature maker and runs through the runner."""
    from engine.align import AudioBuffer
    from tccp.media import io as media
    from tccp.models.landmarks import LandmarkNet, audio_radius, audio_tokens_for

    stage1 = runner.pipeline.stage1
    old = stage1.net
    cfg = type(old.cfg).from_dict({**old.cfg.to_dict(), "audio_tokens": audio_tokens_for(4)})
    torch.manual_seed(0)
    stage1.net = LandmarkNet(cfg).eval()
    try:
        assert audio_radius(stage1.net.cfg) == 4
        feats = runner.audio_features(live=False)
        video, _ = media.sample_paths()
        c = media.load_clip(video, max_frames=8)
        buf = AudioBuffer(c.sr)
        buf.push(c.audio, 0.0)
        tok, vad = feats.for_frames(buf, np.arange(7) / 25.0)
        assert tok.shape[:2] == (7, 18)
        req = _req(runner, clip, steps=0)
        req.tokens = tok
        res = runner.run_batch([req])[0]
        assert res.targets.shape == (7, 478, 2) and np.isfinite(res.targets).all()
    finally:
        stage1.net = old


def test_generated_jaw_keeps_the_source_cheek_line(runner, clip, monkeypatch):
    """Mouth mode: the generated targets' jaw contour ends (by the ears) are the source's
    own tracked points (`tccp.face.mouth.keep_jaw_sides`); without the rule the random
    network's jaw lands elsewhere, so the test tells the two apart."""
    from tccp.face import mouth

    ends = [hf.JAW[0], hf.JAW[-1]]
    src = clip["meshes"][:7][:, ends]
    kept = runner.run_batch([_req(runner, clip, steps=0)])[0].targets
    np.testing.assert_allclose(kept[:, ends], src, atol=1e-3)
    monkeypatch.setattr(mouth, "JAW_SIDES", False)
    free = runner.run_batch([_req(runner, clip, steps=0)])[0].targets
    assert np.abs(free[:, ends] - src).max() > 0.5  # crop px
    np.testing.assert_allclose(free[:, 152], kept[:, 152], atol=1e-3)  # the chin is generated either way
