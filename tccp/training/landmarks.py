"""`tccp train --stage landmarks`: train stage 1 (coordinates) on CPU or GPU.

Resumable in chunks: a run folder holds checkpoints (`tccp.training.checkpoint`),
`metrics.jsonl`, `loss.png` and `val.jsonl`; running again with the same `--out`
continues from the latest checkpoint (model, EMA, optimizer, step), `--init PACK`
starts a new run from a pack's stage-1 weights (so every round continues from the pack
on `main`). The template (mean head-frame shape) is fitted on the training clips
when a run starts from scratch and travels with the weights.

One step: a batch of windows (`tccp.data.landmarks.LandmarkWindows`), loss on the
non-clean slots only; "regress" predicts x0 from an all-zero input at the largest
timestep, "v" is v-prediction on the DDPM schedule. Audio tokens are dropped (null
tokens) for `cond_dropout` of the samples.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tccp.data.landmarks import LandmarkDataConfig, LandmarkWindows, load_landmark_clips, reference_frames
from tccp.diffusion.schedule import Schedule
from tccp.errors import TCCPError
from tccp.face import headframe as hf
from tccp.media.whisper import load_whisper
from tccp.models.landmarks import LandmarkCodec, LandmarkNet, LandmarkNetConfig, audio_radius, audio_tokens_for
from tccp.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tccp.training.ema import EMA
from tccp.training.log import MetricsLog, plot_loss

__all__ = ["LandmarkTrainConfig", "train_landmarks", "validate", "load_stage1_run"]


@dataclass
class LandmarkTrainConfig:
    data: str = "data_prepared"
    out: str = "runs/landmarks"
    mode: str = "mouth"
    objective: str = "regress"
    minutes: float | None = None
    steps: int | None = None
    batch: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 200
    lr_schedule: str = "constant"
    """"cosine": the learning rate falls to 0 over this run's --steps (or --minutes): a
    chunk that continues a pack ends settled (measured in docs/lipsync.md)."""
    ema: float = 0.999
    cond_dropout: float = 0.05
    width: int = 128
    depth: int = 4
    seed: int = 0
    threads: int | None = None
    cache: str | None = None  # Whisper feature cache (default <data>/.cache-whisper)
    init: str | None = None  # a pack (or run) to start from
    checkpoint_every: int = 500
    eval_every: int = 1500
    scale: float = 0.05
    motion_weight: float = 0.0
    """Weight of a loss on frame-to-frame differences (regression only): the aperture
    correlation the issue targets rewards following the motion, which a per-frame squared
    error alone lets the network damp."""
    audio_radius: int = 2
    """Audio window: each frame sees +-this many video frames of Whisper features (a new
    run only; a resumed run keeps its network's). +-4 measured 0.587 vs 0.583 for +-2, within
    the noise (docs/lipsync.md)."""
    audio_mask: float = 0.0
    """Probability of blanking each audio token in training (a SpecAugment-like time mask
    on the Whisper features; a regulariser for the 50 clips we have)."""
    speeds: tuple = ()
    """Speed perturbation: every training clip also played at these speeds
    (`tccp.data.landmarks.speed_clip`); more voices and speaking rates for the 50 clips."""
    data_cfg: dict = field(default_factory=dict)
    whisper: str = "tiny.en"
    """Audio encoder of a new run (`tccp/assets/whisper/<name>.safetensors`: tiny.en, or
    base after `scripts/vendor_whisper.py --name base`); a resumed or initialised run keeps
    its network's."""


def _folders(data: str) -> list[Path]:
    from tccp.data.datasets import find_prepared

    folders = find_prepared(data)
    if not folders:
        raise TCCPError(f"{data}: no prepared clips (run tccp prepare)")
    return folders


def _split(folders: list[Path]) -> tuple[list[Path], list[Path]]:
    from tccp.data.datasets import split_clips

    return split_clips(folders)


def load_stage1_run(path: str | Path) -> tuple[LandmarkNet, LandmarkCodec, dict]:
    """EMA weights of a run's latest checkpoint (or a checkpoint folder)."""
    p = Path(path)
    ck = latest_checkpoint(p) if (p / "checkpoints").is_dir() else p
    if ck is None:
        raise TCCPError(f"{p}: no checkpoint")
    d = load_checkpoint(ck)
    cfg = LandmarkNetConfig.from_dict(d["config"]["model"])
    net = LandmarkNet(cfg)
    net.load_state_dict({k: v.float() for k, v in d["ema"].items() if k != "template"}, strict=True)
    codec = LandmarkCodec(np.asarray(d["config"]["template"], np.float32), cfg.mode, d["config"]["scale"])
    return net.eval(), codec, d


@torch.no_grad()
def validate(net: LandmarkNet, codec: LandmarkCodec, clips, steps: int = 4, kind: str = "full",
             gate: bool = True) -> dict:
    """Stage-1 measures (`tccp.metrics.landmarks`) on validation clips, reconstruction,
    run exactly as the engine runs stage 1 (windows carrying slot 0); + baselines."""
    from tccp.media.whisper import frame_tokens
    from tccp.metrics.landmarks import head_metrics, mean_lips_baseline, stage1_metrics
    from tccp.pipelines.landmarks import LandmarkGenerator, generate_clip

    was = net.training
    net.eval()
    gen = LandmarkGenerator(net, codec, Schedule(prediction="v"), steps=steps)
    rows = []
    head = codec.mode == "head"
    for c in clips:
        idx = reference_frames(c.heads, 4)
        refs = gen.references(c.heads[idx], c.pose[idx] if head else None)
        tokens = frame_tokens(c.features[kind], 0, c.n, radius=audio_radius(net.cfg)).astype(np.float32)
        out = generate_clip(gen, tokens, c.vad[kind], c.heads, refs, gate=gate, cv=c.context if head else None,
                            return_pose=head)
        if head:
            out, pose = out
        m = stage1_metrics(out, c.heads, c.vad[kind])
        anchor_mesh = np.array(c.heads[0], copy=True)
        anchor_mesh[codec.gen_index] = refs.anchor
        m["baseline_mean_lips_lmd"] = stage1_metrics(mean_lips_baseline(c.heads, anchor_mesh), c.heads)["lip_lmd"]
        if head:
            m.update(head_metrics(out, pose, c.heads, c.pose, anchor_mesh, refs.pose))
        m["clip"] = c.name
        rows.append(m)
    net.train(was)
    mean = lambda k: float(np.nanmean([r[k] for r in rows if r.get(k) is not None]))  # noqa: E731
    keys = ("aperture_corr", "lip_lmd", "baseline_mean_lips_lmd")
    if head:
        keys += tuple(k for k in rows[0] if k.startswith(("sketch_lmd", "pose_", "baseline_")))
    summary = {k: mean(k) for k in dict.fromkeys(keys)}
    sil = [r["silence_ratio"] for r in rows if r.get("silence_ratio") is not None]
    summary["silence_ratio"] = float(np.mean(sil)) if sil else None
    summary["abs_lag"] = float(np.mean([abs(r["lag"]) for r in rows if r.get("lag") is not None]))
    return {"summary": summary, "clips": rows}


def _loss(net: LandmarkNet, batch: dict, schedule: Schedule, cfg: LandmarkTrainConfig, gen: torch.Generator) -> torch.Tensor:
    x, flags = batch["x"], batch["flags"]
    b = x.shape[0]
    drop = torch.rand(b, generator=gen) < cfg.cond_dropout
    audio = batch["audio"]
    if cfg.audio_mask > 0:
        keep = torch.rand(audio.shape[:3], generator=gen) >= cfg.audio_mask
        audio = audio * keep[..., None]
    ctx = net.condition_tokens(audio, batch["vad"], batch["refs"], drop_audio=drop)
    m = flags[..., None]
    if net.cfg.objective == "regress":
        t = torch.full((b,), schedule.num_steps - 1, dtype=torch.long)
        xin = x * m
        target = x
    else:
        t = torch.randint(0, schedule.num_steps, (b,), generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        xin = torch.where(m.bool(), x, schedule.q_sample(x, t, noise))
        target = schedule.target(x, noise, t)
    out = net(xin, t, ctx, batch["cv"], flags)
    w = 1.0 - m
    loss = (((out - target) ** 2) * w).sum() / (w.sum() * x.shape[-1])
    if cfg.motion_weight > 0 and net.cfg.objective == "regress":
        pred = torch.where(m.bool(), x, out)  # the clean slot is given, its successor's step is learned
        dv = (pred[:, 1:] - pred[:, :-1]) - (x[:, 1:] - x[:, :-1])
        wv = w[:, 1:]
        loss = loss + cfg.motion_weight * ((dv ** 2) * wv).sum() / (wv.sum() * x.shape[-1]).clamp_min(1.0)
    return loss


def train_landmarks(cfg: LandmarkTrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise TCCPError(f"--lr-schedule {cfg.lr_schedule}: choose constant or cosine")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    folders = _folders(cfg.data)
    train_f, val_f = _split(folders)
    ck = latest_checkpoint(out)
    resumed, encoder = None, None
    if ck is not None:
        resumed = load_checkpoint(ck)
        run_cfg = resumed["config"]
        template = np.asarray(run_cfg["template"], np.float32)
        model_cfg = LandmarkNetConfig.from_dict(run_cfg["model"])
        log(f"resuming {out} from step {resumed['state']['step']}")
    elif cfg.init:
        from tccp.pack import load_stage1

        key = "stage1_head" if cfg.mode == "head" else "stage1"  # --mode head continues the pack's head stage 1
        net0, codec0 = load_stage1(cfg.init, key=key)
        template, model_cfg = codec0.template, net0.cfg
        log(f"starting from {cfg.init}'s {key.replace('_', ' ')}")
    else:
        from tccp.data.datasets import PreparedClip

        sample_meshes = np.concatenate([hf.to_mesh(PreparedClip(f).landmarks[::10], PreparedClip(f).landmark_index)
                                        for f in train_f])
        template = hf.fit_template(sample_meshes)
        codec = LandmarkCodec(template, cfg.mode, cfg.scale)
        encoder = load_whisper(cfg.whisper)  # a new network takes its audio input's shape from it
        model_cfg = LandmarkNetConfig(mode=cfg.mode, gen_dim=codec.gen_dim, cv_dim=codec.cv_dim, ref_dim=codec.ref_dim,
                                      width=cfg.width, depth=cfg.depth, control_depth=min(2, cfg.depth),
                                      objective=cfg.objective, audio_tokens=audio_tokens_for(cfg.audio_radius),
                                      audio_layers=encoder.n_layers + 1, audio_width=encoder.width,
                                      audio_encoder=cfg.whisper)
    codec = LandmarkCodec(template, model_cfg.mode, cfg.scale)
    cache = cfg.cache or str(Path(cfg.data) / ".cache-whisper")
    t0 = time.time()
    log(f"loading {len(train_f)} training + {len(val_f)} validation clips (Whisper features cached in {cache})")
    head = model_cfg.mode == "head"
    if encoder is None:  # a resumed or initialised network reads the encoder it names
        encoder = load_whisper(model_cfg.audio_encoder)
    train_clips = load_landmark_clips(train_f, template, encoder, cache_dir=cache, context=head, speeds=cfg.speeds)
    val_clips = load_landmark_clips(val_f, template, encoder, cache_dir=cache, kinds=("full", "stream0", "stream2"),
                                    context=head)
    log(f"  {len(train_clips)} lip-sync training clips, {sum(c.n for c in train_clips)} frames; "
        f"{len(val_clips)} validation clips ({time.time() - t0:.0f} s)")
    torch.manual_seed(cfg.seed)
    net = LandmarkNet(model_cfg)
    if resumed is None and cfg.init:
        net.load_state_dict(net0.state_dict())
    ema = EMA(net, decay=cfg.ema)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if resumed is not None:
        net.load_state_dict({k: v.float() for k, v in resumed["model"].items()})
        ema.load_state_dict(resumed["ema"])
        if resumed["optim"] is not None:
            opt.load_state_dict(resumed["optim"])
        step = int(resumed["state"]["step"])
    data = LandmarkWindows(train_clips, codec, LandmarkDataConfig(**{**cfg.data_cfg, "radius": audio_radius(model_cfg)}),
                           seed=cfg.seed + step)
    schedule = Schedule(prediction="v")
    gen = torch.Generator().manual_seed(cfg.seed + step)
    metrics = MetricsLog(out / "metrics.jsonl")
    metrics.truncate_after(step)
    run_config = {"train": dataclasses.asdict(cfg), "model": model_cfg.to_dict(), "template": template.tolist(),
                  "scale": cfg.scale, "schedule": schedule.to_dict(), "stage": "landmarks",
                  "train_clips": [c.name for c in train_clips], "val_clips": [c.name for c in val_clips]}
    (out / "config.json").write_text(json.dumps(run_config, indent=1))
    budget_s = None if cfg.minutes is None else cfg.minutes * 60
    end_step = None if cfg.steps is None else step + cfg.steps
    if budget_s is None and end_step is None:
        raise TCCPError("give --minutes or --steps")
    start, smooth, last_ck = time.time(), None, step
    first_step = step
    last_eval: tuple[int, dict] = (-1, {})

    def save() -> Path:
        return save_checkpoint(out, step, net.state_dict(), ema.state_dict(), run_config,
                               {"elapsed_s": time.time() - start}, opt.state_dict())

    net.train()
    while True:
        if end_step is not None and step >= end_step:
            break
        if budget_s is not None and time.time() - start >= budget_s:
            break
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        if cfg.lr_schedule == "cosine":
            done = max((step - first_step) / max(1, end_step - first_step) if end_step is not None else 0.0,
                       (time.time() - start) / budget_s if budget_s is not None else 0.0)
            lr *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = _loss(net, data.sample(cfg.batch), schedule, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.update(net, step)
        step += 1
        v = float(loss.detach())
        smooth = v if smooth is None else 0.98 * smooth + 0.02 * v
        if step % 50 == 0:
            metrics.append({"step": step, "loss": v, "loss_smooth": smooth, "lr": lr, "t": time.time() - start})
        if step % 200 == 0:
            log(f"step {step} loss {smooth:.4f} ({time.time() - start:.0f} s)")
        if step - last_ck >= cfg.checkpoint_every:
            save()
            last_ck = step
        if cfg.eval_every and step % cfg.eval_every == 0 and val_clips:
            last_eval = (step, _eval_and_log(net, ema, codec, val_clips, out, step, log))
    save()
    if val_clips and last_eval[0] != step:
        last_eval = (step, _eval_and_log(net, ema, codec, val_clips, out, step, log))
    res = last_eval[1]
    plot_loss((r for r in _read(out / "metrics.jsonl")), out / "loss.png", title=f"stage 1 ({model_cfg.objective})")
    return {"step": step, "run": str(out), "val": res}


def _read(path: Path) -> list[dict]:
    from tccp.training.log import read_metrics

    return read_metrics(path) if path.is_file() else []


def _eval_and_log(net, ema, codec, val_clips, out: Path, step: int, log) -> dict:
    ev = LandmarkNet(net.cfg)
    ev.load_state_dict(ema.state_dict())
    res = {kind: validate(ev, codec, val_clips, kind=kind)["summary"] for kind in ("full", "stream0", "stream2")}
    with open(out / "val.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **res}) + "\n")
    s = res["full"]
    log(f"  val step {step}: aperture r {s['aperture_corr']:.3f} (live {res['stream0']['aperture_corr']:.3f}, "
        f"live + 0.2 s look-ahead {res['stream2']['aperture_corr']:.3f}), "
        f"LipLMD {s['lip_lmd']:.4f} (mean lips {s['baseline_mean_lips_lmd']:.4f}), |lag| {s['abs_lag']:.2f}, "
        f"silence ratio {s['silence_ratio'] if s['silence_ratio'] is None else round(s['silence_ratio'], 3)}")
    if "sketch_lmd" in s:
        log(f"  head: sketch LMD {s['sketch_lmd']:.4f} (hold {s['baseline_hold_sketch_lmd']:.4f}), pose angle "
            f"{s['pose_angle_deg']:.2f} deg (hold {s['baseline_hold_pose_angle_deg']:.2f}), position "
            f"{s['pose_origin']:.4f} (hold {s['baseline_hold_pose_origin']:.4f}), motion ratio {s['pose_motion_ratio']:.2f}")
    return res
