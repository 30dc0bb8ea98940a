"""Model pack: everything the engine needs to run both stages, in one folder.

    <pack>/config.json        format/version, MVConfig per stage, schedule, default
                              sampler, latent normalisation, autoencoder ("taef2"),
                              crop size, card (training summary, free-form)
    <pack>/stage1.safetensors landmark-sketch MVControlNet weights (fp16 by default)
    <pack>/stage2.safetensors face MVControlNet weights

fp16 halves the download/ship size (the bundled `small` pack is ~23 MB); weights are
cast back to the requested dtype on load. Packs are written atomically (a partially
written pack never has the final name). Anything wrong with a pack is a user error:
`TCCPError` with one line naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from tccp.diffusion.schedule import Schedule
from tccp.errors import TCCPError
from tccp.io_utils import read_descriptor
from tccp.models.config import MVConfig
from tccp.models.mvcontrolnet import MVControlNet
from tccp.pipeline import LatentNorm, SamplerConfig, TCCPPipeline

__all__ = [
    "DEFAULT_PACK",
    "PACK_FORMAT",
    "save_pack",
    "read_pack_config",
    "load_stage",
    "load_stage_state",
    "load_pack",
]

DEFAULT_PACK = Path(__file__).resolve().parent / "assets" / "models" / "default"
PACK_FORMAT = "tccp-pack"
PACK_VERSION = 1
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def save_pack(
    path: str | os.PathLike,
    stage1: MVControlNet,
    stage2: MVControlNet,
    *,
    schedule: Schedule | None = None,
    sampler: SamplerConfig | None = None,
    latent_norm: LatentNorm | None = None,
    crop_size: int = 128,
    card: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a pack folder (atomically replacing an existing one); returns its path."""
    from safetensors.torch import save_file

    from tccp.io_utils import atomic_dir

    dtype_name = {v: k for k, v in _DTYPES.items()}[dtype]
    config = {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "stage1": stage1.cfg.to_dict(),
        "stage2": stage2.cfg.to_dict(),
        "schedule": (schedule or Schedule()).to_dict(),
        "sampler": (sampler or SamplerConfig()).to_dict(),
        "latent_norm": {"scale": (latent_norm or LatentNorm()).scale, "shift": (latent_norm or LatentNorm()).shift},
        "autoencoder": "taef2",
        "crop_size": int(crop_size),
        "dtype": dtype_name,
        "card": card or {},
    }
    final = Path(path)
    with atomic_dir(final) as tmp:
        for name, model in (("stage1", stage1), ("stage2", stage2)):
            state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / f"{name}.safetensors"), metadata={"format": PACK_FORMAT, "stage": name})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    return final


def read_pack_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parsed and checked config.json of a pack folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise TCCPError(f"{folder}: model pack not found (no such folder)")
    cfg_path = folder / "config.json"
    config = read_descriptor(cfg_path, PACK_FORMAT, PACK_VERSION, missing=f"{folder} is not a model pack",
                             unreadable="pack config", not_a="TCCP model pack config", noun="pack")
    for key in ("stage1", "stage2"):
        if not isinstance(config.get(key), dict):
            raise TCCPError(f"{cfg_path}: '{key}' model config missing")
    return config


def _stage_config(config: dict[str, Any], key: str, cfg_path: Path) -> MVConfig:
    try:
        return MVConfig.from_dict(config[key])
    except TCCPError as exc:
        raise TCCPError(f"{cfg_path}: {key}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise TCCPError(f"{cfg_path}: {key}: bad model config ({exc})") from None


def load_stage_state(path: str | os.PathLike, stage: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """State dict of stage 1 or 2 of a pack (cast to `dtype`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if stage not in (1, 2):
        raise ValueError("stage must be 1 or 2")
    read_pack_config(path)
    file = Path(path) / f"stage{stage}.safetensors"
    if not file.is_file():
        raise TCCPError(f"{file}: missing from the model pack")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise TCCPError(f"{file}: corrupt weights file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def load_stage(
    path: str | os.PathLike, stage: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> MVControlNet:
    """One stage's MVControlNet from a pack, in eval mode on `device`."""
    folder = Path(path)
    config = read_pack_config(folder)
    cfg = _stage_config(config, f"stage{stage}", folder / "config.json")
    model = MVControlNet(cfg)
    state = load_stage_state(folder, stage, dtype=torch.float32)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "mismatch"
        raise TCCPError(f"{folder / f'stage{stage}.safetensors'}: weights do not match the config ({first})") from None
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()


def load_pack(
    path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    with_autoencoder: bool = True,
) -> TCCPPipeline:
    """The pipeline of a pack folder (None: the bundled default pack)."""
    folder = Path(path) if path is not None else DEFAULT_PACK
    config = read_pack_config(folder)
    cfg_path = folder / "config.json"
    stage1 = load_stage(folder, 1, device, dtype)
    stage2 = load_stage(folder, 2, device, dtype)
    try:
        schedule = Schedule.from_dict(config.get("schedule", {}))
        sampler = SamplerConfig.from_dict(config.get("sampler", {}))
        norm = LatentNorm(**config.get("latent_norm", {}))
    except (TypeError, ValueError) as exc:
        raise TCCPError(f"{cfg_path}: bad schedule/sampler settings ({exc})") from None
    autoencoder = None
    if with_autoencoder:
        if config.get("autoencoder", "taef2") != "taef2":
            raise TCCPError(f"{cfg_path}: unknown autoencoder {config.get('autoencoder')!r} (only 'taef2')")
        from tccp.models.autoencoder import load_autoencoder

        try:
            autoencoder = load_autoencoder(device=device, dtype=dtype)
        except FileNotFoundError as exc:
            raise TCCPError(str(exc)) from None
    pipe = TCCPPipeline(stage1, stage2, autoencoder, sampler=sampler, schedule=schedule, latent_norm=norm)
    pipe.pack_config = config
    return pipe
