"""Which model pack a command works on: a trained pack, or random weights of a named
config written to a real (temporary) pack.

Random weights go through a pack on disk rather than straight into memory so that
every backend, export included, takes the same path as with a trained pack; the
result is labelled `random:<config>` everywhere it is reported.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tccp.errors import TCCPError

__all__ = ["random_pack", "resolve_pack"]


def random_pack(config: str, out_dir: str | os.PathLike, seed: int = 0, crop_size: int | None = None) -> Path:
    """Write a pack with random weights of named config `config` (latent channels
    forced to TAEF2's 32). The control branches' zero convs are nudged off zero, as
    in `engine.runner.PipelineRunner.random`, so the random model really depends on
    its video condition (a zero branch would hide control-branch export bugs)."""
    from tccp.models.autoencoder import DOWNSCALE, LATENT_CHANNELS
    from tccp.models.config import get_config
    from tccp.models.mvcontrolnet import MVControlNet
    from tccp.pack import save_pack

    cfg = get_config(config, latent_channels=LATENT_CHANNELS)
    torch.manual_seed(seed)
    stages = [MVControlNet(cfg), MVControlNet(cfg)]
    with torch.no_grad():
        for m in stages:
            for p in m.parameters():
                if p.abs().sum() == 0:  # zero-initialised layers (zero convs, conv_out)
                    p.normal_(0, 0.02)
    return save_pack(out_dir, *stages, crop_size=crop_size or cfg.latent_size * DOWNSCALE,
                     card={"random_weights": True, "config": config, "seed": seed}, dtype=torch.float32)


def resolve_pack(model: str | None, config: str | None, scratch: str | os.PathLike) -> tuple[Path, str]:
    """(pack folder, label) for `--model PACK` / `--config NAME` (random weights).

    Neither given: the bundled default pack, or a one-line error while it does not
    exist yet."""
    from tccp.pack import DEFAULT_PACK, read_pack_config

    if model and config:
        raise TCCPError("--model and --config exclude each other (--config means random weights)")
    if config:
        return random_pack(config, Path(scratch) / f"random-{config}"), f"random:{config} (RANDOM WEIGHTS)"
    pack = Path(model) if model else DEFAULT_PACK
    if not model and not (DEFAULT_PACK / "config.json").is_file():
        raise TCCPError(f"{DEFAULT_PACK}: the bundled model pack does not exist yet; pass --model PACK "
                        "or --config NAME (random weights)")
    read_pack_config(pack)  # one-line error for a bad pack before any work
    return pack, str(pack)
