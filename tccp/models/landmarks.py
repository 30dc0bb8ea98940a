"""Stage 1 in coordinates: MVControlNet's structure over landmark sequences.

TCCP's stage 1 draws landmark sketches and generates them as image latents; a mouth
opening is then smaller than one 8x8 latent cell, and the network must learn to draw
before it can learn to speak. Here the landmarks stay coordinates (TCCP's "explicit
and compact" signal, generated in coordinates as in IP_LAP) and the network keeps
MVControlNet's parts, carried from pixels to frames:

- the diffusion branch: one token per frame (its noisy coordinates + the clean-slot
  flag + the timestep), temporal self-attention across the window's frames;
- c_l by per-frame cross-attention (eq. 7): frame i attends only to its own tokens,
  the audio tokens of frame i (Whisper features within +-2 video frames, all layers
  mixed by learned weights, plus voice activity) and the reference-landmark tokens
  (the person's own lip shapes);
- c_v by a control branch: a trainable copy of the first blocks fed through a
  zero-initialised projection, its outputs added back through zero-initialised
  projections (ControlNet), so training starts from the trunk's behaviour.
  Mouth mode: c_v = the source's tracked landmarks outside the mouth (the pose prior);
  head mode: pooled head-masked context latents.

One network serves both `objective`s: "v" (diffusion, v-prediction, any sampler of
`tccp.diffusion.samplers`) and "regress" (a deterministic head: one call at the
largest timestep on an all-zero input, trained to output x0).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from tccp.errors import TCCPError

__all__ = ["LandmarkNetConfig", "LandmarkNet", "LandmarkCodec", "timestep_embedding", "audio_radius", "audio_tokens_for"]


def audio_tokens_for(radius: int, fps: float = 25.0) -> int:
    """Audio tokens per video frame when each frame sees +-`radius` video frames of
    Whisper features (`tccp.media.whisper.tokens_per_frame`)."""
    from tccp.media.whisper import tokens_per_frame

    return tokens_per_frame(radius, fps)


def audio_radius(cfg: "LandmarkNetConfig") -> int:
    """The +-video-frame audio window a network was trained with (from its token count
    at 25 fps: 10 tokens = +-2 frames, the bundled pack's; 18 = +-4)."""
    return max(0, (int(cfg.audio_tokens) * 25 // 50 - 1) // 2)


@dataclass
class LandmarkNetConfig:
    mode: str = "mouth"  # "mouth": lips + jaw, c_v = rest of the face; "head": all points + pose
    gen_dim: int = 114  # generated values per frame (mouth: 57 points x 2)
    cv_dim: int = 206  # control input per frame (mouth: 103 rest points x 2)
    audio_layers: int = 5  # Whisper outputs per feature frame (embedding + blocks)
    audio_width: int = 384  # Whisper width
    audio_tokens: int = 10  # feature frames per video frame (+-2 frames at 50 Hz)
    ref_dim: int = 114  # one reference token (a reference frame's generated points)
    width: int = 128
    depth: int = 4
    heads: int = 4
    frames: int = 8
    control_depth: int = 2
    dropout: float = 0.1
    objective: str = "regress"  # "regress" | "v"
    audio_encoder: str = "tiny.en"
    """The vendored Whisper encoder whose features the network reads
    (`tccp/assets/whisper/<name>.safetensors`); the pack, training and the engine load it."""

    def __post_init__(self) -> None:
        if self.mode not in ("mouth", "head"):
            raise TCCPError(f"landmark model: mode {self.mode!r} (choose mouth or head)")
        if self.objective not in ("regress", "v"):
            raise TCCPError(f"landmark model: objective {self.objective!r} (choose regress or v)")
        if self.control_depth > self.depth or self.width % self.heads:
            raise TCCPError("landmark model: control_depth <= depth and width divisible by heads")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LandmarkNetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) - known:
            raise TCCPError(f"landmark model config: unknown keys {sorted(set(d) - known)}")
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([a.cos(), a.sin()], -1)


class _Block(nn.Module):
    """Temporal self-attention, per-frame cross-attention, MLP (pre-LN)."""

    def __init__(self, d: int, heads: int, p: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.cproj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(p), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(p)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(x, "b t (h e) -> b h t e", h=self.heads) for x in (q, k, v))
        p = self.drop.p if self.training else 0.0
        return rearrange(F.scaled_dot_product_attention(q, k, v, dropout_p=p), "b h t e -> b t (h e)")

    def cross(self, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """The cross-attention output alone: frame i's query attends to ctx[:, i] only."""
        b = h.shape[0]
        q = rearrange(self.q(self.ln2(h)), "b n d -> (b n) 1 d")
        k, v = rearrange(self.kv(ctx), "b n l d -> (b n) l d").chunk(2, -1)
        return rearrange(self.cproj(self._attend(q, k, v)), "(b n) 1 d -> b n d", b=b)

    def forward(self, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(h)).chunk(3, -1)
        h = h + self.proj(self._attend(q, k, v))
        h = h + self.cross(h, ctx)
        return h + self.mlp(self.ln3(h))


class LandmarkNet(nn.Module):
    def __init__(self, cfg: LandmarkNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.x_in = nn.Linear(cfg.gen_dim + 1, d)  # coordinates + clean-slot flag
        self.pos = nn.Parameter(torch.randn(1, cfg.frames, d) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.layer_logits = nn.Parameter(torch.zeros(cfg.audio_layers))
        self.audio_in = nn.Sequential(nn.LayerNorm(cfg.audio_width + 1), nn.Linear(cfg.audio_width + 1, d))
        self.audio_pos = nn.Parameter(torch.randn(1, 1, cfg.audio_tokens, d) * 0.02)
        self.ref_in = nn.Linear(cfg.ref_dim, d)
        self.null_audio = nn.Parameter(torch.zeros(cfg.audio_tokens, d))
        self.blocks = nn.ModuleList([_Block(d, cfg.heads, cfg.dropout) for _ in range(cfg.depth)])
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.gen_dim))
        self.cv_in = nn.Sequential(nn.Linear(cfg.cv_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.control_blocks = nn.ModuleList([_Block(d, cfg.heads, cfg.dropout) for _ in range(cfg.control_depth)])
        self.control_zero_in = nn.Linear(d, d)
        self.control_zero_out = nn.ModuleList([nn.Linear(d, d) for _ in range(cfg.control_depth)])
        self.reset_control()

    def reset_control(self) -> None:
        """ControlNet initialisation: copy the trunk's first blocks, zero the projections."""
        for cb, b in zip(self.control_blocks, self.blocks):
            cb.load_state_dict(b.state_dict())
        for z in (self.control_zero_in, *self.control_zero_out):
            nn.init.zeros_(z.weight)
            nn.init.zeros_(z.bias)

    def condition_tokens(self, audio: torch.Tensor, vad: torch.Tensor, refs: torch.Tensor,
                         drop_audio: torch.Tensor | None = None) -> torch.Tensor:
        """c_l tokens: audio (B, N, La, layers*width) + vad (B, N) + refs (B, K, ref_dim)
        -> (B, N, La + K, width). `drop_audio` (B,) bool replaces a sample's audio tokens
        by the learned null tokens (condition dropout in training)."""
        b, n, la, _ = audio.shape
        per = audio.reshape(b, n, la, self.cfg.audio_layers, self.cfg.audio_width)
        per = F.layer_norm(per, per.shape[-1:])
        mixed = torch.einsum("bnlkd,k->bnld", per, self.layer_logits.softmax(0))
        a = self.audio_in(torch.cat([mixed, vad[:, :, None, None].to(mixed.dtype).expand(b, n, la, 1)], -1))
        a = a + self.audio_pos
        if drop_audio is not None:
            a = torch.where(drop_audio[:, None, None, None], self.null_audio.to(a.dtype).expand_as(a), a)
        r = self.ref_in(refs)[:, None].expand(b, n, -1, -1)
        return torch.cat([a, r], 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, c_v: torch.Tensor | None,
                flags: torch.Tensor) -> torch.Tensor:
        """x (B, N, gen_dim) noisy coordinates, t (B,), ctx (B, N, L, width) from
        `condition_tokens`, c_v (B, N, cv_dim) or None (trunk alone), flags (B, N)
        -> v or x0 (B, N, gen_dim)."""
        n = x.shape[1]
        if n > self.cfg.frames:
            raise ValueError(f"window of {n} frames; the model takes at most {self.cfg.frames}")
        h = self.x_in(torch.cat([x, flags[..., None].to(x.dtype)], -1)) + self.pos[:, :n]
        h = h + self.t_mlp(timestep_embedding(t, self.cfg.width).to(x.dtype))[:, None]
        ctrl: list[torch.Tensor] = []
        if c_v is not None:
            c = h + self.control_zero_in(self.cv_in(c_v))
            for cb, z in zip(self.control_blocks, self.control_zero_out):
                c = cb(c, ctx)
                ctrl.append(z(c))
        for i, blk in enumerate(self.blocks):
            h = blk(h, ctx)
            if i < len(ctrl):
                h = h + ctrl[i]
        return self.out(h)


class LandmarkCodec:
    """Head-frame mesh points <-> the network's vectors (one normalisation for
    training and inference, stored with the weights).

    Mouth mode: x = (mouth points - anchor) / scale, anchor = the mean mouth shape of
    the reference frames (the person's own lips: the network learns the motion, not
    the shape); refs = (reference mouth points - template) / scale; c_v = (rest points
    - template) / scale. Head mode generates every sketch point the same way (anchor =
    mean reference shape) plus 4 pose values relative to the references' mean pose
    (log scale, angle, origin x, y in units of the face crop / 20)."""

    def __init__(self, template: np.ndarray, mode: str = "mouth", scale: float = 0.05) -> None:
        from tccp.face import headframe as hf
        from tccp.face.sketch import SKETCH_INDICES

        self.template = np.asarray(template, np.float32)
        self.mode = mode
        self.scale = float(scale)
        self.gen_index = np.asarray(hf.MOUTH if mode == "mouth" else SKETCH_INDICES)
        self.cv_index = np.asarray(hf.REST)
        self.pose_dims = 0 if mode == "mouth" else 4

    @property
    def gen_dim(self) -> int:
        return 2 * len(self.gen_index) + self.pose_dims

    @property
    def ref_dim(self) -> int:
        return 2 * len(self.gen_index)

    @property
    def cv_dim(self) -> int:
        """Mouth mode: the rest points (pose prior); head mode: the context tokens."""
        from tccp.face.context import CONTEXT_DIM

        return 2 * len(self.cv_index) if self.mode == "mouth" else CONTEXT_DIM

    def anchor(self, ref_heads: np.ndarray) -> np.ndarray:
        """(K, 478, 2) reference head-frame meshes -> (G, 2) anchor shape."""
        return ref_heads[:, self.gen_index].mean(0)

    def refs(self, ref_heads: np.ndarray) -> np.ndarray:
        """(K, 478, 2) -> (K, ref_dim)."""
        r = (ref_heads[:, self.gen_index] - self.template[self.gen_index]) / self.scale
        return r.reshape(len(ref_heads), -1).astype(np.float32)

    def control(self, heads: np.ndarray) -> np.ndarray:
        """(N, 478, 2) head-frame meshes -> (N, cv_dim) (mouth mode's pose prior; head
        mode's c_v is the context, `tccp.face.context.context_tokens`)."""
        if self.mode != "mouth":
            raise ValueError("head mode's control input is the context, not landmarks")
        r = (heads[:, self.cv_index] - self.template[self.cv_index]) / self.scale
        return r.reshape(len(heads), -1).astype(np.float32)

    def encode(self, heads: np.ndarray, anchor: np.ndarray, pose: np.ndarray | None = None,
               ref_pose: np.ndarray | None = None) -> np.ndarray:
        """(N, 478, 2) head-frame meshes (+ (N, 4) pose params in crop px / crop size
        for head mode) -> (N, gen_dim)."""
        x = ((heads[:, self.gen_index] - anchor) / self.scale).reshape(len(heads), -1)
        if self.pose_dims:
            x = np.concatenate([x, (pose - ref_pose) * np.array([20, 20, 20, 20], np.float32)], 1)
        return x.astype(np.float32)

    def decode(self, x: np.ndarray, anchor: np.ndarray, base: np.ndarray,
               ref_pose: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, gen_dim) -> (head-frame meshes (N, 478, 2): `base` (N, 478, 2) with the
        generated points replaced, pose params (N, 4) or None)."""
        g = len(self.gen_index)
        out = np.array(base, np.float32, copy=True)
        out[:, self.gen_index] = x[:, : 2 * g].reshape(-1, g, 2) * self.scale + anchor
        pose = None
        if self.pose_dims:
            pose = x[:, 2 * g :] / 20.0 + ref_pose
        return out, pose
