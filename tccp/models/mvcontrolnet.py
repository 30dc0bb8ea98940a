"""MVControlNet (paper 4.3): video diffusion branch + control branch + c_l encoders.

First-frame conditioning (paper 4.4) is expressed with a per-frame flag channel
concatenated to x_t: slot 0 of a window holds the clean latent of the previous
window's last frame with flag 1; generated slots hold noisy latents with flag 0. The
paper's separate "first frame" step is the same network run on a one-frame window
with flag 0: one set of weights serves both steps (half the parameters of two models,
which keeps two stages inside a 40 MB pack), and training mixes in one-frame windows
(`diffusion_loss(p_first=...)`) so it learns both.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import nn

from tccp.models.conditions import ConditionEncoder
from tccp.models.config import MVConfig
from tccp.models.control import ControlBranch
from tccp.models.unet import VideoUNet

__all__ = ["MVControlNet", "count_params", "count_flops"]


class MVControlNet(nn.Module):
    def __init__(self, cfg: MVConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.conditions = ConditionEncoder(cfg)
        self.unet = VideoUNet(cfg)
        self.control = ControlBranch(cfg, self.unet)

    def reset_control(self) -> None:
        """Re-copy the control branch from the (trained) diffusion branch, zero convs at 0."""
        self.control = ControlBranch(self.cfg, self.unet).to(next(self.unet.parameters()).device)

    def encode_conditions(
        self, mel: torch.Tensor, ref_latent: torch.Tensor | None = None, drop_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """mel (B, N, 16, 80), ref (B, C, h, w) -> c_l (B, N, La + Li, D)."""
        return self.conditions(mel, ref_latent, drop_mask)

    def null_conditions(self, batch: int, frames: int) -> torch.Tensor:
        """The unconditional c_l (all null tokens) used by classifier-free guidance."""
        parts = [self.conditions.null_audio]
        if self.conditions.identity is not None:
            parts.append(self.conditions.null_identity)
        return repeat(torch.cat(parts, dim=0), "l d -> b n l d", b=batch, n=frames)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond_tokens: torch.Tensor,
        c_v: torch.Tensor | None = None,
        cond_flags: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t (B, C, N, h, w), t (B,), cond_tokens (B, N, L, D), c_v (B, C, N, h, w) or
        None (diffusion branch alone), cond_flags (B, N) (1 = clean conditioning slot),
        extra (B, E, N, h, w) inpainting channels when `cfg.extra_channels` = E
        -> model output (eps or v) (B, C, N, h, w)."""
        b, _, n, hh, ww = x_t.shape
        if cond_flags is None:
            cond_flags = x_t.new_zeros(b, n)
        flag = repeat(cond_flags.to(x_t.dtype), "b n -> b 1 n h w", h=hh, w=ww)
        parts = [x_t, flag]
        if self.cfg.extra_channels:
            if extra is None or extra.shape[1] != self.cfg.extra_channels:
                raise ValueError(f"this model takes {self.cfg.extra_channels} extra input channels")
            parts.append(extra.to(x_t.dtype))
        x = rearrange(torch.cat(parts, dim=1), "b c n h w -> (b n) c h w")
        ctx = rearrange(cond_tokens.to(x_t.dtype), "b n l d -> (b n) l d")
        t_frames = repeat(t.reshape(b), "b -> (b n)", n=n)
        emb = self.unet.time_embed(t_frames)
        control = None
        if c_v is not None:
            control = self.control(x, t_frames, ctx, n, rearrange(c_v, "b c n h w -> (b n) c h w"))
        out = self.unet(x, emb, ctx, n, control)
        return rearrange(out, "(b n) c h w -> b c n h w", b=b)


def count_params(model: MVControlNet) -> dict[str, int]:
    """Parameter counts per part (diffusion branch, control branch, condition encoders)."""
    part = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    d = {"diffusion": part(model.unet), "control": part(model.control), "conditions": part(model.conditions)}
    d["total"] = sum(d.values())
    return d


@torch.no_grad()
def count_flops(model: MVControlNet, cfg: MVConfig | None = None, frames: int | None = None, batch: int = 1) -> int:
    """FLOPs of one forward call (with control branch) on a `frames`-frame window,
    counted by torch's FlopCounterMode (matmuls, convs, attention; elementwise ops are
    not counted, which is the usual convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = cfg or model.cfg
    n = cfg.frames if frames is None else frames
    p = next(model.parameters())
    c, s = cfg.latent_channels, cfg.latent_size
    x = torch.randn(batch, c, n, s, s, device=p.device, dtype=p.dtype)
    mel = torch.randn(batch, n, cfg.mel_frames, cfg.mel_bins, device=p.device, dtype=p.dtype)
    ref = torch.randn(batch, c, s, s, device=p.device, dtype=p.dtype)
    t = torch.full((batch,), 500, device=p.device)
    extra = torch.randn(batch, cfg.extra_channels, n, s, s, device=p.device, dtype=p.dtype) if cfg.extra_channels else None
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        tokens = model.encode_conditions(mel, ref)
        model(x, t, tokens, torch.randn_like(x), torch.zeros(batch, n, device=p.device), extra)
    model.train(was_training)
    return int(counter.get_total_flops())
