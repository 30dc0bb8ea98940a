"""Exponential moving average of model weights (paper Table 3: EMA 0.9999).

The exported model is the EMA, not the raw weights: diffusion models sample markedly
better from averaged weights. A fixed 0.9999 averages over ~10k steps, so for the short
runs this project can afford (hundreds to a few thousand steps) the EMA would still be
mostly the random initialisation. The decay therefore warms up as
`min(decay, (1 + step) / (10 + step))` (0.1 at step 0, 0.9 at step 80, 0.99 at step
890, capped at `decay`): early on the EMA tracks the model closely, later it averages
over a window that grows with the run.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["EMA", "ema_decay"]


def ema_decay(step: int, decay: float = 0.9999, warmup: bool = True) -> float:
    """The decay used for the update after optimizer step `step` (0-based)."""
    if not warmup:
        return float(decay)
    return float(min(decay, (1.0 + step) / (10.0 + step)))


class EMA:
    """fp32 shadow copies of a module's floating-point parameters and buffers.

    Kept outside the module (a plain dict of tensors) so it never ends up in the
    optimizer, in DDP's gradient buckets or in `model.state_dict()`; `state_dict()`
    returns tensors under the same names as the model's, so EMA weights load straight
    into a fresh `MVControlNet`.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().float().clone() for k, v in _float_items(model)
        }

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Blend the model's current weights into the average; returns the decay used."""
        d = ema_decay(step, self.decay, self.warmup)
        for k, v in _float_items(model):
            s = self.shadow[k]
            s.lerp_(v.detach().to(s.dtype), 1.0 - d)
        return d

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        unexpected = set(state) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(f"EMA state mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        for k, v in state.items():
            self.shadow[k].copy_(v.to(self.shadow[k].device, self.shadow[k].dtype))

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model` (e.g. a separate eval copy)."""
        for k, v in _float_items(model):
            v.copy_(self.shadow[k].to(v.dtype))


def _float_items(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """Parameters and floating buffers by state-dict name (integer buffers such as
    BatchNorm counters are not averaged)."""
    for k, v in model.state_dict(keep_vars=True).items():
        if torch.is_floating_point(v):
            yield k, v
