"""Training objective with first-frame conditioning (paper eq. 6 and 8).

A window of N latents becomes: slot 0 clean (flag 1, no noise, no loss), slots 1..N-1
noised at one timestep per sample and predicted. With probability `p_first` a batch is
instead split into one-frame windows (every frame its own sample, flag 0, all frames
noised): that is the first-frame step, learned by the same network at the same cost
per step. c_l is replaced by the null tokens with probability `cond_dropout` so the
model also learns the unconditional prediction that classifier-free guidance needs.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange, repeat

from tccp.diffusion.schedule import Schedule

__all__ = ["diffusion_loss", "split_first_frame"]


def split_first_frame(batch: dict[str, Any]) -> dict[str, Any]:
    """(B, C, N, h, w) windows -> (B*N, C, 1, h, w) single-frame samples."""
    out = dict(batch)
    b = batch["target"].shape[0]
    n = batch["target"].shape[2]
    for key in ("target", "c_v", "extra"):
        if batch.get(key) is not None:
            out[key] = rearrange(batch[key], "b c n h w -> (b n) c 1 h w")
    out["mel"] = rearrange(batch["mel"], "b n t f -> (b n) 1 t f")
    if batch.get("ref") is not None:
        out["ref"] = repeat(batch["ref"], "b c h w -> (b n) c h w", n=n)
    assert out["target"].shape[0] == b * n
    return out


def diffusion_loss(
    model: torch.nn.Module,
    batch: dict[str, Any],
    schedule: Schedule,
    *,
    p_first: float = 0.15,
    cond_dropout: float | None = None,
    cond_noise_std: float = 0.0,
    first: bool | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean squared error of the model output against the schedule's target over the
    generated slots.

    batch: "target" (B, C, N, h, w) latents to generate (already normalised), "c_v"
    (B, C, N, h, w) or None, "mel" (B, N, 16, 80), "ref" (B, C, h, w) or None, "extra"
    (B, E, N, h, w) or None (inpainting channels).
    `first` forces (True) or forbids (False) the one-frame mode; None draws it with
    `p_first`. `cond_noise_std` adds a little noise to the clean slot (robustness to
    the model's own slightly-off previous frames at inference).
    """
    x0 = batch["target"]
    dev = x0.device
    gdev = generator.device if generator is not None else dev  # draw where the generator lives

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=gdev).to(dev)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=gdev).to(dev, x0.dtype)

    if first is None:
        first = x0.shape[2] == 1 or bool(rand(1).item() < p_first)
    if first:
        batch = split_first_frame(batch) if x0.shape[2] > 1 else batch
        x0 = batch["target"]
    b, _, n = x0.shape[:3]
    flags = torch.zeros(b, n, device=dev, dtype=x0.dtype)
    if not first:
        flags[:, 0] = 1.0

    drop_p = getattr(getattr(model, "cfg", None), "cond_dropout", 0.0) if cond_dropout is None else cond_dropout
    drop_mask = rand(b) < drop_p
    tokens = model.encode_conditions(batch["mel"], batch.get("ref"), drop_mask)

    t = torch.randint(0, schedule.num_steps, (b,), generator=generator, device=gdev).to(dev)
    noise = randn(x0.shape)
    x_t = schedule.q_sample(x0, t, noise)
    gen_mask = (1.0 - flags)[:, None, :, None, None]  # 1 on generated slots
    clean = x0
    if cond_noise_std > 0 and not first:
        clean = x0 + cond_noise_std * randn(x0.shape)
    x_t = gen_mask * x_t + (1.0 - gen_mask) * clean

    out = model(x_t, t, tokens, batch.get("c_v"), flags, batch.get("extra"))
    target = schedule.target(x0, noise, t)
    err = (out.float() - target.float()) ** 2 * gen_mask
    denom = gen_mask.expand_as(err).sum().clamp_min(1.0)
    return err.sum() / denom
