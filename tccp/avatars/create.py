"""`tccp avatar create`: fine-tune the bundled pack on one person and pack the result.

Steps (all under a work folder; the avatar folder appears only when complete):

1. **Split** each video into a training head and a held-out tail (`tail`, 15 % by
   default, at least 16 frames), re-encoded at 25 fps with the audio cut to match.
2. **Prepare** both parts exactly as training data (`tccp.data.prepare`) at the base pack's
   crop size.
3. **Fine-tune** stage 1 then stage 2 with `tccp.training.trainer`'s trainer, `--init` from the
   base pack, within the time budget (40 % for stage 1, the rest for stage 2) or a
   step cap. Stage 2 (appearance) gets the larger share: identity is what an avatar is
   for, while stage 1's lip motion mostly transfers between people.
4. **References**: a few frames of the training part chosen by farthest-point
   sampling over (yaw, pitch, mouth aperture) (`tccp.avatars.refs`).
5. **Validate** base vs fine-tuned on the tail (`tccp.avatars.evaluate`).
6. **Write** the pack (fine-tuned EMA weights, the base pack's schedule, sampler and
   latent normalisation), refs/*.png, avatar.json and AVATAR_CARD.md.
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

__all__ = ["AvatarConfig", "AvatarResult", "create_avatar", "split_video"]

FPS = 25.0
SR = 16000
MIN_PART_FRAMES = 16
STAGE1_SHARE = 0.4


@dataclass
class AvatarConfig:
    videos: list[str]
    out: str
    minutes: float = 10.0
    """Fine-tuning budget for both stages together (wall clock, incl. latent encoding)."""
    steps: int | None = None
    """Optimizer steps per stage at most (None: as many as the budget allows)."""
    device: str = "auto"
    config: str | None = None
    """Model config name to fine-tune; None: the base pack's own architecture."""
    init: str | None = None
    """Base model pack (None: the bundled `tccp.pack.DEFAULT_PACK`)."""
    refs: int = 4
    max_seconds: float | None = None
    """Use at most this much of each video (from its start)."""
    tail: float = 0.15
    batch: int | None = None
    """Windows per step (None: 4 on CPU, 32 on CUDA)."""
    lr: float = 1e-4
    warmup: int = 20
    seed: int = 0
    eval_steps: int = 4
    eval_frames: int = 250
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


def split_video(video: Path, train_out: Path, tail_out: Path, tail: float,
                max_seconds: float | None = None) -> tuple[int, int]:
    """Write the head and the tail of `video` (25 fps, 16 kHz audio) as two mp4s;
    returns their frame counts. The audio is the clip's own track (or a same-stem .wav
    beside it, as `tccp prepare` finds it)."""
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
                n_train += 1
            else:
                w_tail.write(frame)
                n_tail_got += 1
        if n_tail_got < 8:
            raise TCCPError(f"{video}: decoded only {n_train + n_tail_got} frames; too short for an avatar")
    return n_train, n_tail_got


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


def _model_overrides(base_cfg: dict, name: str | None, stage_key: str) -> tuple[str, dict]:
    """Config name and overrides for the trainer: the base pack's exact architecture
    unless a named config was asked for (then tensors are copied where they match)."""
    if name is not None:
        return name, {}
    d = dict(base_cfg[stage_key])
    over = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return "small", over


def _prepare(clip: Path, out_dir: Path, size: int, source: Path) -> Path:
    from tccp.data.prepare import PrepareConfig, prepare_clip

    try:
        return prepare_clip(clip, out_dir, config=PrepareConfig(size=size, preset="veryfast"))
    except TCCPError as exc:
        msg = str(exc)
        if msg.startswith(str(clip)):
            msg = msg[len(str(clip)):].lstrip(": ")
        raise TCCPError(f"{source}: {msg}") from None


