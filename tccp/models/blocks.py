"""Building blocks of the video U-Net (paper Fig. 3b).

Inside the U-Net a latent video is carried as `((b n), c, h, w)`: frames are folded
into the batch, so every spatial op (convolutions, GroupNorm, spatial attention,
frame-wise cross-attention) sees one frame at a time. Only the explicitly temporal
layers unfold to `((b h w), c, n)` and mix frames. Keeping normalisation per frame is
deliberate: a one-frame window (the first frame of a stream) and an eight-frame window
then see the same statistics, and frame i's features never depend on frame j except
through the temporal layers.

Every block takes `(h, emb, ctx, n)`: features, per-frame time embedding
`((b n), E)`, per-frame condition tokens `((b n), L, D)` and the number of frames.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "timestep_embedding",
    "TimeEmbedding",
    "STResBlock",
    "SpatialSelfAttention",
    "TemporalSelfAttention",
    "FrameCrossAttention",
    "STTransformerBlock",
    "Downsample",
    "Upsample",
    "StepSequential",
    "zero_module",
]


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so that the branch it ends starts as a no-op."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, `(B,) -> (B, dim)`."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoid -> 2-layer MLP (Table 3: 128 dims, 2 MLP layers)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.dim).to(self.mlp[0].weight.dtype))


def _groups(ch: int, groups: int) -> int:
    g = min(groups, ch)
    while ch % g:
        g -= 1
    return g


class STResBlock(nn.Module):
    """Spatial ResNet block (two 3x3 convs, time embedding added) followed by a 1D
    temporal convolution (kernel 3) residual.

    The temporal conv is zero-initialised: the block starts as a per-frame image block
    and learns how much to mix neighbouring frames (Ho et al., factorised space-time).
    """

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float = 0.0, temporal: bool = True
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch, groups), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch, groups), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.temporal = temporal
        if temporal:
            self.tnorm = nn.GroupNorm(_groups(out_ch, groups), out_ch)
            self.tconv = zero_module(nn.Conv1d(out_ch, out_ch, 3, padding=1))

    def forward(self, h: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor | None, n: int) -> torch.Tensor:
        x = self.conv1(F.silu(self.norm1(h)))
        x = x + self.emb(F.silu(emb))[:, :, None, None]
        x = self.conv2(self.dropout(F.silu(self.norm2(x))))
        h = self.skip(h) + x
        if self.temporal:
            hh, ww = h.shape[-2:]
            t = F.silu(self.tnorm(h))  # per-frame norm, then mix along frames
            t = rearrange(t, "(b n) c h w -> (b h w) c n", n=n)
            t = self.tconv(t)
            h = h + rearrange(t, "(b h w) c n -> (b n) c h w", h=hh, w=ww)
        return h


class _Attention(nn.Module):
    """Multi-head attention on token sequences `(B, L, C)` with SDPA."""

    def __init__(self, dim: int, context_dim: int | None, head_dim: int) -> None:
        super().__init__()
        self.heads = max(1, dim // head_dim)
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, key_context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Queries from `x`, values from `context` (default `x`), keys from
        `key_context` (default `context`)."""
        context = x if context is None else context
        key_context = context if key_context is None else key_context
        q = rearrange(self.to_q(x), "b l (h d) -> b h l d", h=self.heads)
        k = rearrange(self.to_k(key_context), "b l (h d) -> b h l d", h=self.heads)
        v = rearrange(self.to_v(context), "b l (h d) -> b h l d", h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))


class SpatialSelfAttention(nn.Module):
    """Self-attention among the h*w tokens of each frame."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = _Attention(dim, None, head_dim)

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:  # x: ((b n), hw, c)
        return x + self.attn(self.norm(x))


def _frame_positions(n: int, dim: int, device: torch.device) -> torch.Tensor:
    return timestep_embedding(torch.arange(n, device=device), dim)


class TemporalSelfAttention(nn.Module):
    """Self-attention along frames at each spatial position.

    Queries/keys carry a sinusoidal frame-index embedding (attention alone is blind to
    order); the output projection is zero-initialised so the layer starts as identity.
    """

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = _Attention(dim, None, head_dim)
        zero_module(self.attn.to_out)

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:  # x: ((b n), hw, c)
        hw = x.shape[1]
        t = rearrange(x, "(b n) l c -> (b l) n c", n=n)
        pos = _frame_positions(n, t.shape[-1], t.device).to(t.dtype)[None]
        t = self.norm(t)
        t_pos = t + pos
        t = self.attn(t_pos, context=t, key_context=t_pos)
        return x + rearrange(t, "(b l) n c -> (b n) l c", l=hw)


class FrameCrossAttention(nn.Module):
    """Eq. 7: frame i's spatial tokens attend only to frame i's condition tokens.

    Frames are already folded into the batch, so a plain cross-attention between
    `((b n), hw, c)` queries and `((b n), L, D)` keys is exactly per frame.
    """

    def __init__(self, dim: int, context_dim: int, head_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = _Attention(dim, context_dim, head_dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x), ctx)


class STTransformerBlock(nn.Module):
    """Spatial self-attention -> temporal self-attention -> frame-wise cross-attention
    to c_l -> feed-forward, wrapped in GroupNorm + 1x1 projections (LDM style)."""

    def __init__(
        self, ch: int, context_dim: int, head_dim: int, groups: int, ff_mult: int = 4, temporal: bool = True
    ) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch, groups), ch)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.spatial = SpatialSelfAttention(ch, head_dim)
        self.temporal = TemporalSelfAttention(ch, head_dim) if temporal else None
        self.cross = FrameCrossAttention(ch, context_dim, head_dim)
        self.ff_norm = nn.LayerNorm(ch)
        self.ff = nn.Sequential(nn.Linear(ch, ch * ff_mult), nn.GELU(), nn.Linear(ch * ff_mult, ch))
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor, n: int) -> torch.Tensor:
        hh, ww = h.shape[-2:]
        x = rearrange(self.proj_in(self.norm(h)), "bn c h w -> bn (h w) c")
        x = self.spatial(x, n)
        if self.temporal is not None:
            x = self.temporal(x, n)
        x = self.cross(x, ctx)
        x = x + self.ff(self.ff_norm(x))
        return h + self.proj_out(rearrange(x, "bn (h w) c -> bn c h w", h=hh, w=ww))


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor, n: int) -> torch.Tensor:
        return self.conv(h)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor, n: int) -> torch.Tensor:
        return self.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))


class StepSequential(nn.ModuleList):
    """Runs blocks that all take `(h, emb, ctx, n)`; optional activation checkpointing."""

    def __init__(self, *layers: nn.Module, use_checkpoint: bool = False) -> None:
        super().__init__(layers)
        self.use_checkpoint = use_checkpoint

    def forward(self, h: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor, n: int) -> torch.Tensor:
        for layer in self:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, emb, ctx, n, use_reentrant=False)
            else:
                h = layer(h, emb, ctx, n)
        return h
