"""Schedule, samplers (against analytic denoisers) and the first-frame training loss."""

from __future__ import annotations

import math

import pytest
import torch

from tccp.diffusion import Schedule, cfg_model_fn, ddim, ddpm, diffusion_loss, dpmpp_2m, sample
from tccp.models import MVControlNet, get_config

SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m}


# ----------------------------------------------------------------------- schedule
def test_schedule_linear_ddpm() -> None:
    s = Schedule()
    ab = s.alphas_cumprod
    assert len(ab) == 1000 and torch.all(ab[1:] < ab[:-1])
    assert ab[0].item() == pytest.approx(1 - 1e-4)
    assert ab[-1].item() == pytest.approx(4.04e-5, rel=0.05)  # DDPM's linear schedule end point
    assert s.timesteps(None) == list(range(999, -1, -1))
    assert Schedule(spacing="trailing").timesteps(4) == [999, 749, 499, 249]
    for spacing in ("logsnr", "trailing"):
        for steps in (1, 2, 3, 10, 50, 999):
            ts = Schedule(spacing=spacing).timesteps(steps)
            assert len(ts) == steps and ts[0] == 999 and all(a > b >= 0 for a, b in zip(ts, ts[1:]))
    # log-SNR spacing reaches down to low noise with few steps
    assert Schedule().timesteps(10)[-3:] == [22, 5, 0]
    assert Schedule.from_dict(s.to_dict()).to_dict() == s.to_dict()
    with pytest.raises(ValueError):
        Schedule(prediction="x0")


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_prediction_conversions_roundtrip(prediction: str) -> None:
    s = Schedule(prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 2, generator=g), torch.randn(6, 3, 2, generator=g)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    x_t = s.q_sample(x0, t, eps)
    x0_hat, eps_hat = s.to_x0_eps(x_t.double(), t, s.target(x0, eps, t).double())
    assert torch.allclose(x0_hat.float(), x0, atol=1e-4)
    assert torch.allclose(eps_hat.float(), eps, atol=1e-4)


