"""Which model pack a command works on: a trained pack, or random weights of a named
configuration written to a real (temporary) pack.

Random weights go through a pack on disk rather than straight into memory so that
every backend, export included, takes the same path as with a trained pack; the
result is labelled `random:<config>` everywhere it is reported.

    mouth      the default pack's shapes: LandmarkNet's default config (stage 1) and
               the `mouth` MVControlNet (stage 2, 10x10 latents of the 80 px mouth
               patch of a 128 px crop); what speed is measured on before a trained
               pack exists
    tiny       the random-weight models of `engine.runner.PipelineRunner.random`
               (64 px crops): tests
    tiny-warp  the same stage 1 and no stage 2 (a warp-only pack): tests
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tccp.errors import TCCPError

__all__ = ["RANDOM_CONFIGS", "random_models", "random_pack", "resolve_pack"]

RANDOM_CONFIGS = ("mouth", "tiny", "tiny-warp")


def _nudge(module: torch.nn.Module) -> None:
    """Zero-initialised layers (ControlNet zero projections, output convs) off zero,
    so a random model really depends on every input (a zero branch would hide an
    export bug in it)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)


def random_models(config: str, seed: int = 0) -> tuple[torch.nn.Module, object, torch.nn.Module | None, int]:
    """(stage-1 net, codec, stage-2 model or None, crop size) with random weights."""
    from engine.runner import default_template
    from tccp.face.regions import patch_box
    from tccp.models.autoencoder import LATENT_CHANNELS
    from tccp.models.config import get_config
    from tccp.models.landmarks import LandmarkCodec, LandmarkNet, LandmarkNetConfig
    from tccp.models.mvcontrolnet import MVControlNet

    if config not in RANDOM_CONFIGS:
        raise TCCPError(f"--config {config}: unknown (choose from {', '.join(RANDOM_CONFIGS)})")
    torch.manual_seed(seed)
    codec = LandmarkCodec(default_template(), "mouth")
    dims = {"gen_dim": codec.gen_dim, "cv_dim": codec.cv_dim, "ref_dim": codec.ref_dim}
    if config == "mouth":
        size = 128
        net = LandmarkNet(LandmarkNetConfig(**dims))
        model = MVControlNet(get_config("mouth", latent_channels=LATENT_CHANNELS))
    else:
        size = 64
        net = LandmarkNet(LandmarkNetConfig(**dims, width=32, depth=1, control_depth=1, heads=2))
        model = None
        if config == "tiny":
            x0, _, x1, _ = patch_box(size)
            lat = (x1 - x0) // 8
            model = MVControlNet(get_config("tiny", latent_channels=LATENT_CHANNELS, latent_size=lat, channel_mult=(1,),
                                            attention_levels=(0,), extra_channels=2 * LATENT_CHANNELS + 1,
                                            identity_tokens=lat * lat, frames=8))
    _nudge(net)
    if model is not None:
        _nudge(model)
    return net.requires_grad_(False).eval(), codec, None if model is None else model.requires_grad_(False).eval(), size


def random_pack(config: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a pack with random weights of named config `config` (see module doc)."""
    from tccp.pack import save_pack

    net, codec, model, size = random_models(config, seed)
    return save_pack(out_dir, net, codec, model, crop_size=size, dtype=torch.float32,
                     card={"random_weights": True, "config": config, "seed": seed})


def resolve_pack(model: str | None, config: str | None, scratch: str | os.PathLike) -> tuple[Path, str]:
    """(pack folder, label) for `--model PACK` / `--config NAME` (random weights).

    Neither given: the bundled default pack, or a one-line error while it does not
    exist (or is still of the old format)."""
    from tccp.pack import DEFAULT_PACK, read_pack_config

    if model and config:
        raise TCCPError("--model and --config exclude each other (--config means random weights)")
    if config:
        return random_pack(config, Path(scratch) / f"random-{config}"), f"random:{config} (RANDOM WEIGHTS)"
    pack = Path(model) if model else DEFAULT_PACK
    if not model and not (DEFAULT_PACK / "config.json").is_file():
        raise TCCPError(f"{DEFAULT_PACK}: the bundled model pack does not exist yet; pass --model PACK "
                        "or --config NAME (random weights)")
    read_pack_config(pack)  # one-line error for a bad (or version 1) pack before any work
    return pack, str(pack)
