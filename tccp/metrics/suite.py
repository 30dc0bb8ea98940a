"""`tccp eval --suite`: the model on held-out clips against baselines, in one run.

Reconstruction: each held-out clip is re-generated from its own audio by the engine's
file run (`engine.filerun.run_file`) and compared with the clip. The reference bank is
taken from the clip's frames AFTER the evaluated seconds when the clip is long enough
(else from the whole clip, noted as `bank_overlap`), so the warp cannot copy the very
frame it is judged against. Measured in the same run, on the same frames, through the
same H.264 encode:
- `tccp`: the full pipeline (stage-1 landmarks from the audio, stage 2), with stage 1
  adapted to the person (`engine.adapt`) on the clip's frames after the evaluated
  seconds, as a dubbing run adapts on the source's own speech; not adapted where the
  clip has nothing after them (no leak of the judged frames);
- `unadapted`: the same without the adaptation (the pack's stage 1 as shipped);
- `tccp_tracked`: stage 2 on the clip's tracked landmarks (stage 2's faithfulness);
- `warp`: generated landmarks, stage 2 at 0 steps (the warped reference alone: the
  no-learning baseline the denoiser must beat);
- `denoiser`: generated landmarks, stage 2's learned correction at 4 DDIM steps (packs
  with a stage-2 network; `tccp` is whatever the pack's default steps are);
- `frozen`: the first frame's lower face pasted on every frame (no motion);
- `blur`: the real frame with the mouth region blurred (Gaussian sigma 2.5 px);
- `real`: the clip after one encode/decode round trip (the codec's ceiling).
Plus a stage-1 table (landmarks alone vs tracked, `tccp.metrics.landmarks`) against
"mean lips" and "audio energy" baselines, on clips with speech only.

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
    "frozen_baseline",
    "blur_baseline",
    "stage1_clip",
    "run_suite",
    "format_table",
]

# (video in, mp4 out, seconds) -> the run's stats summary (any JSON-able dict)
Generator = Callable[[Path, Path, float], dict]

METHODS = ("tccp", "unadapted", "tccp_tracked", "warp", "denoiser", "frozen", "blur", "real")

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
    "PSNR mouth": (("mouth", "psnr_mouth"), ".2f"),
    "sharp": (("mouth", "sharpness_ratio"), ".2f"),
    "PSNR kept": (("mouth", "psnr_face_kept"), ".2f"),
}
# the columns printed (the JSON keeps every measure)
PRINT_COLUMNS = ("mouth r", "|lag|", "LipLMD", "PSNR mouth", "sharp", "PSNR kept", "identity", "seam ratio")


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
    region: str = "mouth"  # 'head': the whole-head mode (stage 1's head mode + the head warp)
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
        if not cand.is_file() and not p.suffix:
            cand = next((c for c in (folder / f"{name}.mpg", folder / f"{name}_noaudio.mp4") if c.is_file()), cand)
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
        model = load_model(cfg.model, cfg.device)
        close = model.close
    changes: dict[str, Any] = {"window": cfg.eval.window, "degrade": False, "region": cfg.region}
    if cfg.region == "head":
        from engine.model import check_region

        try:
            check_region(model, "head")
        except TCCPError:
            close()
            raise
    if cfg.steps is not None:
        if cfg.steps < 0:
            raise TCCPError(f"--steps {cfg.steps}: must be 0 or more")
        changes["steps"] = cfg.steps
    econf = EngineConfig(**changes)

    template = getattr(model.runner, "template", None)

    def generate(video: Path, out: Path, seconds: float, landmarks: str = "generated",
                 steps: int | None = None, references: Any = None, audio: Path | None = None,
                 adapt: bool = True) -> dict:
        from tccp.media.io import probe

        # adapt on what follows the judged seconds only; a clip with too little after them is not adapted
        after = probe(video).duration - seconds >= 3.0
        conf = econf.with_(landmarks=landmarks, references=references,
                           adapt_start_s=seconds if (adapt and after) else None,
                           adapt_audio=_clip_audio(video))  # x_noaudio.mp4's own speech is x.wav
        if steps is not None:
            conf = conf.with_(steps=steps)
        res = run_file(video, out, model, audio=audio, config=conf, max_seconds=seconds)
        generate.stage1 = res.stage1  # type: ignore[attr-defined]
        return res.summary

    def bank(video: Path, seconds: float) -> tuple[Any, bool]:
        """References from after the evaluated part when there is enough of it."""
        from engine.refs import scan_video
        from tccp.media.io import probe

        if template is None:
            return None, False
        dur = probe(video).duration
        after = dur - seconds >= 1.5
        b = scan_video(video, template, None, model.size, start_s=seconds if after else 0.0)
        return (b.bank if b is not None else None), not after

    generate.bank = bank  # type: ignore[attr-defined]
    generate.pipeline = getattr(model.runner, "pipeline", None)  # type: ignore[attr-defined]

    generate.supports_landmarks = True  # type: ignore[attr-defined]
    generate.stage1 = None  # type: ignore[attr-defined]  # the last run's adapted stage 1 (None: not adapted)

    return generate, close


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
        if not any(method in clip for clip in per_clip.values()):
            continue
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
    stage1_rows: list[dict] = []
    try:
        for path in clips:
            name = path.stem
            audio_path = _clip_audio(path)
            real_clip = load_clip(path, audio=audio_path, max_seconds=cfg.seconds, require_audio=False)
            fps, sr = real_clip.fps, real_clip.sr
            say(f"{name}: tracking")
            real = track_frames(real_clip.frames)
            if not real.found.any():
                raise TCCPError(f"{path}: no face found in the first {cfg.seconds:g} s")
            bank, overlap = (None, False)
            if hasattr(generator, "bank"):
                bank, overlap = generator.bank(path, cfg.seconds)  # type: ignore[attr-defined]
            kw: dict[str, Any] = {"references": bank} if bank is not None else {}
            if audio_path is not None:
                kw["audio"] = audio_path
            say(f"{name}: generating {cfg.seconds:g} s")
            gen_path = work / f"{name}.tccp.mp4"
            stats = generator(path, gen_path, cfg.seconds, **kw)
            gen_frames = load_clip(gen_path, require_audio=False, min_frames=1).frames
            n = min(len(gen_frames), len(real.frames))
            real_n = real.head(n)
            audio = real_clip.audio[: int(round(n / fps * sr))] if real_clip.audio is not None else None
            candidates = {"tccp": gen_frames[:n]}
            adapted = getattr(generator, "stage1", None)
            if cfg.tracked and getattr(generator, "supports_landmarks", False):
                runs: list[tuple[str, dict]] = [("tccp_tracked", {"landmarks": "tracked"})]
                if adapted is not None:
                    runs.insert(0, ("unadapted", {"adapt": False}))
                if cfg.region == "mouth":  # the head region is the warp already
                    runs.append(("warp", {"steps": 0}))
                pipe = getattr(generator, "pipeline", None)
                if pipe is not None and pipe.stage2.model is not None and cfg.region == "mouth":
                    runs.append(("denoiser", {"steps": 4}))  # the learned correction, 4 DDIM steps
                for method, extra in runs:
                    say(f"{name}: generating ({method})")
                    p = work / f"{name}.{method}.mp4"
                    generator(path, p, cfg.seconds, **extra, **kw)  # type: ignore[call-arg]
                    frames = load_clip(p, require_audio=False, min_frames=1).frames
                    if len(frames) >= n:
                        candidates[method] = frames[:n]
                if adapted is None:  # not adapted: the unadapted run is this very run
                    candidates["unadapted"] = candidates["tccp"]
            candidates["frozen"] = _roundtrip(frozen_baseline(real_n), audio, work / f"{name}.frozen.mp4", fps, sr)
            candidates["blur"] = _roundtrip(blur_baseline(real_n), audio, work / f"{name}.blur.mp4", fps, sr)
            candidates["real"] = _roundtrip(real_n.frames, audio, work / f"{name}.real.mp4", fps, sr)
            speech = _speech_fraction(audio, sr, n, fps) if audio is not None else 0.0
            per_clip[name] = {"run_stats": stats, "bank_overlap": overlap, "speech_fraction": speech}
            for method, frames in candidates.items():
                res = evaluate_arrays(frames, real_n, audio, sr=sr, fps=fps, cfg=cfg.eval)
                per_clip[name][method] = res.metrics
            pipe = getattr(generator, "pipeline", None)
            if pipe is not None and audio is not None and bank is not None and cfg.region == "mouth":
                row = stage1_clip(pipe, real_n, audio, sr, fps, bank, adapted=adapted)
                row.update(clip=name, speech_fraction=speech)
                stage1_rows.append(row)
    finally:
        close()
        if tmp is not None:
            tmp.cleanup()
    return {
        "version": 2,
        "seconds": cfg.seconds,
        "model": cfg.model or "bundled",
        "steps": cfg.steps,
        "region": cfg.region,
        "clips": per_clip,
        "summary": _mean_table(per_clip),
        "summary_speech": _mean_table({k: v for k, v in per_clip.items() if v.get("speech_fraction", 0) >= 0.5}),
        "stage1": {"clips": stage1_rows, "summary": _stage1_summary(stage1_rows)},
    }


def _clip_audio(path: Path) -> Path | None:
    """The clip's driving audio when it is not its own track (`x_noaudio.mp4` + `x.wav`)."""
    from tccp.data.prepare import resolve_audio
    from tccp.media.io import probe

    try:
        return resolve_audio(path, None, probe(path).has_audio)
    except TCCPError:
        return None


