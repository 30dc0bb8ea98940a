"""What a live call needs from the engine besides a `Session`: its policy, warm parts,
and an in-process replay to measure it (`tccp bench --live`).

- `LiveController`: the degradation policy of calls. The engine's ladder ends in a
  "passthrough" level that, once reached, hands back original frames for many windows
  while it waits to climb back. A call's playout already sends the original for any
  frame the engine does not finish in time (`streaming.playout`), so that level buys
  nothing: this controller keeps the step-halving rungs (when the pack has a stage 2)
  but never goes to pass-through, and its budget is the playout's slack, so the
  session skips ahead (`reason="overload"`) only the windows that can no longer make
  their slot, and generates every other one.
- `live_config`: the engine settings of calls on a model (a pack without a stage 2
  runs the warp-only rung, 0 steps, from the first window).
- `TrackerPool`: face trackers built before calls need them (a mediapipe graph takes
  0.3-0.6 s to build, ~40 ms more on its first frame), lent to sessions and taken back
  (reset) when they close.
- `warm_up`: one short run of the bundled sample through a live session at server
  start: Whisper, the mel filterbank (~1.3 s on its first call), stage 1, the warp,
  TAEF2 and the compositor pay their first-call costs there instead of in the first
  call, and the per-window time it measures sets the playout delay.
- `replay`: a clip in real time through a session and its playout, in process (no
  WebRTC): first frame, first generated frame, generated share, frame latency and
  A/V offset, as `tccp bench --live` reports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from engine.config import EngineConfig
from engine.degrade import DegradeController

__all__ = ["LiveController", "live_config", "has_stage2", "TrackerPool", "WarmUp", "warm_up", "replay",
           "new_session"]

log = logging.getLogger("tccp.serve")


class LiveController(DegradeController):
    """See the module docstring. `slack()` -> seconds a window may take from its last
    frame's arrival until its first frame must be ready (the playout delay minus the
    window's own span; None: the engine's own budget).

    Besides the rung it decides, per window, whether generating it is still worth it
    (`skip`) and whether the compositor may spend time on the references' fine detail
    (`detail`), from the work the session's last windows took (`stats`, the session's
    `SessionStats`, set by `new_session`)."""

    RECENT = 8
    TOLERANCE_S = 0.08
    """A window may start this much too late: only its first ~2 frames miss their slot."""
    MAX_SKIPS = 3
    """After this many windows skipped in a row, one that is not yet past its budget
    is generated anyway, so a one-off slow window cannot keep a session skipping."""
    DETAIL_HOLD = 50
    """Windows the detail transfer stays off once it was switched off (~14 s)."""

    def __init__(self, cfg: EngineConfig, slack: Callable[[], float] | None = None, stats: Any = None) -> None:
        super().__init__(cfg)
        if len(self.rungs) > 1 and self.rungs[-1].mode == "passthrough":
            self.rungs = self.rungs[:-1]
            self._hold = self._hold[: len(self.rungs)]
        self._slack = slack
        self.stats = stats
        self.period = cfg.new_frames / cfg.fps
        self.lookahead = 0.1 + 1.0 / cfg.fps
        self.skipped = 0
        self._skips_seen = 0
        self._in_a_row = 0
        self._first_window: int | None = None
        self._detail = True
        self._detail_off_at = -1
        self.detail_switches = 0

    def set_slack(self, slack: Callable[[], float] | None) -> None:
        self._slack = slack

    @property  # type: ignore[override]
    def budget(self) -> float | None:
        if self._budget is None:
            return None
        if self._slack is not None:
            return max(0.05, float(self._slack()))
        return self._budget

    @budget.setter
    def budget(self, value: float | None) -> None:
        self._budget = value

    def _recent(self) -> list:
        """The session's last generated windows, without its first one (which pays
        one-off costs: a new tracker's first frames, a first batch shape)."""
        st = self.stats
        if st is None:
            return []
        lock = getattr(st, "_lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            tail = list(st.windows)[-3 * self.RECENT:]
        gen = [w for w in tail if w.mode != "passthrough"]
        if gen and self._first_window is None:
            self._first_window = gen[0].window
        return [w for w in gen if w.window != self._first_window][-self.RECENT:]

    def front_work(self) -> float | None:
        """Seconds from a window's model call to its first frame being pasted (median of
        the last windows; None before any)."""
        ws = self._recent()
        if not ws:
            return None
        return float(np.median([w.features + w.stage1 + w.stage2 + w.composite / max(1, w.frames) for w in ws]))

    def skip(self, age: float, waiting: bool) -> bool:
        """Skip a window that starts `age` s after its last frame arrived if even its
        first frame can no longer make its slot; without a measure yet, only when
        another window waits and the budget is spent (the engine's rule)."""
        budget = self.budget
        if budget is None:
            return False
        work = self.front_work()
        if work is None:
            late = waiting and age > budget
        else:
            # the window still waits for its audio look-ahead (0.1 s + one frame)
            late = max(age, self.lookahead) + work > budget + self.TOLERANCE_S
        if late and self._in_a_row >= self.MAX_SKIPS and age <= budget:
            late = False  # try one now and then: the measure of the work stays current
        self._in_a_row = self._in_a_row + 1 if late else 0
        if late:
            self.skipped += 1
        return late

    @property
    def detail(self) -> bool:
        """Fine detail from the references when pasting (~60% of the compositing): off
        while the session cannot keep up (a window skipped, or the generator or the
        compositor slower than real time), back on after `DETAIL_HOLD` windows."""
        ws = self._recent()
        total = self.stats.windows_total if self.stats is not None else 0
        behind = False
        if ws:
            gen = float(np.median([w.features + w.stage1 + w.stage2 for w in ws]))
            comp = float(np.median([w.composite for w in ws]))
            behind = max(gen, comp) > 0.9 * self.period
        if self._detail and (behind or self.skipped_recently()):
            self._detail, self._detail_off_at = False, total
            self.detail_switches += 1
        elif not self._detail and total - self._detail_off_at >= self.DETAIL_HOLD and not behind:
            self._detail = True
            self.detail_switches += 1
        return self._detail

    def skipped_recently(self) -> bool:
        """A window was skipped among the last few decisions."""
        recent = self._skips_seen
        self._skips_seen = self.skipped
        return self.skipped > recent


def has_stage2(model: Any) -> bool:
    """Whether the model has a trained mouth-patch denoiser (else: warp-only)."""
    runner = getattr(model, "runner", model)
    stage2 = getattr(getattr(runner, "pipeline", None), "stage2", None)
    if stage2 is None:
        return True  # not a PipelineRunner (test doubles): keep the configured steps
    return getattr(stage2, "model", None) is not None


def live_config(model: Any, base: EngineConfig | None = None) -> EngineConfig:
    """Engine settings of calls: live, and 0 steps when the pack has no stage 2
    (`steps=None` stays: each session takes its pack's own steps)."""
    cfg = (base or EngineConfig()).with_(live=True)
    if not has_stage2(model) and cfg.steps:
        cfg = cfg.with_(steps=0)
    return cfg


def new_session(model: Any, cfg: EngineConfig, slack: Callable[[], float] | None = None, tracker: Any = None,
                name: str | None = None):
    """An engine Session for a call, with the live controller."""
    from engine.session import Session

    sess = Session(model, cfg, tracker=tracker, name=name)
    # sess.cfg: the session resolved `steps=None` to the pack's own steps
    sess.controller = LiveController(sess.cfg, slack, stats=sess.stats)
    return sess


# --------------------------------------------------------------------------- trackers
class _Lent:
    """A pooled tracker as a session sees it: `close()` gives it back."""

    def __init__(self, pool: "TrackerPool", tracker: Any) -> None:
        self._pool, self._tracker = pool, tracker

    def update(self, frame: np.ndarray, t: float | None = None):
        return self._tracker.update(frame, t)

    def reset(self) -> None:
        self._tracker.reset()

    def close(self) -> None:
        tracker, self._tracker = self._tracker, None
        if tracker is not None:
            self._pool.give_back(tracker)


class TrackerPool:
    """Up to `size` ready face trackers (see module docstring). `factory()` builds one
    (default: `tccp.face.track.FaceTracker`)."""

    def __init__(self, size: int, factory: Callable[[], Any] | None = None, fps: float = 25.0,
                 prebuild: bool = True) -> None:
        self.size = max(0, int(size))
        self._factory = factory or (lambda: _face_tracker(fps))
        self._ready: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self.built = 0
        self._thread: threading.Thread | None = None
        if prebuild and self.size:
            self._thread = threading.Thread(target=self._fill, name="tccp-trackers", daemon=True)
            self._thread.start()

    def _fill(self) -> None:
        while True:
            with self._lock:
                if self._closed or self.built >= self.size:
                    return
                self.built += 1
            try:
                tr = self._factory()
            except Exception as exc:  # noqa: BLE001 - sessions build their own then
                log.warning("could not pre-build a face tracker: %r", exc)
                return
            self.give_back(tr)

    def wait_ready(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def take(self) -> Any:
        """A ready tracker (reset), or None: the session builds its own."""
        with self._lock:
            tr = self._ready.pop() if self._ready else None
        return None if tr is None else _Lent(self, tr)

    def give_back(self, tracker: Any) -> None:
        try:
            if hasattr(tracker, "reset"):
                tracker.reset()
        except Exception:  # noqa: BLE001 - a broken tracker is not kept
            _close(tracker)
            return
        with self._lock:
            keep = not self._closed and len(self._ready) < self.size
            if keep:
                self._ready.append(tracker)
        if not keep:
            _close(tracker)

    @property
    def available(self) -> int:
        with self._lock:
            return len(self._ready)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ready, self._ready = self._ready, []
        for tr in ready:
            _close(tr)


def _close(tracker: Any) -> None:
    try:
        tracker.close()
    except Exception:  # noqa: BLE001
        pass


def _face_tracker(fps: float):
    from tccp.face.track import FaceTracker, FaceTrackerConfig

    return FaceTracker(FaceTrackerConfig(fps=fps))


# --------------------------------------------------------------------------- warm-up
@dataclass
class WarmUp:
    seconds: float
    """Wall time of the warm-up."""
    window_s: float | None
    """Per-window work of a warm window: tracking 7 frames + audio features + both
    stages + compositing (None: no window was generated)."""
    windows: int


def warm_up(model: Any, cfg: EngineConfig, tracker: Any = None, clip: str | None = None,
            frames: int = 28) -> WarmUp:
    """Run the first `frames` frames of the bundled sample (or `clip`) through a live
    session on `model` (blocking; call at server start, off the event loop)."""
    from tccp.media.io import read_audio, read_video, sample_paths

    t0 = time.perf_counter()
    path = clip or sample_paths()[0]
    video = read_video(path, max_frames=frames)
    audio = read_audio(path, sr=cfg.sr, max_seconds=len(video.frames) / cfg.fps + 0.5)
    trk = tracker
    track_s: list[float] = []
    if trk is not None:  # time the tracker on the clip (then reset for the session)
        for i, f in enumerate(video.frames[:8]):
            t = time.perf_counter()
            trk.update(f, i / cfg.fps)
            track_s.append(time.perf_counter() - t)
        if hasattr(trk, "reset"):
            trk.reset()

    async def run() -> Any:
        from engine.session import Session

        sess = Session(model, cfg.with_(live=True, degrade=False, job_queue=8, video_queue=max(64, frames)),
                       tracker=trk, name="warm-up")
        await sess.push_audio(audio, 0.0)
        for i, f in enumerate(video.frames):
            await sess.push_video(f, i / cfg.fps)

        async def drain() -> None:
            while await sess.get() is not None:
                pass

        reader = asyncio.ensure_future(drain())
        await sess.close()
        await reader
        return sess.stats

    stats = asyncio.run(run()) if _no_loop() else _run_in_thread(run)
    gen = [w for w in stats.windows if w.mode != "passthrough"]
    window_s = None
    if len(gen) >= 2:
        steady = gen[1:]
        work = [w.features + w.stage1 + w.stage2 + w.composite for w in steady]
        track = 7 * (float(np.median(track_s[1:])) if len(track_s) > 1 else 0.01)
        window_s = float(np.median(work)) + track
    return WarmUp(time.perf_counter() - t0, window_s, len(gen))


def _no_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


def _run_in_thread(coro_fn) -> Any:
    box: dict = {}

    def go() -> None:
        try:
            box["v"] = asyncio.run(coro_fn())
        except BaseException as exc:  # noqa: BLE001
            box["e"] = exc

    th = threading.Thread(target=go, name="tccp-warm-up")
    th.start()
    th.join()
    if "e" in box:
        raise box["e"]
    return box["v"]


# --------------------------------------------------------------------------- replay
async def replay(model: Any, frames: np.ndarray, audio: np.ndarray, cfg: EngineConfig, seconds: float,
                 delay_s: float | None = None, window_s: float | None = None, tracker: Any = None,
                 fps: float = 25.0, sr: int = 16000) -> dict[str, Any]:
    """Play `frames` (looped, 25 fps) and `audio` (mono float32 at `sr`, looped) in real
    time through a live session and its playout for `seconds`; returns the report of
    `tccp bench --live` (times in ms from the first frame pushed)."""
    from streaming.playout import AudioDelayLine, DelayedAudioReader, Playout, auto_delay

    delay = delay_s if delay_s is not None else auto_delay(window_s, cfg.new_frames, fps)
    holder: dict = {}
    slack = lambda: holder["playout"].delay - (cfg.new_frames - 1) / fps  # noqa: E731
    sess = new_session(model, cfg, slack, tracker=tracker, name="bench-live")
    origin = time.monotonic()  # media starts now (after the session exists, as in a call)
    playout = holder["playout"] = Playout(origin, delay_s=delay, fps=fps)
    line = AudioDelayLine(sr)
    n_total = int(round(seconds * fps))
    block = sr // 50
    sent: list[tuple[float, float, bool]] = []  # (send time, pts, generated)
    audio_sent: list[tuple[float, float]] = []  # (send time, session time of the block)
    arrivals: dict[float, float] = {}

    async def feed() -> None:
        k_audio = 0
        for i in range(n_total):
            t = i / fps
            await asyncio.sleep(max(0.0, origin + t - time.monotonic()))
            while k_audio * block / sr <= t + 0.02:
                idx = (np.arange(k_audio * block, (k_audio + 1) * block)) % max(1, audio.size)
                chunk = audio[idx].astype(np.float32)
                ta = k_audio * block / sr
                line.push(chunk, ta)
                await sess.push_audio(chunk, ta)
                k_audio += 1
            frame = frames[i % len(frames)]
            now = time.monotonic()
            arrivals[round(t, 4)] = now
            playout.add_input(t, frame, now)
            await sess.push_video(frame, t)

    async def outputs() -> None:
        while True:
            out = await sess.get()
            if out is None:
                return
            playout.add_output(out, time.monotonic())

    async def video_sender() -> None:
        while True:
            slot = await playout.next()
            if slot is None:
                return
            if not slot.repeat:
                sent.append((time.monotonic(), slot.pts, slot.generated))

    async def audio_sender() -> None:
        reader = DelayedAudioReader(line, origin, lambda: playout.delay)
        k = 0
        while True:
            await asyncio.sleep(max(0.0, origin + k * reader.frame_s - time.monotonic()))
            now = time.monotonic()
            _, t = reader.read(now)
            if t is not None:
                audio_sent.append((now, t))
            k += 1

    tasks = [asyncio.ensure_future(c) for c in (outputs(), video_sender(), audio_sender())]
    try:
        await feed()
        await asyncio.sleep(playout.max_delay + 0.2)  # the last frames play out
    finally:
        sess.abort()
        playout.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    lat = [s - arrivals[round(p, 4)] for s, p, _ in sent if round(p, 4) in arrivals]
    v_lat = [s - (origin + p) for s, p, _ in sent[1:]]
    a_lat = [s - (origin + t) for s, t in audio_sent]
    gen = [s for s in sent if s[2]]
    pct = lambda xs, q: float(np.percentile(xs, q) * 1000) if xs else None  # noqa: E731
    st = sess.stats
    extra: dict[str, Any] = {}
    if getattr(sess, "adapter", None) is not None:  # EngineConfig.live_adapt: when and how it adapted
        ad = sess.adapter
        rel = lambda t: None if t is None else round(t - origin, 2)  # noqa: E731
        extra["adapt"] = {**ad.summary(), "started_s": rel(ad.collected_at), "ended_s": rel(ad.done_at)}
    bins = int(np.ceil(seconds))
    made, edited = np.zeros(bins), np.zeros(bins)
    for s, _, g in sent:
        b = min(bins - 1, max(0, int(s - origin)))
        made[b] += 1
        edited[b] += bool(g)
    return {
        **extra,
        "generated_share_per_s": [round(float(e / m), 3) if m else None for e, m in zip(edited, made)],
        "seconds": seconds,
        "frames_in": n_total,
        "frames_sent": len(sent),
        "frames_generated": len(gen),
        "generated_share": len(gen) / len(sent) if sent else 0.0,
        "first_frame_ms": (sent[0][0] - origin) * 1000 if sent else None,
        "first_generated_ms": (gen[0][0] - origin) * 1000 if gen else None,
        "frame_latency_ms": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99), "max": pct(lat, 100)},
        "av_offset_ms": (float(np.median(a_lat)) - float(np.median(v_lat))) * 1000 if a_lat and v_lat else None,
        "playout_delay_ms": {"start": delay * 1000, "end": playout.delay * 1000, "changes": playout.delay_changes},
        "late_frames": playout.late,
        "repeated_frames": playout.repeats,
        "skipped_slots": playout.skipped,
        "original_reasons": dict(playout.reasons),
        "engine": {"frames_generated": st.frames_generated, "passthrough": dict(st.passthrough),
                   "windows": st.windows_total, "dropped_input": st.dropped_input,
                   "e2e_ms_p50": st.latency("e2e")["p50"] * 1000, "error": st.error},
    }
