"""Prometheus metrics of the server, one registry per app.

A private `CollectorRegistry` (not the process-global default) so several apps can
live in one process (tests) and `/metrics` shows exactly this server's numbers.
Per-window engine latencies come from each session's `stats.windows`
(`engine.stats.WindowTiming`); `WindowFeed` remembers how far it has read so every
window is observed exactly once.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

__all__ = ["ServerMetrics", "WindowFeed"]

# 40 ms (one frame) .. 10 s: real-time windows should sit in the first few buckets
LATENCY_BUCKETS = (0.02, 0.04, 0.08, 0.12, 0.16, 0.2, 0.28, 0.4, 0.56, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class ServerMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry(auto_describe=True)
        self.sessions_active = Gauge("tccp_sessions_active", "WebRTC sessions open now", registry=r)
        self.sessions_max = Gauge("tccp_sessions_max", "Configured --max-sessions", registry=r)
        self.sessions_started = Counter("tccp_sessions_started", "Sessions accepted", registry=r)
        self.sessions_rejected = Counter(
            "tccp_sessions_rejected", "Offers refused", ["reason"], registry=r
        )
        self.sessions_closed = Counter(
            "tccp_sessions_closed", "Sessions ended", ["reason"], registry=r
        )
        self.frames_in = Counter(
            "tccp_frames_in", "Media frames received (video: after 25 fps resampling)",
            ["kind"], registry=r,
        )
        self.frames_out = Counter(
            "tccp_frames_out", "Video frames sent back", ["generated"], registry=r
        )
        self.frames_late = Counter(
            "tccp_frames_late", "Generated frames that missed their playout slot (the original went out)",
            registry=r,
        )
        self.session_errors = Counter(
            "tccp_session_errors", "Engine sessions that failed mid-call (the call went on with its own frames)",
            registry=r,
        )
        self.peer_generated = Gauge(
            "tccp_session_generated_ratio", "Share of the frames sent to a call that were generated (per open call)",
            ["peer"], registry=r,
        )
        self.peer_delay = Gauge(
            "tccp_session_playout_delay_seconds", "Playout delay of an open call (its video and audio)",
            ["peer"], registry=r,
        )
        self.warmup_seconds = Gauge(
            "tccp_warmup_seconds", "Model warm-up at server start (wall time)", registry=r,
        )
        self.model_window_seconds = Gauge(
            "tccp_model_window_seconds", "Per-window work of a warm window measured at server start", registry=r,
        )
        self.frame_latency = Histogram(
            "tccp_frame_latency_seconds",
            "Server latency per output frame: arrival of its input frame -> handed to the encoder (the playout delay)",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.window_latency = Histogram(
            "tccp_window_latency_seconds",
            "Engine per-window end-to-end latency (Session stats e2e)",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.window_stage = Histogram(
            "tccp_window_stage_seconds", "Engine per-window time by step", ["step"],
            buckets=LATENCY_BUCKETS, registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class WindowFeed:
    """Observes the new windows of one session's stats into the histograms."""

    STEPS = ("queue_wait", "stage1", "stage2", "composite")

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self._seen_total = 0

    def poll(self, stats: Any) -> int:
        """Observe windows added since the last call; returns how many."""
        lock = getattr(stats, "_lock", None)  # windows are appended from other threads
        with lock if lock is not None else contextlib.nullcontext():
            total = int(getattr(stats, "windows_total", 0) or 0)
            windows = getattr(stats, "windows", None) or ()
            fresh = min(total - self._seen_total, len(windows))
            # only the new tail: the deque holds up to 10k windows of a long session
            new = list(itertools.islice(reversed(windows), max(0, fresh)))[::-1]
        self._seen_total = total
        for w in new:
            self.metrics.window_latency.observe(float(getattr(w, "e2e", 0.0)))
            if getattr(w, "mode", "") != "passthrough":
                for step in self.STEPS:
                    self.metrics.window_stage.labels(step).observe(float(getattr(w, step, 0.0)))
        return len(new)