def _speech_fraction(audio: np.ndarray, sr: int, n: int, fps: float) -> float:
    from tccp.media.vad import frame_voice_activity

    return float((frame_voice_activity(audio, n, fps, sr) > 0.5).mean()) if n else 0.0


def frozen_baseline(real: TrackedVideo) -> np.ndarray:
    """The first frame's lower face (the mouth region) pasted, feathered, on every frame."""
    from tccp.face.regions import region_mask

    frames = real.frames
    ok = np.flatnonzero(real.found)
    if ok.size == 0:
        return frames.copy()
    ref = int(ok[0])
    h, w = frames.shape[1:3]
    out = np.empty_like(frames)
    src = frames[ref].astype(np.float32)
    for t in range(len(frames)):
        lm = real.landmarks[t] if real.found[t] else real.landmarks[ref]
        m = region_mask([lm, real.landmarks[ref]], (h, w), "mouth", dilate=0.06, feather=0.02)[..., None]
        out[t] = np.clip(frames[t] * (1 - m) + src * m + 0.5, 0, 255).astype(np.uint8)
    return out


def blur_baseline(real: TrackedVideo, sigma: float = 2.5) -> np.ndarray:
    """Each real frame with its mouth region Gaussian-blurred (sigma px): the sharpness
    floor (a tool's calibration puts it at ~31 dB and a ratio of ~0.17 on 512 px clips)."""
    import cv2

    from tccp.face.regions import region_mask

    frames = real.frames
    h, w = frames.shape[1:3]
    out = frames.copy()
    for t in range(len(frames)):
        if not real.found[t]:
            continue
        m = region_mask(real.landmarks[t], (h, w), "mouth", dilate=0.06, feather=0.02)[..., None]
        blurred = cv2.GaussianBlur(frames[t], (0, 0), sigma).astype(np.float32)
        out[t] = np.clip(frames[t] * (1 - m) + blurred * m + 0.5, 0, 255).astype(np.uint8)
    return out


