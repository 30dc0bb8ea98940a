"""TAEF2: the tiny pretrained latent autoencoder every model in the project works in.

The diffusion models never see pixels: faces, context crops and sketches are encoded
once to `(32, S/8, S/8)` latents and generated latents are decoded back. TAEF2 (the
distilled FLUX.2 tiny autoencoder from madebyollin/taesd, MIT) is small enough
(1.34 M parameters per half) to run on CPU in real time at 128 px.

The modules are written here from the published layout (plain `nn.Sequential` stacks,
so the state-dict keys are `<position>.<...>`); the weights are vendored as
safetensors in `tccp/assets/taef2/` (see `scripts/vendor_taef2.py`), so loading never
unpickles anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn

__all__ = [
    "LATENT_CHANNELS",
    "DOWNSCALE",
    "ASSET_DIR",
    "Block",
    "make_encoder",
    "make_decoder",
    "TinyAutoencoder",
    "load_autoencoder",
]

LATENT_CHANNELS = 32
DOWNSCALE = 8
ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "taef2"
_WIDTH = 64


def _conv(n_in: int, n_out: int, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class _SoftClamp(nn.Module):
    """`3 tanh(x / 3)`: keeps out-of-range latents (e.g. from a diffusion sampler)
    from blowing up the decoder while being near-identity on real ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3.0) * 3.0


class Block(nn.Module):
    """Residual conv block; `mid=True` adds the GroupNorm 1x1 branch of the
    lowest-resolution stage (applied to the input before the convs)."""

    def __init__(self, channels: int = _WIDTH, mid: bool = False) -> None:
        super().__init__()
        c = channels
        self.conv = nn.Sequential(_conv(c, c), nn.ReLU(), _conv(c, c), nn.ReLU(), _conv(c, c))
        self.pool: nn.Module | None = None
        if mid:
            self.pool = nn.Sequential(
                nn.Conv2d(c, 4 * c, 1, bias=False),
                nn.GroupNorm(4, 4 * c),
                nn.ReLU(),
                nn.Conv2d(4 * c, c, 1, bias=False),
            )
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


def make_encoder(latent_channels: int = LATENT_CHANNELS) -> nn.Sequential:
    """RGB [0, 1] (B, 3, H, W) -> latent (B, 32, H/8, W/8)."""
    c = _WIDTH
    layers: list[nn.Module] = [_conv(3, c), Block(c)]
    for stage in range(3):
        mid = stage == 2
        layers += [_conv(c, c, bias=False, stride=2), Block(c, mid), Block(c, mid), Block(c, mid)]
    layers.append(_conv(c, latent_channels))
    return nn.Sequential(*layers)


def make_decoder(latent_channels: int = LATENT_CHANNELS) -> nn.Sequential:
    """Latent (B, 32, h, w) -> RGB (B, 3, 8h, 8w), unclamped."""
    c = _WIDTH
    layers: list[nn.Module] = [_SoftClamp(), _conv(latent_channels, c), nn.ReLU()]
    layers += [Block(c, mid=True) for _ in range(3)]
    for n_blocks in (3, 3, 1):
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(c, c, bias=False)]
        layers += [Block(c) for _ in range(n_blocks)]
    layers.append(_conv(c, 3))
    return nn.Sequential(*layers)


class TinyAutoencoder(nn.Module):
    """Encoder + decoder pair with tensor and numpy entry points."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = make_encoder()
        self.decoder = make_decoder()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, 32, H/8, W/8); H, W multiples of 8."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got {tuple(x.shape)}")
        if x.shape[-1] % DOWNSCALE or x.shape[-2] % DOWNSCALE:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of {DOWNSCALE}")
        return self.encoder(x.to(self.device, self.dtype))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 32, h, w) -> (B, 3, 8h, 8w) in [0, 1]."""
        if z.ndim != 4 or z.shape[1] != LATENT_CHANNELS:
            raise ValueError(f"expected (B, {LATENT_CHANNELS}, h, w) latents, got {tuple(z.shape)}")
        return self.decoder(z.to(self.device, self.dtype)).clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.inference_mode()
    def encode_images(self, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
        """uint8 (N, H, W, 3) RGB -> latents (N, 32, H/8, W/8) on the model's device.

        Batched so that encoding a whole clip does not hold every activation at once.
        """
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))
            x = rearrange(x, "b h w c -> b c h w").to(self.device, self.dtype) / 255.0
            out.append(self.encode(x))
        if not out:
            raise ValueError("no images to encode")
        return torch.cat(out)

    @torch.inference_mode()
    def decode_latents(self, z: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Latents (N, 32, h, w) -> uint8 (N, 8h, 8w, 3) RGB."""
        if z.ndim == 3:
            z = z[None]
        out = []
        for i in range(0, len(z), batch_size):
            x = self.decode(z[i : i + batch_size])
            x = rearrange(x.float().mul(255.0).round_(), "b c h w -> b h w c")
            out.append(x.to(torch.uint8).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


def load_autoencoder(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> TinyAutoencoder:
    """The pretrained TAEF2 in eval mode with gradients off (it is never trained here)."""
    from safetensors.torch import load_file

    model = TinyAutoencoder()
    for name, module in (("encoder", model.encoder), ("decoder", model.decoder)):
        path = ASSET_DIR / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: TAEF2 weights missing (run scripts/vendor_taef2.py)")
        module.load_state_dict(load_file(str(path)), strict=True)
    model.requires_grad_(False)
    return model.eval().to(device=device, dtype=dtype)
