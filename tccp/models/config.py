"""MVControlNet hyper-parameters and the named configurations.

One dataclass describes one stage (stage 1: landmark sketches, stage 2: faces); both
stages use the same architecture, they differ only in what their inputs mean. The
`paper` config follows Table 3 of the TCCP paper; `small` is sized so that both stages
train meaningfully on two CPU cores in well under an hour and fit a 40 MB fp16 pack;
`tiny` exists only to keep the unit tests fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tccp.errors import TCCPError

__all__ = ["MVConfig", "get_config", "CONFIG_NAMES"]


@dataclass
class MVConfig:
    # latent video: TAEF2 latents, 32 channels, 16 x 16 at the 128 px crop
    latent_channels: int = 32
    latent_size: int = 16
    frames: int = 8
    # extra input channels concatenated to x_t (inpainting-style conditions: stage 2's
    # masked source, warped reference and region mask in mouth mode); 0 = none
    extra_channels: int = 0
    # U-Net
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    # levels (0 = full latent resolution) that get the spatial/temporal self-attention
    # + frame-wise cross-attention block; the middle block always has one
    attention_levels: tuple[int, ...] = (0, 1, 2)
    norm_groups: int = 32
    head_dim: int = 64
    ff_mult: int = 4
    time_embed_dim: int = 128
    dropout: float = 0.1
    # temporal layers (1D conv in each res block, temporal self-attention); False
    # gives a purely per-frame network, used to test that nothing else mixes frames
    temporal: bool = True
    # latent-based condition c_l
    cond_dim: int = 128
    mel_frames: int = 16
    mel_bins: int = 80
    audio_tokens: int = 4
    audio_channels: int = 64
    identity_tokens: int = 16  # 0 disables the identity encoder
    cond_dropout: float = 0.1
    # memory/compute trade-off for large configs on GPU
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_levels = tuple(int(a) for a in self.attention_levels)
        if self.latent_size % (2 ** (len(self.channel_mult) - 1)):
            raise TCCPError(
                f"model config: latent_size {self.latent_size} is not divisible by "
                f"2^{len(self.channel_mult) - 1} (one downsample between levels)"
            )
        for m in self.channel_mult:
            if (self.base_channels * m) % self.norm_groups:
                raise TCCPError(
                    f"model config: channels {self.base_channels * m} not divisible by "
                    f"norm_groups {self.norm_groups}"
                )
        if self.identity_tokens:
            side = int(round(self.identity_tokens**0.5))
            if side * side != self.identity_tokens or self.latent_size % side:
                raise TCCPError(
                    f"model config: identity_tokens {self.identity_tokens} must be a square "
                    f"whose side divides latent_size {self.latent_size}"
                )

    @property
    def cond_tokens(self) -> int:
        """Tokens per frame in c_l (audio then identity)."""
        return self.audio_tokens + self.identity_tokens

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_levels"] = list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MVConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise TCCPError(f"model config: unknown keys {sorted(unknown)}")
        return cls(**d)


def _paper() -> MVConfig:
    # Table 3: base 128, mult 1,2,4, 2 res blocks + 1 down/up sample per scale,
    # self- and cross-attention at every scale, cond/time embeddings 128, head dim 64.
    # Downsampling follows the LDM convention (between levels: 16 -> 8 -> 4, middle at
    # 4x4); a third downsample after the last level would leave a 2x2 middle.
    return MVConfig()


def _small() -> MVConfig:
    # CPU demo model: 2.8 M parameters per stage (11 MB for both stages in fp16).
    # Sized by measurement: one training step at batch 4 (8-frame windows, control
    # branch on) costs 0.73 CPU-seconds, i.e. ~0.4-0.5 s wall on two cores, so each
    # stage gets ~2500 steps in a 20-minute budget. Width 48 cost 1.6x more per step
    # for no gain at this step count; attention only at 8x8 and 4x4, where it is cheap.
    return MVConfig(
        base_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_levels=(1, 2),
        norm_groups=8,
        head_dim=32,
        ff_mult=2,
        time_embed_dim=128,
        dropout=0.0,
        cond_dim=64,
        audio_channels=32,
        audio_tokens=4,
        identity_tokens=16,
    )


def _demo() -> MVConfig:
    # The bundled CPU-trained pack: `small` at 64 px crops (8x8 latents). On a 2-core
    # machine shared with other jobs the TAEF2 encoder costs ~0.1-0.5 s per 128 px
    # image, so the latent cache and each training step are 4x cheaper at 64 px; at
    # 8x8 attention is cheap enough for every level.
    return dataclasses.replace(_small(), latent_size=8, attention_levels=(0, 1, 2))


def _mouth() -> MVConfig:
    # Stage 2 of the default pack (mouth mode): the `small` network on the mouth patch
    # (80 px of a 128 px crop -> 10 x 10 latents), one downsample (10 -> 5), attention
    # at both levels; 65 extra input channels = masked source (32) + warped reference
    # (32) + region mask (1); identity tokens on a 5 x 5 grid of the reference patch.
    return dataclasses.replace(
        _small(), latent_size=10, channel_mult=(1, 2), attention_levels=(0, 1), extra_channels=65,
        identity_tokens=25,
    )


def _tiny() -> MVConfig:
    return MVConfig(
        latent_channels=4,
        latent_size=8,
        frames=4,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        norm_groups=8,
        head_dim=16,
        ff_mult=2,
        time_embed_dim=32,
        dropout=0.0,
        cond_dim=32,
        mel_frames=16,
        mel_bins=80,
        audio_tokens=2,
        audio_channels=8,
        identity_tokens=4,
    )


_CONFIGS = {"paper": _paper, "small": _small, "demo": _demo, "mouth": _mouth, "tiny": _tiny}
CONFIG_NAMES = tuple(_CONFIGS)


def get_config(name: str, **overrides: Any) -> MVConfig:
    """A fresh named config; keyword overrides replace single fields."""
    try:
        cfg = _CONFIGS[name]()
    except KeyError:
        raise TCCPError(f"model config: unknown name {name!r} (choose from {', '.join(CONFIG_NAMES)})") from None
    return dataclasses.replace(cfg, **overrides) if overrides else cfg

