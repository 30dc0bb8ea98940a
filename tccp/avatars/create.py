"""`tccp avatar create`: a person's reference bank, optionally a stage 2 fine-tuned on them.

Steps (all under a work folder; the avatar folder appears only when complete):

1. **Split** each video into a training head and a held-out tail (`tail`, 15 % by
   default, at least 16 frames), re-encoded at 25 fps with the audio cut to match.
2. **Reference bank**: `samples` frames spread over the training heads are tracked
   one by one and `engine.refs.BankBuilder.from_frames` keeps `refs` of them that span
   the person's mouth openings with typical lip shapes (`engine.refs.select_references`,
   head frame of the base pack's template, the most closed mouth first), each as a crop at the
   pack's size, its landmarks and the same box at the source resolution.
3. **Fine-tune** (unless `minutes` or `steps` is 0, or the base pack is warp-only and
   no budget was asked for): the training heads are prepared as training data
   (`tccp.data.prepare`) at the pack's crop size, stage 2 is trained from the base
   pack's stage 2 (`tccp.training.trainer`, same architecture, latent normalisation
   and objective) within the time budget or step cap, and its EMA weights are packed
   under the base pack's stage 1 (`export_pack` with the base pack as stage 1).
   Stage 1 (lip motion from audio) is not fine-tuned: it mostly transfers between
   people, and the person's own mouth appearance is stage 2's and the bank's job.
4. **Validate** on the tails (`tccp.avatars.evaluate`): the engine's file run
   reconstructs each tail from its own audio with the avatar's bank, base pack vs
   avatar, measured against the real tail.
5. **Write** the pack (a copy of the base pack, or the fine-tuned one), refs/,
   avatar.json and AVATAR_CARD.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tccp.errors import TCCPError

__all__ = ["AvatarConfig", "AvatarResult", "create_avatar", "split_video", "build_bank", "DEFAULT_MINUTES"]

FPS = 25.0
SR = 16000
MIN_PART_FRAMES = 16
DEFAULT_MINUTES = 10.0
CPU_CACHE_FRAMES = 750  # frames per clip encoded for fine-tuning on CPU (30 s); all on CUDA


@dataclass
class AvatarConfig:
    videos: list[str]
    out: str
    minutes: float | None = None
    """Fine-tuning budget for stage 2 (wall clock, latent encoding included); 0: no
    fine-tuning (a bank-only avatar); None: `DEFAULT_MINUTES` when the base pack has a
    stage 2, else 0."""
    steps: int | None = None
    """Optimizer steps at most (None: as many as the budget allows; 0: no fine-tuning)."""
    device: str = "auto"
    init: str | None = None
    """Base model pack (None: the bundled `tccp.pack.DEFAULT_PACK`)."""
    refs: int = 8
    """Reference frames in the bank."""
    samples: int = 48
    """Candidate frames (spread over the training footage) the bank is chosen from."""
    max_seconds: float | None = None
    """Use at most this much of each video (from its start)."""
    tail: float = 0.15
    batch: int | None = None
    """Windows per step (None: 4 on CPU, 32 on CUDA)."""
    lr: float = 1e-4
    warmup: int = 20
    seed: int = 0
    cache_frames: int | None = None
    """Frames per clip encoded for fine-tuning (None: all on CUDA, `CPU_CACHE_FRAMES` on CPU)."""
    adapt_steps: int = 300
    """Stage 1 fine-tuned on the training parts' own speech (`engine.adapt`; 0: the base
    pack's stage 1 as it is). The avatar's pack carries the adapted stage 1, so live calls
    with the avatar get it too."""
    adapt_seconds: float = 60.0
    """Seconds of each video's training part the stage-1 adaptation learns from."""
    eval_steps: int = 4
    eval_seconds: float = 6.0
    """Held-out seconds (over all tails) the validation reconstructs."""
    work: str | None = None
    """Keep intermediate files here (None: a temp folder next to `out`, removed)."""
    force: bool = False
    progress: bool = True


@dataclass
class AvatarResult:
    path: Path
    meta: dict
    seconds: float
    validation: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- split


