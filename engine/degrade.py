"""The degradation ladder: what a session gives up, in order, when it falls behind.

Live output must keep pace with the input, so instead of letting queues (and latency
and memory) grow, each session walks down a fixed ladder of cheaper modes and back up
once it has had headroom for a while (see docs/engine.md):

    level 0        full quality: stage 1 + stage 2 at `steps` sampler steps
    level 1..k     halve stage 2's sampler steps, down to `min_steps`
    level k+1      0 steps: stage 2 pastes the warped reference without the denoiser
                   (stage 1 costs ~1 ms a window and stays; the mouth still follows
                   the audio, only the learned refinement is skipped)
    level k+2      "passthrough": original frames, no model call

A failed attempt to climb back (the first window after recovering is over budget
again) doubles how long that level waits before the next attempt, so an overloaded
machine settles instead of oscillating every few windows.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import EngineConfig
from engine.stats import Degradation

__all__ = ["Rung", "ladder", "DegradeController"]

MODES = ("generated", "tracked", "passthrough")


@dataclass(frozen=True)
class Rung:
    mode: str
    steps: int


def ladder(steps: int, min_steps: int = 1, mode: str = "generated") -> list[Rung]:
    """The rungs for a given full step count, best first (`mode` 'tracked' starts
    without stage 1)."""
    rungs = [Rung(mode, steps)]
    s = steps
    while s > min_steps:
        s = max(min_steps, s // 2)
        rungs.append(Rung(mode, s))
    if steps > 0:
        rungs.append(Rung(mode, 0))
    rungs.append(Rung("passthrough", 0))
    return rungs


class DegradeController:
    """Chooses the rung for the next window from the latency of the previous ones."""

    MAX_HOLD = 256

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        steps = 4 if cfg.steps is None else cfg.steps  # sessions resolve None to their pack's steps first
        self.rungs = ladder(steps, cfg.min_steps, getattr(cfg, "landmarks", "generated"))
        self.level = 0
        self.budget = cfg.budget_s if cfg.degrade else None
        self._good = 0  # consecutive windows under recover_ratio * budget
        self._hold = [cfg.recover_after] * len(self.rungs)
        self._just_recovered = False

    @property
    def rung(self) -> Rung:
        return self.rungs[self.level]

    @property
    def enabled(self) -> bool:
        return self.budget is not None

    def observe(self, window: int, e2e: float, backlog: bool = False) -> Degradation | None:
        """Feed one finished window's end-to-end latency; returns the change, if any.

        `backlog` (the next window is already waiting) counts as over budget: the
        session is behind even if this window's own latency looked fine.
        """
        if self.budget is None:
            return None
        over = e2e > self.budget or backlog
        if over:
            self._good = 0
            if self._just_recovered and self.level + 1 < len(self.rungs):
                # the climb failed at once: wait longer before trying this level again
                self._hold[self.level + 1] = min(self.MAX_HOLD, self._hold[self.level + 1] * 2)
            self._just_recovered = False
            if self.level + 1 < len(self.rungs):
                old = self.level
                self.level += 1
                why = "backlog" if backlog and e2e <= self.budget else f"e2e {e2e:.3f}s > budget {self.budget:.3f}s"
                return Degradation(window, old, self.level, why)
            return None
        self._just_recovered = False
        if e2e < self.cfg.recover_ratio * self.budget:
            self._good += 1
        else:
            self._good = 0
        if self.level > 0 and self._good >= self._hold[self.level]:
            old = self.level
            self.level -= 1
            self._good = 0
            self._just_recovered = True
            return Degradation(window, old, self.level, "recovered")
        return None
