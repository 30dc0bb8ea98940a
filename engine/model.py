"""One loaded model shared by every session of a process, driven by one worker thread.

Why a thread of its own: model calls take tens to hundreds of milliseconds and hold
the GIL only in short stretches, so running them off the event loop keeps sources,
sinks and the WebRTC transport responsive. Why exactly one: torch already uses every
core (or the one GPU) for a single call, so two concurrent calls only thrash; instead
requests of several sessions that arrive together and have the same shapes are
concatenated into one batched call, which costs far less than running them one after
another.

A failing call never takes other sessions down: if a batched call raises, each of
its requests is retried on its own, so only the request that really fails gets the
exception (and only its session ends).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

__all__ = ["Runner", "SharedModel", "ModelStats", "load_model", "check_mouth_scale", "check_silence_motion", "check_region"]

from engine.runner import check_region  # noqa: E402,F401 - the commands' import point

log = logging.getLogger(__name__)


class Runner(Protocol):
    """What the worker thread drives (engine.runner.PipelineRunner in production)."""

    size: int
    """Face crop side in pixels that the model works at."""
    template: Any
    """Head-frame template (478, 2) the references are matched in."""

    def audio_features(self, live: bool, fps: float = 25.0) -> Any:
        """A per-session maker of audio conditions (`engine.features.AudioFeatures`)."""

    def batch_key(self, request: Any) -> Any:
        """Requests with equal keys can be run in one batched call."""

    def run_batch(self, requests: Sequence[Any]) -> list[Any]:
        """Run the requests (one call) and return one result per request."""


@dataclass
class _Item:
    request: Any
    future: concurrent.futures.Future
    key: Any
    enqueued: float


@dataclass
class ModelStats:
    calls: int = 0
    requests: int = 0
    batched_requests: int = 0
    """Requests that ran in a call together with at least one other request."""
    failures: int = 0
    busy_s: float = 0.0
    max_batch_seen: int = 0
    """Largest batch the worker put together (attempted, whether it succeeded or not)."""


_STOP = object()


class SharedModel:
    """A `Runner` plus its worker thread and request queue.

    `await shared.submit(request)` from any event loop returns the runner's result for
    that request (or raises what the runner raised for it). The queue is bounded by
    the number of sessions (each session has at most one request in flight), so it
    needs no explicit limit.
    """

    def __init__(self, runner: Runner, max_batch: int = 8, coalesce_s: float = 0.0,
                 name: str = "tccp-model") -> None:
        self.runner = runner
        self.max_batch = max(1, int(max_batch))
        self.coalesce_s = float(coalesce_s)
        """How long the worker waits for more requests before a call (0: take what is
        queued). A few ms helps batching when sessions' windows arrive nearly together."""
        self.stats = ModelStats()
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._held: list[_Item] = []  # taken from the queue but not batchable with the last call
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls,
        pack: str | None = None,
        device: str = "cpu",
        **kwargs: Any,
    ) -> "SharedModel":
        """Load a model pack (None: the bundled default pack) onto `device`."""
        from engine.runner import PipelineRunner

        return cls(PipelineRunner.from_pack(pack, device=device), **kwargs)

    @property
    def size(self) -> int:
        return int(self.runner.size)

    # ------------------------------------------------------------------ requests
    def submit_threadsafe(self, request: Any) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("SharedModel is closed")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Item(request, fut, self.runner.batch_key(request), time.monotonic()))
        return fut

    async def submit(self, request: Any) -> Any:
        """Run one request on the worker thread; awaits its result."""
        fut = self.submit_threadsafe(request)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.cancel()  # if still queued it is skipped; a running call finishes alone
            raise

    def pending(self) -> int:
        return self._queue.qsize() + len(self._held)

    # ------------------------------------------------------------------ worker
    def _next(self, block: bool) -> _Item | None | object:
        if self._held:
            return self._held.pop(0)
        try:
            return self._queue.get(block=block)
        except queue.Empty:
            return None

    def _work(self) -> None:
        while True:
            first = self._next(block=True)
            if first is _STOP:
                break
            assert isinstance(first, _Item)
            if not first.future.set_running_or_notify_cancel():
                continue
            batch = [first]
            if self.coalesce_s > 0 and self._queue.empty():
                time.sleep(self.coalesce_s)
            stop = False
            rest: list[_Item] = []
            while len(batch) < self.max_batch:
                item = self._next(block=False)
                if item is None:
                    break
                if item is _STOP:
                    stop = True
                    break
                assert isinstance(item, _Item)
                if item.key == first.key:
                    if item.future.set_running_or_notify_cancel():
                        batch.append(item)
                else:
                    rest.append(item)
            self._held = rest + self._held
            self._run(batch)
            if stop:
                break
        # fail whatever is left so no session waits forever
        for item in self._held:
            if not item.future.done():
                item.future.set_exception(RuntimeError("SharedModel closed"))
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Item) and not item.future.done():
                item.future.set_exception(RuntimeError("SharedModel closed"))

    def _run(self, batch: list[_Item]) -> None:
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(batch))
        t0 = time.perf_counter()
        try:
            results = self.runner.run_batch([it.request for it in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"runner returned {len(results)} results for {len(batch)} requests")
        except BaseException as exc:  # noqa: BLE001 - the worker must survive anything
            self.stats.busy_s += time.perf_counter() - t0
            if len(batch) == 1:
                self.stats.calls += 1
                self.stats.requests += 1
                self.stats.failures += 1
                log.warning("model call failed: %r", exc)
                batch[0].future.set_exception(exc)
                return
            # isolate the culprit: rerun each request alone
            log.warning("batched model call of %d failed (%r); retrying one by one", len(batch), exc)
            for it in batch:
                self._run([it])
            return
        dt = time.perf_counter() - t0
        self.stats.calls += 1
        self.stats.requests += len(batch)
        if len(batch) > 1:
            self.stats.batched_requests += len(batch)
        self.stats.busy_s += dt
        for it, res in zip(batch, results):
            if hasattr(res, "batch"):
                res.batch = len(batch)
            it.future.set_result(res)

    # ------------------------------------------------------------------ lifecycle
    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the worker after the call in progress; queued requests fail."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def __enter__(self) -> "SharedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_silence_motion(value: float | None) -> float | None:
    """`value` if it is a valid share of mouth motion kept in silence (0..1, or None for
    the default), else a one-line `TCCPError` (--silence-motion)."""
    from tccp.errors import TCCPError

    if value is not None and not 0.0 <= value <= 1.0:  # NaN fails too
        raise TCCPError(f"--silence-motion {value}: must be between 0 and 1")
    return value


def check_mouth_scale(value: float) -> float:
    """`value` if it is a valid lip-opening factor, else a one-line `TCCPError`."""
    from tccp.errors import TCCPError
    from tccp.face.mouth import MAX_SCALE, check_scale

    try:
        return check_scale(value)
    except ValueError:
        raise TCCPError(f"--mouth-scale {value}: must be between 0 and {MAX_SCALE:g}") from None


def load_model(pack: str | None, device: str, loader: Any = None, allow_random: bool = False, *,
               avatar: str | None = None):
    """SharedModel for the commands (`tccp run`, `demo`, `serve`, `eval --suite`);
    `loader(pack, device)` loads the pipeline on another runtime (None: torch; see
    `PipelineRunner.from_pack`); `allow_random` turns a missing default pack into a
    random-weight tiny model with a loud warning (the demo's temporary fallback).
    `avatar` (name or folder) loads the avatar's pack and reference bank instead of `pack`."""
    from engine.runner import PipelineRunner, default_pack_missing
    from tccp.errors import TCCPError

    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise TCCPError("--device cuda: no CUDA device is available (use --device cpu)")
    if avatar is not None:
        if pack is not None:
            raise TCCPError("--model and --avatar: pass one (an avatar brings its own fine-tuned model)")
        return SharedModel(PipelineRunner.from_avatar(avatar, device=device, loader=loader))
    if pack is None and default_pack_missing():
        if not allow_random:
            raise TCCPError("no model pack: the bundled pack is missing; pass --model PACK")
        from rich.console import Console

        Console(stderr=True).print(
            "[bold red]WARNING: the bundled model pack does not exist yet; using a RANDOM-WEIGHT "
            "tiny model. The output face will be noise, not a talking head.[/]"
        )
        return SharedModel(PipelineRunner.random(device=device))
    return SharedModel(PipelineRunner.from_pack(pack, device=device, loader=loader))
