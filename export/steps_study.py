"""Few-step sampling study: stage-2 quality against sampler steps on held-out windows.

    python -m export.steps_study --model PACK --prepared data_prepared --json steps.json --plot steps.png
    tccp bench --steps-sweep --model PACK --json steps.json --plot steps.png      (same thing)

Stage 2 regenerates the mouth patch from the masked source, a reference of the same
person warped onto the target landmarks and the target sketch. The study runs it in
the engine's `tracked` mode (target landmarks = the tracked ones of the same frame),
so the real crop is the right answer and every number measures stage 2 alone:

- steps 0 is the warp-only rung (the warped reference pasted as the patch: the
  no-learning baseline the model must beat), 1 / 2 / 4 ... are sampler steps;
- each held-out window is teacher-forced: slot 0 carries the TAEF2 latent of the
  real patch of its first frame (as if the previous window had been perfect), so the
  numbers measure one window's sampling error, not drift over a clip, and every
  (sampler, steps) cell sees the same inputs and the same noise;
- the reference bank comes from the first half of the clip's frames, the windows
  from the second half (the model cannot copy the answer from its reference).

Per cell, averaged over windows: face PSNR inside the region mask (the pixels stage 2
replaced) against the real crop; LipLMD (tccp.metrics.lip_lmd) between mediapipe
landmarks of the edited and the real crops, if `lip`; seconds per window (model only)
on this machine. The window's 7 new frames are scored.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from tccp.errors import TCCPError

__all__ = ["StudyConfig", "StudyWindow", "held_out_windows", "find_held_out", "run_study", "plot_study",
           "study_from_args", "main"]

DEFAULT_STEPS = (0, 1, 2, 4)
DEFAULT_SAMPLERS = ("ddim",)
WINDOW = 8


@dataclass
class StudyConfig:
    steps: tuple[int, ...] = DEFAULT_STEPS
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS
    windows_per_clip: int = 4
    lip: bool = True
    seed: int = 0


@dataclass
class StudyWindow:
    clip: Any  # export.realdata.RealClip
    start: int  # slot 0 = frame start; frames start+1 .. start+7 are generated
    bank_frames: slice  # frames of the clip the reference bank is built from


def _video_of(item: str | os.PathLike) -> Path:
    """A video file, or a prepared clip folder's source video."""
    p = Path(item)
    if p.is_dir():
        try:
            src = Path(json.loads((p / "meta.json").read_text())["source"])
        except (OSError, ValueError, KeyError):
            raise TCCPError(f"{p}: not a prepared clip folder (no meta.json with a source)") from None
        if not src.is_file():
            raise TCCPError(f"{p}: its source video {src} is missing")
        return src
    if not p.is_file():
        raise TCCPError(f"{p}: no such video or prepared clip folder")
    return p


def held_out_windows(items: Sequence[str | os.PathLike], per_clip: int, size: int = 128,
                     max_frames: int = 150, cache: str | os.PathLike | None = None) -> list[StudyWindow]:
    """`per_clip` evenly spaced windows from the second half of each clip (videos or
    prepared folders; the first `max_frames` frames are tracked), the bank from its
    first half. Clips without a face in every frame of that span are skipped."""
    from export.realdata import load_real_clip

    out = []
    for item in items:
        try:
            clip = load_real_clip(_video_of(item), frames=max_frames, size=size, cache=cache)
        except TCCPError:
            continue
        half = clip.n // 2
        last = clip.n - WINDOW
        if last < half or half < 2:
            continue
        for s in np.unique(np.linspace(half, last, per_clip).round().astype(int)):
            out.append(StudyWindow(clip, int(s), slice(0, half)))
    return out


def find_held_out(root: str | os.PathLike) -> list[Path]:
    """The validation clips (tccp.data.datasets.VALIDATION_CLIPS) under a prepared root."""
    from tccp.data.datasets import VALIDATION_CLIPS, find_prepared, split_clips

    root = Path(root)
    if not root.is_dir():
        raise TCCPError(f"{root}: prepared clip folder not found (run tccp prepare, or pass --prepared DIR)")
    _, val = split_clips(find_prepared(root))
    if not val:
        raise TCCPError(f"{root}: none of the held-out clips {', '.join(VALIDATION_CLIPS)} is prepared there")
    return list(val)


def _track_lips(faces: np.ndarray) -> np.ndarray:
    """(n, 478, 2) raw mediapipe landmarks of face crops, NaN where no face is found."""
    from tccp.face.track import FaceTracker

    with FaceTracker() as tracker:
        tr = tracker.track(faces)
    lm = np.asarray(tr.raw if getattr(tr, "raw", None) is not None else tr.landmarks, np.float32).copy()
    lm[~np.asarray(tr.found, bool)] = np.nan
    return lm