def stage1_clip(pipe: Any, real: TrackedVideo, audio: np.ndarray, sr: int, fps: float, bank: Any,
                adapted: Any = None) -> dict:
    """Stage 1 alone on one clip (its own audio): generated vs tracked head-frame
    landmarks, and the two baselines (mean lips held; energy mapped to the opening);
    with `adapted` (the run's stage 1 adapted to the person) also its row."""
    from tccp.data.landmarks import reference_frames
    from tccp.face import headframe as hf
    from tccp.media.vad import frame_voice_activity
    from tccp.media.whisper import frame_tokens, full_features
    from tccp.metrics.evaluate import energy_db
    from tccp.metrics.landmarks import energy_baseline, mean_lips_baseline, stage1_metrics
    from tccp.pipelines.landmarks import generate_clip

    gen = pipe.stage1
    template = gen.codec.template
    n = len(real.frames)
    idx = np.flatnonzero(real.found)
    lm = real.landmarks.copy()
    lm[~real.found] = lm[idx[np.abs(np.arange(n)[:, None] - idx[None]).argmin(1)]][~real.found]
    heads, _ = hf.to_head(lm.astype(np.float32), template)
    bank_heads, _ = hf.to_head(bank.meshes, template)
    ref_heads = bank_heads[reference_frames(bank_heads, 4)]
    refs = gen.references(ref_heads)
    from tccp.models.landmarks import audio_radius

    tokens = frame_tokens(full_features(pipe.whisper, audio), 0, n, fps=fps,
                          radius=audio_radius(gen.net.cfg)).astype(np.float32)
    vad = frame_voice_activity(audio, n, fps, sr)
    out = generate_clip(gen, tokens, vad, heads, refs)
    row = {"tccp": stage1_metrics(out, heads, vad)}
    # as shipped: the adapted stage 1 where the run adapted, else the pack's (the same run)
    shipped = gen if adapted is None else adapted
    shipped_refs = refs if adapted is None else adapted.references(ref_heads)
    row["adapted"] = row["tccp"] if adapted is None else stage1_metrics(generate_clip(
        adapted, tokens, vad, heads, shipped_refs), heads, vad)
    # a dub: the rest of the face (stage 1's pose prior) moves with other speech than the
    # audio's. Stand-in: the same clip's meshes played backwards (same person, same poses,
    # motion unrelated to this audio); the gap to "adapted" is what stage 1 reads from
    # the source face's own speech motion instead of the audio (docs/lipsync.md)
    row["elsewhere"] = stage1_metrics(generate_clip(shipped, tokens, vad, heads[::-1].copy(), shipped_refs), heads, vad)
    anchor = heads[0].copy()
    anchor[gen.codec.gen_index] = refs.anchor
    row["mean_lips"] = stage1_metrics(mean_lips_baseline(heads, anchor), heads, vad)
    e = energy_db(audio, sr, fps, n)
    row["energy"] = stage1_metrics(energy_baseline(heads, refs.rest, e), heads, vad)
    return row