def split_video(video: Path, train_out: Path, tail_out: Path, tail: float, max_seconds: float | None = None,
                on_train_frame: Callable[[int, int, np.ndarray], None] | None = None) -> tuple[int, int]:
    """Write the head and the tail of `video` (25 fps, 16 kHz audio) as two mp4s;
    returns their frame counts. The audio is the clip's own track (or a same-stem .wav
    beside it, as `tccp prepare` finds it). `on_train_frame(i, n_train, frame)` sees
    every frame of the head as it is decoded."""
    from tccp.data.prepare import resolve_audio
    from tccp.media import io as media

    info = media.probe(video)
    if not info.has_video:
        raise TCCPError(f"{video}: has no video stream (is it an audio file?)")
    try:
        audio_src = resolve_audio(video, None, info.has_audio) or video
    except TCCPError:
        raise TCCPError(f"{video}: has no audio; an avatar is learned from the person speaking "
                        "(put a same-name .wav beside it)") from None
    duration = info.duration if max_seconds is None else min(info.duration, max_seconds)
    n_est = int(math.floor(duration * FPS + 1e-6))
    n_tail = max(MIN_PART_FRAMES, int(round(tail * n_est)))
    if n_est - n_tail < MIN_PART_FRAMES:
        need = (2 * MIN_PART_FRAMES) / FPS
        raise TCCPError(f"{video}: too short ({duration:.2f} s); an avatar needs at least {need:.1f} s of footage")
    cut = n_est - n_tail
    samples = media.read_audio(audio_src, sr=SR, max_seconds=duration + 1.0)
    per = int(round(SR / FPS))
    n_train = n_tail_got = 0
    with media.VideoWriter(train_out, fps=FPS, audio=samples[: cut * per], crf=17) as w_train, \
            media.VideoWriter(tail_out, fps=FPS, audio=samples[cut * per: n_est * per], crf=17) as w_tail:
        for i, (_, frame) in enumerate(media.iter_video(video, fps=FPS, max_frames=n_est)):
            if i < cut:
                w_train.write(frame)
                if on_train_frame is not None:
                    on_train_frame(i, cut, frame)
                n_train += 1
            else:
                w_tail.write(frame)
                n_tail_got += 1
        if n_tail_got < 8:
            raise TCCPError(f"{video}: decoded only {n_train + n_tail_got} frames; too short for an avatar")
    return n_train, n_tail_got


# --------------------------------------------------------------------------- reference bank