# ------------------------------------------------------------------ analytic oracles
def _gaussian_oracle(s: Schedule, mu: float, std: float):
    """Exact E[model output | x_t] for data ~ N(mu, std^2) (per element)."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = s.alpha_bar(t, x).double()
        xd = x.double()
        var = a * std**2 + (1 - a)
        eps = (1 - a).sqrt() * (xd - a.sqrt() * mu) / var
        x0 = (xd - (1 - a).sqrt() * eps) / a.sqrt()
        out = eps if s.prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return out.to(x.dtype)

    return fn


@pytest.mark.parametrize(
    "name,steps,std_range",
    [
        ("ddpm", None, (0.96, 1.04)),
        ("ddim", 1000, (0.96, 1.04)),
        ("dpmpp_2m", 10, (0.94, 1.06)),
        # coarse first-order steps shrink the spread (each x0 estimate is a posterior
        # mean; Bao et al., Analytic-DPM); it converges with more steps (0.45 -> 0.50
        # from 25 to 1000 DDIM steps here), so only a loose bound for these
        ("ddpm", 50, (0.8, 1.0)),
        ("ddim", 25, (0.85, 1.0)),
    ],
)
def test_samplers_recover_a_gaussian(name: str, steps: int | None, std_range: tuple[float, float]) -> None:
    s = Schedule()
    mu, std = 1.5, 0.5
    x_T = torch.randn(20000, 1, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample(name, _gaussian_oracle(s, mu, std), x_T, s, steps, generator=torch.Generator().manual_seed(1))
    assert out.mean().item() == pytest.approx(mu, abs=0.03)
    assert std_range[0] * std < out.std().item() < std_range[1] * std


def test_ddim_1000_tracks_ddpm() -> None:
    # the ODE and the ancestral SDE have the same marginals: same sample statistics
    s = Schedule(prediction="v")
    fn = _gaussian_oracle(s, -0.7, 0.3)
    x_T = torch.randn(20000, 1, 1, 1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = ddpm(fn, x_T, s, generator=torch.Generator().manual_seed(4))
    b = ddim(fn, x_T, s, 1000)
    assert a.mean().item() == pytest.approx(b.mean().item(), abs=0.02)
    assert a.std().item() == pytest.approx(b.std().item(), rel=0.05)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_samplers_exact_for_a_point_mass(name: str, steps: int) -> None:
    # a model that knows the data is one point: every sampler must land on it
    s = Schedule()
    target = torch.linspace(-2, 2, 3 * 4 * 4).reshape(1, 3, 1, 4, 4).double()

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = s.alpha_bar(t, x)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    x_T = torch.randn(2, 3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = SAMPLERS[name](fn, x_T, s, steps, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, target.expand_as(out), atol=1e-6)


# --------------------------------------------------------------- real tiny model
@pytest.fixture(scope="module")
def tiny_model() -> MVControlNet:
    torch.manual_seed(0)
    model = MVControlNet(get_config("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _model_fn(model: MVControlNet, n: int, flags: torch.Tensor, seen: list | None = None):
    cfg = model.cfg
    g = torch.Generator().manual_seed(5)
    tokens = model.encode_conditions(torch.randn(2, n, cfg.mel_frames, cfg.mel_bins, generator=g))
    c_v = torch.randn(2, cfg.latent_channels, n, cfg.latent_size, cfg.latent_size, generator=g)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if seen is not None:
            seen.append(x.clone())
        return model(x, t, tokens, c_v, flags)

    return fn


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_conditioning_slot_stays_clean(tiny_model: MVControlNet, name: str) -> None:
    cfg = tiny_model.cfg
    n, shape = cfg.frames, (2, cfg.latent_channels, cfg.frames, cfg.latent_size, cfg.latent_size)
    flags = torch.zeros(2, n)
    flags[:, 0] = 1
    clean = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[:, :, 0] = True
    seen: list[torch.Tensor] = []
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = SAMPLERS[name](_model_fn(tiny_model, n, flags, seen), x_T, Schedule(), 4, fixed=(mask, clean))
    assert torch.equal(out[:, :, 0], clean[:, :, 0])
    assert len(seen) == 4 and all(torch.equal(x[:, :, 0], clean[:, :, 0]) for x in seen)
    assert not torch.equal(out[:, :, 1:], x_T[:, :, 1:]) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_deterministic_with_seed(tiny_model: MVControlNet, name: str) -> None:
    cfg = tiny_model.cfg
    shape = (2, cfg.latent_channels, 1, cfg.latent_size, cfg.latent_size)
    fn = _model_fn(tiny_model, 1, torch.zeros(2, 1))

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x_T = torch.randn(shape, generator=g)
        kwargs = {"eta": 1.0} if name == "ddim" else {}
        with torch.no_grad():
            return SAMPLERS[name](fn, x_T, Schedule(), 3, generator=g, **kwargs)

    a, b, c = run(0), run(0), run(1)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_cfg_wrapper_batches_both_halves() -> None:
    calls: list[int] = []

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x * 0 + cond

    x, t = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    c, u = torch.full((3, 2), 2.0), torch.full((3, 2), 1.0)
    out = cfg_model_fn(model_fn, (c,), (u,), 3.0)(x, t)
    assert calls == [6] and torch.allclose(out, torch.full((3, 2), 1.0 + 3.0 * (2.0 - 1.0)))
    calls.clear()
    assert torch.equal(cfg_model_fn(model_fn, (c,), (u,), 1.0)(x, t), c) and calls == [3]


# --------------------------------------------------------------------------- loss
class _Recorder(torch.nn.Module):
    """Stands in for MVControlNet: records what the loss feeds it, returns `fill`."""

    def __init__(self, fill: float = 0.0) -> None:
        super().__init__()
        self.fill = fill
        self.calls: list[dict] = []

    def encode_conditions(self, mel, ref, drop_mask):  # noqa: ANN001, ANN201
        self.drop = drop_mask
        return torch.zeros(mel.shape[0], mel.shape[1], 1, 1)

    def forward(self, x_t, t, tokens, c_v, flags, extra=None):  # noqa: ANN001, ANN201
        self.calls.append(dict(x_t=x_t, t=t, c_v=c_v, flags=flags))
        out = torch.zeros_like(x_t)
        out[:, :, 0] = self.fill  # garbage in the conditioning slot
        return out


def _batch(b: int = 3, n: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "target": torch.randn(b, 2, n, 3, 3, generator=g),
        "c_v": torch.randn(b, 2, n, 3, 3, generator=g),
        "mel": torch.randn(b, n, 16, 80, generator=g),
        "ref": torch.randn(b, 2, 3, 3, generator=g),
    }


def test_loss_window_keeps_slot0_clean_and_unscored() -> None:
    batch, s = _batch(), Schedule()
    losses = []
    for fill in (0.0, 1e3):
        rec = _Recorder(fill)
        losses.append(diffusion_loss(rec, batch, s, first=False, generator=torch.Generator().manual_seed(1)))
    assert losses[0].item() == pytest.approx(losses[1].item())  # slot 0 output is not scored
    assert losses[0].item() == pytest.approx(1.0, rel=0.35)  # eps target, zero prediction
    call = rec.calls[0]
    assert torch.equal(call["x_t"][:, :, 0], batch["target"][:, :, 0])
    assert not torch.allclose(call["x_t"][:, :, 1:], batch["target"][:, :, 1:])
    assert call["flags"][:, 0].eq(1).all() and call["flags"][:, 1:].eq(0).all()


def test_loss_first_frame_mode_splits_windows() -> None:
    batch, rec = _batch(b=3, n=4), _Recorder(1e3)
    loss = diffusion_loss(rec, batch, Schedule(), first=True, generator=torch.Generator().manual_seed(1))
    call = rec.calls[0]
    assert call["x_t"].shape == (12, 2, 1, 3, 3) and call["c_v"].shape == (12, 2, 1, 3, 3)
    assert call["flags"].eq(0).all()
    assert loss.item() > 1e4  # the single slot is generated and scored
    # p_first draws the mode; cond_dropout draws the null-condition mask
    modes = []
    for seed in range(40):
        rec = _Recorder()
        diffusion_loss(rec, _batch(b=8), Schedule(), p_first=0.5, cond_dropout=0.5, generator=torch.Generator().manual_seed(seed))
        modes.append(rec.calls[0]["x_t"].shape[2] == 1)
    assert 5 < sum(modes) < 35
    assert 0 < int(rec.drop.sum()) < len(rec.drop)


def test_overfit_one_batch() -> None:
    torch.manual_seed(0)
    cfg = get_config("tiny")
    model = MVControlNet(cfg)
    g = torch.Generator().manual_seed(0)
    b, n, c, sz = 2, cfg.frames, cfg.latent_channels, cfg.latent_size
    batch = {
        "target": torch.randn(b, c, n, sz, sz, generator=g),
        "c_v": torch.randn(b, c, n, sz, sz, generator=g),
        "mel": torch.randn(b, n, cfg.mel_frames, cfg.mel_bins, generator=g),
        "ref": torch.randn(b, c, sz, sz, generator=g),
    }
    s = Schedule()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_fn() -> torch.Tensor:  # same noise and timesteps every step: one fixed batch
        return diffusion_loss(model, batch, s, first=False, cond_dropout=0.0, generator=torch.Generator().manual_seed(1))

    first = loss_fn().item()
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert math.isfinite(first) and loss_fn().item() < first / 5


def test_clip_x0_bounds_few_step_output():
    """An eps model that is badly off (as an undertrained one is) sends few-step x0
    estimates far outside the data range; clip_x0 keeps them in it."""
    import torch

    from tccp.diffusion.samplers import ddim, dpmpp_2m
    from tccp.diffusion.schedule import Schedule

    sch = Schedule()
    x_T = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    bad = lambda x, t: torch.full_like(x, -1.0)  # noqa: E731  (a constant, wrong eps)
    for sampler in (ddim, dpmpp_2m):
        free = sampler(bad, x_T, sch, steps=4)
        clipped = sampler(bad, x_T, sch, steps=4, clip_x0=3.0)
        assert free.abs().max() > 10
        assert clipped.abs().max() <= 3.0 + 1e-5
