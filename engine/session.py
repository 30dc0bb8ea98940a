"""One edited stream: pushed frames and audio in, composited frames out.

Pipeline (each arrow a bounded asyncio queue, each box a task of this session):

    push_video -> [input] -> assemble (align to 25 fps, cut windows, track + crop in
    the session's tracker thread) -> [jobs] -> generate (degradation ladder, audio,
    SharedModel worker thread) -> [composite] -> composite (paste-back in the
    session's compositor thread) -> [output] -> get()

Windows are generated one after another because each is conditioned on the last
generated frame of the previous one (autoregressive); tracking of the next window and
compositing of the previous one overlap with the model call. See docs/engine.md for
the queue, latency and degradation policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.align import AudioBuffer, FrameAligner, GridFrame, mel_for_frames
from engine.composite import CompositeSettings, paste_mouth
from engine.config import EngineConfig
from engine.degrade import DegradeController, Rung
from engine.model import SharedModel
from engine.prep import PreparedWindow, WindowPreparer
from engine.runner import ModelState, SessionRefs, WindowRequest, WindowResult
from engine.stats import SessionStats, WindowTiming
from tccp.face.geometry import to_crop_coords

__all__ = ["Session", "OutputFrame", "EngineError"]

log = logging.getLogger(__name__)

_EOS = object()
FILE_AUDIO_WAIT_S = 5.0
_ids = itertools.count()


class EngineError(RuntimeError):
    """The session failed (its model call or a stage raised); other sessions go on."""


@dataclass
class OutputFrame:
    pts: float
    """Grid time of the frame in the input's clock (seconds)."""
    frame: np.ndarray
    generated: bool
    reason: str | None
    """Why the frame is the original: 'no_face', 'degraded' (ladder at pass-through),
    'overload' (the window went stale waiting); None for generated frames."""
    window: int
    sketch: np.ndarray | None = None
    """Optional (EngineConfig-independent) debug output: the sketch that drove stage 2,
    kept only when the session was created with keep_debug=True."""
    crop: np.ndarray | None = None
    """Debug: the generated face crop before paste-back (keep_debug=True)."""
    box: np.ndarray | None = None
    """Debug: the face box (x0, y0, x1, y1) the crop was pasted into (keep_debug=True)."""
    targets: np.ndarray | None = None
    """Debug: the target landmarks (478, 2) in crop px that drove stage 2 (keep_debug=True)."""


@dataclass
class _CompositeJob:
    win: PreparedWindow
    result: WindowResult | None
    rung: Rung
    reason: str | None
    timing: WindowTiming