class _Candidates:
    """Bank candidates gathered while the training heads are split off: every wanted
    frame is tracked on its own (frames far apart: no video-mode tracking) and kept as
    a region around the face only (the full frames of 48 1080p samples would be
    300 MB), with its landmarks and box shifted into that region."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self.frames: list[np.ndarray] = []
        self.landmarks: list[np.ndarray] = []
        self.boxes: list[np.ndarray] = []
        self.origin: list[tuple[int, int]] = []  # (video index, frame index)
        self.apertures: list[float] = []

    def want(self, n_train: int, samples: int) -> set[int]:
        k = max(1, min(samples, n_train))
        return set(np.linspace(0, n_train - 1, k).round().astype(int).tolist())

    def offer(self, video: int, i: int, frame: np.ndarray) -> None:
        from tccp.face.geometry import mouth_aperture

        self.tracker.reset()
        obs = self.tracker.update(frame)
        if obs is None:
            return
        box = np.asarray(obs.face_box, np.float64)
        side = float(box[2] - box[0])
        h, w = frame.shape[:2]
        x0, y0 = int(max(0, math.floor(box[0] - 0.25 * side))), int(max(0, math.floor(box[1] - 0.25 * side)))
        x1, y1 = int(min(w, math.ceil(box[2] + 0.25 * side))), int(min(h, math.ceil(box[3] + 0.25 * side)))
        if x1 - x0 < 8 or y1 - y0 < 8:
            return
        shift = np.array([x0, y0], np.float64)
        self.frames.append(np.ascontiguousarray(frame[y0:y1, x0:x1]))
        self.landmarks.append(np.asarray(obs.landmarks, np.float64) - shift)
        self.boxes.append(box - np.concatenate([shift, shift]))
        self.origin.append((video, i))
        self.apertures.append(float(mouth_aperture(np.asarray(obs.landmarks, np.float64))))


def build_bank(cands: _Candidates, template: np.ndarray, size: int, k: int) -> tuple[Any, list[int]]:
    """`BankBuilder.from_frames` over the candidates -> (ReferenceBank, candidate index
    of each reference)."""
    from engine.refs import BankBuilder

    lms, boxes = np.stack(cands.landmarks), np.stack(cands.boxes)
    builder = BankBuilder.from_frames(cands.frames, lms, boxes, template, size=k, crop=size)
    return builder.bank, [int(j) for j in builder.picks]


# --------------------------------------------------------------------------- helpers


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _base_pack(init: str | None) -> Path:
    from tccp.pack import DEFAULT_PACK, read_pack_config

    base = Path(init) if init else DEFAULT_PACK
    if init is None and not (base / "config.json").is_file():
        raise TCCPError(f"{base}: the bundled model pack is missing; pass --init PACK")
    read_pack_config(base)
    return base


def _prepare(clip: Path, out_dir: Path, size: int, source: Path) -> Path:
    from tccp.data.prepare import PrepareConfig, prepare_clip

    try:
        return prepare_clip(clip, out_dir, config=PrepareConfig(size=size, preset="veryfast"))
    except TCCPError as exc:
        msg = str(exc)
        if msg.startswith(str(clip)):
            msg = msg[len(str(clip)):].lstrip(": ")
        raise TCCPError(f"{source}: {msg}") from None


def _signature(video: Path, cfg: AvatarConfig) -> dict:
    st = video.stat()
    return {"video": str(video.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
            "max_seconds": cfg.max_seconds, "tail": cfg.tail}


def _fresh_prepared(work: Path, part: str, sig: dict) -> None:
    """A kept --work folder: prepared data of a part made from another video (or
    other --max-seconds/--tail) is stale; remove it so it is prepared again."""
    note = work / "clips" / f"{part}.json"
    old = None
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(note.read_text())
    if old != sig:
        shutil.rmtree(work / "data" / part, ignore_errors=True)
    note.write_text(json.dumps(sig) + "\n")


def _train_stage2(cfg: AvatarConfig, data: Path, run: Path, cache: Path, base: Path, base_cfg: dict,
                  log: Callable[[str], None]) -> dict:
    from tccp.training.trainer import TrainConfig, Trainer

    c2 = base_cfg["stage2"]
    over = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(c2["model"]).items()}
    norm = c2.get("latent_norm") or {}
    device = cfg.device
    cuda = str(device).startswith("cuda")
    batch = cfg.batch or (32 if cuda else 4)
    minutes = cfg.minutes
    # a step cap shows the trainer's step bar; a time budget alone shows a time bar (the
    # trainer's would count to its "no cap" sentinel with a meaningless ETA)
    by_time = cfg.steps is None and minutes is not None
    cache_frames = cfg.cache_frames if cfg.cache_frames is not None else (None if cuda else CPU_CACHE_FRAMES)
    tc = TrainConfig(
        stage="faces", data=str(data), out=str(run), config="mouth", model_overrides=over,
        steps=cfg.steps if cfg.steps is not None else 10**7, batch=batch, lr=cfg.lr,
        warmup_steps=cfg.warmup, minutes=minutes, device=device, init=str(base), cache=str(cache),
        latent_scale=float(norm.get("scale", 1.0)), latent_shift=float(norm.get("shift", 0.0)),
        prediction=str((c2.get("schedule") or {}).get("prediction", "v")), cache_frames=cache_frames,
        val_every=0, ckpt_every=0, progress=cfg.progress and not by_time, seed=cfg.seed,
    )
    t0 = time.monotonic()
    with _time_bar("fine-tune stage 2", minutes * 60.0 if by_time else None, cfg.progress and by_time):
        trainer = Trainer(tc, log=log)
        try:
            res = trainer.run()
        finally:
            trainer.close()
    if res.step == 0:
        # no step fits the budget: an "avatar" equal to the base pack (or worse) is no avatar
        raise TCCPError(f"--minutes {cfg.minutes or 0:g}: too short, stage-2 fine-tuning got 0 steps in "
                        f"{(minutes or 0) * 60:.0f} s (encoding its data took the budget); give more "
                        "--minutes, an explicit --steps N, or --minutes 0 for a bank-only avatar")
    return {
        "steps": res.step,
        "stopped": res.stopped,
        "seconds": round(time.monotonic() - t0, 1),
        "sec_per_step": res.sec_per_step,
        "last_loss": res.last_loss,
        "batch": batch,
        "lr": cfg.lr,
        "cache_frames": cache_frames,
        "checkpoint": str(res.checkpoint) if res.checkpoint else None,
    }


@contextlib.contextmanager
def _time_bar(label: str, seconds: float | None, enabled: bool):
    """A progress bar over a wall-clock budget (elapsed / budget seconds), updated by a
    background thread; a no-op when disabled."""
    if not enabled or not seconds:
        yield
        return
    import threading

    from tqdm import tqdm

    bar = tqdm(total=max(1, round(seconds)), desc=label, unit="s", file=sys.stderr, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s of the time budget")
    stop = threading.Event()
    t0 = time.monotonic()

    def tick() -> None:
        while not stop.wait(1.0):
            bar.n = min(bar.total, int(time.monotonic() - t0))
            bar.refresh()

    th = threading.Thread(target=tick, name="avatar-time-bar", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()
        bar.close()


def _write_refs(folder: Path, bank: Any, cands: _Candidates, picked: list[int], videos: list[Path]) -> list[dict]:
    import cv2

    from tccp.avatars.store import MESHES_FILE

    (folder / "refs").mkdir(exist_ok=True)
    listed = []
    for i, j in enumerate(picked):
        entry = {"file": f"refs/ref_{i:02d}.png", "hires": f"refs/hires_{i:02d}.png"}
        for key, img in (("file", bank.crops[i]), ("hires", bank.hires[i])):
            if not cv2.imwrite(str(folder / entry[key]), np.ascontiguousarray(np.asarray(img)[:, :, ::-1])):
                raise TCCPError(f"{folder / entry[key]}: could not write the reference image")
        v, frame = cands.origin[j]
        entry.update(video=str(videos[v]), frame=int(frame), seconds=round(frame / FPS, 2),
                     aperture=round(cands.apertures[j], 4))
        listed.append(entry)
    np.save(folder / MESHES_FILE, np.asarray(bank.meshes, np.float32))
    return listed


def _adapt_stage1(pack: Path, parts: list[Path], cfg: AvatarConfig, log: Callable[[str], None]) -> dict:
    """Fine-tune the pack's stage 1 (in `pack`, rewritten in place) on the training parts'
    own speech (`engine.adapt`); returns the adaptation's summary."""
    from safetensors.torch import save_file

    import torch

    from engine.adapt import AdaptConfig, adapt_from_videos
    from tccp.media.whisper import load_whisper
    from tccp.pack import _DTYPES, PACK_FORMAT, load_stage1, read_pack_config
    from tccp.pipelines.landmarks import LandmarkGenerator

    if cfg.adapt_steps <= 0:
        return {"adapted": False, "note": "adaptation off"}
    net, codec = load_stage1(pack)
    log(f"adapting stage 1 to the person: {cfg.adapt_steps} steps on up to {cfg.adapt_seconds:g} s of each video")
    res = adapt_from_videos(parts, LandmarkGenerator(net, codec), load_whisper(net.cfg.audio_encoder),
                            AdaptConfig(steps=cfg.adapt_steps, seconds=cfg.adapt_seconds, seed=cfg.seed))
    log(res.note)
    if res.generator is not None:
        dtype = _DTYPES.get(read_pack_config(pack).get("dtype", "float16"), torch.float16)
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in res.generator.net.state_dict().items()}
        state["template"] = torch.from_numpy(np.ascontiguousarray(codec.template, np.float32))
        save_file(state, str(pack / "stage1.safetensors"), metadata={"format": PACK_FORMAT, "stage": "stage1"})
    return res.summary()


