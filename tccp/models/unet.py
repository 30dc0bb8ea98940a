"""Video diffusion branch: a space-time U-Net over folded latent videos.

Split into an encoder half (input conv, down levels, middle block) and a decoder half
because the control branch (ControlNet) is a trainable copy of exactly the encoder
half; its per-level outputs are added to this U-Net's skip connections.

Layout (SD/LDM convention): each level has `num_res_blocks` x [ST-ResBlock (+ ST
transformer block where attention is enabled)], followed by one 2x downsample except at
the last level; the middle is ResBlock-Transformer-ResBlock; the decoder mirrors it with
`num_res_blocks + 1` blocks per level, each consuming one skip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tccp.models.blocks import (
    Downsample,
    StepSequential,
    STResBlock,
    STTransformerBlock,
    TimeEmbedding,
    Upsample,
    _groups,
    zero_module,
)
from tccp.models.config import MVConfig

__all__ = ["VideoEncoder", "VideoDecoder", "VideoUNet"]


class VideoEncoder(nn.Module):
    """conv_in + down levels + middle. `forward` returns every skip and the middle
    output, which is all the decoder (or the ControlNet residuals) need."""

    def __init__(self, cfg: MVConfig, in_channels: int) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.base_channels
        emb, ctx, g, hd = cfg.time_embed_dim, cfg.cond_dim, cfg.norm_groups, cfg.head_dim
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.skip_channels: list[int] = [ch]
        for level, mult in enumerate(cfg.channel_mult):
            out = cfg.base_channels * mult
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [STResBlock(ch, out, emb, g, cfg.dropout, cfg.temporal)]
                if level in cfg.attention_levels:
                    layers.append(STTransformerBlock(out, ctx, hd, g, cfg.ff_mult, cfg.temporal))
                self.blocks.append(StepSequential(*layers, use_checkpoint=cfg.use_checkpoint))
                ch = out
                self.skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.blocks.append(StepSequential(Downsample(ch)))
                self.skip_channels.append(ch)
        self.middle = StepSequential(
            STResBlock(ch, ch, emb, g, cfg.dropout, cfg.temporal),
            STTransformerBlock(ch, ctx, hd, g, cfg.ff_mult, cfg.temporal),
            STResBlock(ch, ch, emb, g, cfg.dropout, cfg.temporal),
            use_checkpoint=cfg.use_checkpoint,
        )
        self.out_channels = ch

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        ctx: torch.Tensor,
        n: int,
        hint: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x: ((b n), C_in, h, w). `hint` (control branch only) is added after conv_in."""
        h = self.conv_in(x)
        if hint is not None:
            h = h + hint
        skips = [h]
        for block in self.blocks:
            h = block(h, emb, ctx, n)
            skips.append(h)
        return skips, self.middle(h, emb, ctx, n)


class VideoDecoder(nn.Module):
    def __init__(self, cfg: MVConfig, skip_channels: list[int], in_ch: int) -> None:
        super().__init__()
        emb, ctx, g, hd = cfg.time_embed_dim, cfg.cond_dim, cfg.norm_groups, cfg.head_dim
        skips = list(skip_channels)
        ch = in_ch
        self.blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            out = cfg.base_channels * cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [STResBlock(ch + skips.pop(), out, emb, g, cfg.dropout, cfg.temporal)]
                if level in cfg.attention_levels:
                    layers.append(STTransformerBlock(out, ctx, hd, g, cfg.ff_mult, cfg.temporal))
                ch = out
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.blocks.append(StepSequential(*layers, use_checkpoint=cfg.use_checkpoint))
        assert not skips
        self.norm_out = nn.GroupNorm(_groups(ch, cfg.norm_groups), ch)
        # zero output conv: a fresh model predicts eps = 0 (LDM convention)
        self.conv_out = zero_module(nn.Conv2d(ch, cfg.latent_channels, 3, padding=1))

    def forward(
        self, skips: list[torch.Tensor], h: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor, n: int
    ) -> torch.Tensor:
        skips = list(skips)
        for block in self.blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, ctx, n)
        return self.conv_out(F.silu(self.norm_out(h)))


class VideoUNet(nn.Module):
    """Time embedding + encoder + decoder. Control residuals (one per skip, plus one for
    the middle output) are added where ControlNet adds them."""

    def __init__(self, cfg: MVConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.time_embed = TimeEmbedding(cfg.time_embed_dim)
        # +1 input channel: the per-frame "clean conditioning frame" flag; + extra
        # inpainting-style condition channels (cfg.extra_channels)
        self.encoder = VideoEncoder(cfg, cfg.latent_channels + 1 + cfg.extra_channels)
        self.decoder = VideoDecoder(cfg, self.encoder.skip_channels, self.encoder.out_channels)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        ctx: torch.Tensor,
        n: int,
        control: tuple[list[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        skips, h = self.encoder(x, emb, ctx, n)
        if control is not None:
            c_skips, c_mid = control
            skips = [s + c for s, c in zip(skips, c_skips, strict=True)]
            h = h + c_mid
        return self.decoder(skips, h, emb, ctx, n)
