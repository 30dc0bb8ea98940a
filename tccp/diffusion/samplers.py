"""Samplers as small pure functions (k-diffusion style).

Each takes `model_fn(x, t) -> raw model output` (eps or v, as `schedule.prediction`
says; `t` is an integer tensor of shape (B,)), a starting noise `x_T` and a schedule,
and returns the x0 estimate. Any number of steps works, 1 included.

First-frame conditioning: `fixed=(mask, value)` pins the clean conditioning slot. The
sampler feeds `value` (clean, un-noised, as in training) wherever `mask` is set on
every model call, replaces the x0 estimate there by `value` and returns `value` there
exactly. Doing it in the sampler (not in the caller's model_fn) keeps it correct for
samplers whose state is not x_t itself (DPM-Solver++ works in sigma-scaled space).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from tccp.diffusion.schedule import Schedule

__all__ = ["ddpm", "ddim", "dpmpp_2m", "cfg_model_fn", "SAMPLERS", "sample"]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Fixed = tuple[torch.Tensor, torch.Tensor] | None


def _impose(x: torch.Tensor, fixed: Fixed) -> torch.Tensor:
    if fixed is None:
        return x
    mask, value = fixed
    return torch.where(mask.bool(), value.to(x.dtype), x)


def _denoise(
    model_fn: ModelFn, x: torch.Tensor, t: int, schedule: Schedule, fixed: Fixed, clip_x0: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) estimates at x_t; the fixed slots are given to the model clean.

    `clip_x0` clamps the x0 estimate to the data range (DDPM's `clip_denoised`) and
    re-derives eps from it. Why: with eps prediction on the linear schedule,
    x0 = (x_t - sqrt(1-a) eps) / sqrt(a) amplifies any eps error ~150x at t = T, so a
    few-step sampler on an imperfect model otherwise lands far outside the latent range.
    """
    x_in = _impose(x, fixed)
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    x0, eps = schedule.to_x0_eps(x_in, tt, model_fn(x_in, tt))
    if clip_x0 is not None:
        a = float(schedule.alphas_cumprod[t])
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = (x_in - a**0.5 * x0) / max(1 - a, 1e-12) ** 0.5
    return _impose(x0, fixed), eps


def _ab(schedule: Schedule, t: int) -> float:
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    dev = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=dev).to(like.device, like.dtype)


@torch.no_grad()
def ddim(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: Schedule,
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    fixed: Fixed = None,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """DDIM (Song et al.); eta = 0 deterministic, eta = 1 is ancestral (DDPM-like)."""
    ts = schedule.timesteps(steps)
    x = x_T
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        x0, eps = _denoise(model_fn, x, t, schedule, fixed, clip_x0)
        if s < 0:
            x = x0
            break
        a_t, a_s = _ab(schedule, t), _ab(schedule, s)
        sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) ** 0.5
        dir_coef = max(1 - a_s - sigma**2, 0.0) ** 0.5
        x = a_s**0.5 * x0 + dir_coef * eps
        if sigma > 0:
            x = x + sigma * _randn(x, generator)
    return _impose(x, fixed)


@torch.no_grad()
def ddpm(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: Schedule,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    fixed: Fixed = None,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """Ancestral DDPM sampling (the paper's sampler). `steps=None` runs all T steps;
    fewer steps use the DDPM posterior between the strided timesteps."""
    ts = schedule.timesteps(steps)
    x = x_T
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        x0, _ = _denoise(model_fn, x, t, schedule, fixed, clip_x0)
        if s < 0:
            x = x0
            break
        a_t, a_s = _ab(schedule, t), _ab(schedule, s)
        alpha = a_t / a_s
        beta = 1 - alpha
        mean = (a_s**0.5 * beta / (1 - a_t)) * x0 + (alpha**0.5 * (1 - a_s) / (1 - a_t)) * x
        var = beta * (1 - a_s) / (1 - a_t)
        x = mean + var**0.5 * _randn(x, generator)
    return _impose(x, fixed)


@torch.no_grad()
def dpmpp_2m(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: Schedule,
    steps: int = 10,
    generator: torch.Generator | None = None,
    fixed: Fixed = None,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al.), the k-diffusion formulation in sigma space
    (x_sigma = x_t / sqrt(alpha_bar)). Deterministic; `generator` is unused."""
    ts = schedule.timesteps(steps)
    sig = [((1 - _ab(schedule, t)) / _ab(schedule, t)) ** 0.5 for t in ts] + [0.0]
    x = x_T * (1 + sig[0] ** 2) ** 0.5
    old = None
    for i, t in enumerate(ts):
        x_vp = x / (1 + sig[i] ** 2) ** 0.5
        den, _ = _denoise(model_fn, x_vp, t, schedule, fixed, clip_x0)
        if sig[i + 1] == 0:
            x = den
            break
        h = math.log(sig[i] / sig[i + 1])  # step in lambda = -log(sigma)
        d = den
        if old is not None:
            r = math.log(sig[i - 1] / sig[i]) / h
            d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
        x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * d
        old = den
    return _impose(x, fixed)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m}


def sample(
    name: str,
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: Schedule,
    steps: int | None,
    generator: torch.Generator | None = None,
    fixed: Fixed = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Dispatch by name ("ddpm" | "ddim" | "dpmpp_2m")."""
    try:
        fn = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})") from None
    return fn(model_fn, x_T, schedule, steps, generator=generator, fixed=fixed, **kwargs)


def _cat(a: Any, b: Any) -> Any:
    if a is None:
        return None
    return torch.cat([a, b], dim=0)


def cfg_model_fn(
    model_fn: Callable[..., torch.Tensor], cond: Sequence[Any], uncond: Sequence[Any], scale: float
) -> ModelFn:
    """Classifier-free guidance as one batched call: `model_fn(x, t, *cond)` with the
    conditional and unconditional arguments stacked along the batch, then
    `out = u + scale * (c - u)` (linear, so valid for eps and v outputs alike).

    `cond` / `uncond` are matching tuples of batch-first tensors (or None); scale 1
    skips the unconditional half entirely."""
    cond, uncond = tuple(cond), tuple(uncond)
    if scale == 1.0:
        return lambda x, t: model_fn(x, t, *cond)
    both = tuple(_cat(c, u) for c, u in zip(cond, uncond, strict=True))

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), *both)
        c, u = out.chunk(2)
        return u + scale * (c - u)

    return fn
