"""Engine settings shared by file runs, the microphone and WebRTC sessions.

One dataclass so that every entry point (CLI, demo, server) exposes the same knobs and
the degradation policy in docs/engine.md has one place to read its thresholds from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

__all__ = ["EngineConfig", "SAMPLERS"]

SAMPLERS = ("ddim", "dpmpp", "ddpm")


@dataclass
class EngineConfig:
    """Per-session engine settings.

    `live=True` is for real-time sources (camera, microphone, WebRTC): input never
    blocks (the oldest frame is dropped and counted), a slow `get()` consumer loses
    the oldest output frames, and the latency budget drives degradation. `live=False`
    (files) applies backpressure instead and, unless a budget is given, never degrades:
    an offline render should be full quality however long it takes.
    """

    steps: int | None = None
    """Stage-2 sampler steps at full quality (0: the warped reference, no denoiser);
    None: the model pack's own setting (its `stage2.sampler.steps`; 0 without stage 2)."""
    sampler: str = "ddim"
    min_steps: int = 1
    """Degradation never reduces the step count below this."""
    guidance: float = 1.0
    """Classifier-free guidance scale (1 = off: one model call per step)."""
    window: int = 8
    """Slots per model window: slot 0 conditions, `window - 1` frames are new."""
    fps: float = 25.0
    sr: int = 16000
    live: bool = False
    latency_budget_s: float | None = None
    """End-to-end budget per window (last frame in -> its output out). None = auto:
    live sessions get the real-time budget `budget_windows * (window - 1) / fps`,
    file sessions get none (no degradation)."""
    budget_windows: float = 2.0
    """Auto live budget in units of one window's duration (0.28 s at 25 fps)."""
    recover_after: int = 4
    """Windows comfortably under budget (< `recover_ratio` x budget) before one
    degradation level is undone."""
    recover_ratio: float = 0.5
    degrade: bool = True
    """Allow the degradation ladder at all (False: always full quality)."""
    video_queue: int = 32
    """Input frames buffered before alignment (live: drop oldest beyond this)."""
    job_queue: int = 2
    """Prepared windows waiting for the model (live: the oldest is passed through)."""
    output_queue: int = 64
    """Composited frames waiting for `get()` (live: drop oldest beyond this)."""
    audio_wait_s: float = 0.5
    """Live: how long a ready window waits for its audio before using silence."""
    max_gap_frames: int = 12
    """Live A/V alignment: a gap in the input longer than this many 25 fps slots is
    not filled with repeated frames (the grid restarts at the next frame)."""
    identity: np.ndarray | None = field(default=None, repr=False)
    """A still image of the person (uint8 RGB, one face): the session's only reference
    for stage 2. None: references come from `references` or the session's own frames."""
    landmarks: str = "generated"
    """'generated': stage 1 predicts the landmarks from context + audio (the paper's
    pipeline). 'tracked': stage 1 is skipped and stage 2 is driven by the tracked
    landmarks of the input (the upper bound of the model card, and a choice for
    footage whose own head motion should be kept)."""
    region: str = "mouth"
    """What is edited: 'mouth' (the lower face; the rest of the source is kept: dubbing,
    live calls) or 'head' (the whole head from the references, with stage 1's head mode
    generating expression and pose: avatar replacement, TCCP's setting; warp only)."""
    mouth_scale: float = 1.0
    """Mouth-opening factor on stage 1's coordinates (0 closed, 1 as generated, 2 double)."""
    gate: bool = True
    """Rest the mouth where the voice-activity detector hears no speech."""
    silence_motion: float | None = None
    """Share of the generated mouth motion the gate keeps in silence (0: fully at rest,
    1: no rest); None: `tccp.pipelines.landmarks.GATE_FLOOR` (0.2, measured in
    docs/lipsync.md "Silence")."""
    references: Any = field(default=None, repr=False)
    """A ready reference bank (`tccp.pipelines.faces.ReferenceBank`, e.g. from
    `engine.refs.scan_video` or an image); None: built from the session's own frames."""
    stage1: Any = field(default=None, repr=False)
    """A session's own stage-1 generator (mouth mode), e.g. the pack's adapted to the
    person by `engine.adapt`; None: the pack's."""
    adapt_steps: int = 50
    """File runs with generated landmarks: fine-tune a copy of stage 1 on the source
    video's own speech for this many steps before generating (`engine.adapt`; 0: off;
    50 measured as good as 100 at half the wait, docs/lipsync.md). Live sessions adapt
    only with `live_adapt`, and want 100 (streamed features: 50 steps measured no gain)."""
    adapt_seconds: float = 15.0
    """How much of the source video (or of a live call) the adaptation learns from."""
    live_adapt: bool = False
    """Live sessions (mouth region, generated landmarks, no `stage1` given): after the
    call's first `adapt_seconds` with a face, adapt a copy of stage 1 to the caller in a
    background thread (`engine.adapt.LiveAdapter`, `adapt_steps` steps) and use it from
    then on. Off by default: the training takes CPU from the call for a few seconds."""
    adapt_audio: Any = None
    """The source video's own speech as a separate file (path), aligned with the video,
    for a video whose track is elsewhere (stems); None: the video's own track. Never the
    driving audio of a dub: that is not what the source's mouth says."""
    adapt_start_s: float | None = 0.0
    """Where in the source that part starts; None: no adaptation (e.g. an evaluation
    whose clip has nothing outside the judged seconds)."""
    replay_tracking: bool = True
    """File runs that adapt: the session replays the adaptation's tracking of the
    source's start instead of tracking those frames again (`engine.prep.ReplayTracker`;
    the same observations). Off only to measure what it saves (`tccp bench --startup`)."""
    seed: int = 0
    colour_match: bool = True
    feather: float = 0.06
    """Gaussian feather of the paste-back mask, as a fraction of the crop size."""

    def __post_init__(self) -> None:
        if self.landmarks not in ("generated", "tracked"):
            raise ValueError(f"landmarks must be 'generated' or 'tracked', got {self.landmarks!r}")
        if self.region not in ("mouth", "head"):
            raise ValueError(f"region must be 'mouth' or 'head', got {self.region!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if (self.steps is not None and self.steps < 0) or self.min_steps < 1:
            raise ValueError("steps must be >= 0 and min_steps >= 1")
        if self.steps is not None:
            self.min_steps = max(1, min(self.min_steps, self.steps))  # steps 0 (warp only) keeps 1
        if self.window < 2:
            raise ValueError("window must have at least 2 slots")
        if self.adapt_steps < 0 or self.adapt_seconds < 0:
            raise ValueError("adapt_steps and adapt_seconds must be >= 0")
        if min(self.video_queue, self.job_queue, self.output_queue) < 1:
            raise ValueError("queue sizes must be >= 1")

    @property
    def new_frames(self) -> int:
        """Frames generated per window (the conditioning slot is not new)."""
        return self.window - 1

    @property
    def budget_s(self) -> float | None:
        """The effective per-window latency budget (None: unlimited)."""
        if self.latency_budget_s is not None:
            return float(self.latency_budget_s)
        if self.live:
            return self.budget_windows * self.new_frames / self.fps
        return None

    def with_(self, **changes: Any) -> "EngineConfig":
        return replace(self, **changes)