STAGE1_METHODS = ("tccp", "adapted", "elsewhere", "mean_lips", "energy")
"""Rows of the stage-1 table: the pack's stage 1, as shipped (adapted where the run
adapted), as shipped with the rest of the face from elsewhere in the clip (a dub's
situation), and the two baselines."""


def _stage1_summary(rows: list[dict]) -> dict:
    speech = [r for r in rows if r.get("speech_fraction", 0) >= 0.5]
    out: dict = {"clips_with_speech": len(speech)}
    for method in STAGE1_METHODS:
        d = {}
        for key in ("aperture_corr", "lip_lmd", "silence_ratio", "silence_open"):
            vals = [r.get(method, {}).get(key) for r in speech]
            vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
            d[key] = float(np.mean(vals)) if vals else None
        lags = [abs(r[method]["lag"]) for r in speech if r.get(method, {}).get("lag") is not None]
        d["abs_lag"] = float(np.mean(lags)) if lags else None
        out[method] = d
    return out


def format_table(result: dict, key: str = "summary", stage1: bool = True) -> str:
    """The summary as a fixed-width text table (methods x measures, means over clips);
    `key` "summary_speech" for clips with speech only; `stage1` adds the stage-1 table."""
    cols = list(PRINT_COLUMNS)
    fmt = {c: TABLE_COLUMNS[c][1] for c in cols}
    widths = {c: max(len(c), 7) for c in cols}
    head = f"{'method':<16}" + " ".join(f"{c:>{widths[c]}}" for c in cols)
    clips = result.get("clips", {})
    count = len(clips) if key == "summary" else sum(1 for c in clips.values() if c.get("speech_fraction", 0) >= 0.5)
    lines = [f"{count} clips x {result.get('seconds')} s "
             f"(means; lower is better for LipLMD, |lag|, jitter x, seam ratio)", head,
             "-" * len(head)]
    for method, row in result.get(key, {}).items():
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append(f"{'-' if v is None else format(v, fmt[c]):>{widths[c]}}")
        lines.append(f"{method:<16}" + " ".join(cells))
    st = (result.get("stage1") or {}).get("summary")
    if stage1 and st and st.get("clips_with_speech"):
        lines += ["", f"stage 1 alone (landmarks vs tracked), {st['clips_with_speech']} clips with speech",
                  f"{'method':<16}{'mouth r':>9}{'|lag|':>7}{'LipLMD':>9}{'silence':>9}"]
        for m in STAGE1_METHODS:
            d = st.get(m)
            if not d or d.get("aperture_corr") is None:
                continue
            f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            lines.append(f"{m:<16}{f(d['aperture_corr'], '.3f'):>9}{f(d['abs_lag'], '.2f'):>7}"
                         f"{f(d['lip_lmd'], '.4f'):>9}{f(d['silence_ratio'], '.3f'):>9}")
    return "\n".join(lines)
