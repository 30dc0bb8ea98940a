"""Per-window timings and session counters.

Everything the CLI summary prints and the server exports to Prometheus comes from
here, so the two can never disagree. Timings are kept per window (bounded: the last
`max_windows`), counters are cumulative.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["WindowTiming", "SessionStats", "Degradation", "percentile"]

TIMING_FIELDS = ("queue_wait", "stage1", "stage2", "composite", "e2e")


@dataclass
class WindowTiming:
    """Seconds spent by one window in each step.

    queue_wait: window ready (frames tracked and cropped) -> its model call started
    (waiting behind this session's previous window and other sessions' calls);
    stage1 / stage2: model time of each stage (stage1 is 0 when skipped);
    composite: paste-back of all its frames; e2e: arrival of the window's last input
    frame -> its frames queued for output.
    """

    window: int
    frames: int
    level: int
    steps: int
    mode: str
    """'generated', 'tracked' (stage 1 skipped), or 'passthrough'."""
    batch: int = 1
    queue_wait: float = 0.0
    features: float = 0.0
    """Whisper tokens + voice activity of the window's frames."""
    stage1: float = 0.0
    stage2: float = 0.0
    composite: float = 0.0
    e2e: float = 0.0


@dataclass
class Degradation:
    window: int
    from_level: int
    to_level: int
    reason: str


def percentile(values: list[float] | np.ndarray, q: float) -> float:
    arr = np.asarray(values, np.float64)
    return float(np.percentile(arr, q)) if arr.size else 0.0


@dataclass
class SessionStats:
    """Counters and timings of one session (thread-safe for the few cross-thread bumps)."""

    max_windows: int = 10000
    frames_in: int = 0
    frames_out: int = 0
    frames_generated: int = 0
    passthrough: Counter = field(default_factory=Counter)
    """Frames passed through unchanged, by reason ('no_face', 'overload',
    'degraded', 'error', 'identity')."""
    dropped_input: int = 0
    dropped_output: int = 0
    duplicated_input: int = 0
    """Alignment: input frames repeated to fill the 25 fps grid."""
    windows: deque = field(default_factory=deque)
    degradations: list = field(default_factory=list)
    windows_total: int = 0
    started: float = 0.0
    finished: float = 0.0
    error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_window(self, timing: WindowTiming) -> None:
        with self._lock:
            self.windows.append(timing)
            self.windows_total += 1
            while len(self.windows) > self.max_windows:
                self.windows.popleft()

    def add_degradation(self, d: Degradation) -> None:
        with self._lock:
            self.degradations.append(d)
            if len(self.degradations) > self.max_windows:
                del self.degradations[0]

    def latency(self, name: str = "e2e") -> dict[str, float]:
        vals = [getattr(w, name) for w in self.windows if w.mode != "passthrough" or name == "e2e"]
        return {
            "p50": percentile(vals, 50),
            "p95": percentile(vals, 95),
            "max": float(max(vals)) if vals else 0.0,
            "mean": float(np.mean(vals)) if vals else 0.0,
        }

    @property
    def passed_through(self) -> int:
        return int(sum(self.passthrough.values()))

    def summary(self) -> dict[str, Any]:
        """Nested dict for humans (CLI summary, JSON reports)."""
        elapsed = max(1e-9, (self.finished or 0.0) - self.started) if self.started else 0.0
        modes = Counter(w.mode for w in self.windows)
        return {
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "frames_generated": self.frames_generated,
            "frames_passed_through": self.passed_through,
            "passthrough_reasons": dict(self.passthrough),
            "dropped_input": self.dropped_input,
            "dropped_output": self.dropped_output,
            "duplicated_input": self.duplicated_input,
            "windows": self.windows_total,
            "window_modes": dict(modes),
            "degradations": len(self.degradations),
            "elapsed_s": elapsed,
            "fps": (self.frames_out / elapsed) if elapsed else 0.0,
            "latency": {name: self.latency(name) for name in TIMING_FIELDS},
            "error": self.error,
        }

    def as_metrics(self, prefix: str = "tccp_engine_") -> dict[str, float]:
        """Flat `name -> number` dict (Prometheus-friendly names, seconds for times)."""
        out: dict[str, float] = {
            f"{prefix}frames_in_total": self.frames_in,
            f"{prefix}frames_out_total": self.frames_out,
            f"{prefix}frames_generated_total": self.frames_generated,
            f"{prefix}frames_passthrough_total": self.passed_through,
            f"{prefix}frames_dropped_input_total": self.dropped_input,
            f"{prefix}frames_dropped_output_total": self.dropped_output,
            f"{prefix}windows_total": self.windows_total,
            f"{prefix}degradations_total": len(self.degradations),
            f"{prefix}level": self.windows[-1].level if self.windows else 0,
            f"{prefix}steps": self.windows[-1].steps if self.windows else 0,
        }
        for reason, n in self.passthrough.items():
            out[f"{prefix}frames_passthrough_{reason}_total"] = n
        for name in TIMING_FIELDS:
            lat = self.latency(name)
            out[f"{prefix}{name}_seconds_p50"] = lat["p50"]
            out[f"{prefix}{name}_seconds_p95"] = lat["p95"]
        return out

    def window_records(self) -> list[dict[str, Any]]:
        return [asdict(w) for w in self.windows]
