"""The `--report DIR` output: metrics JSON, plots over time, a strip of frames.

Files (each written atomically, so a reader never sees half a PNG):
- `metrics.json`: the same JSON as `--json`;
- `timeline.png`: mouth aperture real vs generated with the speech energy behind it,
  head-region frame differences with the window joins marked, per-frame PSNR;
- `strip.png`: head crops of evenly spaced frames, real over generated over their
  amplified difference (just generated without a real video);
- `latency.png`: per-window timings, only when a run's stats JSON is given.

Plots use matplotlib's object API on the Agg canvas (no pyplot global state), so
reports can be written from threads and without a display.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tccp.errors import TCCPError
from tccp.io_utils import atomic_path, ensure_writable_dir

__all__ = ["write_report", "plot_timeline", "frame_strip", "plot_latency", "window_records", "load_stats"]

TIMING_KEYS = ("queue_wait", "stage1", "stage2", "composite")


def _figure(rows: int, width: float = 11.0, height: float = 2.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, axes


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def plot_timeline(result, path: str | os.PathLike, fps: float = 25.0) -> Path:
    """Mouth aperture / audio energy, head frame differences, per-frame PSNR."""
    s, m = result.series, result.metrics
    has_ref = "aperture_real" in s
    fig, axes = _figure(3 if has_ref else 2)
    n = len(s["aperture_generated"])
    t = np.arange(n) / fps

    ax = axes[0]
    if "energy_db" in s:
        ax2 = ax.twinx()
        ax2.fill_between(t, s["energy_db"], float(np.min(s["energy_db"])), color="0.85", step="mid")
        ax2.set_ylabel("speech energy (dB)")
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
    if has_ref:
        ax.plot(t, s["aperture_real"], color="black", lw=1.2, label="real")
    ax.plot(t, s["aperture_generated"], color="tab:red", lw=1.2, label="generated")
    ax.set_ylabel("mouth aperture\n(inner lips / IOD)")
    lips = m.get("lipsync", {})
    title = "mouth opening"
    if has_ref:
        title += f"  r={_fmt(lips.get('aperture_corr'))}  lag={lips.get('lag_frames')} frames"
    sync = (lips.get("audio_sync") or {}).get("generated")
    if sync:
        title += f"  |  vs audio r={_fmt(sync.get('r'))} offset={sync.get('offset_frames')}"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)

    ax = axes[1]
    seams = m.get("temporal", {}).get("seams", {})
    new, first = int(seams.get("new_frames", 7)), int(seams.get("first_frames", 1))
    for j in range(first, n, max(1, new)):
        ax.axvline(j / fps, color="tab:blue", lw=0.5, ls=":", alpha=0.6)
    if has_ref:
        ax.plot(t, s["diff_real"], color="black", lw=1.0, label="real")
    ax.plot(t, s["diff_generated"], color="tab:red", lw=1.0, label="generated")
    g = seams.get("generated") or {}
    ax.set_title(f"head frame-to-frame difference (dotted: window joins)  seam ratio "
                 f"{_fmt(g.get('seam_ratio'), '.2f')}", fontsize=10)
    ax.set_ylabel("mean |f[t]-f[t-1]|")
    ax.legend(loc="upper right", fontsize=8)

    if has_ref:
        ax = axes[2]
        for key, colour, label in (("head_psnr", "tab:red", "head"),
                                   ("outside_psnr", "tab:green", "outside"),
                                   ("border_psnr", "tab:purple", "mask border")):
            ax.plot(t, s[key], color=colour, lw=1.0, label=label)
        ax.set_ylabel("PSNR (dB)")
        ax.set_title("fidelity per frame (100 dB = identical)", fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("time (s)")
    return _save(fig, Path(path))


def frame_strip(result, path: str | os.PathLike, count: int = 6, size: int = 160) -> Path:
    """Head crops of `count` evenly spaced frames: real / generated / 4x |difference|."""
    import cv2

    from tccp.face.geometry import crop, face_box

    gen = result.generated
    ref = result.real
    anchor = ref if ref is not None else gen
    ok = np.flatnonzero(anchor.found)
    n = len(gen.frames)
    if ok.size:
        idx = ok[np.linspace(0, ok.size - 1, min(count, ok.size)).round().astype(int)]
    else:
        idx = np.linspace(0, n - 1, min(count, n)).round().astype(int)
    rows: list[list[np.ndarray]] = [[], [], []] if ref is not None else [[]]
    for t in idx:
        if anchor.found[t]:
            box = face_box(anchor.landmarks[t], scale=2.0)
        else:
            h, w = gen.frames.shape[1:3]
            side = min(h, w)
            box = np.array([(w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2])
        g = crop(gen.frames[t], box, size)
        if ref is not None:
            r = crop(ref.frames[t], box, size)
            diff = np.clip(cv2.absdiff(r, g).astype(np.int32) * 4, 0, 255).astype(np.uint8)
            rows[0].append(r)
            rows[1].append(g)
            rows[2].append(diff)
        else:
            rows[0].append(g)
        label = f"{t}"
        for row in rows:
            cv2.putText(row[-1], label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1,
                        cv2.LINE_AA)
    names = ["real", "generated", "|diff| x4"] if ref is not None else ["generated"]
    lines = []
    for name, row in zip(names, rows):
        img = np.concatenate(row, axis=1)
        tag = np.zeros((size, 90, 3), np.uint8)
        cv2.putText(tag, name, (4, size // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                    cv2.LINE_AA)
        lines.append(np.concatenate([tag, img], axis=1))
    strip = np.concatenate(lines, axis=0)
    out = Path(path)
    with atomic_path(out) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR)):
            raise TCCPError(f"{out}: could not write the image")
    return out


def window_records(stats: Any) -> list[dict]:
    """Per-window timing dicts from a run's stats JSON, whatever its nesting.

    Accepts a list of records, or a dict holding one under `windows`,
    `window_records` or `per_window` (possibly inside `stats`).
    """
    if isinstance(stats, list):
        return [w for w in stats if isinstance(w, dict)]
    if not isinstance(stats, dict):
        return []
    for key in ("window_records", "per_window", "windows"):
        v = stats.get(key)
        if isinstance(v, list) and v and isinstance(v[0], dict):
            return v
    for key in ("stats", "engine", "session"):
        if isinstance(stats.get(key), (dict, list)):
            found = window_records(stats[key])
            if found:
                return found
    return []


def plot_latency(stats: Any, path: str | os.PathLike, fps: float = 25.0, new_frames: int = 7) -> Path | None:
    """Stacked per-window step times with end-to-end latency; None without records."""
    recs = window_records(stats)
    if not recs:
        return None
    fig, axes = _figure(1, height=3.4)
    ax = axes[0]
    x = np.arange(len(recs))
    bottom = np.zeros(len(recs))
    for key, colour in zip(TIMING_KEYS, ("0.7", "tab:blue", "tab:orange", "tab:green")):
        v = np.array([float(r.get(key, 0.0) or 0.0) for r in recs])
        ax.bar(x, v, bottom=bottom, color=colour, width=0.9, label=key)
        bottom += v
    if any("e2e" in r for r in recs):
        ax.plot(x, [float(r.get("e2e", 0.0) or 0.0) for r in recs], color="black", lw=1.0, label="e2e")
    budget = new_frames / fps
    ax.axhline(budget, color="red", ls="--", lw=0.8, label=f"real time ({budget:.2f} s / window)")
    ax.set_xlabel("window")
    ax.set_ylabel("seconds")
    ax.set_title("per-window latency", fontsize=10)
    ax.legend(loc="upper right", fontsize=8, ncol=3)
    return _save(fig, Path(path))


def load_stats(path: str | os.PathLike) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise TCCPError(f"{p}: stats file does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TCCPError(f"{p}: not a readable stats JSON ({type(exc).__name__})") from None


def write_report(result, folder: str | os.PathLike, stats: Any = None, fps: float = 25.0) -> list[Path]:
    """Write metrics.json, timeline.png, strip.png (and latency.png) into `folder`."""
    from tccp.metrics.evaluate import write_json

    out = ensure_writable_dir(folder)
    written = [write_json(result.metrics, out / "metrics.json")]
    written.append(plot_timeline(result, out / "timeline.png", fps))
    written.append(frame_strip(result, out / "strip.png"))
    if stats is not None:
        seams = result.metrics.get("temporal", {}).get("seams", {})
        p = plot_latency(stats, out / "latency.png", fps, int(seams.get("new_frames", 7)))
        if p is not None:
            written.append(p)
    return written