def _train_stage(stage: str, cfg: AvatarConfig, data: Path, run: Path, cache: Path, base: Path,
                 base_cfg: dict, minutes: float | None, log: Callable[[str], None]) -> dict:
    from tccp.training.trainer import TrainConfig, Trainer

    name, over = _model_overrides(base_cfg, cfg.config, "stage1" if stage == "landmarks" else "stage2")
    norm = base_cfg.get("latent_norm") or {}
    device = cfg.device
    batch = cfg.batch or (32 if str(device).startswith("cuda") else 4)
    # a step cap shows the trainer's step bar; a time budget alone shows a time bar (the
    # trainer's would count to its "no cap" sentinel with a meaningless ETA)
    by_time = cfg.steps is None and minutes is not None
    tc = TrainConfig(
        stage=stage, data=str(data), out=str(run), config=name, model_overrides=over,
        steps=cfg.steps if cfg.steps is not None else 10**7, batch=batch, lr=cfg.lr,
        warmup_steps=cfg.warmup, minutes=minutes, device=device, init=str(base), cache=str(cache),
        latent_scale=float(norm.get("scale", 1.0)), latent_shift=float(norm.get("shift", 0.0)),
        val_every=0, ckpt_every=0, progress=cfg.progress and not by_time, seed=cfg.seed,
    )
    t0 = time.monotonic()
    with _time_bar(f"fine-tune {stage}", minutes * 60.0 if by_time else None, cfg.progress and by_time):
        trainer = Trainer(tc, log=log)
        try:
            res = trainer.run()
        finally:
            trainer.close()
    if res.step == 0 and cfg.steps != 0:
        # no step fits the budget: an "avatar" equal to the base pack (or worse) is no avatar
        raise TCCPError(f"--minutes {cfg.minutes:g}: too short, {stage} fine-tuning got 0 steps in its "
                        f"{(minutes or 0) * 60:.0f} s (preparing its data took the budget); give more "
                        "--minutes or an explicit --steps N")
    return {
        "steps": res.step,
        "stopped": res.stopped,
        "seconds": round(time.monotonic() - t0, 1),
        "sec_per_step": res.sec_per_step,
        "last_loss": res.last_loss,
        "batch": batch,
        "lr": cfg.lr,
        "checkpoint": str(res.checkpoint) if res.checkpoint else None,
        "config": name if cfg.config else "base pack architecture",
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


def _load_ema(run: Path) -> Any:
    from tccp.models.config import MVConfig
    from tccp.training.checkpoint import latest_checkpoint, load_checkpoint
    from tccp.training.trainer import build_model

    ck = load_checkpoint(latest_checkpoint(run))
    model = build_model(MVConfig.from_dict(ck["config"]["model"]))
    model.load_state_dict(ck["ema"])
    return model


def _choose_refs(folders: list[Path], k: int) -> list[dict]:
    """Reference frames across the training clips (see tccp.avatars.refs)."""
    from tccp.avatars.refs import landmark_features, select_references, sketch_pose
    from tccp.data.datasets import PreparedClip

    rows, feats = [], []
    for f in folders:
        clip = PreparedClip(f)
        ok = np.flatnonzero(clip.found & ~clip.interpolated)
        if not len(ok):
            continue
        fe = landmark_features(np.nan_to_num(clip.mesh_landmarks(ok), nan=0.0))
        rows.extend((clip, int(i)) for i in ok)
        feats.append(fe)
    if not rows:
        raise TCCPError(f"{folders[0]}: no tracked face to take reference images from")
    chosen = select_references(np.concatenate(feats), k)
    out = []
    allf = np.concatenate(feats)
    for j in chosen:
        clip, i = rows[j]
        pose = sketch_pose(clip.sketch(i))
        out.append({
            "crop": clip.faces[i],
            "clip": clip.name,
            "frame": i,
            "features": {"yaw": float(allf[j, 0]), "pitch": float(allf[j, 1]), "aperture": float(allf[j, 2])},
            "sketch_pose": None if pose is None else [float(pose[0]), float(pose[1])],
        })
    return out


def _write_refs(folder: Path, refs: list[dict]) -> list[dict]:
    import cv2

    (folder / "refs").mkdir(exist_ok=True)
    listed = []
    for i, r in enumerate(refs):
        rel = f"refs/ref_{i:02d}.png"
        if not cv2.imwrite(str(folder / rel), np.ascontiguousarray(r["crop"][:, :, ::-1])):
            raise TCCPError(f"{folder / rel}: could not write the reference image")
        listed.append({"file": rel, **{k: v for k, v in r.items() if k != "crop"}})
    return listed


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def card_markdown(meta: dict) -> str:
    """AVATAR_CARD.md: what the avatar was made from and how it measures."""
    v = meta.get("validation", {})
    loss, psnr = v.get("stage2_val_loss", {}), v.get("face_psnr_db", {})
    tr = meta.get("training", {})
    lines = [
        f"# Avatar card: {meta['name']}",
        "",
        f"Created {meta['created']} with tccp {meta.get('tccp_version', '?')} on {tr.get('device', '?')}.",
        f"Base pack: `{meta['base_pack']['path']}` ({meta['base_pack'].get('name') or 'unnamed'}); "
        f"crop size {meta['crop_size']} px.",
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
        "The tail of every video is held out: fine-tuning never sees it; the validation",
        "numbers below are measured on it.",
        "",
        "## Fine-tuning",
        "",
        f"Budget {tr.get('minutes')} min" + (f", at most {tr['max_steps']} steps per stage" if tr.get("max_steps") else "")
        + f"; initialised from the base pack; AdamW lr {tr.get('lr')}, batch {tr.get('batch')}; EMA weights exported.",
        "",
        "| stage | steps | seconds | s/step | last train loss | stopped by |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, label in (("stage1", "1 (landmarks)"), ("stage2", "2 (faces)")):
        s = tr.get(key, {})
        lines.append(f"| {label} | {s.get('steps')} | {s.get('seconds')} | {_fmt(s.get('sec_per_step'), '.3f')} | "
                     f"{_fmt(s.get('last_loss'))} | {s.get('stopped')} |")
    lines += [
        "",
        "## Reference images",
        "",
        "Chosen by farthest-point sampling over (yaw proxy, pitch proxy, mouth aperture);",
        "the engine feeds the identity encoder, per window, the one nearest to the caller's head pose.",
        "",
        "| file | clip | frame | yaw | pitch | aperture |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in meta["refs"]:
        f = r["features"]
        lines.append(f"| `{r['file']}` | {r['clip']} | {r['frame']} | {f['yaw']:+.3f} | {f['pitch']:+.3f} | {f['aperture']:.3f} |")
    lines += [
        "",
        "## Validation (held-out tail)",
        "",
        "| measure | base pack | avatar |",
        "| --- | --- | --- |",
        f"| stage-2 validation loss ({v.get('val_windows', 0)} windows, lower is better) | "
        f"{_fmt(loss.get('base'))} | {_fmt(loss.get('avatar'))} |",
        f"| face PSNR in the head mask, dB ({v.get('psnr_frames', 0)} frames, {v.get('steps')} steps, higher is better) | "
        f"{_fmt(psnr.get('base'), '.2f')} | {_fmt(psnr.get('avatar'), '.2f')} |",
        "",
        "Same inputs, noise and reference images for both columns. The PSNR regenerates the",
        "tail's faces with stage 2 driven by the tracked landmarks, so it measures appearance",
        "(identity), not lip sync; use `tccp eval` for lip-sync metrics of a full run.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main entry


def create_avatar(cfg: AvatarConfig, log: Callable[[str], None] | None = None) -> AvatarResult:
    """Build the avatar folder `cfg.out` (see module docstring)."""
    import torch

    from tccp import __version__
    from tccp.avatars.refs import ReferenceBank
    from tccp.avatars.store import AVATAR_FILE, AVATAR_FORMAT, AVATAR_VERSION, CARD_FILE, valid_name
    from tccp.diffusion.schedule import Schedule
    from tccp.io_utils import atomic_dir, ensure_writable_dir
    from tccp.pack import read_pack_config, save_pack
    from tccp.pipeline import LatentNorm, SamplerConfig
    from tccp.training.trainer import _resolve_device

    log = log or _log_default
    t0 = time.monotonic()
    if not cfg.videos:
        raise TCCPError("--video is required (one or more clips of the person speaking)")
    videos = [Path(v) for v in cfg.videos]
    for v in videos:
        if not v.is_file():
            raise TCCPError(f"{v}: no such file")
    out = Path(cfg.out)
    if not valid_name(out.name):
        raise TCCPError(f"{out}: the avatar's folder name must be letters, digits, '.', '_' or '-'")
    if out.exists() and not cfg.force:
        raise TCCPError(f"{out}: already exists; pass --force to replace it")
    if cfg.minutes is None and cfg.steps is None:
        raise TCCPError("give a fine-tuning budget: --minutes M and/or --steps N")
    if cfg.minutes is not None and cfg.minutes <= 0:
        raise TCCPError(f"--minutes {cfg.minutes}: must be positive")
    if cfg.steps is not None and cfg.steps < 0:
        raise TCCPError(f"--steps {cfg.steps}: must be >= 0")
    if not 1 <= cfg.refs <= 16:
        raise TCCPError(f"--refs {cfg.refs}: must be 1..16")
    if not 0.0 < cfg.tail < 0.5:
        raise TCCPError(f"--tail {cfg.tail}: must be between 0 and 0.5")
    base = _base_pack(cfg.init)
    base_cfg = read_pack_config(base)
    size = int(base_cfg.get("crop_size") or 128)
    device = str(_resolve_device(cfg.device))
    cfg = dataclasses.replace(cfg, device=device)
    ensure_writable_dir(out.parent if str(out.parent) else Path("."), name=out)

    keep_work = cfg.work is not None
    work = Path(cfg.work) if keep_work else Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "runs", ignore_errors=True)  # a kept --work folder: prepared clips are reused, runs are not
    try:
        # 1-2. split + prepare
        sources, train_dirs, tail_dirs = [], [], []
        for i, v in enumerate(videos):
            clips = work / "clips"
            clips.mkdir(exist_ok=True)
            a, b = clips / f"part{i:02d}.mp4", clips / f"tail{i:02d}.mp4"
            log(f"[{i + 1}/{len(videos)}] {v}: splitting off the held-out tail")
            n_train, n_tail = split_video(v, a, b, cfg.tail, cfg.max_seconds)
            log(f"[{i + 1}/{len(videos)}] {v}: tracking and cropping {n_train + n_tail} frames at {size} px")
            train_dirs.append(_prepare(a, work / "data", size, v))
            tail_dirs.append(_prepare(b, work / "tail", size, v))
            sources.append({"video": str(v.resolve()), "seconds_used": (n_train + n_tail) / FPS,
                            "train_frames": n_train, "tail_frames": n_tail})

        # 3. fine-tune
        budget = cfg.minutes
        t_ft = time.monotonic()
        training: dict[str, Any] = {"device": device, "minutes": cfg.minutes, "max_steps": cfg.steps,
                                    "lr": cfg.lr, "base_pack": str(base)}
        cache = work / "latents.safetensors"
        log(f"fine-tuning stage 1 (landmarks) from {base} on {device}")
        training["stage1"] = _train_stage("landmarks", cfg, work / "data", work / "runs" / "s1", cache, base,
                                          base_cfg, None if budget is None else budget * STAGE1_SHARE, log)
        left = None if budget is None else max(0.05, budget - (time.monotonic() - t_ft) / 60.0)
        log("fine-tuning stage 2 (faces)")
        training["stage2"] = _train_stage("faces", cfg, work / "data", work / "runs" / "s2", cache, base,
                                          base_cfg, left, log)
        training["batch"] = training["stage2"]["batch"]

        # 4. references
        refs = _choose_refs(train_dirs, cfg.refs)
        bank = ReferenceBank(np.stack([r["crop"] for r in refs]),
                             np.array([r["sketch_pose"] or [np.nan, np.nan] for r in refs], np.float64))

        with atomic_dir(out) as tmp:
            # 6a. the model pack
            s1, s2 = _load_ema(work / "runs" / "s1"), _load_ema(work / "runs" / "s2")
            card = {"name": out.name, "kind": "avatar", "base_pack": str(base),
                    "training": {k: training[k] for k in ("stage1", "stage2")}}
            packed = save_pack(
                work / "pack", s1, s2,
                schedule=Schedule.from_dict(base_cfg.get("schedule", {})),
                sampler=SamplerConfig.from_dict(base_cfg.get("sampler", {})),
                latent_norm=LatentNorm(**(base_cfg.get("latent_norm") or {})),
                crop_size=size, card=card,
            )
            for f in packed.iterdir():
                shutil.move(str(f), str(tmp / f.name))
            shutil.rmtree(packed, ignore_errors=True)
            listed = _write_refs(tmp, refs)

            # 5. validation
            from tccp.data.windows import ensure_latent_cache

            log("validating base pack vs avatar on the held-out tail")
            tail_cache = ensure_latent_cache(work / "tail", work, device, path=work / "tail_latents.safetensors",
                                             progress=False)
            validation = _validate(base, tmp, tail_dirs, tail_cache, bank, device, cfg, log)

            meta = {
                "format": AVATAR_FORMAT,
                "version": AVATAR_VERSION,
                "name": out.name,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "tccp_version": __version__,
                "crop_size": size,
                "base_pack": {"path": str(base.resolve()), "name": (base_cfg.get("card") or {}).get("name")},
                "sources": sources,
                "refs": listed,
                "training": training,
                "validation": validation,
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


def _validate(base: Path, avatar_dir: Path, tail_dirs: list[Path], cache: Path, bank: Any, device: str,
              cfg: AvatarConfig, log: Callable[[str], None]) -> dict:
    from tccp.avatars.evaluate import compare_packs

    v = compare_packs({"base": base, "avatar": avatar_dir}, tail_dirs, cache, bank, device=device,
                      steps=cfg.eval_steps, max_frames=cfg.eval_frames, log=log)
    loss, psnr = v["stage2_val_loss"], v["face_psnr_db"]
    v["summary"] = {
        "stage2_val_loss": [loss.get("base"), loss.get("avatar")],
        "face_psnr_db": [psnr.get("base"), psnr.get("avatar")],
    }
    return _json_safe(v)


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x
