"""What the stage-2 trainer sees, and in which order (for `tccp.training.trainer`).

Stage 2 (`faces`) generates the mouth patch's correction to the warped reference,
from the sketch (c_v), the masked source, the warped reference and the region mask
(extra input channels) and c_l = audio (mel windows) + the reference patch tokens.
Stage 1 trains in coordinates (`tccp.training.landmarks`).

Batches are drawn by optimizer step, not by iterating a DataLoader: the indices of
step `s` on rank `r` are a pure function of (seed, s, r), computed through
`DistributedSampler` (so multi-GPU shards are the usual disjoint ones), which is what
makes `--resume` continue with exactly the batches an uninterrupted run would have
seen, without saving any loader state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from tccp.errors import TCCPError

__all__ = [
    "STAGES",
    "StageSpec",
    "stage_spec",
    "collate",
    "StepSampler",
    "fixed_subset",
]


@dataclass(frozen=True)
class StageSpec:
    name: str
    target: str  # latent kind generated
    control: str  # latent kind fed to the control branch (c_v)
    number: int
    extra: tuple[str, ...] = ()  # kinds concatenated as extra input channels (inpainting)
    residual_of: str | None = None  # generate target - this kind (a correction), not the target


# Stage 1 is trained in coordinates (`tccp.training.landmarks`), not by this trainer.
# Stage 2 (mouth mode) generates the mouth patch from its sketch (c_v) with the masked
# source, the warped reference and the region mask as extra input channels.
STAGES: dict[str, StageSpec] = {
    # Stage 2 generates the correction to the warped reference (face - warped, in
    # latents): a network that outputs zero is exactly the no-learning warp, so training
    # starts from the baseline and only has to learn what the warp gets wrong.
    "faces": StageSpec("faces", target="faces", control="sketches", number=2, extra=("masked", "warped", "mask"),
                       residual_of="warped"),
    # the alternative measured in docs/faces.md: the warped reference through the
    # control branch instead of the input (no sketch: the warp already has the shape)
    "faces-refctrl": StageSpec("faces-refctrl", target="faces", control="warped", number=2, extra=("masked", "mask")),
}


def stage_spec(stage: str) -> StageSpec:
    aliases = {"2": "faces", "stage2": "faces", "faces_refctrl": "faces-refctrl"}
    key = aliases.get(str(stage), str(stage))
    if key not in STAGES:
        raise TCCPError(f"--stage {stage}: this trainer trains stage 2 ('faces'); stage 1 is 'landmarks' "
                        "(tccp train --stage landmarks)")
    return STAGES[key]


def collate(items: Sequence[dict], spec: StageSpec, device: torch.device | str = "cpu") -> dict:
    """Window items of `LatentWindowDataset` -> the batch `diffusion_loss` takes:
    target/c_v (B, C, N, h, w), mel (B, N, 16, 80), ref (B, C, h, w)."""

    def stack(key: str) -> torch.Tensor:
        return torch.stack([it[key] for it in items]).to(device, non_blocking=True)

    target = stack(spec.target)
    if spec.residual_of:
        target = target - stack(spec.residual_of)
    out = {
        "target": target,
        "c_v": stack(spec.control),
        "mel": stack("mel"),
        "ref": stack("ref"),
    }
    if spec.extra:
        out["extra"] = torch.cat([stack(k) for k in spec.extra], dim=1)
    return out


class StepSampler:
    """Dataset indices of optimizer step `step` for this rank.

    The per-rank index stream is the concatenation of `DistributedSampler` epochs
    (shuffled with seed + epoch, drop_last so every rank has the same count); step `s`
    takes positions `s*B .. s*B+B-1` of that stream, crossing epoch boundaries when
    the epoch length is not a multiple of B.
    """

    def __init__(self, dataset_len: int, batch: int, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        if dataset_len < world:
            raise TCCPError(f"only {dataset_len} training windows for {world} processes")
        self.n = dataset_len
        self.batch = batch
        self._sampler = DistributedSampler(
            range(dataset_len), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.per_epoch = len(self._sampler)
        self._cache: dict[int, list[int]] = {}

    def _epoch(self, e: int) -> list[int]:
        if e not in self._cache:
            self._sampler.set_epoch(e)
            self._cache = {e: list(iter(self._sampler))}  # keep one epoch in memory
        return self._cache[e]

    def indices(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.batch, (step + 1) * self.batch):
            e, i = divmod(pos, self.per_epoch)
            out.append(self._epoch(e)[i])
        return out

    def epoch(self, step: int) -> float:
        """Epochs completed (fractional) after `step` steps."""
        return step * self.batch / self.per_epoch


def fixed_subset(n: int, k: int) -> list[int]:
    """`k` indices spread evenly over range(n): the fixed validation windows."""
    if n <= k:
        return list(range(n))
    return [int(round(x)) for x in np.linspace(0, n - 1, k)]


# --------------------------------------------------------------------------- latent cache