class Session:
    """See the module docstring and docs/ARCHITECTURE.md ("Engine session contract")."""

    def __init__(
        self,
        model: SharedModel,
        config: EngineConfig | None = None,
        *,
        tracker: Any = None,
        keep_debug: bool = False,
        name: str | None = None,
    ) -> None:
        self.model = model
        self.cfg = config or EngineConfig()
        if self.cfg.steps is None:  # the pack's own stage-2 steps
            self.cfg = self.cfg.with_(steps=int(getattr(model.runner, "default_steps", 4)))
        self.name = name or f"session-{next(_ids)}"
        self.keep_debug = keep_debug
        self.stats = SessionStats()
        self.controller = DegradeController(self.cfg)
        self._audio = AudioBuffer(self.cfg.sr)
        self._aligner = FrameAligner(self.cfg.fps, self.cfg.max_gap_frames)
        self._preparer = WindowPreparer(model.size, fps=self.cfg.fps, tracker=tracker)
        self._composite = CompositeSettings(
            feather=self.cfg.feather, colour_match=self.cfg.colour_match
        )
        from engine.refs import BankBuilder

        self._features = model.runner.audio_features(self.cfg.live, self.cfg.fps)
        template = getattr(model.runner, "template", None)
        # a bank grown from the session's own frames (ReferenceBank.own)
        self._bank_builder = BankBuilder(template, crop=model.size, own=True) if template is not None else None
        fixed = self.cfg.references if self.cfg.references is not None else getattr(model.runner, "references", None)
        self._refs: SessionRefs | None = SessionRefs(fixed) if fixed is not None else None
        self._identity_task: asyncio.Task | None = None
        self._state: ModelState | None = None  # autoregressive carry between windows
        self._started = False
        self._closed = False
        self._audio_event: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._tasks: list[asyncio.Task] = []
        self._track_pool = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-track")
        self._comp_pool = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-comp")
        self._window_ids = itertools.count()
        self._pools_down = False
        self.adapter = self._live_adapter()
        self._warm = False  # has a model window completed (warm-up excluded from the ladder)

    def _live_adapter(self):
        """`engine.adapt.LiveAdapter` when this live session adapts stage 1 to the caller
        (`EngineConfig.live_adapt`); None otherwise, or when the model has no stage 1
        and Whisper encoder to adapt (a random test model, a stand-in runner)."""
        c = self.cfg
        if not (c.live and c.live_adapt):
            return None
        from engine.adapt import AdaptConfig, LiveAdapter, adaptable_pipeline, trainable_stage1

        pipe = adaptable_pipeline(self.model, c)
        if pipe is None:
            return None
        acfg = AdaptConfig(steps=c.adapt_steps, seconds=c.adapt_seconds, seed=c.seed, batch=8,
                           mix={"stream0": 0.5, "stream2": 0.5})  # the views a call runs on (docs/lipsync.md)
        return LiveAdapter(lambda: trainable_stage1(pipe), pipe.whisper, acfg, fps=c.fps, name=self.name)

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self.stats.started = time.monotonic()
        c = self.cfg
        self._in_q: asyncio.Queue = asyncio.Queue(c.video_queue)
        self._job_q: asyncio.Queue = asyncio.Queue(c.job_queue)
        self._comp_q: asyncio.Queue = asyncio.Queue(1)
        self._out_q: asyncio.Queue = asyncio.Queue(c.output_queue)
        self._audio_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        for coro, what in (
            (self._assemble(), "assemble"),
            (self._generate(), "generate"),
            (self._compose(), "composite"),
        ):
            t = loop.create_task(coro, name=f"{self.name}-{what}")
            t.add_done_callback(self._task_done)
            self._tasks.append(t)
        # build the face tracker (mediapipe graphs: ~1-3 s) while the first frames arrive
        loop.run_in_executor(self._track_pool, self._warm_tracker)
        if self._refs is None and self.cfg.identity is not None:
            self._identity_task = loop.create_task(self._load_identity(), name=f"{self.name}-identity")
            self._identity_task.add_done_callback(self._task_done)

    def _warm_tracker(self) -> None:
        with contextlib.suppress(Exception):  # a real failure resurfaces on first use
            _ = self._preparer.tracker

    def _task_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._error is not None:
            return
        self._error = exc
        self.stats.error = f"{type(exc).__name__}: {exc}"
        self.stats.finished = time.monotonic()
        log.warning("%s failed: %r", self.name, exc)
        for t in self._tasks:
            if not t.done() and t is not asyncio.current_task():
                t.cancel()
        # wake any get() waiter and every blocked producer
        self._force_put(self._out_q, _EOS)
        for q in (self._in_q, self._job_q, self._comp_q):
            with contextlib.suppress(Exception):
                while not q.empty():
                    q.get_nowait()

    @staticmethod
    def _force_put(q: asyncio.Queue, item: Any) -> int:
        """Put without blocking, dropping the oldest items if full; returns drops."""
        dropped = 0
        while q.full():
            q.get_nowait()
            dropped += 1
        q.put_nowait(item)
        return dropped

    async def close(self) -> None:
        """End of input: the last partial window is flushed through the pipeline.

        Returns once every pushed frame has been generated or passed through and
        queued for `get()`; file-mode callers must keep calling `get()` meanwhile
        (a full output queue applies backpressure). Idempotent; if cancelled (e.g. by
        a timeout) the session is torn down.
        """
        if not self._started:
            self._start()
        if not self._closed:
            self._closed = True
            if self._error is None:
                self._force_put_eos()
        try:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        except asyncio.CancelledError:
            self.abort()
            raise
        finally:
            if all(t.done() for t in self._tasks):
                self._shutdown_pools()
        if not self.stats.finished:
            self.stats.finished = time.monotonic()

    def _force_put_eos(self) -> None:
        if self.cfg.live:
            self.stats.dropped_input += self._force_put(self._in_q, _EOS)
        else:
            # file mode: the assembler is draining, so a blocking put is safe; but
            # close() is async and put_nowait may fail on a full queue, so spawn it
            if self._in_q.full():
                t = asyncio.get_running_loop().create_task(self._in_q.put(_EOS))
                self._tasks.append(t)
            else:
                self._in_q.put_nowait(_EOS)
        if self._audio_event is not None:
            self._audio_event.set()

    def abort(self) -> None:
        """Tear down now (no flush): cancel the tasks and free the threads."""
        self._closed = True
        for t in self._tasks:
            t.cancel()
        if self._started:
            with contextlib.suppress(Exception):
                self._force_put(self._out_q, _EOS)
        self._shutdown_pools()

    def _shutdown_pools(self) -> None:
        if self._pools_down:
            return
        self._pools_down = True
        if self.adapter is not None:
            self.adapter.close()
        # the tracker (a mediapipe graph) belongs to the tracker thread: close it there,
        # after any tracking call still running
        with contextlib.suppress(RuntimeError):
            self._track_pool.submit(self._preparer.close)
        self._track_pool.shutdown(wait=False)
        self._comp_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ public API
    async def push_video(self, frame: np.ndarray, pts: float) -> None:
        """Add one RGB uint8 frame shown at `pts` seconds.

        Live: never blocks; when the input queue is full the oldest frame is dropped
        (counted in `stats.dropped_input`). File: waits for room (backpressure).
        """
        self._check_open()
        self._start()
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"push_video expects (H, W, 3) uint8 RGB, got {frame.dtype} {frame.shape}")
        self.stats.frames_in += 1
        item = (float(pts), frame, time.monotonic())
        if self.cfg.live:
            self.stats.dropped_input += self._force_put(self._in_q, item)
        else:
            await self._in_q.put(item)

    async def push_audio(self, samples: np.ndarray, pts: float | None) -> None:
        """Add mono float32 16 kHz samples starting at `pts` seconds (None: right after
        the previous chunk). Never blocks; memory is trimmed as windows complete."""
        self._check_open()
        self._start()
        self._audio.push(samples, pts)
        if self.adapter is not None:
            self.adapter.add_audio(samples, pts)
        if self._audio_event is not None:
            self._audio_event.set()

    async def get(self) -> OutputFrame | None:
        """Next output frame in order; None once the session is closed and drained.

        Raises `EngineError` if the session failed.
        """
        self._start()
        if self._error is not None and self._out_q.empty():
            raise EngineError(f"{self.name}: {self.stats.error}") from self._error
        item = await self._out_q.get()
        if item is _EOS:
            self._out_q.put_nowait(_EOS)  # later callers get None too
            if self._error is not None:
                raise EngineError(f"{self.name}: {self.stats.error}") from self._error
            return None
        self.stats.frames_out += 1
        return item

    def _check_open(self) -> None:
        if self._error is not None:
            raise EngineError(f"{self.name}: {self.stats.error}") from self._error
        if self._closed:
            raise RuntimeError(f"{self.name}: session is closed")

    @property
    def failed(self) -> bool:
        return self._error is not None

    # ------------------------------------------------------------------ assemble
    async def _assemble(self) -> None:
        loop = asyncio.get_running_loop()
        pending: list[GridFrame] = []
        new = self.cfg.new_frames
        while True:
            item = await self._in_q.get()
            if item is _EOS:
                pending.extend(self._aligner.flush())
                break
            pts, frame, arrival = item
            pending.extend(self._aligner.push(pts, frame, arrival))
            self.stats.duplicated_input = self._aligner.duplicated
            pending = await self._emit_ready(loop, pending, new, final=False)
        await self._emit_ready(loop, pending, new, final=True)
        await self._job_q.put(_EOS)

    async def _emit_ready(
        self, loop: asyncio.AbstractEventLoop, pending: list[GridFrame], new: int, final: bool
    ) -> list[GridFrame]:
        """Cut full windows off `pending`; a jump in the grid (stalled input) ends a
        window early, so a window never spans a gap. Returns what is left."""
        while pending:
            k = 1
            while k < min(new, len(pending)) and pending[k].index == pending[0].index + k:
                k += 1
            if k == len(pending) and k < new and not final:
                break  # wait for more frames
            chunk, pending = pending[:k], pending[k:]
            await self._emit_window(loop, chunk)
        return pending

    async def _emit_window(self, loop: asyncio.AbstractEventLoop, chunk: list[GridFrame]) -> None:
        win = PreparedWindow(
            index=next(self._window_ids),
            pts=np.array([g.pts for g in chunk], np.float64),
            grid=np.array([g.index for g in chunk], np.int64),
            frames=[g.frame for g in chunk],
            arrival=max(g.arrival for g in chunk),
            found=np.zeros(len(chunk), bool),
        )
        win = await loop.run_in_executor(self._track_pool, self._preparer.prepare, win)
        win.ready = time.monotonic()
        if self.adapter is not None:
            self.adapter.add_window(win.pts, win.found, win.landmarks)
        # A full job queue blocks only this task: live pushes keep landing in the input
        # queue, which drops its oldest frames (counted) if the wait is long, while the
        # generator skips stale windows (see _generate_one); order is always kept.
        await self._job_q.put(win)

    # ------------------------------------------------------------------ generate
    async def _generate(self) -> None:
        while True:
            win = await self._job_q.get()
            if win is _EOS:
                await self._comp_q.put(_EOS)
                return
            await self._generate_one(win)

    async def _wait_audio(self, until: float) -> None:
        """Wait until audio up to `until` (session time) has arrived, the input ended,
        or a deadline passed; missing audio is silence. Sessions that have not received
        any audio yet do not wait at all; others wait at most `audio_wait_s` (live) or
        FILE_AUDIO_WAIT_S (files push their audio up front, so this rarely waits)."""
        assert self._audio_event is not None
        live = self.cfg.live
        deadline = time.monotonic() + (self.cfg.audio_wait_s if live else FILE_AUDIO_WAIT_S)
        while self._audio.end_time < until and not self._closed:
            if not self._audio.received:
                return  # no audio track (yet): silence rather than a stall per window
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._audio_event.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._audio_event.wait(), remaining)

    async def _generate_one(self, win: PreparedWindow) -> None:
        t_start = time.monotonic()
        c = self.cfg
        rung = self.controller.rung
        # audio older than this window's context is no longer needed (whatever happens
        # to the window, so long face-less stretches do not accumulate audio)
        # (live audio features look 3 s back: keep that much before the window)
        self._audio.trim_before(float(win.pts[0]) - 3.5)
        timing = WindowTiming(window=win.index, frames=win.n, level=self.controller.level,
                              steps=rung.steps, mode=rung.mode, queue_wait=t_start - win.ready)
        reason: str | None = None
        if not win.any_face:
            reason = "no_face"
        elif rung.mode == "passthrough":
            reason = "degraded"
        elif c.live and self.controller.enabled and self._too_late(t_start - win.arrival):
            reason = "overload"  # already late and more waiting: skip ahead
        if reason is None and self._identity_task is not None:
            await self._identity_task  # a few ms of face tracking on one image
        if reason is None and (self._refs is None or self._refs.bank is None):
            await asyncio.get_running_loop().run_in_executor(self._track_pool, self._grow_bank, win)
            if self._refs is None and self._bank_builder is not None and self._bank_builder.bank is not None:
                self._refs = SessionRefs(self._bank_builder.bank)
            if self._refs is None:
                reason = "no_face"
        elif reason is None and self._bank_builder is not None and self._refs.bank is self._bank_builder.bank \
                and not self._bank_builder.full:
            await asyncio.get_running_loop().run_in_executor(self._track_pool, self._grow_bank, win)
            self._refs.bank = self._bank_builder.bank
        if reason is not None:
            timing.mode, timing.steps = "passthrough", 0
            self._state = None  # the next generated window restarts from a first frame
            await self._comp_q.put(_CompositeJob(win, None, Rung("passthrough", 0), reason, timing))
            return

        await self._wait_audio(float(win.pts[-1]) + 0.1 + 1.0 / c.fps)
        loop = asyncio.get_running_loop()
        mel = await loop.run_in_executor(None, mel_for_frames, self._audio, win.pts, c.fps)
        t_feat = time.monotonic()
        tokens, vad = await loop.run_in_executor(None, self._features.for_frames, self._audio, win.pts)
        timing.features = time.monotonic() - t_feat
        from tccp.face import geometry as fg

        meshes = np.stack([fg.to_crop_coords(win.landmarks[k], win.face_boxes[k], self.model.size)
                           for k in range(win.n)]).astype(np.float32)
        req = WindowRequest(
            mode=rung.mode,
            steps=rung.steps,
            sampler=c.sampler,
            guidance=c.guidance,
            window=c.window,
            crops=win.faces,
            meshes=meshes,
            tokens=tokens,
            vad=vad,
            mel=mel,
            refs=self._refs,
            state=self._state,
            seed=c.seed + win.index,
            mouth_scale=c.mouth_scale,
            gate=c.gate,
            silence_motion=c.silence_motion,
            region=c.region,
            stage1=self._stage1() if c.region == "mouth" else None,
            contexts=None if c.region != "head" else await loop.run_in_executor(None, _context_tokens, win, self.model.size),
        )
        res: WindowResult = await self.model.submit(req)
        self._state = res.state
        timing.stage1, timing.stage2, timing.batch = res.stage1_s, res.stage2_s, res.batch
        await self._comp_q.put(_CompositeJob(win, res, rung, None, timing))

    def _stage1(self):
        """This session's own stage 1: given (`EngineConfig.stage1`), adapted to the
        caller during the call, or None (the pack's)."""
        if self.cfg.stage1 is not None:
            return self.cfg.stage1
        return self.adapter.generator if self.adapter is not None else None

    def _too_late(self, age: float) -> bool:
        """Live: skip this window (`age` s after its last frame arrived)? The controller
        may judge (`controller.skip(age, waiting)`, e.g. against a playout deadline);
        by default a window over the budget is skipped when another one waits."""
        waiting = self._job_q.qsize() > 0
        judge = getattr(self.controller, "skip", None)
        if callable(judge):
            return bool(judge(age, waiting))
        return waiting and age > (self.controller.budget or 0.0)

    async def _load_identity(self) -> None:
        from engine.refs import bank_from_image

        loop = asyncio.get_running_loop()
        bank = await loop.run_in_executor(
            self._track_pool, bank_from_image, self.cfg.identity, self.model.runner.template, self.model.size
        )
        self._refs = SessionRefs(bank)

    def _grow_bank(self, win: PreparedWindow) -> None:
        """Offer the window's tracked (not held or interpolated) frames to the bank."""
        if self._bank_builder is None or self._bank_builder.full:
            return
        for k in np.flatnonzero(win.found)[::2]:
            self._bank_builder.offer(win.frames[k], win.landmarks[k], win.face_boxes[k])

    # ------------------------------------------------------------------ composite
    def _composite_frames(self, job: _CompositeJob) -> list[OutputFrame]:
        return [self._composite_frame(job, k) for k in range(job.win.n)]

    def _composite_frame(self, job: _CompositeJob, k: int) -> OutputFrame:
        win, res = job.win, job.result
        frame = win.frames[k]
        if res is None or not win.found[k]:
            reason = job.reason if res is None else "no_face"
            return OutputFrame(float(win.pts[k]), frame, False, reason, win.index)
        face = res.faces[k]
        bank = res.bank if res.bank is not None else (self._refs.bank if self._refs is not None else None)
        img = paste_mouth(frame, face, win.face_boxes[k], res.masks[k], res.targets[k], bank,
                          int(res.ref_index[k]), getattr(self.model.runner, "triangulation", None),
                          self._composite, detail=getattr(self.controller, "detail", True),
                          align=self.cfg.region == "head",
                          source_mesh=to_crop_coords(win.landmarks[k], win.face_boxes[k], face.shape[0]))
        of = OutputFrame(float(win.pts[k]), img, True, None, win.index)
        if self.keep_debug:
            of.crop = face
            of.box = np.asarray(win.face_boxes[k], np.float32)
            of.sketch = res.sketches[k] if res.sketches is not None else None
            of.targets = res.targets[k]
        return of

    def _composite_live(self, job: _CompositeJob, loop: asyncio.AbstractEventLoop) -> None:
        """Compositor thread: paste the window's frames in order, each handed to the
        event loop (`_emit`) as soon as it is done."""
        for k in range(job.win.n):
            of = self._composite_frame(job, k)
            loop.call_soon_threadsafe(self._emit, of)

    def _emit(self, of: OutputFrame) -> bool:
        """Live: queue one output frame now (True); file mode: False (the caller awaits)."""
        if of.generated:
            self.stats.frames_generated += 1
        else:
            self.stats.passthrough[of.reason or "passthrough"] += 1
        if self.cfg.live:
            self.stats.dropped_output += self._force_put(self._out_q, of)
            return True
        return False

    async def _compose(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._comp_q.get()
            if job is _EOS:
                self.stats.finished = time.monotonic()
                if self.cfg.live:
                    self.stats.dropped_output += self._force_put(self._out_q, _EOS)
                else:
                    await self._out_q.put(_EOS)
                return
            t0 = time.monotonic()
            if self.cfg.live and job.result is not None:
                # live: each frame is queued as soon as it is pasted, so the window's
                # first frame (the one with the least time to spare) is not held back
                # by the other six
                await loop.run_in_executor(self._comp_pool, self._composite_live, job, loop)
                job.timing.composite = time.monotonic() - t0
            else:
                frames = await loop.run_in_executor(self._comp_pool, self._composite_frames, job)
                job.timing.composite = time.monotonic() - t0
                for of in frames:
                    if not self._emit(of):
                        await self._out_q.put(of)
            job.timing.e2e = time.monotonic() - job.win.arrival
            self.stats.add_window(job.timing)
            judged = job.reason != "no_face"
            if judged and not self._warm:
                # the first model window pays one-off warm-up costs (graph and kernel
                # initialisation): it says nothing about the steady-state speed
                self._warm = job.result is not None
                judged = False
            if judged:
                change = self.controller.observe(
                    job.win.index, job.timing.e2e, backlog=self.cfg.live and self._job_q.full()
                )
                if change is not None:
                    self.stats.add_degradation(change)


def _context_tokens(win: PreparedWindow, size: int) -> np.ndarray:
    """Head region: the window's head-masked context crops pooled to stage 1's c_v
    (`tccp.face.context`), made exactly as `tccp prepare` made the training data."""
    from tccp.face.context import context_tokens, masked_context

    boxes = win.extra["context_boxes"]
    return context_tokens(np.stack([masked_context(win.frames[k], win.landmarks[k], boxes[k], size)
                                    for k in range(win.n)]))