def _copy_pack(src: Path, dst: Path, card: dict) -> None:
    """The pack files of `src` into `dst`, its config's card replaced by `card` (the
    base pack's own card kept under "base_card")."""
    config = json.loads((src / "config.json").read_text())
    for name in ("stage1.safetensors", "stage2.safetensors", "stage1_head.safetensors"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    config["card"] = {**card, "base_card": config.get("card") or {}}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def card_markdown(meta: dict) -> str:
    """AVATAR_CARD.md: what the avatar was made from and how it measures."""
    v = meta.get("validation") or {}
    tr = meta.get("training")
    tuned = bool(meta.get("fine_tuned"))
    lines = [
        f"# Avatar card: {meta['name']}",
        "",
        f"Created {meta['created']} with tccp {meta.get('tccp_version', '?')} on {meta.get('device', '?')}.",
        f"Base pack: `{meta['base_pack']['path']}` ({meta['base_pack'].get('name') or 'unnamed'}); "
        f"crop size {meta['crop_size']} px.",
        "",
        ("Model: the base pack's stage 1 with a stage 2 fine-tuned on this person." if tuned else
         "Model: a copy of the base pack (no stage-2 fine-tuning; a bank-only avatar).")
        + (" Stage 1 (lip motion) adapted to this person's own speech (`engine.adapt`): "
           + (meta.get("stage1") or {}).get("note", "") + "." if (meta.get("stage1") or {}).get("adapted") else
           " Stage 1 is the base pack's (" + ((meta.get("stage1") or {}).get("note") or "not adapted") + ")."),
        "",
        "## Data used",
        "",
        "| video | seconds used | training frames | held-out tail frames |",
        "| --- | --- | --- | --- |",
    ]
    for s in meta["sources"]:
        lines.append(f"| `{s['video']}` | {s['seconds_used']:.2f} | {s['train_frames']} | {s['tail_frames']} |")
    lines += [
        "",
        "The tail of every video is held out: neither the reference bank, the stage-1 adaptation nor",
        "fine-tuning sees it; the validation numbers below are measured on it.",
        "",
        "## Reference bank",
        "",
        f"{len(meta['refs'])} frames chosen from {meta.get('bank_candidates', '?')} tracked frames spread over the "
        "training footage: a rest shape and one typical",
        "lip shape per range of mouth opening (head frame, most closed mouth first). Stage 2 starts, per",
        "frame, from the reference whose lips are closest to the target's, warped onto the target",
        "landmarks; the paste-back adds that reference's source-resolution detail.",
        "",
        "| file | source-resolution file | video | frame | mouth aperture |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in meta["refs"]:
        lines.append(f"| `{r['file']}` | `{r['hires']}` | {Path(r['video']).name} | {r['frame']} | {r['aperture']:.3f} |")
    lines += ["", "## Fine-tuning", ""]
    if tuned and tr:
        lines += [
            "Stage 2 only; "
            + (f"budget {tr['minutes']:g} min" if tr.get("minutes") else "no time budget")
            + (f", at most {tr['max_steps']} steps" if tr.get("max_steps") else "")
            + f"; initialised from the base pack; AdamW lr {tr.get('lr')}, batch {tr.get('batch')}; "
            f"EMA weights exported. Frames encoded per clip: {tr.get('cache_frames') or 'all'}.",
            "",
            "| steps | seconds | s/step | last train loss | stopped by |",
            "| --- | --- | --- | --- | --- |",
            f"| {tr.get('steps')} | {tr.get('seconds')} | {_fmt(tr.get('sec_per_step'), '.3f')} | "
            f"{_fmt(tr.get('last_loss'))} | {tr.get('stopped')} |",
        ]
    else:
        lines.append("None: the avatar's weights are the base pack's (`--minutes 0`, or a warp-only base pack).")
    rec = v.get("reconstruction") or {}
    cols = [c for c in ("base", "avatar") if c in rec]
    lines += [
        "",
        "## Validation (held-out tail)",
        "",
        f"The engine's file run reconstructs {v.get('frames', 0)} tail frames from their own audio "
        + ("(stage-1 landmarks from the audio; a warp-only pack: the mouth is the warped reference, no denoiser),"
           if all((v.get("warp_only") or {"x": False}).values()) else
           f"({v.get('steps')} sampler steps, stage-1 landmarks from the audio),"),
        "with the avatar's reference bank" + (" for both columns (same inputs and noise), so the difference is the "
                                              "avatar's own weights (stage-1 adaptation, stage-2 fine-tuning)."
                                              if len(cols) > 1 else "."),
        "",
        "| measure | " + " | ".join("base pack" if c == "base" else "avatar" for c in cols) + " |",
        "| --- |" + " --- |" * len(cols),
    ]
    rows = (("psnr_mouth", "mouth-box PSNR, dB (higher is better)", ".2f"),
            ("sharpness_ratio", "mouth sharpness, generated / real (1 is ideal)", ".2f"),
            ("psnr_face_kept", "PSNR of the face outside the edit, dB", ".2f"),
            ("aperture_corr", "mouth-opening correlation with the real tail", ".3f"),
            ("lip_lmd", "lip landmark distance, inter-ocular units (lower is better)", ".4f"))
    for key, label, spec in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt((rec.get(c) or {}).get(key), spec) for c in cols) + " |")
    s1 = v.get("stage1") or {}
    if s1:
        t, ml = s1.get("tccp") or {}, s1.get("mean_lips") or {}
        lines += [
            "",
            "Stage 1 alone (landmarks from the tail's audio vs tracked, head frame; the avatar's stage 1, "
            + ("adapted to the person" if (meta.get("stage1") or {}).get("adapted") else "the base pack's") + "):",
            f"aperture correlation {_fmt(t.get('aperture_corr'), '.3f')} "
            f"(mean-lips baseline {_fmt(ml.get('aperture_corr'), '.3f')}), lip LMD {_fmt(t.get('lip_lmd'), '.4f')} "
            f"(baseline {_fmt(ml.get('lip_lmd'), '.4f')}).",
        ]
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main entry


