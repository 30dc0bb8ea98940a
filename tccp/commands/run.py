"""`tccp run`: regenerate the talking head of a video so it speaks the given audio.

`tccp run --live` does the same live: the microphone drives a looping context video or
a camera, shown in a window or recorded to an mp4 (`streaming.mic.run_live`).
"""

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
    p.add_argument("--video", metavar="IN", help="context video (any format ffmpeg reads); with --live also a "
                   "camera: 0, camera, camera:1 (default camera 0)")
    p.add_argument("--audio", metavar="AUDIO", help="driving audio (default: the video's own track; with --live: "
                   "the microphone)")
    p.add_argument("--out", metavar="OUT.mp4", help="output mp4 (H.264 + AAC); with --live also 'window' (default)")
    p.add_argument("--live", action="store_true", help="live: the microphone drives a looping video or a camera")
    p.add_argument("--model", metavar="PACK", help="model pack folder (default: the bundled pack)")
    p.add_argument("--steps", type=int, default=None, help="stage-2 sampler steps (default: the pack's; 0 for the "
                   "bundled pack: the warped reference alone, no denoiser; N: its learned correction at N steps)")
    p.add_argument("--sampler", choices=("ddim", "dpmpp", "ddpm"), default="ddim")
    p.add_argument("--landmarks", choices=("generated", "tracked"), default="generated",
                   help="generated: stage 1 predicts landmarks from context+audio (default); "
                        "tracked: stage 2 follows the input's own tracked landmarks")
    p.add_argument("--region", choices=("mouth", "head"), default="mouth",
                   help="mouth: edit the lower face, keep the rest of the source (default; dubbing, calls); head: the "
                        "whole head from the references, expression and pose from stage 1's head mode (avatar "
                        "replacement, the paper's setting; warp only, measured in docs/faces.md)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "tensorrt"),
                   help="inference backend (default torch; onnxruntime/tensorrt export the pack on first use)")
    p.add_argument("--identity", metavar="IMAGE", help="take the identity from this image's face (no fine-tuning)")
    p.add_argument("--avatar", metavar="NAME_OR_DIR", help="an avatar pack (tccp avatar create): its fine-tuned "
                   "model and reference images; NAME is looked up in ./avatars and ~/.tccp/avatars")
    p.add_argument("--mouth-scale", type=float, default=1.0, metavar="F",
                   help="scale the lip opening: 0 closed, 1 as the pack renders it (default), >1 exaggerated "
                        "(max 4; multiplies the pack's articulation gain, 1.25 for the bundled pack)")
    p.add_argument("--silence-motion", type=float, default=None, metavar="F",
                   help="share of the generated mouth motion kept where nobody speaks: 0 rests the mouth fully, "
                        "1 turns the rest off (default 0.2: lips still open before a phrase and close after it)")
    p.add_argument("--max-seconds", type=float, default=None, metavar="S",
                   help="only the first S seconds of the driving audio")
    p.add_argument("--adapt-steps", type=int, default=None, metavar="N",
                   help="first fine-tune a copy of stage 1 for N steps on the video's own speech, so the mouth moves "
                        "the way this person's does (file runs: default 50, ~10-20 s on a 2-core CPU; 0: off; "
                        "--live: off unless given, 100 recommended; a video file adapts before the call, a camera "
                        "on the call's first --adapt-seconds, in the background; docs/lipsync.md)")
    p.add_argument("--adapt-seconds", type=float, default=15.0, metavar="S",
                   help="how much of the video (from its start), or of a camera call, the adaptation learns from "
                        "(default 15)")
    p.add_argument("--adapt-audio", metavar="FILE", default=None,
                   help="the video's own speech as a separate file (aligned with it), when the video has no "
                        "track of its own; never the new speech of a dub")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def make_progress(total_label: str, quiet: bool = False):
    """A rich progress bar (or a no-op) usable as a context manager and a callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    class _Bar:
        def __init__(self) -> None:
            self.progress = None if quiet else Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                transient=True,
            )
            self.task = None
            self._t0 = None
            self._phase: tuple | None = None  # (task, phase, t0) of the adaptation's bar

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
                self.task = self.progress.add_task(total_label, total=total, rate="")
                if self._phase is not None:  # the adaptation is over: its bar goes
                    self.progress.remove_task(self._phase[0])
                    self._phase = None
            fps = done / max(1e-6, time.monotonic() - self._t0)
            self.progress.update(self.task, completed=done, rate=f"{fps:.1f} fps")

        def adapting(self, done: int, total: int, phase: str) -> None:
            """`engine.adapt`'s progress (called from its worker thread: rich's
            Progress locks its own state): tracking frames, then training steps."""
            import time

            if self.progress is None:
                return
            if self._phase is None or self._phase[1] != phase:
                if self._phase is not None:
                    self.progress.remove_task(self._phase[0])
                task = self.progress.add_task(f"adapting stage 1: {phase}", total=total, rate="")
                self._phase = (task, phase, time.monotonic())
            task, _, t0 = self._phase
            unit = "frames/s" if phase == "tracking" else "steps/s"
            rate = done / max(1e-6, time.monotonic() - t0)
            self.progress.update(task, completed=done, total=total, rate=f"{rate:.1f} {unit}")

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
    if s.get("adapt"):
        t.add_row("person", s["adapt"]["note"])
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


def main(args: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.filerun import run_file
    from engine.model import check_mouth_scale, check_region, check_silence_motion, load_model
    from tccp.errors import TCCPError
    from tccp.io_utils import guard_output

    if args.steps is not None and args.steps < 0:
        raise TCCPError(f"--steps {args.steps}: must be 0 (the warped reference, no denoiser) or more")
    check_mouth_scale(args.mouth_scale)
    check_silence_motion(args.silence_motion)
    if args.avatar is not None and args.identity is not None:
        raise TCCPError("--identity and --avatar: pass one (the avatar brings its own reference images)")
    if args.live:
        return main_live(args)
    if args.video is None or args.out is None:
        raise TCCPError("--video and --out are required (or pass --live)")
    for name in ("video", "audio", "identity", "adapt_audio"):
        value = getattr(args, name)
        if value is not None and not Path(value).exists():
            raise TCCPError(f"{value}: no such file")
    if Path(args.out).suffix.lower() not in (".mp4", ".m4v", ".mov"):
        raise TCCPError(f"{args.out}: output must be an .mp4 file")
    if args.max_seconds is not None and args.max_seconds <= 0:
        raise TCCPError(f"--max-seconds {args.max_seconds}: must be positive")
    guard_output(args.out, inputs=(args.video, args.audio, args.identity, args.adapt_audio))
    if args.adapt_steps is None:
        args.adapt_steps = EngineConfig().adapt_steps
    _check_adapt_options(args)
    cfg = EngineConfig(sampler=args.sampler, seed=args.seed, landmarks=args.landmarks, mouth_scale=args.mouth_scale,
                       region=args.region, adapt_steps=args.adapt_steps, adapt_seconds=args.adapt_seconds,
                       adapt_audio=args.adapt_audio, silence_motion=args.silence_motion)
    if args.steps is not None:
        cfg = cfg.with_(steps=args.steps, min_steps=max(1, min(cfg.min_steps, args.steps)))
    model = load_model(args.model, args.device, _loader(args.backend), avatar=args.avatar)
    try:
        check_region(model, args.region, args.landmarks)
    except TCCPError:
        model.close()
        raise
    caught: list = []
    from engine.adapt import adaptable_pipeline

    if not args.quiet and adaptable_pipeline(model, cfg) is not None:  # what run_file then adapts
        print(f"adapting stage 1 to the person in {Path(args.video).name} first ({cfg.adapt_steps} steps on up to "
              f"{cfg.adapt_seconds:g} s of it; --adapt-steps 0 skips) ...", flush=True)
    try:
        with quiet_native_stderr() as caught, make_progress("generating", quiet=args.quiet) as bar:
            result = run_file(
                args.video, args.out, model, audio=args.audio, config=cfg,
                identity=args.identity, max_seconds=args.max_seconds, progress=bar,
                adapt_progress=bar.adapting,
            )
    finally:
        model.close()
        print_warnings(caught)
    print_summary(result)
    return 0


def _loader(backend: str):
    """The pipeline loader for `--backend` (None: torch, the engine's own)."""
    if backend == "torch":
        return None
    from export.backends import pipeline_loader

    return pipeline_loader(backend)


def _camera_spec(value: str) -> bool:
    v = value.strip().lower()
    return v.isdigit() or v == "camera" or v.startswith("camera:")


def _check_adapt_options(args: argparse.Namespace) -> None:
    from engine.adapt import check_adapt_options

    check_adapt_options(args.adapt_steps, args.adapt_seconds)


def _adapt_live(model, video: Path, args: argparse.Namespace):
    """`--live --video FILE --adapt-steps N`: stage 1 adapted to the looping video's own
    speech before the call starts (`engine.adapt`); None (with the note) if it cannot be."""
    from engine.adapt import AdaptConfig, adapt_from_video, trainable_stage1

    pipe = model.runner.pipeline
    print(f"adapting stage 1 to the person in {video.name} ({args.adapt_steps} steps) before going live ...",
          flush=True)
    with quiet_native_stderr():
        res = adapt_from_video(video, trainable_stage1(pipe), pipe.whisper,
                               AdaptConfig(steps=args.adapt_steps, seconds=args.adapt_seconds, seed=args.seed),
                               audio_path=args.adapt_audio)
    print(res.note, flush=True)
    return res.generator


def main_live(args: argparse.Namespace) -> int:
    """`tccp run --live`: audio source first (no microphone fails before any model
    work), then the model, then `streaming.mic.run_live` until Ctrl-C, the window's
    q/Esc, the end of an --audio file or --max-seconds."""
    from engine.aio import run_interruptible

    from engine.config import EngineConfig
    from engine.model import check_region, load_model
    from streaming.mic import FileAudioSource, MicSource, run_live
    from tccp.errors import TCCPError

    video = args.video if args.video is not None else "0"
    if not _camera_spec(video) and not Path(video).exists():
        raise TCCPError(f"{video}: no such file (or pass a camera: 0, camera, camera:1)")
    out = args.out if args.out is not None else "window"
    if out != "window" and Path(out).suffix.lower() not in (".mp4", ".m4v", ".mov"):
        raise TCCPError(f"{out}: output must be an .mp4 file or 'window'")
    if args.max_seconds is not None and args.max_seconds <= 0:
        raise TCCPError(f"--max-seconds {args.max_seconds}: must be positive")
    if args.identity is not None and not Path(args.identity).exists():
        raise TCCPError(f"{args.identity}: no such file")
    if out != "window":
        from tccp.io_utils import guard_output

        guard_output(out, inputs=(None if _camera_spec(video) else video, args.audio, args.identity))
    audio = FileAudioSource(args.audio) if args.audio is not None else MicSource()
    cfg = EngineConfig(live=True, sampler=args.sampler, seed=args.seed, landmarks=args.landmarks,
                       mouth_scale=args.mouth_scale, region=args.region, silence_motion=args.silence_motion)
    if args.steps is not None:
        cfg = cfg.with_(steps=args.steps, min_steps=max(1, min(cfg.min_steps, args.steps)))
    if args.identity is not None:
        from engine.filerun import load_image

        cfg = cfg.with_(identity=load_image(args.identity))
    source = int(video) if video.strip().isdigit() else video
    _check_adapt_options(args)
    if args.adapt_audio is not None and not Path(args.adapt_audio).exists():
        raise TCCPError(f"{args.adapt_audio}: no such file")
    camera_adapt = bool(args.adapt_steps) and _camera_spec(video)
    if camera_adapt and args.adapt_audio is not None:
        raise TCCPError("--adapt-audio: a camera call adapts on its own microphone, not on a file")
    model = load_model(args.model, args.device, _loader(args.backend), avatar=args.avatar)
    try:
        check_region(model, args.region, args.landmarks)
        if args.adapt_steps and args.region == "mouth" and args.landmarks == "generated":
            if camera_adapt:  # no speech before the call: adapt on its first seconds, in the call
                cfg = cfg.with_(live_adapt=True, adapt_steps=args.adapt_steps, adapt_seconds=args.adapt_seconds)
                print(f"stage 1 adapts to you after the first {args.adapt_seconds:g} s of the call with your face "
                      f"({args.adapt_steps} steps, in the background)", flush=True)
            else:
                cfg = cfg.with_(stage1=_adapt_live(model, Path(video), args))
    except BaseException:
        model.close()
        raise
    caught: list = []
    try:
        with quiet_native_stderr() as caught:
            result = run_interruptible(run_live(source, out, model, cfg, audio=audio, duration_s=args.max_seconds))
    except KeyboardInterrupt:
        return 130
    finally:
        audio.stop()
        model.close()
        print_warnings(caught)
    s = result.stats or {}
    print(f"tccp run --live: {result.frames_out} frames ({result.frames_generated} generated) in "
          f"{result.seconds:.1f} s, stopped by {result.stopped_by or 'end'}"
          + (f"; output {result.output}" if result.output else ""))
    if s.get("degradations"):
        print(f"degradations: {s['degradations']}")
    if s.get("adapt"):
        a = s["adapt"]
        print(f"person: {a.get('note') or a['state'] + ' (the call ended first)'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from tccp.cli import main as tccp_main

    sys.exit(tccp_main(["run", *sys.argv[1:]]))
