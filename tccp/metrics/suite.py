"""`tccp eval --suite`: the model on held-out clips against two baselines, one table.

Reconstruction: each held-out clip is re-generated from its own audio by the engine's
file run (`engine.filerun.run_file`), and compared with the clip. Two baselines are
measured in the same run, on the same frames, through the same H.264 encode, so the
model's numbers have a floor and a ceiling next to them:
- `reference_frame`: the head of the clip's first frame pasted, unchanged and
  feathered, onto every frame (no motion at all; context untouched);
- `real`: the clip itself after one encode/decode round trip (the upper bound; it is
  not a perfect 100 dB only because of the codec, which the model output also goes
  through).

The pipeline run is a hook (`Generator`): the default loads the bundled (or given)
model pack once and calls the file run; tests pass a stand-in.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from tccp.errors import TCCPError
from tccp.metrics.evaluate import EvalConfig, TrackedVideo, evaluate_arrays, track_frames

__all__ = [
    "SuiteConfig",
    "Generator",
    "METHODS",
    "TABLE_COLUMNS",
    "default_clips_dir",
    "resolve_clips",
    "engine_generator",
    "reference_frame_baseline",
    "run_suite",
    "format_table",
]

# (video in, mp4 out, seconds) -> the run's stats summary (any JSON-able dict)
Generator = Callable[[Path, Path, float], dict]

METHODS = ("tccp", "tccp_tracked", "reference_frame", "real")

# column title -> (path into one clip's metrics, format); means over clips
TABLE_COLUMNS: dict[str, tuple[tuple[str, ...], str]] = {
    "LMD": (("lipsync", "landmark_error"), ".4f"),
    "LipLMD": (("lipsync", "lip_lmd"), ".4f"),
    "mouth r": (("lipsync", "aperture_corr"), ".3f"),
    "|lag|": (("lipsync", "lag_frames"), ".1f"),
    "audio r": (("lipsync", "audio_sync", "generated", "r"), ".3f"),
    "PSNR head": (("fidelity", "head", "psnr"), ".2f"),
    "SSIM head": (("fidelity", "head", "ssim"), ".3f"),
    "PSNR out": (("fidelity", "outside", "psnr"), ".2f"),
    "PSNR border": (("fidelity", "border", "psnr"), ".2f"),
    "jitter x": (("temporal", "jitter", "ratio"), ".2f"),
    "seam ratio": (("temporal", "seams", "generated", "seam_ratio"), ".2f"),
    "identity": (("identity", "cosine"), ".3f"),
}


@dataclass
class SuiteConfig:
    clips: Sequence[str] | None = None  # names (stems) or files; None: VALIDATION_CLIPS
    clips_dir: Path | None = None  # where names are looked up; None: ../shared/data/clips
    model: str | None = None  # model pack; None: the bundled one
    steps: int | None = None  # sampler steps; None: the engine's default
    seconds: float = 4.0  # of each clip (CPU inference is slow; 4 s = 14 windows)
    work: Path | None = None  # keep generated videos here; None: a temp folder
    device: str = "cpu"
    tracked: bool = True  # also run stage 2 on the tracked landmarks (the upper bound)
    eval: EvalConfig = field(default_factory=EvalConfig)


def default_clips_dir() -> Path:
    """`shared/data/clips` beside the repository (the project's shared data)."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "clips"


def resolve_clips(cfg: SuiteConfig) -> list[Path]:
    """Clip files: existing paths as given, names looked up in the clips folder."""
    from tccp.data.datasets import VALIDATION_CLIPS

    names = list(cfg.clips) if cfg.clips else list(VALIDATION_CLIPS)
    folder = cfg.clips_dir or default_clips_dir()
    out = []
    for name in names:
        p = Path(name)
        if p.is_file():
            out.append(p)
            continue
        cand = folder / (name if p.suffix else f"{name}.mp4")
        if not cand.is_file():
            raise TCCPError(f"{cand}: held-out clip not found (pass --clips FILE ...)")
        out.append(cand)
    return out


def engine_generator(cfg: SuiteConfig, model=None) -> tuple[Generator, Callable[[], None]]:
    """The engine's file run with one loaded model; returns (generate, close).

    `model`: an `engine.model.SharedModel` to use (it is then not closed here);
    None loads `cfg.model` (None: the bundled pack) the way `tccp run` does.
    """
    try:
        from engine.config import EngineConfig
        from engine.filerun import run_file
        from engine.model import load_model
    except ImportError as exc:
        raise TCCPError(f"engine: the file run is not available ({exc})") from None
    close: Callable[[], None] = lambda: None  # noqa: E731
    if model is None:
        model = load_model(cfg.model, cfg.device, "torch")
        close = model.close
    changes: dict[str, Any] = {"window": cfg.eval.window, "degrade": False}
    if cfg.steps is not None:
        if cfg.steps < 1:
            raise TCCPError(f"--steps {cfg.steps}: must be at least 1")
        changes["steps"] = cfg.steps
    econf = EngineConfig(**changes)

    def generate(video: Path, out: Path, seconds: float, landmarks: str = "generated") -> dict:
        res = run_file(video, out, model, config=econf.with_(landmarks=landmarks), max_seconds=seconds)
        return res.summary

    generate.supports_landmarks = True  # type: ignore[attr-defined]

    return generate, close


def reference_frame_baseline(real: TrackedVideo, cfg: EvalConfig, feather: float = 0.03) -> np.ndarray:
    """Every frame with the first frame's head pasted over it (no motion).

    The head mask is the evaluation's own (so "head" metrics compare the still head
    with the moving one) with an edge feathered by `feather` x the frame size,
    like the engine's paste-back.
    """
    import cv2

    from tccp.metrics.evaluate import head_masks_for_frame

    frames = real.frames
    ok = np.flatnonzero(real.found)
    if ok.size == 0:
        return frames.copy()
    ref = int(ok[0])
    h, w = frames.shape[1:3]
    reg = head_masks_for_frame(real.landmarks[ref], (h, w), cfg)
    if reg is None:
        return frames.copy()
    alpha = reg.head.astype(np.float32)
    sigma = feather * max(h, w)
    if sigma > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigma)
    alpha = alpha[..., None]
    still = frames[ref].astype(np.float32) * alpha
    out = np.empty_like(frames)
    for t in range(len(frames)):
        out[t] = np.clip(frames[t].astype(np.float32) * (1.0 - alpha) + still + 0.5, 0, 255).astype(np.uint8)
    return out