def _bank(w: StudyWindow, template: np.ndarray) -> Any:
    from engine.refs import BankBuilder

    c, sl = w.clip, w.bank_frames
    key = ("study", sl.start, sl.stop)
    if key not in c._banks:  # noqa: SLF001 - the clip's own bank cache
        c._banks[key] = BankBuilder.from_frames(c.frames[sl], c.landmarks[sl], c.boxes[sl], template, 4, c.size).bank
    return c._banks[key]


@torch.inference_mode()
def _teacher_state(pipeline: Any, w: StudyWindow, bank: Any) -> Any:
    """The carry a perfect previous window would leave: slot 0 = frame `start`, its
    patch latent the TAEF2 encoding of the real patch."""
    from engine.runner import ModelState

    c, i = w.clip, w.start
    editor = pipeline.stage2
    x0, y0, x1, y1 = editor.patch
    latent = None
    if editor.model is not None:
        latent = editor.encode(np.ascontiguousarray(c.crops[i:i + 1, y0:y1, x0:x1]))[0]
    return ModelState(x=None, latent=latent, tokens=np.zeros(1), vad=float(c.vad[i]), cv=None,
                      mel=c.mel[i].copy(), mesh=c.meshes[i].copy(), crop=c.crops[i].copy(),
                      source_mesh=c.meshes[i].copy())


def run_study(pipeline: Any, windows: Sequence[StudyWindow], cfg: StudyConfig = StudyConfig(),
              log: Any = None) -> dict[str, Any]:
    """Every (sampler, steps) cell on every window; see the module docstring."""
    from engine.runner import PipelineRunner, SessionRefs
    from export.realdata import window_request
    from tccp.metrics import masked_psnr

    say = log or (lambda m: None)
    lip_ok = cfg.lip
    if lip_ok:
        try:
            from tccp.metrics import lip_lmd
        except ImportError:
            lip_ok = False
    runner = PipelineRunner(pipeline, size=windows[0].clip.size if windows else None)
    has_model = pipeline.stage2.model is not None
    prepared = []
    for w in windows:
        bank = _bank(w, pipeline.template)
        sl = slice(w.start + 1, w.start + WINDOW)
        prepared.append({
            "bank": bank, "sl": sl, "state": _teacher_state(pipeline, w, bank),
            "real_lm": _track_lips(w.clip.crops[sl]) if lip_ok else None,
        })
    cells: dict[str, dict[str, Any]] = {}
    for sampler in cfg.samplers:
        cells[sampler] = {}
        for steps in cfg.steps:
            if steps > 0 and not has_model:
                continue
            psnr, lmd, secs, found = [], [], [], []
            for w, p in zip(windows, prepared):
                sl = p["sl"]
                req = window_request(w.clip, sl, SessionRefs(p["bank"]), p["state"],
                                     tokens=np.zeros((sl.stop - sl.start, 1, 1), np.float32), steps=steps,
                                     mode="tracked", sampler=sampler, seed=cfg.seed)
                t0 = time.perf_counter()
                res = runner.run_batch([req])[0]
                secs.append(time.perf_counter() - t0)
                psnr.append(float(masked_psnr(w.clip.crops[sl], res.faces, res.masks > 0.5)))
                if lip_ok:
                    gen_lm = _track_lips(res.faces)
                    found.append(float(np.isfinite(gen_lm[:, 0, 0]).mean()))
                    lmd.append(lip_lmd(gen_lm, p["real_lm"]))
            cell = {
                "face_psnr_db": _mean(psnr), "lip_lmd": _mean(lmd) if lip_ok else None,
                # share of edited frames where mediapipe found a face (LipLMD is over those)
                "lip_face_found": _mean(found) if lip_ok else None, "seconds_per_window": _mean(secs),
                "per_window": {"face_psnr_db": psnr, **({"lip_lmd": lmd} if lip_ok else {})},
            }
            cells[sampler][str(steps)] = cell
            say(f"{sampler:>9} {steps:>3} steps{' (warp only)' if steps == 0 else ''}: face PSNR "
                f"{cell['face_psnr_db']:.2f} dB" + (f", LipLMD {cell['lip_lmd']:.3f}" if lip_ok and
                                                    cell['lip_lmd'] is not None else "")
                + f", {cell['seconds_per_window']:.2f} s/window")
    return {
        "windows": [{"clip": w.clip.name, "start": w.start, "frames": WINDOW} for w in windows],
        "window_frames": WINDOW,
        "scored_frames_per_window": WINDOW - 1,
        "config": {"steps": list(cfg.steps), "samplers": list(cfg.samplers), "seed": cfg.seed,
                   "teacher_forced_slot0": True, "mode": "tracked", "lip": lip_ok},
        "results": cells,
    }


