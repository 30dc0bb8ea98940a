"""Few-step sampling study: quality against sampler steps on held-out windows.

    python -m export.steps_study --model PACK --prepared data_prepared --json steps.json --plot steps.png
    tccp bench --steps-sweep --model PACK --json steps.json --plot steps.png      (same thing)

Each held-out window is generated teacher-forced: slot 0 holds the ground-truth
latents of its first frame (as if the previous window had been perfect), so the
numbers measure one window's sampling error, not drift accumulated over a clip, and
every (sampler, steps) cell sees exactly the same inputs and the same noise.
Measures per cell, averaged over windows:
- face PSNR inside the head mask, decoded face vs the real face crop (dB);
- stage-1 sketch latent RMSE vs the encoded sketch of the tracked landmarks (in the
  pack's normalised latent units, where the data has unit variance);
- LipLMD (tccp.metrics.lip_lmd) between mediapipe landmarks of the generated and the
  real face crops (tracked the same way, so tracker bias cancels), if `lip`;
- seconds per window (model only) on this machine.
The window's N-1 generated slots are scored; slot 0 is the given frame.
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

__all__ = ["StudyConfig", "held_out_windows", "run_study", "plot_study", "study_from_args", "main"]

DEFAULT_STEPS = (1, 2, 4, 8, 50)
DEFAULT_SAMPLERS = ("ddim", "dpmpp_2m")


@dataclass
class StudyConfig:
    steps: tuple[int, ...] = DEFAULT_STEPS
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS
    windows_per_clip: int = 4
    lip: bool = True
    seed: int = 0


def held_out_windows(folders: Sequence[str | os.PathLike], frames: int, per_clip: int,
                     size: int | None = None) -> list[Any]:
    """`per_clip` evenly spaced windows of `frames` frames (all with a tracked face and
    real audio) from each prepared clip folder, as `RealClip`s at `size` px."""
    from export.realdata import load_real_clip
    from tccp.data.datasets import PreparedClip

    out = []
    for folder in folders:
        clip = PreparedClip(folder)
        starts = clip.valid_starts(frames, stride=1)
        if starts.size == 0:
            continue
        pick = starts[np.unique(np.linspace(0, starts.size - 1, per_clip).round().astype(int))]
        for s in pick:
            out.append(load_real_clip(folder, int(s), frames, size=size))
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


@torch.inference_mode()
def run_study(pipeline: Any, windows: Sequence[Any], cfg: StudyConfig = StudyConfig(), log: Any = None) -> dict[str, Any]:
    """Every (sampler, steps) cell on every window; see the module docstring."""
    from einops import rearrange

    from tccp.metrics import masked_psnr

    say = log or (lambda m: None)
    lip_ok = cfg.lip
    if lip_ok:
        try:
            from tccp.metrics import lip_lmd
        except ImportError:
            lip_ok = False
    ae = pipeline.autoencoder
    norm = pipeline.norm

    def enc(images: np.ndarray) -> torch.Tensor:  # (n, S, S, 3) -> (1, C, n, h, w)
        return rearrange(ae.encode_images(images).float(), "n c h w -> 1 c n h w")

    prepared = []
    for w in windows:
        real_lm = _track_lips(w.faces[1:]) if lip_ok else None
        prepared.append({
            "ctx": enc(w.contexts), "sk": enc(w.sketches), "face": enc(w.faces),
            "ref": ae.encode_images(w.identity[None]).float(), "mel": torch.from_numpy(w.mel[None]).float(),
            "real_lm": real_lm,
        })
    cells: dict[str, dict[str, Any]] = {}
    for sampler in cfg.samplers:
        cells[sampler] = {}
        for steps in cfg.steps:
            psnr, rmse, lmd, secs, found = [], [], [], [], []
            for w, p in zip(windows, prepared):
                g = torch.Generator().manual_seed(cfg.seed)
                t0 = time.perf_counter()
                sk, face = pipeline.window(p["ctx"], p["mel"], p["ref"], p["sk"][:, :, 0], p["face"][:, :, 0],
                                           steps=steps, sampler=sampler, generator=g)
                secs.append(time.perf_counter() - t0)
                gen = pipeline.decode(face)[0].cpu().numpy()  # (n-1, S, S, 3)
                psnr.append(masked_psnr(w.faces[1:], gen, w.masks[1:] > 0.5))
                err = norm.to_model(sk.float().cpu()) - norm.to_model(p["sk"][:, :, 1:])
                rmse.append(float(err.pow(2).mean().sqrt()))
                if lip_ok:
                    gen_lm = _track_lips(gen)
                    found.append(float(np.isfinite(gen_lm[:, 0, 0]).mean()))
                    lmd.append(lip_lmd(gen_lm, p["real_lm"]))
            cell = {
                "face_psnr_db": _mean(psnr), "sketch_latent_rmse": _mean(rmse),
                "lip_lmd": _mean(lmd) if lip_ok else None,
                # share of generated frames where mediapipe found a face (LipLMD is over those)
                "lip_face_found": _mean(found) if lip_ok else None, "seconds_per_window": _mean(secs),
                "per_window": {"face_psnr_db": psnr, "sketch_latent_rmse": rmse, **({"lip_lmd": lmd} if lip_ok else {})},
            }
            cells[sampler][str(steps)] = cell
            say(f"{sampler:>9} {steps:>3} steps: face PSNR {cell['face_psnr_db']:.2f} dB, sketch RMSE "
                f"{cell['sketch_latent_rmse']:.3f}" + (f", LipLMD {cell['lip_lmd']:.3f}" if lip_ok and
                                                        cell['lip_lmd'] is not None else "")
                + f", {cell['seconds_per_window']:.2f} s/window")
    return {
        "windows": [{"clip": w.name, "frames": w.n} for w in windows],
        "window_frames": windows[0].n if windows else None,
        "scored_frames_per_window": windows[0].n - 1 if windows else None,
        "config": {"steps": list(cfg.steps), "samplers": list(cfg.samplers), "seed": cfg.seed,
                   "teacher_forced_slot0": True, "lip": lip_ok},
        "results": cells,
    }


def _mean(xs: list[float]) -> float | None:
    a = np.asarray([x for x in xs if x is not None], np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else None


def plot_study(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Quality measures against steps (log x), one line per sampler."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tccp.io_utils import atomic_path

    keys = [("face_psnr_db", "face PSNR in head mask (dB, higher better)"),
            ("sketch_latent_rmse", "stage-1 sketch latent RMSE (lower better)"),
            ("lip_lmd", "LipLMD (lower better)"), ("seconds_per_window", "seconds per window (this machine)")]
    fig = Figure(figsize=(13, 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys))
    for ax, (key, title) in zip(axes, keys):
        for sampler, cells in report["results"].items():
            xs = [int(s) for s in cells]
            ys = [cells[s][key] if cells[s][key] is not None else np.nan for s in cells]
            ax.plot(xs, ys, marker="o", label=sampler)
        ax.set_xscale("log")
        ax.set_xticks(report["config"]["steps"], [str(s) for s in report["config"]["steps"]])
        ax.set_xlabel("sampler steps")
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
                   "held-out clips (tccp.data.datasets.VALIDATION_CLIPS) found there are used")
    p.add_argument("--clips", nargs="+", metavar="FOLDER", help="explicit prepared clip folders instead")
    p.add_argument("--steps", nargs="+", type=int, default=list(DEFAULT_STEPS))
    p.add_argument("--samplers", nargs="+", default=list(DEFAULT_SAMPLERS), choices=("ddim", "dpmpp_2m", "ddpm"))
    p.add_argument("--windows-per-clip", type=int, default=4)
    p.add_argument("--no-lip", action="store_true", help="skip LipLMD (mediapipe on every generated frame)")
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
    if min(steps) < 1:
        raise TCCPError("--steps: every step count must be at least 1")
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
        frames = int(pipe.stage1.cfg.frames)
        size = int(pipe.pack_config.get("crop_size") or pipe.stage1.cfg.latent_size * 8)
        windows = held_out_windows(clips, frames, cfg.windows_per_clip, size=size)
        if not windows:
            raise TCCPError(f"no window of {frames} frames with a tracked face and audio in {', '.join(map(str, clips))}")
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