def _check(cfg: AvatarConfig) -> None:
    from tccp.avatars.store import valid_name

    if not cfg.videos:
        raise TCCPError("--video is required (one or more clips of the person speaking)")
    for v in cfg.videos:
        if not Path(v).is_file():
            raise TCCPError(f"{v}: no such file")
    out = Path(cfg.out)
    if not valid_name(out.name):
        raise TCCPError(f"{out}: the avatar's folder name must be letters, digits, '.', '_' or '-'")
    if out.exists() and not cfg.force:
        raise TCCPError(f"{out}: already exists; pass --force to replace it")
    if cfg.minutes is not None and not (math.isfinite(cfg.minutes) and cfg.minutes >= 0):
        raise TCCPError(f"--minutes {cfg.minutes}: must be 0 (no fine-tuning: a bank-only avatar) or more")
    if cfg.steps is not None and cfg.steps < 0:
        raise TCCPError(f"--steps {cfg.steps}: must be 0 (no fine-tuning) or more")
    if (cfg.minutes == 0 and (cfg.steps or 0) > 0) or (cfg.steps == 0 and (cfg.minutes or 0) > 0):
        raise TCCPError(f"--minutes {cfg.minutes:g} and --steps {cfg.steps}: one asks for no fine-tuning, "
                        "the other for some; pass one")
    if not 1 <= cfg.refs <= 16:
        raise TCCPError(f"--refs {cfg.refs}: must be 1..16")
    if cfg.samples < cfg.refs:
        raise TCCPError(f"samples {cfg.samples}: must be at least --refs ({cfg.refs})")
    if not 0.0 < cfg.tail < 0.5:
        raise TCCPError(f"--tail {cfg.tail}: must be between 0 and 0.5")
    if cfg.max_seconds is not None and cfg.max_seconds <= 0:
        raise TCCPError(f"--max-seconds {cfg.max_seconds}: must be positive")


