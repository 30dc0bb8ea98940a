"""`tccp run`: regenerate the talking head of a video so it speaks the given audio."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

__all__ = ["add_arguments", "main", "print_summary", "make_progress"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", required=True, metavar="IN", help="context video (any format ffmpeg reads)")
    p.add_argument("--audio", metavar="AUDIO", help="driving audio (default: the video's own track)")
    p.add_argument("--out", required=True, metavar="OUT.mp4", help="output mp4 (H.264 + AAC)")
    p.add_argument("--model", metavar="PACK", help="model pack folder (default: the bundled pack)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps per stage (default: 4)")
    p.add_argument("--sampler", choices=("ddim", "dpmpp", "ddpm"), default="ddim")
    p.add_argument("--landmarks", choices=("generated", "tracked"), default="generated",
                   help="generated: stage 1 predicts landmarks from context+audio (default); "
                        "tracked: stage 2 follows the input's own tracked landmarks")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backend", default="torch", help="inference backend (torch)")
    p.add_argument("--identity", metavar="IMAGE", help="take the identity from this image's face")
    p.add_argument("--max-seconds", type=float, default=None, metavar="S",
                   help="only the first S seconds of the driving audio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def make_progress(total_label: str, quiet: bool = False):
    """A rich progress bar (or a no-op) usable as a context manager and a callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    class _Bar:
        def __init__(self) -> None:
            self.progress = None if quiet else Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[fps]:.1f} fps"), TimeRemainingColumn(),
                transient=True,
            )
            self.task = None
            self._t0 = None

        def __enter__(self):
            if self.progress is not None:
                self.progress.__enter__()
            return self

        def __exit__(self, *exc):
            if self.progress is not None:
                self.progress.__exit__(*exc)

        def __call__(self, done: int, total: int) -> None:
            import time

            if self.progress is None:
                return
            if self.task is None:
                self._t0 = time.monotonic()
                self.task = self.progress.add_task(total_label, total=total, fps=0.0)
            fps = done / max(1e-6, time.monotonic() - self._t0)
            self.progress.update(self.task, completed=done, fps=fps)

    return _Bar()


def print_summary(result: Any, title: str = "tccp run", console=None) -> None:
    """Frames, windows, speed, per-window latency and pass-through reasons, as a table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    s = result.summary
    lat = s["latency"]
    t = Table(title=title, show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("output", f"{result.out} ({result.frames} frames, {result.duration:.2f} s)")
    ctx = f"{result.context_frames} frames" + (" (played ping-pong)" if result.looped else "")
    t.add_row("context video", ctx)
    t.add_row("windows", f"{s['windows']} ({', '.join(f'{k} {v}' for k, v in sorted(s['window_modes'].items()))})")
    t.add_row("speed", f"{s['fps']:.2f} fps over {s['elapsed_s']:.1f} s")
    t.add_row("generated", f"{s['frames_generated']} frames")
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["passthrough_reasons"].items())) or "none"
    t.add_row("passed through", f"{s['frames_passed_through']} frames ({reasons})")
    for name in ("e2e", "queue_wait", "stage1", "stage2", "composite"):
        v = lat[name]
        t.add_row(f"{name} / window", f"p50 {v['p50'] * 1000:.0f} ms   p95 {v['p95'] * 1000:.0f} ms")
    if s["degradations"]:
        t.add_row("degradations", str(s["degradations"]))
    console.print(t)
    if result.frames and not s["frames_generated"]:
        console.print("[bold yellow]warning:[/] no face was tracked in any frame; the output is the input unchanged")


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[list]:
    """Silence mediapipe/TFLite C++ log lines (they write to fd 2, bypassing Python) for
    the duration of a run, so the terminal shows the progress bar and one-line errors
    only. Python warnings raised meanwhile are collected and yielded to the caller,
    which prints them afterwards."""
    fd = 2
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            os.dup2(devnull, fd)
            yield caught
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            os.close(devnull)


def print_warnings(caught: list) -> None:
    seen = set()
    for w in caught:
        text = f"warning: {w.message}"
        if text not in seen:
            seen.add(text)
            print(text, file=sys.stderr)


def load_model(pack: str | None, device: str, backend: str, allow_random: bool = False):
    """SharedModel for the CLI; `allow_random` turns a missing default pack into a
    random-weight tiny model with a loud warning (the demo's temporary fallback)."""
    from engine.model import SharedModel
    from engine.runner import PipelineRunner, default_pack_missing
    from tccp.errors import TCCPError

    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise TCCPError("--device cuda: no CUDA device is available (use --device cpu)")
    if pack is None and default_pack_missing():
        if not allow_random:
            raise TCCPError("no model pack: the bundled pack is missing; pass --model PACK")
        from rich.console import Console

        Console(stderr=True).print(
            "[bold red]WARNING: the bundled model pack does not exist yet; using a RANDOM-WEIGHT "
            "tiny model. The output face will be noise, not a talking head.[/]"
        )
        return SharedModel(PipelineRunner.random("tiny", device=device))
    return SharedModel.load(pack=pack, device=device, backend=backend)


def main(args: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.filerun import run_file
    from tccp.errors import TCCPError

    if args.steps is not None and args.steps < 1:
        raise TCCPError(f"--steps {args.steps}: must be at least 1")
    for name in ("video", "audio", "identity"):
        value = getattr(args, name)
        if value is not None and not Path(value).exists():
            raise TCCPError(f"{value}: no such file")
    if Path(args.out).suffix.lower() not in (".mp4", ".m4v", ".mov"):
        raise TCCPError(f"{args.out}: output must be an .mp4 file")
    if args.max_seconds is not None and args.max_seconds <= 0:
        raise TCCPError(f"--max-seconds {args.max_seconds}: must be positive")
    cfg = EngineConfig(sampler=args.sampler, seed=args.seed, landmarks=args.landmarks)
    if args.steps is not None:
        cfg = cfg.with_(steps=args.steps, min_steps=min(cfg.min_steps, args.steps))
    model = load_model(args.model, args.device, args.backend)
    caught: list = []
    try:
        with quiet_native_stderr() as caught, make_progress("generating", quiet=args.quiet) as bar:
            result = run_file(
                args.video, args.out, model, audio=args.audio, config=cfg,
                identity=args.identity, max_seconds=args.max_seconds, progress=bar,
            )
    finally:
        model.close()
        print_warnings(caught)
    print_summary(result)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from tccp.cli import main as tccp_main

    sys.exit(tccp_main(["run", *sys.argv[1:]]))
