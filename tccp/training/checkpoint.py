"""Training checkpoints: safetensors + JSON only (nothing is unpickled on load).

A checkpoint is one folder, written atomically:

- `model.safetensors`  raw weights (fp32)
- `ema.safetensors`    EMA weights (fp32); what gets exported
- `optim.safetensors`  optimizer moments, keys `<param index>/<name>` (absent in a
                       weights-only checkpoint)
- `rng.safetensors`    torch CPU/CUDA generator states (uint8), for bit-exact resume
- `state.json`         step, optimizer param groups, trainer counters, timings
- `config.json`        the run config (train + model + schedule), so a checkpoint
                       folder is self-describing

Folders live in `<run>/checkpoints/step_XXXXXXXX/` with a `latest` text file naming
the newest; older ones are pruned to `keep`. A weights-only checkpoint (fp16 EMA +
model, no optimizer) is small enough to come back from a GPU machine; resuming from
it restarts the Adam moments (documented as inexact).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from tccp.errors import TCCPError
from tccp.io_utils import atomic_dir, atomic_path

__all__ = [
    "CKPT_DIR",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "optimizer_to_tensors",
    "optimizer_from_tensors",
    "save_tensors",
    "load_tensors",
    "write_json",
]

CKPT_DIR = "checkpoints"
_LATEST = "latest"


# --------------------------------------------------------------------------- files


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None,
                 metadata: dict[str, str] | None = None) -> None:
    """safetensors file of contiguous CPU tensors (floats cast to `dtype` if given).

    Tied tensors (one storage under two names) are cloned, since safetensors refuses
    shared storage."""
    from safetensors.torch import save_file

    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if dtype is not None and torch.is_floating_point(v):
            v = v.to(dtype)
        out[k] = v.contiguous().clone()
    save_file(out, str(path), metadata=metadata)


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types
        raise TCCPError(f"{path}: not a readable safetensors file ({exc})") from None


def write_json(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- optimizer


def optimizer_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """torch optimizer `state_dict()` -> (flat tensors, JSON-able param groups)."""
    tensors: dict[str, torch.Tensor] = {}
    for idx, slots in state["state"].items():
        for name, value in slots.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}/{name}"] = t
    groups = [dict(g) for g in state["param_groups"]]
    for g in groups:
        for k, v in list(g.items()):
            if isinstance(v, tuple):
                g[k] = list(v)
    return tensors, groups


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = value
    fixed = []
    for g in groups:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        fixed.append(g)
    return {"state": state, "param_groups": fixed}


# --------------------------------------------------------------------------- folders


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "state.json").is_file())


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of a run (by the `latest` pointer, else by name).

    `run_dir` may also be a checkpoint folder itself."""
    run = Path(run_dir)
    if (run / "state.json").is_file() and (run / "ema.safetensors").is_file():
        return run
    pointer = run / CKPT_DIR / _LATEST
    if pointer.is_file():
        p = run / CKPT_DIR / pointer.read_text().strip()
        if (p / "state.json").is_file():
            return p
    found = list_checkpoints(run)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    config: dict,
    state: dict,
    optim_state: dict | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    keep: int = 3,
    weights_dtype: torch.dtype | None = None,
    folder: str | os.PathLike | None = None,
) -> Path:
    """Write one checkpoint folder atomically, point `latest` at it, prune old ones.

    `folder` writes to an explicit folder instead (no pointer, no pruning): used for
    the weights-only fp16 copies that come back from a GPU machine.
    """
    final = Path(folder) if folder is not None else Path(run_dir) / CKPT_DIR / _step_name(step)
    with atomic_dir(final) as tmp:
        meta = {"step": str(step)}
        save_tensors(model_state, tmp / "model.safetensors", weights_dtype, meta)
        save_tensors(ema_state, tmp / "ema.safetensors", weights_dtype, meta)
        st = dict(state, step=int(step), has_optimizer=optim_state is not None)
        if optim_state is not None:
            tensors, groups = optimizer_to_tensors(optim_state)
            save_tensors(tensors, tmp / "optim.safetensors")
            st["param_groups"] = groups
        if rng:
            save_tensors(rng, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps(st, indent=1, sort_keys=True) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    if folder is None:
        root = Path(run_dir) / CKPT_DIR
        with atomic_path(root / _LATEST) as tmp:
            tmp.write_text(final.name + "\n")
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """{"model", "ema", "optim" (torch state dict or None), "rng", "state", "config", "path"}."""
    p = Path(folder)
    for name in ("state.json", "config.json", "ema.safetensors"):
        if not (p / name).is_file():
            raise TCCPError(f"{p}: not a training checkpoint (no {name})")
    try:
        state = json.loads((p / "state.json").read_text())
        config = json.loads((p / "config.json").read_text())
    except ValueError as exc:
        raise TCCPError(f"{p}: damaged checkpoint JSON ({exc})") from None
    ema = load_tensors(p / "ema.safetensors", device)
    model = load_tensors(p / "model.safetensors", device) if (p / "model.safetensors").is_file() else None
    optim = None
    if state.get("has_optimizer") and (p / "optim.safetensors").is_file():
        optim = optimizer_from_tensors(load_tensors(p / "optim.safetensors", device), state["param_groups"])
    rng = load_tensors(p / "rng.safetensors") if (p / "rng.safetensors").is_file() else {}
    return {"model": model, "ema": ema, "optim": optim, "rng": rng, "state": state, "config": config, "path": p}