def create_avatar(cfg: AvatarConfig, log: Callable[[str], None] | None = None) -> AvatarResult:
    """Build the avatar folder `cfg.out` (see module docstring)."""
    from tccp import __version__
    from tccp.avatars.store import AVATAR_FILE, AVATAR_FORMAT, AVATAR_VERSION, CARD_FILE
    from tccp.face.track import FaceTracker, FaceTrackerConfig
    from tccp.io_utils import atomic_dir, ensure_writable_dir
    from tccp.pack import load_stage1, read_pack_config
    from tccp.training.trainer import _resolve_device

    log = log or _log_default
    t0 = time.monotonic()
    _check(cfg)
    videos = [Path(v) for v in cfg.videos]
    out = Path(cfg.out)
    base = _base_pack(cfg.init)
    base_cfg = read_pack_config(base)
    size = int(base_cfg.get("crop_size") or 128)
    warp_only = base_cfg.get("stage2") is None
    asked = (cfg.minutes or 0) > 0 or (cfg.steps or 0) > 0
    if warp_only and asked:
        raise TCCPError(f"{base}: a warp-only pack (no stage 2 to fine-tune); pass --minutes 0 for a bank-only "
                        "avatar, or --init PACK with a trained stage 2")
    fine_tune = not warp_only and cfg.minutes != 0 and cfg.steps != 0
    if fine_tune and cfg.minutes is None and cfg.steps is None:
        cfg = dataclasses.replace(cfg, minutes=DEFAULT_MINUTES)
    if warp_only and cfg.minutes is None and cfg.steps is None:
        log(f"{base}: a warp-only pack; making a bank-only avatar (no fine-tuning)")
    device = str(_resolve_device(cfg.device))
    cfg = dataclasses.replace(cfg, device=device)
    ensure_writable_dir(out.parent if str(out.parent) else Path("."), name=out)
    _, codec = load_stage1(base)
    template = codec.template

    keep_work = cfg.work is not None
    work = Path(cfg.work) if keep_work else Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "runs", ignore_errors=True)  # a kept --work folder: prepared clips are reused, runs are not
    shutil.rmtree(work / "eval", ignore_errors=True)
    try:
        # 1-2. split, gathering the bank's candidate frames on the way
        sources, parts, tails = [], [], []
        (work / "clips").mkdir(exist_ok=True)
        with FaceTracker(FaceTrackerConfig(fps=FPS)) as tracker:
            cands = _Candidates(tracker)
            for i, v in enumerate(videos):
                a, b = work / "clips" / f"part{i:02d}.mp4", work / "clips" / f"tail{i:02d}.mp4"
                per_video = max(1, int(round(cfg.samples / len(videos))))
                wanted: dict[str, set] = {}

                def seen(k: int, n_train: int, frame: np.ndarray, i=i, wanted=wanted, per_video=per_video) -> None:
                    if "idx" not in wanted:
                        wanted["idx"] = cands.want(n_train, per_video)
                    if k in wanted["idx"]:
                        cands.offer(i, k, frame)

                log(f"[{i + 1}/{len(videos)}] {v}: splitting off the held-out tail, tracking {per_video} frames")
                n_train, n_tail = split_video(v, a, b, cfg.tail, cfg.max_seconds, on_train_frame=seen)
                parts.append(a)
                tails.append(b)
                sources.append({"video": str(v.resolve()), "seconds_used": round((n_train + n_tail) / FPS, 2),
                                "train_frames": n_train, "tail_frames": n_tail})
        if not cands.frames:
            raise TCCPError(f"{videos[0] if len(videos) == 1 else 'the videos'}: no face found in the "
                            f"{cfg.samples} frames sampled for the reference bank")
        bank, picked = build_bank(cands, template, size, cfg.refs)
        log(f"reference bank: {len(bank)} frames of {len(cands.frames)} tracked candidates")

        # 3. fine-tune
        training = None
        pack_src = base
        if fine_tune:
            for i, (a, v) in enumerate(zip(parts, videos)):
                _fresh_prepared(work, a.stem, _signature(v, cfg))
                log(f"[{i + 1}/{len(videos)}] {v}: preparing the training part at {size} px")
                _prepare(a, work / "data", size, v)
            log(f"fine-tuning stage 2 from {base} on {device}")
            training = {"device": device, "minutes": cfg.minutes, "max_steps": cfg.steps}
            training.update(_train_stage2(cfg, work / "data", work / "runs" / "s2",
                                          work / "mouth_latents.safetensors", base, base_cfg, log))
            if not keep_work:
                training["checkpoint"] = None
            from tccp.pipeline import SamplerConfig
            from tccp.training.trainer import export_pack

            card = {"name": out.name, "kind": "avatar", "base_pack": str(base.resolve()), "fine_tuned": True}
            shutil.rmtree(work / "pack", ignore_errors=True)
            pack_src = export_pack(base.resolve(), work / "runs" / "s2", work / "pack", card,
                                   sampler=SamplerConfig.from_dict(base_cfg["stage2"].get("sampler") or {}))
            if not keep_work:  # the run folder goes with the temp work folder
                config = json.loads((pack_src / "config.json").read_text())
                config["card"]["training"]["stage2"]["checkpoint"] = None
                (pack_src / "config.json").write_text(json.dumps(config, indent=2) + "\n")

        with atomic_dir(out) as tmp:
            # 5a. the model pack and the bank
            if fine_tune:
                for f in pack_src.iterdir():
                    if f.name != ".tccp-output":
                        shutil.copyfile(f, tmp / f.name)
            else:
                _copy_pack(base, tmp, {"name": out.name, "kind": "avatar", "base_pack": str(base.resolve()),
                                       "fine_tuned": False})
            listed = _write_refs(tmp, bank, cands, picked, videos)
            # 3b. stage 1 adapted to the person on the training parts (the tails stay held out)
            stage1 = _adapt_stage1(tmp, parts, cfg, log)

            # 4. validation
            from tccp.avatars.evaluate import validate_avatar

            packs = {"base": base, "avatar": tmp} if (fine_tune or stage1["adapted"]) else {"avatar": tmp}
            log("validating on the held-out tail" + (": base pack vs avatar" if len(packs) > 1 else ""))
            try:
                validation = validate_avatar(packs, tails, bank, device=device, steps=cfg.eval_steps,
                                             max_seconds=cfg.eval_seconds, work=work / "eval", seed=cfg.seed,
                                             log=log)
            except TCCPError as exc:  # name the user's video, not the temp tail file
                msg = str(exc)
                for tail, v in zip(tails, videos):
                    msg = msg.replace(str(tail), f"{v} (held-out tail)")
                raise TCCPError(msg) from None

            meta = {
                "format": AVATAR_FORMAT,
                "version": AVATAR_VERSION,
                "name": out.name,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "tccp_version": __version__,
                "device": device,
                "crop_size": size,
                "base_pack": {"path": str(base.resolve()), "name": (base_cfg.get("card") or {}).get("name")},
                "fine_tuned": fine_tune,
                "stage1": _json_safe(stage1),
                "sources": sources,
                "bank_candidates": len(cands.frames),
                "refs": listed,
                "meshes": "refs/meshes.npy",
                "training": _json_safe(training),
                "validation": _json_safe(validation),
            }
            (tmp / AVATAR_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            (tmp / CARD_FILE).write_text(card_markdown(meta))
            _fix_permissions(tmp)
        log(f"avatar written: {out} ({time.monotonic() - t0:.0f} s)")
        return AvatarResult(out, meta, time.monotonic() - t0, validation)
    finally:
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)


def _fix_permissions(folder: Path) -> None:
    """Temp-file writers create private (0600/0700) entries; an installed avatar is
    read by servers running as other users, so give it plain mkdir/open permissions."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [folder, *folder.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN); numpy scalars -> Python numbers."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x
