"""Latent-based condition c_l (paper Fig. 3c): audio and identity, encoded separately and
concatenated frame by frame, so c_l has one token set per video frame.

Classifier-free guidance needs an "unconditional" c_l: learned null tokens replace the
audio and identity tokens of dropped samples (training, prob `cond_dropout`) and of
the unconditional half of a guided sampling call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from tccp.models.config import MVConfig

__all__ = ["AudioEncoder", "IdentityEncoder", "ConditionEncoder"]


class AudioEncoder(nn.Module):
    """Mel window per frame `(B, N, 16, 80)` -> `(B, N, La, D)` tokens.

    A small 2D conv net treats each 0.2 s window as a (time x frequency) image, halving
    time until it has `La` rows; each row (all channels x remaining frequency bins)
    becomes one token, so tokens keep their position inside the window.
    """

    def __init__(self, cfg: MVConfig) -> None:
        super().__init__()
        c, d, la = cfg.audio_channels, cfg.cond_dim, cfg.audio_tokens
        layers: list[nn.Module] = [nn.Conv2d(1, c, 3, padding=1), nn.SiLU()]
        t, f = cfg.mel_frames, cfg.mel_bins
        ch = c
        while f > 10 or t > la:
            st = 2 if t > la else 1
            sf = 2 if f > 10 else 1
            out = min(ch * 2, 4 * c)
            layers += [nn.Conv2d(ch, out, 3, stride=(st, sf), padding=1), nn.GroupNorm(min(8, out), out), nn.SiLU()]
            t, f, ch = (t + st - 1) // st, (f + sf - 1) // sf, out
        if t != la:
            raise ValueError(f"audio_tokens {la} must be mel_frames {cfg.mel_frames} / 2^k")
        self.net = nn.Sequential(*layers)
        self.proj = nn.Linear(ch * f, d)
        self.pos = nn.Parameter(torch.randn(la, d) * 0.02)
        self.norm = nn.LayerNorm(d)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        b = mel.shape[0]
        x = self.net(rearrange(mel, "b n t f -> (b n) 1 t f"))
        x = self.proj(rearrange(x, "bn c t f -> bn t (c f)")) + self.pos
        return rearrange(self.norm(x), "(b n) l d -> b n l d", b=b)


class IdentityEncoder(nn.Module):
    """Reference face latent `(B, C, h, w)` -> `(B, Li, D)` patch tokens (conv then
    patchify to a sqrt(Li) x sqrt(Li) grid), shared by every frame of the window."""

    def __init__(self, cfg: MVConfig) -> None:
        super().__init__()
        side = int(round(cfg.identity_tokens**0.5))
        patch = cfg.latent_size // side
        d = cfg.cond_dim
        self.conv = nn.Conv2d(cfg.latent_channels, d // 2, 3, padding=1)
        self.patch = nn.Conv2d(d // 2, d, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(cfg.identity_tokens, d) * 0.02)
        self.norm = nn.LayerNorm(d)

    def forward(self, ref: torch.Tensor) -> torch.Tensor:
        x = self.patch(F.silu(self.conv(ref)))
        return self.norm(rearrange(x, "b d h w -> b (h w) d") + self.pos)


class ConditionEncoder(nn.Module):
    def __init__(self, cfg: MVConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.audio = AudioEncoder(cfg)
        self.null_audio = nn.Parameter(torch.randn(cfg.audio_tokens, cfg.cond_dim) * 0.02)
        if cfg.identity_tokens:
            self.identity = IdentityEncoder(cfg)
            self.null_identity = nn.Parameter(torch.randn(cfg.identity_tokens, cfg.cond_dim) * 0.02)
        else:
            self.identity = None

    def forward(
        self, mel: torch.Tensor, ref_latent: torch.Tensor | None = None, drop_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """mel (B, N, 16, 80), ref_latent (B, C, h, w) or None, drop_mask (B,) bool
        (True = replace this sample's c_l by the null tokens) -> c_l (B, N, L, D)."""
        b, n = mel.shape[:2]
        audio = self.audio(mel)
        if drop_mask is not None:
            keep = (~drop_mask.bool()).to(audio.dtype)[:, None, None, None]
            audio = audio * keep + self.null_audio.to(audio.dtype) * (1 - keep)
        if self.identity is None:
            return audio
        if ref_latent is None:  # no reference: identity is unknown, use its null tokens
            ident = repeat(self.null_identity, "l d -> b l d", b=b).to(audio.dtype)
        else:
            ident = self.identity(ref_latent)
            if drop_mask is not None:
                keep1 = keep[:, 0]
                ident = ident * keep1 + self.null_identity.to(ident.dtype) * (1 - keep1)
        return torch.cat([audio, repeat(ident, "b l d -> b n l d", n=n)], dim=2)
