"""PipelineRunner on a random-weight tiny TCCP pipeline: first-frame restart, the
autoregressive carry, short windows, the 'tracked' rung (stage 1 skipped), batching
and samplers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.runner import PipelineRunner, WindowRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runner():
    return PipelineRunner.random("tiny", latent_size=4)  # 32 px crops: fast on CPU


def _req(runner, n=7, mode="generated", state=None, seed=0, sampler="ddim", k=0):
    rng = np.random.default_rng(k)
    s = runner.size
    return WindowRequest(
        mode=mode, steps=1, sampler=sampler, guidance=1.0, window=8,
        contexts=rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
        sketches=rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
        mel=rng.standard_normal((n, 16, 80)).astype(np.float32),
        identity=rng.integers(0, 256, (s, s, 3), dtype=np.uint8),
        state=state, seed=seed,
    )


def test_restart_then_continue_carries_the_last_frame(runner):
    s = runner.size
    first = runner.run_batch([_req(runner)])[0]
    assert first.faces.shape == (7, s, s, 3) and first.faces.dtype == np.uint8
    st = first.state
    assert s == 32 and st.face.shape == st.sketch.shape == st.context.shape == (32, 4, 4)
    assert st.mel.shape == (16, 80)
    again = runner.run_batch([_req(runner)])[0]
    assert np.array_equal(first.faces, again.faces)  # seeded: reproducible
    # the carried face latent is exactly what frame 6 decodes from
    decoded = runner.pipeline.decode(st.face[:, None][None])[0, 0].cpu().numpy()
    # (a batched vs a single decode may round a pixel differently)
    assert np.abs(decoded.astype(int) - first.faces[6].astype(int)).max() <= 1
    nxt = runner.run_batch([_req(runner, state=st, k=1)])[0]
    assert nxt.faces.shape == (7, s, s, 3)
    assert first.stage1_s > 0 and first.stage2_s > 0


def test_short_window_is_padded_and_trimmed(runner):
    res = runner.run_batch([_req(runner, n=3)])[0]
    assert res.faces.shape[0] == 3


def test_tracked_mode_uses_the_tracked_sketches(runner):
    req = _req(runner, mode="tracked")
    res = runner.run_batch([req])[0]
    enc = runner.pipeline.autoencoder.encode_images(req.sketches[-1:])[0]
    assert torch.allclose(res.state.sketch.float(), enc.float(), atol=1e-4)


def test_batched_requests_get_their_own_results(runner):
    a, b = _req(runner, n=7, k=2), _req(runner, n=4, k=3)
    assert runner.batch_key(a) == runner.batch_key(b)
    ra, rb = runner.run_batch([a, b])
    assert ra.faces.shape[0] == 7 and rb.faces.shape[0] == 4
    assert ra.batch == rb.batch == 2
    assert not np.array_equal(ra.faces[:4], rb.faces)
    # a cached identity latent replaces the identity image
    r1 = runner.run_batch([_req(runner, n=2, k=2)])[0]
    cached = _req(runner, n=2, k=2)
    cached.identity = np.zeros_like(cached.identity)
    cached.identity_latent = r1.identity_latent
    assert np.array_equal(runner.run_batch([cached])[0].faces, r1.faces)


@pytest.mark.parametrize("sampler", ["dpmpp", "ddpm"])
def test_other_samplers_run(runner, sampler):
    res = runner.run_batch([_req(runner, n=2, sampler=sampler)])[0]
    assert res.faces.shape[0] == 2
