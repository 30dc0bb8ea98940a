"""MVControlNet: shapes, ControlNet zero-init property, frame-wise cross-attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tccp.errors import TCCPError
from tccp.models import MVConfig, MVControlNet, count_flops, count_params, get_config
from tccp.models.blocks import FrameCrossAttention
from tccp.models.conditions import AudioEncoder, IdentityEncoder


def _randomise(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Overwrite every parameter (zero-initialised ones included) with noise, so the
    tests exercise a network whose every path is active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _inputs(cfg: MVConfig, b: int = 2, n: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = cfg.frames if n is None else n
    c, s = cfg.latent_channels, cfg.latent_size
    x = torch.randn(b, c, n, s, s, generator=g)
    mel = torch.randn(b, n, cfg.mel_frames, cfg.mel_bins, generator=g)
    ref = torch.randn(b, c, s, s, generator=g)
    c_v = torch.randn(b, c, n, s, s, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    flags = torch.zeros(b, n)
    if n > 1:
        flags[:, 0] = 1
    return x, t, mel, ref, c_v, flags


@pytest.fixture(scope="module")
def tiny() -> MVConfig:
    return get_config("tiny")


def test_named_configs_and_roundtrip() -> None:
    for name in ("paper", "small", "tiny"):
        cfg = get_config(name)
        assert MVConfig.from_dict(cfg.to_dict()) == cfg
    paper = get_config("paper")
    assert (paper.base_channels, paper.channel_mult, paper.num_res_blocks) == (128, (1, 2, 4), 2)
    assert (paper.cond_dim, paper.time_embed_dim, paper.head_dim) == (128, 128, 64)
    assert paper.attention_levels == (0, 1, 2) and paper.frames == 8 and paper.latent_channels == 32
    with pytest.raises(TCCPError):
        get_config("nope")
    with pytest.raises(TCCPError):
        MVConfig.from_dict({**paper.to_dict(), "bogus": 1})
    with pytest.raises(TCCPError):
        get_config("tiny", identity_tokens=5)


def test_condition_encoders_shapes(tiny: MVConfig) -> None:
    cfg = get_config("small")
    mel = torch.randn(2, 3, cfg.mel_frames, cfg.mel_bins)
    assert AudioEncoder(cfg)(mel).shape == (2, 3, cfg.audio_tokens, cfg.cond_dim)
    ref = torch.randn(2, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    assert IdentityEncoder(cfg)(ref).shape == (2, cfg.identity_tokens, cfg.cond_dim)

    model = MVControlNet(tiny)
    _, _, mel, ref, _, _ = _inputs(tiny)
    tokens = model.encode_conditions(mel, ref)
    assert tokens.shape == (2, tiny.frames, tiny.cond_tokens, tiny.cond_dim)
    # identity tokens are shared by every frame; audio tokens differ per frame
    assert torch.equal(tokens[:, 0, tiny.audio_tokens :], tokens[:, -1, tiny.audio_tokens :])
    assert not torch.allclose(tokens[:, 0, : tiny.audio_tokens], tokens[:, 1, : tiny.audio_tokens])
    # dropped samples get exactly the null tokens; kept samples are untouched
    dropped = model.encode_conditions(mel, ref, drop_mask=torch.tensor([True, False]))
    null = model.null_conditions(2, tiny.frames)
    assert torch.allclose(dropped[0], null[0])
    assert torch.allclose(dropped[1], tokens[1])


@pytest.mark.parametrize("frames", [None, 1])
def test_forward_shapes(tiny: MVConfig, frames: int | None) -> None:
    model = MVControlNet(tiny)
    _randomise(model)
    x, t, mel, ref, c_v, flags = _inputs(tiny, n=frames)
    tokens = model.encode_conditions(mel, ref)
    out = model(x, t, tokens, c_v, flags)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert model(x, t, tokens, None, flags).shape == x.shape  # diffusion branch alone


def test_fresh_model_predicts_zero(tiny: MVConfig) -> None:
    # zero output conv: an untrained model starts from eps = 0, a sane diffusion prior
    model = MVControlNet(tiny)
    x, t, mel, ref, c_v, flags = _inputs(tiny)
    assert torch.equal(model(x, t, model.encode_conditions(mel, ref), c_v, flags), torch.zeros_like(x))


def test_fresh_control_branch_leaves_output_unchanged(tiny: MVConfig) -> None:
    model = MVControlNet(tiny)
    _randomise(model.unet, seed=1)
    _randomise(model.conditions, seed=2)
    model.reset_control()  # a fresh copy of the (now "trained") diffusion branch
    x, t, mel, ref, c_v, flags = _inputs(tiny)
    tokens = model.encode_conditions(mel, ref)
    without = model(x, t, tokens, None, flags)
    assert without.abs().mean() > 1e-3  # the comparison below is not 0 == 0
    assert torch.equal(model(x, t, tokens, c_v, flags), without)
    # ...yet the copy is a real copy and the zero convs are the only thing muting it
    enc_main, enc_ctrl = model.unet.encoder.state_dict(), model.control.encoder.state_dict()
    assert all(torch.equal(enc_main[k], enc_ctrl[k]) for k in enc_main)
    _randomise(model.control, seed=3)
    assert not torch.allclose(model(x, t, tokens, c_v, flags), without, atol=1e-4)


def test_control_gradients_reach_zero_convs(tiny: MVConfig) -> None:
    # ControlNet trains although its output convs start at zero: their gradient is
    # the copy's (non-zero) features times the upstream gradient
    model = MVControlNet(tiny)
    _randomise(model.unet, seed=1)
    model.reset_control()
    x, t, mel, ref, c_v, flags = _inputs(tiny)
    model(x, t, model.encode_conditions(mel, ref), c_v, flags).square().mean().backward()
    assert model.control.zero_mid.weight.grad.abs().sum() > 0
    assert all(zc.weight.grad.abs().sum() > 0 for zc in model.control.zero_convs)


def test_cross_attention_module_is_per_frame() -> None:
    torch.manual_seed(0)
    b, n, hw, c, l, d = 2, 4, 9, 16, 5, 12
    attn = FrameCrossAttention(c, d, head_dim=8)
    x = torch.randn(b * n, hw, c)
    ctx = torch.randn(b, n, l, d)
    fold = lambda z: z.reshape(b * n, l, d)  # noqa: E731
    out = attn(x, fold(ctx)).reshape(b, n, hw, c)
    ctx2 = ctx.clone()
    ctx2[:, 2] = torch.randn(b, l, d)
    out2 = attn(x, fold(ctx2)).reshape(b, n, hw, c)
    others = [0, 1, 3]
    assert torch.allclose(out[:, others], out2[:, others], atol=1e-6)
    assert not torch.allclose(out[:, 2], out2[:, 2], atol=1e-3)


def _perturb_frame(model: MVControlNet, cfg: MVConfig, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, t, mel, ref, c_v, flags = _inputs(cfg)
    tokens = model.encode_conditions(mel, ref)
    tokens2 = tokens.clone()
    tokens2[:, j] = torch.randn_like(tokens2[:, j])
    return model(x, t, tokens, c_v, flags), model(x, t, tokens2, c_v, flags)


def test_full_model_cross_attention_is_per_frame(tiny: MVConfig) -> None:
    """Without temporal layers nothing else mixes frames, so frame j's condition tokens
    must only affect frame j; with (trained, i.e. non-zero) temporal layers they
    legitimately reach the other frames too - which shows the test can fail."""
    j = 1
    others = [i for i in range(tiny.frames) if i != j]
    flat = MVControlNet(dataclasses.replace(tiny, temporal=False))
    _randomise(flat)
    a, b = _perturb_frame(flat, flat.cfg, j)
    assert torch.allclose(a[:, :, others], b[:, :, others], atol=1e-5)
    assert not torch.allclose(a[:, :, j], b[:, :, j], atol=1e-3)

    temporal = MVControlNet(tiny)
    _randomise(temporal)
    a, b = _perturb_frame(temporal, tiny, j)
    assert not torch.allclose(a[:, :, others], b[:, :, others], atol=1e-3)


def test_fresh_temporal_layers_are_identity(tiny: MVConfig) -> None:
    # zero-initialised temporal conv/attention outputs: a fresh network is per-frame
    model = MVControlNet(tiny)
    for name, p in model.named_parameters():
        if "tconv" not in name and "temporal.attn.to_out" not in name and "zero" not in name:
            with torch.no_grad():
                p.normal_(0, 0.1)
    a, b = _perturb_frame(model, tiny, 2)
    others = [0, 1, 3]
    assert torch.allclose(a[:, :, others], b[:, :, others], atol=1e-5)


def test_one_frame_window_matches_per_frame_model(tiny: MVConfig) -> None:
    # first-frame call (N = 1) runs the same weights; with temporal layers at their
    # identity init it equals frame 0 of an 8-frame call with the same inputs there
    model = MVControlNet(tiny)
    x, t, mel, ref, c_v, _ = _inputs(tiny)
    flags = torch.zeros(2, tiny.frames)
    for name, p in model.named_parameters():
        if "tconv" not in name and "temporal.attn.to_out" not in name:
            with torch.no_grad():
                p.normal_(0, 0.1)
    tokens = model.encode_conditions(mel, ref)
    full = model(x, t, tokens, c_v, flags)
    one = model(x[:, :, :1], t, tokens[:, :1], c_v[:, :, :1], flags[:, :1])
    assert torch.allclose(full[:, :, :1], one, atol=1e-5)


def test_params_and_flops(tiny: MVConfig) -> None:
    model = MVControlNet(tiny)
    p = count_params(model)
    assert p["total"] == sum(q.numel() for q in model.parameters())
    assert p["control"] < p["diffusion"]
    f8, f1 = count_flops(model, tiny), count_flops(model, tiny, frames=1)
    assert f8 > 0 and 0.8 * tiny.frames < f8 / f1 <= tiny.frames + 0.5
    small = count_params(MVControlNet(get_config("small")))["total"]
    assert 2 * small * 2 < 40e6 * 0.75  # both stages in fp16 fit a 40 MB pack comfortably


def test_activation_checkpointing_gives_the_same_gradients(tiny: MVConfig) -> None:
    torch.manual_seed(0)
    plain = MVControlNet(tiny)
    _randomise(plain)
    ckpt = MVControlNet(dataclasses.replace(tiny, use_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t, mel, ref, c_v, flags = _inputs(tiny)
    grads = []
    for model in (plain, ckpt):
        model.train()
        model(x, t, model.encode_conditions(mel, ref), c_v, flags).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)