def _roundtrip(frames: np.ndarray, audio: np.ndarray | None, path: Path, fps: float, sr: int) -> np.ndarray:
    """Encode and decode, so baselines carry the same codec loss as the engine output."""
    from tccp.media.io import read_video, write_video

    write_video(path, frames, fps=fps, audio=audio, sr=sr)
    out = read_video(path, fps=fps, min_frames=1).frames
    return out[:, : frames.shape[1], : frames.shape[2]]


def _get(d: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _mean_table(per_clip: dict[str, dict[str, dict]]) -> dict[str, dict[str, float | None]]:
    table: dict[str, dict[str, float | None]] = {}
    for method in METHODS:
        row: dict[str, float | None] = {}
        for col, (path, _) in TABLE_COLUMNS.items():
            vals = []
            for clip in per_clip.values():
                v = _get(clip.get(method), path)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    vals.append(abs(v) if col == "|lag|" else float(v))
            row[col] = float(np.mean(vals)) if vals else None
        table[method] = row
    return table


def run_suite(
    cfg: SuiteConfig,
    generator: Generator | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run the pipeline and both baselines on each clip; return the JSON-ready result."""
    from tccp.media.io import load_clip

    say = progress or (lambda msg: None)
    clips = resolve_clips(cfg)
    if cfg.seconds <= 0:
        raise TCCPError(f"--seconds {cfg.seconds}: must be positive")
    close: Callable[[], None] = lambda: None  # noqa: E731
    if generator is None:
        generator, close = engine_generator(cfg)
    tmp = None
    if cfg.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="tccp-suite-")
        work = Path(tmp.name)
    else:
        work = Path(cfg.work)
        work.mkdir(parents=True, exist_ok=True)
    per_clip: dict[str, dict] = {}
    try:
        for path in clips:
            name = path.stem
            say(f"{name}: generating {cfg.seconds:g} s")
            gen_path = work / f"{name}.tccp.mp4"
            stats = generator(path, gen_path, cfg.seconds)
            real_clip = load_clip(path, max_seconds=cfg.seconds, require_audio=False)
            fps, sr = real_clip.fps, real_clip.sr
            say(f"{name}: tracking and measuring")
            real = track_frames(real_clip.frames)
            if not real.found.any():
                raise TCCPError(f"{path}: no face found in the first {cfg.seconds:g} s")
            gen_frames = load_clip(gen_path, require_audio=False, min_frames=1).frames
            n = min(len(gen_frames), len(real.frames))
            real_n = real.head(n)
            audio = real_clip.audio[: int(round(n / fps * sr))] if real_clip.audio is not None else None
            candidates = {
                "tccp": gen_frames[:n],
                "reference_frame": _roundtrip(
                    reference_frame_baseline(real_n, cfg.eval), audio, work / f"{name}.reference.mp4", fps, sr
                ),
                "real": _roundtrip(real_n.frames, audio, work / f"{name}.real.mp4", fps, sr),
            }
            if cfg.tracked and getattr(generator, "supports_landmarks", False):
                say(f"{name}: generating with tracked landmarks (upper bound)")
                trk_path = work / f"{name}.tracked.mp4"
                generator(path, trk_path, cfg.seconds, landmarks="tracked")  # type: ignore[call-arg]
                trk = load_clip(trk_path, require_audio=False, min_frames=1).frames
                if len(trk) >= n:
                    candidates = {"tccp": candidates["tccp"], "tccp_tracked": trk[:n], **{
                        k: v for k, v in candidates.items() if k != "tccp"}}
            per_clip[name] = {"run_stats": stats}
            for method, frames in candidates.items():
                res = evaluate_arrays(frames, real_n, audio, sr=sr, fps=fps, cfg=cfg.eval)
                per_clip[name][method] = res.metrics
    finally:
        close()
        if tmp is not None:
            tmp.cleanup()
    return {
        "version": 1,
        "seconds": cfg.seconds,
        "model": cfg.model or "bundled",
        "steps": cfg.steps,
        "clips": per_clip,
        "summary": _mean_table(per_clip),
    }


def format_table(result: dict) -> str:
    """The summary as a fixed-width text table (methods x measures, means over clips)."""
    cols = list(TABLE_COLUMNS)
    fmt = {c: TABLE_COLUMNS[c][1] for c in cols}
    widths = {c: max(len(c), 7) for c in cols}
    head = f"{'method':<16}" + " ".join(f"{c:>{widths[c]}}" for c in cols)
    lines = [f"{len(result.get('clips', {}))} clips x {result.get('seconds')} s "
             f"(means; lower is better for LipLMD, |lag|, jitter x, seam ratio)", head,
             "-" * len(head)]
    for method, row in result.get("summary", {}).items():
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append(f"{'-' if v is None else format(v, fmt[c]):>{widths[c]}}")
        lines.append(f"{method:<16}" + " ".join(cells))
    return "\n".join(lines)
