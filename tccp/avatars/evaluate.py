"""An avatar's validation numbers: reconstruction of held-out footage, base pack vs avatar.

The tails of the person's videos are never seen by the reference bank or by
fine-tuning. Each tail is reconstructed from its own audio by the engine's file run
(`engine.filerun.run_file`: stage-1 landmarks from the audio, stage 2 from the bank's
best-matching reference, paste-back at the source resolution), once per pack, with the
avatar's bank, the same sampler steps and seeds, no degradation; then measured against
the real tail (`tccp.metrics.evaluate.evaluate_arrays`, the measures of `tccp eval`):

- mouth-box PSNR, mouth sharpness ratio and PSNR of the face outside the edit
  (`mouth_region_measures`);
- mouth-opening correlation with the real tail and lip landmark distance (the output
  tracked like the real video).

Stage 1 on its own (generated vs tracked head-frame landmarks, `tccp.metrics.landmarks`,
with the "mean lips" baseline) is measured once: an avatar keeps its base pack's stage 1.
Values over several tails are frame-weighted means.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["RECONSTRUCTION_KEYS", "reconstruction_measures", "validate_avatar"]

# name in the result -> path into `evaluate_arrays(...).metrics`
RECONSTRUCTION_KEYS: dict[str, tuple[str, ...]] = {
    "psnr_mouth": ("mouth", "psnr_mouth"),
    "sharpness_ratio": ("mouth", "sharpness_ratio"),
    "psnr_face_kept": ("mouth", "psnr_face_kept"),
    "aperture_corr": ("lipsync", "aperture_corr"),
    "lip_lmd": ("lipsync", "lip_lmd"),
    "lag_frames": ("lipsync", "lag_frames"),
}


def _get(d: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d if isinstance(d, (int, float)) and math.isfinite(d) else None


def reconstruction_measures(generated: np.ndarray, real: Any, audio: np.ndarray | None, sr: int,
                            fps: float) -> dict[str, float | None]:
    """The measures above for generated frames vs a `TrackedVideo` of the real ones."""
    from tccp.metrics.evaluate import EvalConfig, evaluate_arrays

    m = evaluate_arrays(generated, real, audio, sr=sr, fps=fps, cfg=EvalConfig(identity=False)).metrics
    return {k: _get(m, path) for k, path in RECONSTRUCTION_KEYS.items()}


def _weighted(rows: list[tuple[int, dict]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in {k for _, r in rows for k in r}:
        vals = [(n, r[key]) for n, r in rows if isinstance(r.get(key), (int, float))]
        total = sum(n for n, _ in vals)
        out[key] = float(sum(n * v for n, v in vals) / total) if total else None
    return out


def validate_avatar(
    packs: dict[str, str | Path],
    tails: Sequence[Path],
    bank: Any,
    device: str = "cpu",
    steps: int = 4,
    max_seconds: float = 6.0,
    work: Path | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Validation numbers of each named pack (e.g. {"base": ..., "avatar": ...}) on the
    tail videos (up to `max_seconds` of them in all), every pack with `bank`."""
    import tempfile

    from engine.config import EngineConfig
    from engine.filerun import run_file
    from engine.model import SharedModel
    from engine.runner import PipelineRunner
    from tccp.media.io import load_clip
    from tccp.metrics.evaluate import track_frames
    from tccp.metrics.suite import stage1_clip

    say = log or (lambda msg: None)
    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="tccp-avatar-eval-")
        work = Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        reals = []
        left = float(max_seconds)
        for tail in tails:
            if left * 25.0 < 1:
                break
            clip = load_clip(tail, max_seconds=left)
            reals.append((tail, clip, track_frames(clip.frames)))
            left -= len(clip.frames) / clip.fps
        rows: dict[str, list[tuple[int, dict]]] = {name: [] for name in packs}
        warp_only: dict[str, bool] = {}
        stage1_rows: list[tuple[int, dict]] = []
        conf = EngineConfig(steps=steps, degrade=False, seed=seed, adapt_steps=0)  # the tail is held out: no learning on it
        for pi, (name, pack) in enumerate(packs.items()):
            runner = PipelineRunner.from_pack(str(pack), device=device)
            runner.references = bank
            warp_only[name] = runner.pipeline.stage2.model is None
            model = SharedModel(runner)
            try:
                for i, (tail, clip, real) in enumerate(reals):
                    out = work / f"{name}_{i:02d}.mp4"
                    run_file(tail, out, model, config=conf, max_seconds=len(clip.frames) / clip.fps)
                    gen = load_clip(out, require_audio=False, min_frames=1).frames
                    n = min(len(gen), len(real.frames))
                    audio = clip.audio[: int(round(n / clip.fps * clip.sr))] if clip.audio is not None else None
                    r = reconstruction_measures(gen[:n], real.head(n), audio, clip.sr, clip.fps)
                    rows[name].append((n, r))
                    say(f"validation ({name}, {tail.name}): mouth PSNR {_show(r['psnr_mouth'], '.2f')} dB, "
                        f"mouth-opening r {_show(r['aperture_corr'], '.3f')} on {n} frames")
                    if pi == len(packs) - 1 and audio is not None and real.found.any():
                        s1 = stage1_clip(runner.pipeline, real.head(n), audio, clip.sr, clip.fps, bank)
                        stage1_rows.append((n, s1))
            finally:
                model.close()
    finally:
        if tmp is not None:
            tmp.cleanup()
    stage1 = {k: _weighted([(n, r.get(k) or {}) for n, r in stage1_rows]) for k in ("tccp", "mean_lips")} \
        if stage1_rows else {}
    rec = {name: _weighted(r) for name, r in rows.items()}
    base, avatar = rec.get("base"), rec.get("avatar") or {}
    summary = {k: [None if base is None else base.get(k), avatar.get(k)]
               for k in ("psnr_mouth", "aperture_corr", "sharpness_ratio")}
    return {
        "steps": steps,
        "warp_only": warp_only,
        "frames": int(sum(len(r[2].frames) for r in reals)),
        "clips": [str(Path(r[0]).name) for r in reals],
        "reconstruction": rec,
        "stage1": stage1,
        "summary": summary,
    }


def _show(x: Any, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)
