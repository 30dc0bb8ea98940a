"""Training metrics: an append-only `metrics.jsonl` and the `loss.png` curve.

One JSON object per line: `{"kind": "train", "step", "loss", "lr", "grad_norm",
"sec_per_step", "epoch", ...}` every `log_every` steps and `{"kind": "val", "step",
"val_loss", "val_first"}` at each validation. JSONL because a run killed mid-write
loses at most its last line, and resuming truncates the log back to the checkpoint's
step so the curve never shows steps that were redone.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable

from tccp.io_utils import atomic_path

__all__ = ["MetricsLog", "read_metrics", "plot_loss"]


class MetricsLog:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (work a resumed run will redo)."""
        if not self.path.is_file():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line from a killed run
    return out


def _smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    out, s = [], None
    for v in values:
        s = v if s is None else (1 - alpha) * s + alpha * v
        out.append(s)
    return out


def plot_loss(records: Iterable[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Train loss (raw + smoothed) and validation losses against step, log y-axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = list(records)
    tr = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train" and _finite(r.get("loss"))]
    va = [(r["step"], r["val_loss"]) for r in recs if r.get("kind") == "val" and _finite(r.get("val_loss"))]
    vf = [(r["step"], r["val_first"]) for r in recs if r.get("kind") == "val" and _finite(r.get("val_first"))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if tr:
        xs, ys = zip(*tr)
        ax.plot(xs, ys, color="tab:blue", alpha=0.3, lw=0.8, label="train")
        ax.plot(xs, _smooth(list(ys)), color="tab:blue", lw=1.6, label="train (smoothed)")
    if va:
        xs, ys = zip(*va)
        ax.plot(xs, ys, "o-", color="tab:orange", lw=1.4, ms=3, label="val (EMA, windows)")
    if vf:
        xs, ys = zip(*vf)
        ax.plot(xs, ys, "s--", color="tab:green", lw=1.0, ms=3, label="val (EMA, first frame)")
    if tr or va:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss (MSE)")
    ax.grid(True, which="both", alpha=0.3)
    if tr or va or vf:
        ax.legend(loc="upper right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
