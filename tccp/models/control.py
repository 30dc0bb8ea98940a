"""Control branch (ControlNet, paper 4.3): a trainable copy of the diffusion branch's
encoder half that reads the video-based condition c_v.

c_v has the shape of x_t (a latent video); it enters through a small conv net whose
last layer is zero-initialised and is added to the copy's conv_in features. Each skip
and the middle output go back to the diffusion branch through zero-initialised 1x1
convs. With both ends at zero a freshly attached control branch leaves the diffusion
branch's output unchanged, so attaching it never destroys what the branch has learned;
gradients still reach the zero convs because the copy's own features are non-zero.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tccp.models.blocks import TimeEmbedding, zero_module
from tccp.models.config import MVConfig
from tccp.models.unet import VideoEncoder, VideoUNet

__all__ = ["ControlBranch"]


class ControlBranch(nn.Module):
    def __init__(self, cfg: MVConfig, unet: VideoUNet | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        if unet is not None:
            # a trainable copy, starting from the diffusion branch's current weights
            self.time_embed = copy.deepcopy(unet.time_embed)
            self.encoder = copy.deepcopy(unet.encoder)
        else:
            self.time_embed = TimeEmbedding(cfg.time_embed_dim)
            self.encoder = VideoEncoder(cfg, cfg.latent_channels + 1 + cfg.extra_channels)
        ch = cfg.base_channels
        self.hint = nn.Sequential(
            nn.Conv2d(cfg.latent_channels, ch, 3, padding=1),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, ch, 3, padding=1)),
        )
        self.zero_convs = nn.ModuleList(zero_module(nn.Conv2d(c, c, 1)) for c in self.encoder.skip_channels)
        self.zero_mid = zero_module(nn.Conv2d(self.encoder.out_channels, self.encoder.out_channels, 1))

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, n: int, c_v: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x: ((b n), C+1, h, w) U-Net input; t: ((b n),); c_v: ((b n), C, h, w).

        Returns residuals for every skip of the diffusion branch and for its middle."""
        emb = self.time_embed(t)
        skips, mid = self.encoder(x, emb, ctx, n, hint=self.hint(c_v))
        return [zc(s) for zc, s in zip(self.zero_convs, skips, strict=True)], self.zero_mid(mid)
