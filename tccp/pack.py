"""Model pack: everything the engine needs to run both stages, in one folder.

    <pack>/config.json        format "tccp-pack", version 2; region; crop size;
                              stage1: the landmark network's config, the coordinate
                              scale, sampler steps, the audio encoder's name;
                              stage2: MVConfig, schedule, sampler, latent norm, the
                              residual scale when the network generates the correction
                              to the warped reference (or null: a warp-only pack, the
                              no-learning baseline);
                              autoencoder ("taef2"); card (how it was trained)
    <pack>/stage1.safetensors landmark network + its head-frame template (fp16)
    <pack>/stage2.safetensors mouth-patch MVControlNet (fp16)
    <pack>/stage1_head.safetensors  optional: head mode's landmark network (every
                              sketch point + the head pose from audio and the
                              head-masked context; config "stage1_head"), for
                              `--region head`

Version 1 packs (stage 1 generating sketch latents, stage 2 regenerating the whole
head at 64 px) are refused with one line naming the version. Packs are written
atomically; anything wrong with one is a `TCCPError` naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tccp.diffusion.schedule import Schedule
from tccp.errors import TCCPError
from tccp.io_utils import read_descriptor
from tccp.models.config import MVConfig
from tccp.models.landmarks import LandmarkCodec, LandmarkNet, LandmarkNetConfig, audio_radius
from tccp.models.mvcontrolnet import MVControlNet
from tccp.pipeline import EditPipeline, LatentNorm, SamplerConfig

__all__ = [
    "DEFAULT_PACK",
    "PACK_FORMAT",
    "PACK_VERSION",
    "save_pack",
    "read_pack_config",
    "load_stage1",
    "load_stage2",
    "load_pack",
    "load_head_generator",
    "STAGE1_SCALE",
    "STAGE1_STEPS",
]

DEFAULT_PACK = Path(__file__).resolve().parent / "assets" / "models" / "default"
PACK_FORMAT = "tccp-pack"
PACK_VERSION = 2
STAGE1_SCALE, STAGE1_STEPS = 0.05, 4
"""Stage-1 settings a pack's config may leave out (coordinate scale of the codec, sampler
steps): read here and by the exported backends (`export.backends`)."""
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def save_pack(
    path: str | os.PathLike,
    stage1: LandmarkNet,
    codec: LandmarkCodec,
    stage2: MVControlNet | None,
    *,
    schedule: Schedule | None = None,
    sampler: SamplerConfig | None = None,
    latent_norm: LatentNorm | None = None,
    crop_size: int = 128,
    stage1_steps: int = 4,
    card: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
    extra_files: dict[str, Path] | None = None,
    residual_scale: float | None = None,
    articulation: float = 1.0,
    stage1_head: tuple[LandmarkNet, LandmarkCodec] | None = None,
) -> Path:
    """Write a pack folder atomically; returns its path."""
    from safetensors.torch import save_file

    from tccp.io_utils import atomic_dir

    if stage1_head is not None and stage1_head[0].cfg.audio_encoder != stage1.cfg.audio_encoder:
        raise TCCPError(f"pack: stage 1 reads Whisper {stage1.cfg.audio_encoder} features, the head-mode stage 1 "
                        f"{stage1_head[0].cfg.audio_encoder}: the engine runs one encoder (train both on one)")
    dtype_name = {v: k for k, v in _DTYPES.items()}[dtype]
    config = {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "region": "mouth",
        "crop_size": int(crop_size),
        "stage1": {"kind": "landmarks", "model": stage1.cfg.to_dict(), "scale": codec.scale, "steps": int(stage1_steps),
                   "audio": {"encoder": "whisper", "name": stage1.cfg.audio_encoder, "radius": audio_radius(stage1.cfg)},
                   # gain on the generated lip opening (scale_opening) that undoes the
                   # network's measured damping; users' --mouth-scale multiplies it
                   "articulation": float(articulation)},
        "stage2": None if stage2 is None else {
            "kind": "faces", "model": stage2.cfg.to_dict(), "schedule": (schedule or Schedule(prediction="v")).to_dict(),
            "sampler": (sampler or SamplerConfig()).to_dict(),
            "latent_norm": {"scale": (latent_norm or LatentNorm()).scale, "shift": (latent_norm or LatentNorm()).shift},
            # the network generates face - warped reference (x this scale); None: the face
            "residual_scale": residual_scale,
        },
        "stage1_head": None if stage1_head is None else {
            "kind": "landmarks", "model": stage1_head[0].cfg.to_dict(), "scale": stage1_head[1].scale,
            "steps": int(stage1_steps),
            "audio": {"encoder": "whisper", "name": stage1_head[0].cfg.audio_encoder,
                      "radius": audio_radius(stage1_head[0].cfg)}},
        "autoencoder": "taef2",
        "dtype": dtype_name,
        "card": card or {},
    }
    final = Path(path)
    with atomic_dir(final) as tmp:
        s1 = {k: v.detach().to("cpu", dtype).contiguous() for k, v in stage1.state_dict().items()}
        s1["template"] = torch.from_numpy(np.ascontiguousarray(codec.template, np.float32))
        save_file(s1, str(tmp / "stage1.safetensors"), metadata={"format": PACK_FORMAT, "stage": "stage1"})
        if stage2 is not None:
            s2 = {k: v.detach().to("cpu", dtype).contiguous() for k, v in stage2.state_dict().items()}
            save_file(s2, str(tmp / "stage2.safetensors"), metadata={"format": PACK_FORMAT, "stage": "stage2"})
        if stage1_head is not None:
            sh = {k: v.detach().to("cpu", dtype).contiguous() for k, v in stage1_head[0].state_dict().items()}
            sh["template"] = torch.from_numpy(np.ascontiguousarray(stage1_head[1].template, np.float32))
            save_file(sh, str(tmp / "stage1_head.safetensors"), metadata={"format": PACK_FORMAT, "stage": "stage1_head"})
        for name, src in (extra_files or {}).items():
            (tmp / name).write_bytes(Path(src).read_bytes())
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return final


def read_pack_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parsed and checked config.json of a pack folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise TCCPError(f"{folder}: model pack not found (no such folder)")
    cfg_path = folder / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        raw = None
    if isinstance(raw, dict) and raw.get("format") == PACK_FORMAT and raw.get("version") == 1:
        raise TCCPError(f"{cfg_path}: a version 1 pack (latent sketches, whole head at 64 px) from before the mouth "
                        f"editor; this engine reads version {PACK_VERSION} packs: use the bundled pack or retrain")
    config = read_descriptor(cfg_path, PACK_FORMAT, PACK_VERSION, missing=f"{folder} is not a model pack",
                             unreadable="pack config", not_a="TCCP model pack config", noun="pack")
    if not isinstance(config.get("stage1"), dict):
        raise TCCPError(f"{cfg_path}: 'stage1' config missing")
    return config


def _load_file(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise TCCPError(f"{file}: missing from the model pack")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TCCPError(f"{file}: corrupt weights file ({first})") from None


def load_stage1(path: str | os.PathLike, device: str | torch.device = "cpu", key: str = "stage1"
                ) -> tuple[LandmarkNet, LandmarkCodec]:
    """A pack's landmark network and codec: `key` "stage1" (mouth mode) or "stage1_head"
    (head mode; a `TCCPError` when the pack has none)."""
    folder = Path(path)
    config = read_pack_config(folder)
    c1 = config.get(key)
    if not isinstance(c1, dict):
        raise TCCPError(f"{folder}: this pack has no head-mode stage 1 (no '{key}' in its config); "
                        f"--region head needs a pack exported with --stage1-head")
    try:
        cfg = LandmarkNetConfig.from_dict(c1["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TCCPError(f"{folder / 'config.json'}: {key}: bad model config ({exc})") from None
    file = folder / f"{key}.safetensors"
    state = _load_file(file)
    template = state.pop("template", None)
    if template is None:
        raise TCCPError(f"{file}: no head-frame template")
    net = LandmarkNet(cfg)
    try:
        net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise TCCPError(f"{file}: weights do not match the config "
                        f"({str(exc).splitlines()[0]})") from None
    codec = LandmarkCodec(template.float().numpy(), cfg.mode, float(c1.get("scale", STAGE1_SCALE)))
    return net.requires_grad_(False).to(device).eval(), codec


def load_stage2(path: str | os.PathLike, device: str | torch.device = "cpu") -> MVControlNet | None:
    folder = Path(path)
    config = read_pack_config(folder)
    c2 = config.get("stage2")
    if c2 is None:
        return None
    try:
        cfg = MVConfig.from_dict(c2["model"])
    except (KeyError, TypeError, ValueError, TCCPError) as exc:
        raise TCCPError(f"{folder / 'config.json'}: stage2: bad model config ({exc})") from None
    model = MVControlNet(cfg)
    state = _load_file(folder / "stage2.safetensors")
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise TCCPError(f"{folder / 'stage2.safetensors'}: weights do not match the config "
                        f"({str(exc).splitlines()[0]})") from None
    return model.requires_grad_(False).to(device).eval()


def load_pack(
    path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    with_autoencoder: bool = True,
) -> EditPipeline:
    """The pipeline of a pack folder (None: the bundled default pack)."""
    folder = Path(path) if path is not None else DEFAULT_PACK
    config = read_pack_config(folder)
    net, codec = load_stage1(folder, device)
    model2 = load_stage2(folder, device)
    c2 = config.get("stage2") or {}
    try:
        schedule = Schedule.from_dict(c2.get("schedule", {"prediction": "v"}))
        sampler = SamplerConfig.from_dict(c2.get("sampler", {}))
        norm = LatentNorm(**c2.get("latent_norm", {}))
    except (TypeError, ValueError) as exc:
        raise TCCPError(f"{folder / 'config.json'}: bad schedule/sampler settings ({exc})") from None
    autoencoder = None
    if with_autoencoder:
        from tccp.models.autoencoder import load_autoencoder

        try:
            autoencoder = load_autoencoder(device=device, dtype=dtype)
        except FileNotFoundError as exc:
            raise TCCPError(str(exc)) from None
    from tccp.media.whisper import load_whisper

    whisper = load_whisper(config["stage1"].get("audio", {}).get("name", "tiny.en"), device=str(device))
    if model2 is not None and dtype != torch.float32:
        model2 = model2.to(dtype)
    pipe = EditPipeline.build(net, codec, model2, autoencoder, whisper, crop_size=int(config.get("crop_size", 128)),
                              schedule=schedule, sampler=sampler, latent_norm=norm,
                              stage1_steps=int(config["stage1"].get("steps", STAGE1_STEPS)),
                              residual_scale=c2.get("residual_scale"))
    pipe.pack_config = config
    pipe.stage1_head = load_head_generator(folder, device)
    return pipe


def load_head_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """The pack's head-mode stage 1 as a `LandmarkGenerator` (`--region head`), or None
    when the pack has none."""
    config = read_pack_config(path)
    if not isinstance(config.get("stage1_head"), dict):
        return None
    from tccp.pipelines.landmarks import LandmarkGenerator

    net, codec = load_stage1(path, device, key="stage1_head")
    return LandmarkGenerator(net, codec, Schedule(prediction="v"), steps=int(config["stage1_head"].get("steps", STAGE1_STEPS)))
