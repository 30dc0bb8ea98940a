"""An avatar's validation numbers: fine-tuned weights vs the base pack on held-out footage.

Both numbers are computed on the tail of the person's own videos, which fine-tuning
never saw, with identical inputs, noise and reference images for both models, so the
difference is the fine-tuning alone:

- **stage-2 validation loss**: the training objective (`diffusion_loss`, window mode)
  on up to 64 fixed windows of the tail with fixed timesteps and noise, as
  `tccp train` validates.
- **face PSNR in the head mask**: the engine's stage 2 (`PipelineRunner`, 'tracked'
  mode: driven by sketches of the tracked landmarks, autoregressive windows, the
  avatar's reference bank as identity) regenerates the tail's face crops, compared with
  the real crops inside the head mask (`tccp.metrics.masked_psnr`). With the geometry
  given, this measures appearance: how much the generated face looks like the person.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["stage2_val_loss", "face_psnr", "compare_packs"]


@torch.no_grad()
def stage2_val_loss(
    stage2: torch.nn.Module,
    cache: str | os.PathLike,
    folders: Sequence[Path],
    latent_norm: Any,
    window: int,
    device: torch.device | str = "cpu",
    max_windows: int = 64,
    seed: int = 0,
) -> tuple[float, int]:
    """(mean window-mode diffusion loss, windows used) of `stage2` on the clips."""
    from tccp.data.datasets import LatentWindowDataset
    from tccp.data.windows import collate, fixed_subset, stage_spec
    from tccp.diffusion.loss import diffusion_loss
    from tccp.diffusion.schedule import Schedule

    ds = LatentWindowDataset(cache, list(folders), window=window, split=None, deterministic=True, seed=seed)
    if len(ds) == 0:
        return float("nan"), 0
    spec = stage_spec("faces")
    idx = fixed_subset(len(ds), max_windows)
    schedule = Schedule()
    stage2 = stage2.to(device).eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total, n = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        for a in range(0, len(idx), 8):
            batch = collate([ds[i] for i in idx[a:a + 8]], spec, device)
            batch = {k: latent_norm.to_model(v) if k in ("target", "c_v", "ref") else v for k, v in batch.items()}
            b = batch["target"].shape[0]
            gen_dev = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
            loss = diffusion_loss(stage2, batch, schedule, p_first=0.0, cond_dropout=0.0, first=False, generator=gen_dev)
            total += float(loss) * b
            n += b
    return total / max(1, n), n


def _head_masks(clip: Any, frames: np.ndarray) -> np.ndarray:
    from tccp.face.geometry import head_mask

    s = clip.size
    box = np.array([0, 0, s, s], np.float32)
    out = np.zeros((len(frames), s, s), np.float32)
    for j, i in enumerate(frames):
        lm = np.nan_to_num(clip.mesh_landmarks(int(i)), nan=0.0)
        out[j] = head_mask(lm, box, s) if clip.found[int(i)] else 0.0
    return out


def face_psnr(
    runner: Any,
    clips: Sequence[Any],
    window: int = 8,
    steps: int = 4,
    max_frames: int = 250,
    seed: int = 0,
) -> tuple[float, int]:
    """(face PSNR in dB inside the head mask, frames) of stage 2 regenerating the clips'
    face crops from their tracked sketches (see module docstring)."""
    from engine.runner import WindowRequest
    from tccp.metrics import masked_psnr

    new = window - 1
    real, gen, masks = [], [], []
    budget = max_frames
    for clip in clips:
        n = min(clip.n_frames, budget)
        if n < 1:
            break
        budget -= n
        faces, ctx = clip.faces[:n], clip.contexts[:n]
        sketches = clip.sketches(range(n))
        mel = clip.mel_windows[:n].astype(np.float32)
        state = None
        out = []
        for k, a in enumerate(range(0, n, new)):
            sl = slice(a, min(n, a + new))
            req = WindowRequest(
                mode="tracked", steps=steps, sampler="ddim", guidance=1.0, window=window,
                contexts=ctx[sl], sketches=sketches[sl], mel=mel[sl], identity=faces[0],
                state=state, seed=seed + k,
            )
            res = runner.run_batch([req])[0]
            state = res.state
            out.append(res.faces)
        real.append(faces)
        gen.append(np.concatenate(out)[:n])
        masks.append(_head_masks(clip, np.arange(n)))
    if not real:
        return float("nan"), 0
    r, g, m = np.concatenate(real), np.concatenate(gen), np.concatenate(masks)
    return float(masked_psnr(r, g, m)), int(len(r))


def compare_packs(
    packs: dict[str, str | os.PathLike],
    tail_folders: Sequence[Path],
    cache: str | os.PathLike,
    bank: Any,
    device: str = "cpu",
    steps: int = 4,
    max_frames: int = 250,
    log: Any = None,
) -> dict[str, Any]:
    """Validation numbers of each named pack (e.g. {"base": ..., "avatar": ...})."""
    from engine.runner import PipelineRunner
    from tccp.data.datasets import PreparedClip
    from tccp.pack import load_pack

    clips = [PreparedClip(f) for f in tail_folders]
    out: dict[str, Any] = {"stage2_val_loss": {}, "face_psnr_db": {}}
    for name, pack in packs.items():
        pipe = load_pack(pack, device=device)
        window = int(pipe.stage2.cfg.frames)
        loss, n_win = stage2_val_loss(pipe.stage2, cache, tail_folders, pipe.norm, window, device)
        runner = PipelineRunner(pipe, references=bank)
        psnr, n_frames = face_psnr(runner, clips, steps=steps, max_frames=max_frames)
        out["stage2_val_loss"][name] = loss
        out["face_psnr_db"][name] = psnr
        out["val_windows"], out["psnr_frames"] = n_win, n_frames
        if log is not None:
            log(f"validation ({name}): stage-2 loss {loss:.4f} on {n_win} windows, "
                f"face PSNR {psnr:.2f} dB on {n_frames} frames")
    out["steps"] = steps
    return out