def _mean(xs: list[float]) -> float | None:
    a = np.asarray([x for x in xs if x is not None], np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else None


def plot_study(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Quality measures against steps (0 = warp only), one line per sampler."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tccp.io_utils import atomic_path

    keys = [("face_psnr_db", "face PSNR in the edited region (dB, higher better)"),
            ("lip_lmd", "LipLMD (lower better)"), ("seconds_per_window", "seconds per window (this machine)")]
    fig = Figure(figsize=(11, 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys))
    for ax, (key, title) in zip(axes, keys):
        for sampler, cells in report["results"].items():
            xs = [int(s) for s in cells]
            ys = [cells[s][key] if cells[s][key] is not None else np.nan for s in cells]
            ax.plot(xs, ys, marker="o", label=sampler)
        ax.set_xticks(report["config"]["steps"], [("0\n(warp)" if s == 0 else str(s)) for s in report["config"]["steps"]])
        ax.set_xlabel("stage-2 sampler steps")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"steps study: {report.get('model', '')}, {len(report['windows'])} held-out windows", fontsize=10)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return Path(path)


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PACK", help="model pack (default: the bundled pack)")
    src.add_argument("--config", metavar="NAME", help="RANDOM weights of a named config (machinery test only)")
    p.add_argument("--prepared", metavar="DIR", default="data_prepared", help="root of prepared clips; the "
                   "held-out clips (tccp.data.datasets.VALIDATION_CLIPS) found there are used (their source videos)")
    p.add_argument("--clips", nargs="+", metavar="CLIP", help="explicit videos or prepared clip folders instead")
    p.add_argument("--steps", nargs="+", type=int, default=list(DEFAULT_STEPS), help="0 = warp only")
    p.add_argument("--samplers", nargs="+", default=list(DEFAULT_SAMPLERS), choices=("ddim", "dpmpp_2m", "ddpm"))
    p.add_argument("--windows-per-clip", type=int, default=4)
    p.add_argument("--no-lip", action="store_true", help="skip LipLMD (mediapipe on every edited frame)")
    p.add_argument("--backend", default="torch", help="backend to run the pipeline on (default torch)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT.json", required=True)
    p.add_argument("--plot", metavar="OUT.png")


def study_from_args(args: argparse.Namespace) -> int:
    import tempfile

    from rich.console import Console

    from export.backends import load_pipeline
    from export.packs import resolve_pack
    from tccp.io_utils import atomic_path

    console = Console(stderr=True)
    steps = getattr(args, "steps", None)
    steps = tuple(steps) if isinstance(steps, (list, tuple)) else DEFAULT_STEPS
    if min(steps) < 0:
        raise TCCPError("--steps: every step count must be at least 0 (0 = warp only)")
    cfg = StudyConfig(steps=steps, samplers=tuple(getattr(args, "samplers", None) or DEFAULT_SAMPLERS),
                      windows_per_clip=int(getattr(args, "windows_per_clip", 4)),
                      lip=not getattr(args, "no_lip", False), seed=int(getattr(args, "seed", 0)))
    clips = getattr(args, "clips", None) or find_held_out(getattr(args, "prepared", "data_prepared"))
    with tempfile.TemporaryDirectory(prefix="tccp-steps-") as scratch:
        pack, label = resolve_pack(args.model, args.config, scratch)
        if args.config:
            console.print(f"[bold red]steps study on RANDOM WEIGHTS of {args.config!r}: numbers are meaningless[/]")
        backend = args.backend[0] if isinstance(args.backend, list) else (args.backend or "torch")
        pipe = load_pipeline(pack, backend=backend, device=getattr(args, "device", "cpu"))
        windows = held_out_windows(clips, cfg.windows_per_clip, size=int(pipe.crop_size))
        if not windows:
            raise TCCPError(f"no clip with a tracked face in every frame among {', '.join(map(str, clips))}")
        console.print(f"steps study: {len(windows)} windows from {len(clips)} clip(s), {label}")
        report = run_study(pipe, windows, cfg, log=lambda m: console.print(m))
    from export.machine import machine_info

    report = {"model": label, "random_weights": "RANDOM" in label, "backend": backend,
              "machine": machine_info(getattr(args, "device", "cpu")), **report}
    with atomic_path(Path(args.json)) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot_study(report, args.plot)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.steps_study", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return study_from_args(args)
    except TCCPError as exc:
        print(f"error: {exc}")
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
