"""`tccp bench --startup`: how long a file run takes to its first frame, and why.

A dubbing run adapts stage 1 to the person before its first frame (`engine.adapt`):
it tracks the source's first seconds, computes their Whisper features and fine-tunes a
copy of stage 1, then the session starts. This benchmark runs the same `tccp run` job
(the clip with its own audio, `--seconds` of output) several ways in one process and
one sitting, so the figures compare like with like on whatever machine it runs on:

- no adaptation (`--adapt-steps 0`): the floor;
- adapting N steps with the source's start tracked twice (the adaptation's pass, then the
  session's own: how runs worked before `engine.prep.ReplayTracker`);
- adapting N steps, the start tracked once (the session replays the adaptation's tracking);

for N in the run's default and 100. An untimed warm-up run loads what every run loads
once (mediapipe graphs, Whisper, the optimiser's imports). Reported per variant: time
to the first output frame, total wall time, the adaptation's own seconds, frames and
how many the session replayed. JSON + a bar plot.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["run_startup_bench", "plot_startup", "print_startup", "summarise"]


def _variants(steps: int) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = [("no adaptation", {"adapt_steps": 0})]
    for n in sorted({steps, 100}):
        out.append((f"adapt {n} steps, start tracked twice", {"adapt_steps": n, "replay_tracking": False}))
        out.append((f"adapt {n} steps, start tracked once", {"adapt_steps": n}))
    return out


def run_startup_bench(pack: Path, label: str, clip: str | Path | None = None, seconds: float = 6.0,
                      adapt_steps: int = 50, adapt_seconds: float = 15.0, repeat: int = 1,
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """See the module docstring. `repeat` runs every variant that many times, in
    rotating order (the shared machine's noise falls on all of them alike)."""
    from engine.config import EngineConfig
    from engine.filerun import run_file
    from engine.model import SharedModel
    from engine.runner import PipelineRunner
    from export.machine import machine_info
    from tccp.media.io import probe, sample_paths

    say = log or (lambda m: None)
    path = Path(clip) if clip else sample_paths()[0]
    info = probe(path)
    audio = None if info.has_audio else sample_paths()[1]
    machine = machine_info("cpu")
    model = SharedModel(PipelineRunner.from_pack(str(pack), device="cpu"))
    variants = _variants(adapt_steps)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
    try:
        with tempfile.TemporaryDirectory(prefix="tccp-startup-") as tmp:
            say("warm-up run (untimed)")
            run_file(path, Path(tmp) / "warm.mp4", model, audio=audio, max_seconds=1.0,
                     config=EngineConfig(adapt_steps=2, adapt_seconds=2.0))
            for r in range(repeat):
                order = variants[r % len(variants):] + variants[: r % len(variants)]
                for name, changes in order:
                    say(f"[{r + 1}/{repeat}] {name}")
                    out = Path(tmp) / f"run{r}.mp4"
                    first: list[float] = []
                    t0 = time.perf_counter()
                    res = run_file(path, out, model, audio=audio, max_seconds=seconds,
                                   config=EngineConfig(adapt_seconds=adapt_seconds, **changes),
                                   progress=lambda i, n: first.append(time.perf_counter()) if not first else None)
                    total = time.perf_counter() - t0
                    out.unlink()
                    ad = res.summary.get("adapt") or {}
                    t1 = first[0] - t0 if first else None
                    rows[name].append({
                        "first_frame_s": round(t1, 2) if t1 is not None else None,
                        "total_s": round(total, 2),
                        "frames": res.frames,
                        "fps_after_first": round((res.frames - 1) / (total - t1), 2)
                        if t1 is not None and total > t1 and res.frames > 1 else None,
                        "adapt_s": ad.get("seconds"), "adapted": ad.get("adapted"),
                        "frames_replayed": ad.get("frames_replayed"), "note": ad.get("note"),
                    })
    finally:
        model.close()
    summary = summarise(rows, adapt_steps)
    return {
        "mode": "startup",
        "model": label,
        "config": {"clip": path.name, "clip_seconds": round(info.duration, 2), "size": [info.width, info.height],
                   "seconds": seconds, "adapt_steps": adapt_steps, "adapt_seconds": adapt_seconds,
                   "repeat": repeat, "threads": __import__("torch").get_num_threads()},
        "machine": {**machine, "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "runs": rows,
        "summary": summary,
    }


def summarise(rows: dict[str, list[dict[str, Any]]], adapt_steps: int) -> dict[str, dict[str, Any]]:
    """Medians over the repeats per variant, and the first frame as a ratio of the
    adapting run with the start tracked twice (how runs worked before)."""
    from statistics import median

    summary: dict[str, dict[str, Any]] = {}
    for name, rs in rows.items():
        firsts = [x["first_frame_s"] for x in rs if x["first_frame_s"] is not None]
        summary[name] = {"first_frame_s_median": round(median(firsts), 2) if firsts else None,
                         "total_s_median": round(median(x["total_s"] for x in rs), 2)}
    base = summary.get(f"adapt {adapt_steps} steps, start tracked twice", {}).get("first_frame_s_median")
    for s in summary.values():
        s["first_frame_vs_tracked_twice"] = round(s["first_frame_s_median"] / base, 3) \
            if base and s["first_frame_s_median"] is not None else None
    return summary


def plot_startup(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Per variant: the time to the first frame (the adaptation's share marked) and the
    rest of the run, medians over the repeats."""
    import numpy as np
    from matplotlib.figure import Figure

    from tccp.io_utils import save_png

    names = list(report["runs"])
    med = lambda xs: float(np.median([x for x in xs if x is not None])) if any(x is not None for x in xs) else 0.0  # noqa: E731
    adapt = [med([r["adapt_s"] for r in report["runs"][n]]) for n in names]
    first = [med([r["first_frame_s"] for r in report["runs"][n]]) for n in names]
    total = [med([r["total_s"] for r in report["runs"][n]]) for n in names]
    fig = Figure(figsize=(9, 0.7 * len(names) + 2.0))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(names))[::-1]
    ax.barh(y, adapt, color="tab:orange", label="adapting stage 1 (tracking, features, training)")
    ax.barh(y, np.subtract(first, adapt), left=adapt, color="tab:blue", label="reference bank, session start, first window")
    ax.barh(y, np.subtract(total, first), left=first, color="tab:gray", alpha=0.5, label="the rest of the run")
    for yi, f, t in zip(y, first, total):
        ax.text(t + 0.3, yi, f"first frame {f:.1f} s, all {t:.1f} s", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlim(0, max(total) * 1.4 if total else 1)
    c, m = report["config"], report["machine"]
    ax.set_title(f"{Path(report['model']).name}: tccp run on {c['clip']} ({c['size'][0]}x{c['size'][1]}), {c['seconds']:g} s out, "
                 f"median of {c['repeat']} | {m['cpu']} ({m['cpus_usable']} cpus)", fontsize=8)
    ax.set_xlabel("seconds from the start of the run")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.4, -0.14), ncol=3, frameon=False)
    fig.tight_layout()
    return save_png(fig, path)


def print_startup(report: dict[str, Any]) -> None:
    c, m = report["config"], report["machine"]
    print(f"model {report['model']} | tccp run on {c['clip']} {c['size'][0]}x{c['size'][1]}, {c['seconds']:g} s out, "
          f"{c['repeat']} repeat(s) | {m['cpu']} ({m['cpus_usable']} cpus)")
    for name, s in report["summary"].items():
        r = report["runs"][name][-1]
        ratio = s["first_frame_vs_tracked_twice"]
        print(f"  {name:38s} first frame {s['first_frame_s_median']:6.1f} s"
              f"{'' if ratio is None else f' (x{ratio:.2f})'} | all {s['total_s_median']:6.1f} s | adapting "
              f"{r['adapt_s'] if r['adapt_s'] is not None else '-'} s | replayed {r['frames_replayed'] or 0} frames")
