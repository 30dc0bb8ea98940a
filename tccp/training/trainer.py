"""`tccp train`: train one MVControlNet stage on pre-encoded TAEF2 latents.

Stage 1 (`landmarks`): target = sketch latents, c_v = head-masked context latents.
Stage 2 (`faces`): target = face latents, c_v = sketch latents (from the tracked
landmarks, which is what stage 1 produces at inference). Both: c_l = audio + identity.
The objective is `tccp.diffusion.loss.diffusion_loss`: windows of `cfg.frames` frames
with slot 0 clean and the loss on the rest, and with probability `p_first` one-frame
windows for the first-frame step (paper 4.4).

Optimisation follows the paper (Table 3) where it can: Adam(W) at lr 2e-4, EMA 0.9999
(with a warm-up for short runs, see `tccp.training.ema`), linear 1000-step schedule; plus what
makes small runs robust: linear lr warm-up, gradient clipping at 1.0, a small weight
decay, bf16 autocast on CUDA.

Exact resume: every random draw of step `s` (timesteps, noise, first-frame coin, c_l
dropout, model dropout, identity-frame pick) comes from generators seeded with
(seed, s, rank), and the batch of step `s` is a pure function of (seed, s, rank)
(`tccp.data.windows.StepSampler`). So a checkpoint needs only weights, EMA, optimizer
moments and the step: `N` steps straight equal `N/2` + resume + `N/2`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import numpy as np

from tccp.data.windows import StageSpec, StepSampler, collate, fixed_subset, stage_spec
from tccp.errors import TCCPError
from tccp.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_tensors,
    save_checkpoint,
    write_json,
)
from tccp.training.ema import EMA
from tccp.training.log import MetricsLog, plot_loss, read_metrics

__all__ = [
    "TrainConfig",
    "Trainer",
    "TrainResult",
    "train",
    "build_model",
    "load_stage_weights",
    "export_weights",
    "export_pack",
]

RUN_CONFIG = "config.json"
METRICS = "metrics.jsonl"
LOSS_PNG = "loss.png"

# fields a resumed run may change; everything else must match the checkpoint
_RESUME_MUTABLE = {"steps", "minutes", "device", "val_every", "ckpt_every", "log_every", "progress",
                   "keep_checkpoints", "out", "data", "resume", "resume_from", "cache", "init", "val_windows"}


@dataclass
class TrainConfig:
    stage: str = "faces"  # stage 2 (stage 1 trains in coordinates: tccp.training.landmarks)
    data: str = ""  # folder of prepared clips
    out: str = ""  # run folder
    config: str = "mouth"  # model config name (tccp.models.config)
    model_overrides: dict = field(default_factory=dict)
    steps: int = 5000
    batch: int = 8  # per process; the global batch is batch x world size
    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # "constant" (paper) | "cosine" (to min_lr_ratio)
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    grad_clip: float = 1.0
    p_first: float = 0.15
    cond_dropout: float | None = None  # None: the model config's
    cond_noise_std: float = 0.0
    # model-space latent = (TAEF2 latent - shift) * scale, as tccp.pipeline.LatentNorm;
    # TAEF2 latents are already ~unit variance (std 0.86-1.04 measured), so identity
    latent_scale: float = 1.0
    latent_shift: float = 0.0
    # residual stages (target = face - warped reference): the correction's scale in
    # model space; latents' correction std is ~0.47 on the shared clips, so 2.0 makes
    # it about unit variance like the rest
    residual_scale: float = 2.0
    seed: int = 0
    val_every: int = 250
    val_windows: int = 64
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    minutes: float | None = None  # stop cleanly (with a checkpoint) within this budget
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = True  # autocast on CUDA
    init: str | None = None  # pack / checkpoint / run folder to start the weights from
    cache: str | None = None  # latent cache file (default: DATA/latents or OUT/cache)
    prediction: str = "v"  # "v" (robust for few-step sampling of small models) | "eps" (paper)
    cache_frames: int | None = 300  # encode only the first N frames of each clip (CPU)
    progress: bool = True
    resume: bool = False
    resume_from: str | None = None  # continue from this checkpoint folder into `out`

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    stopped: str  # "done" | "time budget" | "interrupted"
    last_loss: float | None
    val_loss: float | None
    sec_per_step: float | None


# --------------------------------------------------------------------------- helpers


def _resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TCCPError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    elif name != "cpu":
        raise TCCPError(f"--device {name}: expected cpu, cuda or cuda:N")
    return torch.device(name)


def _step_seed(seed: int, step: int, rank: int, salt: str = "") -> int:
    h = hashlib.blake2b(f"{seed}/{step}/{rank}/{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 62) - 1)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    warm = max(1, cfg.warmup_steps)
    scale = min(1.0, (step + 1) / warm) if cfg.warmup_steps > 0 else 1.0
    if cfg.lr_schedule == "cosine" and step >= cfg.warmup_steps:
        span = max(1, cfg.steps - cfg.warmup_steps)
        prog = min(1.0, (step - cfg.warmup_steps) / span)
        scale *= cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))
    elif cfg.lr_schedule not in ("constant", "cosine"):
        raise TCCPError(f"lr_schedule {cfg.lr_schedule!r}: expected constant or cosine")
    return cfg.lr * scale


def build_model(model_cfg: dict | Any) -> nn.Module:
    from tccp.models.config import MVConfig
    from tccp.models.mvcontrolnet import MVControlNet

    cfg = model_cfg if isinstance(model_cfg, MVConfig) else MVConfig.from_dict(model_cfg)
    return MVControlNet(cfg)


def _model_config_for_data(cfg: TrainConfig, latent_shape: tuple[int, ...], extra: int | None = None) -> Any:
    """The named config with latent channels/size taken from the data (a 64 px
    prepared set has 8x8 latents, 128 px 16x16) and any explicit overrides."""
    from tccp.models.config import get_config

    c, h = int(latent_shape[0]), int(latent_shape[-1])
    over = {"latent_channels": c, "latent_size": h, "extra_channels": 2 * c + 1 if extra is None else extra}
    base = get_config(cfg.config)
    # a named config whose levels do not fit this latent side (e.g. `tiny` on the 5 x 5
    # patch of 64 px crops) loses levels until they do; identity tokens follow
    mult = list(base.channel_mult)
    while len(mult) > 1 and h % (2 ** (len(mult) - 1)):
        mult.pop()
    side = int(round(base.identity_tokens ** 0.5)) if base.identity_tokens else 0
    while side > 1 and h % side:
        side -= 1
    over.update(channel_mult=tuple(mult), attention_levels=tuple(a for a in base.attention_levels if a < len(mult)) or (0,),
                identity_tokens=side * side if base.identity_tokens else 0)
    over.update(cfg.model_overrides or {})
    return get_config(cfg.config, **over)


def load_stage_weights(path: str | os.PathLike, stage: str | None = None) -> dict[str, torch.Tensor]:
    """Weights to initialise a model from: a training checkpoint or run folder (its
    EMA), a single safetensors file, or a model pack (the given stage's weights)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        return load_tensors(p)
    ckpt = latest_checkpoint(p) if p.is_dir() else None
    if ckpt is not None:
        return load_tensors(ckpt / "ema.safetensors")
    if p.is_dir() and (p / "config.json").is_file() and (p / "stage1.safetensors").is_file():
        from tccp.pack import load_stage2

        model = load_stage2(p)
        if model is None:
            raise TCCPError(f"{p}: a warp-only pack has no stage-2 weights to start from")
        return model.state_dict()
    raise TCCPError(f"{p}: not a checkpoint, run folder, safetensors file or model pack")


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> tuple[int, int]:
    """Copy every tensor whose name and shape match; the rest keep their init (e.g.
    a stage-1 pack initialising stage 2, or a config with a different input size)."""
    own = model.state_dict()
    loaded = 0
    with torch.no_grad():
        for k, v in state.items():
            if k in own and own[k].shape == v.shape:
                own[k].copy_(v.to(own[k].dtype))
                loaded += 1
    if loaded == 0:
        raise TCCPError(f"{source}: no weights match this model config")
    return loaded, len(own)


def _rng_fork(devices: list[torch.device]):
    cuda = [d for d in devices if d.type == "cuda"]
    return torch.random.fork_rng(devices=cuda, enabled=True)


def mouth_cache_path(cfg: TrainConfig) -> Path:
    return Path(cfg.cache) if cfg.cache else Path(cfg.data) / ".cache-mouth.safetensors"


def ensure_mouth_cache(cfg: TrainConfig, train_f: list, val_f: list, log: Callable[[str], None]) -> Path:
    """The mouth-patch latent cache of every prepared clip (built once, resumable)."""
    from tccp.data.datasets import PreparedClip
    from tccp.face import headframe as hf
    from tccp.models.autoencoder import load_autoencoder
    from tccp.training.mouth_cache import encode_mouth_cache

    path = mouth_cache_path(cfg)
    template = hf.fit_template(np.concatenate([hf.to_mesh(PreparedClip(f).landmarks[::10], PreparedClip(f).landmark_index)
                                               for f in train_f]))
    t0 = time.time()
    dev = "cuda" if cfg.device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    encode_mouth_cache(list(train_f) + list(val_f), load_autoencoder(device=dev), template, path,
                       max_frames=cfg.cache_frames,
                       progress=(lambda i, n, name: log(f"mouth cache {i}/{n} {name} ({time.time() - t0:.0f} s)"))
                       if cfg.progress else None)
    return path


# --------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    enabled: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_name: str) -> _Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is one process."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return _Dist()
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(world=world, rank=rank, local_rank=local, enabled=True)


class _Objective(nn.Module):
    """The loss as a module, so DistributedDataParallel wraps the whole computation
    (conditions + network) in one forward call."""

    def __init__(self, model: nn.Module, schedule: Any, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.cfg = cfg

    def forward(self, batch: dict, generator: torch.Generator, first: bool | None = None) -> torch.Tensor:
        from tccp.diffusion.loss import diffusion_loss

        return diffusion_loss(
            self.model,
            batch,
            self.schedule,
            p_first=self.cfg.p_first,
            cond_dropout=self.cfg.cond_dropout,
            cond_noise_std=self.cfg.cond_noise_std,
            first=first,
            generator=generator,
        )


# --------------------------------------------------------------------------- trainer


class Trainer:
    """One training run in `cfg.out`; `run()` trains until `cfg.steps` or the time
    budget and leaves a checkpoint. Construct with `resume=True` to continue."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] | None = None) -> None:
        self.t_start = time.monotonic()
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.dist = _init_distributed(cfg.device)
        self.out = Path(cfg.out)
        if not cfg.out:
            raise TCCPError("--out is required")
        if not cfg.data:
            raise TCCPError("--data is required")
        if not Path(cfg.data).is_dir():
            raise TCCPError(f"{cfg.data}: data folder does not exist")
        if cfg.batch < 1 or cfg.steps < 0:
            raise TCCPError("--batch must be >= 1 and --steps >= 0")
        from tccp.io_utils import ensure_writable_dir

        if self.dist.main:
            ensure_writable_dir(self.out)
        cfg = dataclasses.replace(cfg, stage=stage_spec(cfg.stage).name)
        self.ckpt = latest_checkpoint(self.out) if self.out.is_dir() else None
        if cfg.resume_from:
            # e.g. the fp16 weights-only copy that came back from a GPU machine
            self.ckpt = latest_checkpoint(cfg.resume_from) if Path(cfg.resume_from).is_dir() else None
            if self.ckpt is None:
                raise TCCPError(f"{cfg.resume_from}: not a checkpoint folder or run")
            cfg = dataclasses.replace(cfg, resume=True)
        if cfg.resume:
            if self.ckpt is None:
                raise TCCPError(f"{self.out}: nothing to resume (no checkpoint); drop --resume")
            cfg = self._merge_resumed(cfg, load_checkpoint(self.ckpt, "cpu")["config"]["train"])
        elif self.ckpt is not None:
            raise TCCPError(f"{self.out}: already holds a run (checkpoint {self.ckpt.name}); pass --resume or use another --out")
        self.cfg = cfg
        self.spec: StageSpec = stage_spec(cfg.stage)
        self.device = _resolve_device(cfg.device, self.dist.local_rank)
        self.amp = self.device.type == "cuda" and cfg.bf16
        self._setup_data()
        self._setup_model()

    # -- setup ------------------------------------------------------------------
    def _merge_resumed(self, cfg: TrainConfig, saved: dict) -> TrainConfig:
        base = TrainConfig.from_dict(saved)
        given = cfg.to_dict()
        defaults = TrainConfig().to_dict()
        merged = base.to_dict()
        if stage_spec(given["stage"]).name != stage_spec(merged["stage"]).name:
            raise TCCPError(f"{self.out}: --resume with --stage {given['stage']}, but the run trains {merged['stage']}")
        for k, v in given.items():
            if k == "stage":
                continue
            if k in _RESUME_MUTABLE:
                if k in ("out", "data", "device", "resume", "progress") or v != defaults.get(k):
                    merged[k] = v
            elif v != defaults.get(k) and v != merged.get(k):
                # a setting that changes the run (data order, model, optimizer)
                raise TCCPError(f"{self.out}: --resume with {k}={v!r}, but the run was started with {merged.get(k)!r}")
        merged["resume"] = True
        return TrainConfig.from_dict(merged)

    def _setup_data(self) -> None:
        from tccp.data.datasets import find_prepared, split_clips
        from tccp.data.faces import MouthWindowDataset

        cfg = self.cfg
        folders = find_prepared(cfg.data)
        if not folders:
            raise TCCPError(f"{cfg.data}: no prepared clips found (run `tccp prepare` first)")
        train_f, val_f = split_clips(folders)
        if not train_f:
            raise TCCPError(f"{cfg.data}: every prepared clip is a validation clip; nothing to train on")
        # one process builds the cache; the others wait and read it
        if self.dist.main:
            self.cache = ensure_mouth_cache(cfg, train_f, val_f, self.log)
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier()
            if not self.dist.main:
                self.cache = mouth_cache_path(cfg)
        window = self._window()
        self.train_set = MouthWindowDataset(self.cache, train_f, window=window, seed=cfg.seed)
        if len(self.train_set) == 0:
            raise TCCPError(f"{cfg.data}: no {window}-frame window among the training clips")
        self.train_clips = [c.name for c in self.train_set.clips]
        sizes = {c.size for c in self.train_set.clips}
        if len(sizes) != 1:
            raise TCCPError(f"{cfg.data}: prepared clips of different sizes {sorted(sizes)}; prepare them at one --size")
        prepared_size = sizes.pop()
        self.val_set = None
        self.val_batches: list[dict] = []
        if val_f:
            self.val_set = MouthWindowDataset(self.cache, val_f, window=window, seed=cfg.seed, deterministic=True)
            if len(self.val_set) == 0:
                self.val_set = None
        self.val_clips = [c.name for c in self.val_set.clips] if self.val_set is not None else []
        if self.val_set is not None and {c.size for c in self.val_set.clips} != {prepared_size}:
            raise TCCPError(f"{cfg.data}: validation clips are not all prepared at {prepared_size} px like the training clips")
        self.sampler = StepSampler(len(self.train_set), cfg.batch, cfg.seed, self.dist.rank, self.dist.world)
        self.latent_shape = tuple(self.train_set[0][self.spec.target].shape)  # (C, N, h, w)
        self.crop_size = prepared_size  # the face crop; the model sees its mouth patch

    def _window(self) -> int:
        from tccp.models.config import get_config

        over = dict(self.cfg.model_overrides or {})
        return int(over.get("frames", get_config(self.cfg.config).frames))

    def _setup_model(self) -> None:
        from tccp.diffusion.schedule import Schedule

        cfg = self.cfg
        shape = self.latent_shape
        n_extra = sum(1 if k == "mask" else shape[0] for k in self.spec.extra)
        self.model_cfg = _model_config_for_data(cfg, (shape[0], shape[2], shape[3]), n_extra)
        self.schedule = Schedule(prediction=cfg.prediction)
        torch.manual_seed(cfg.seed)  # identical init on every rank
        self.model = build_model(self.model_cfg).to(self.device)
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup)
        self.step = 0
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                       weight_decay=cfg.weight_decay)
        self.elapsed_before = 0.0
        if cfg.resume:
            ck = load_checkpoint(self.ckpt, "cpu")
            self.model.load_state_dict(ck["model"] if ck["model"] is not None else ck["ema"])
            self.ema.load_state_dict(ck["ema"])
            self.step = int(ck["state"]["step"])
            self.elapsed_before = float(ck["state"].get("train_seconds", 0.0))
            if ck["optim"] is not None:
                self.optim.load_state_dict(ck["optim"])
            else:
                self.log(f"{self.ckpt}: weights-only checkpoint; optimizer moments restart (resume is not exact)")
        elif cfg.init:
            state = load_stage_weights(cfg.init, self.spec.name)
            n, total = _load_matching(self.model, state, cfg.init)
            self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup)
            self.log(f"init: {n}/{total} tensors from {cfg.init}")
        self.ema.to(self.device)
        self.objective = _Objective(self.model, self.schedule, cfg)
        self.ddp = self.objective
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.objective, device_ids=ids, find_unused_parameters=True)
        self.metrics = MetricsLog(self.out / METRICS)
        if self.dist.main:
            carried = self.ckpt / METRICS if self.ckpt is not None else None
            if cfg.resume and not self.metrics.path.is_file() and carried is not None and carried.is_file():
                shutil.copyfile(carried, self.metrics.path)  # the log travelled with the checkpoint
            if cfg.resume:
                self.metrics.truncate_after(self.step)
            else:
                self.metrics.path.unlink(missing_ok=True)
            write_json(self.run_config(), self.out / RUN_CONFIG)

    def run_config(self) -> dict:
        return {
            "format": "tccp-train",
            "version": 1,
            "stage": self.spec.name,
            "stage_number": self.spec.number,
            "target": self.spec.target,
            "control": self.spec.control,
            "train": self.cfg.to_dict(),
            "model": self.model_cfg.to_dict(),
            "schedule": self.schedule.to_dict(),
            "latent_norm": {"scale": self.cfg.latent_scale, "shift": self.cfg.latent_shift},
            "residual": {"of": self.spec.residual_of, "scale": self.cfg.residual_scale} if self.spec.residual_of else None,
            "crop_size": self.crop_size,
            "train_clips": self.train_clips,
            "val_clips": self.val_clips,
            "world_size": self.dist.world,
        }

    # -- steps --------------------------------------------------------------------
    def _batch(self, step: int) -> dict:
        # the dataset's identity-frame pick uses the global torch RNG: seed it per step
        torch.manual_seed(_step_seed(self.cfg.seed, step, self.dist.rank, "data"))
        items = [self.train_set[i] for i in self.sampler.indices(step)]
        return self._norm(collate(items, self.spec, self.device))

    def _norm(self, batch: dict) -> dict:
        """Raw TAEF2 latents -> model space (the pipeline's `LatentNorm`)."""
        sc, sh = self.cfg.latent_scale, self.cfg.latent_shift
        out = {k: (v - sh) * sc if k in ("c_v", "ref") else v for k, v in batch.items()}
        if self.spec.residual_of:
            out["target"] = batch["target"] * self.cfg.residual_scale
        else:
            out["target"] = (batch["target"] - sh) * sc
        if sc == 1.0 and sh == 0.0:
            return out
        if "extra" in batch:  # latents (masked source, warped reference) then the mask channel
            e = batch["extra"]
            out["extra"] = torch.cat([(e[:, :-1] - sh) * sc, e[:, -1:]], dim=1)
        return out

    def train_step(self) -> tuple[float, float]:
        """One optimizer step; returns (loss, grad norm before clipping)."""
        cfg, s = self.cfg, self.step
        batch = self._batch(s)
        gen = torch.Generator(device=self.device).manual_seed(_step_seed(cfg.seed, s, self.dist.rank, "loss"))
        torch.manual_seed(_step_seed(cfg.seed, s, self.dist.rank, "model"))  # dropout
        for g in self.optim.param_groups:
            g["lr"] = lr_at(cfg, s)
        self.model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            loss = self.ddp(batch, gen)
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optim.step()
        self.ema.update(self.model, s)
        self.step = s + 1
        return float(loss.detach()), float(gn)

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        """EMA-weight loss on fixed held-out windows with fixed noise and timesteps
        (comparable across steps and runs): windowed and first-frame modes."""
        if self.val_set is None:
            return None
        if not self.val_batches:
            idx = fixed_subset(len(self.val_set), self.cfg.val_windows)
            b = max(1, min(self.cfg.batch, 16))
            for a in range(0, len(idx), b):
                items = [self.val_set[i] for i in idx[a:a + b]]
                self.val_batches.append(self._norm(collate(items, self.spec, self.device)))
        if getattr(self, "_eval_model", None) is None:
            self._eval_model = build_model(self.model_cfg).to(self.device)
        eval_model = self._eval_model
        self.ema.copy_to(eval_model)
        eval_model.eval()
        obj = _Objective(eval_model, self.schedule, dataclasses.replace(self.cfg, cond_dropout=0.0, cond_noise_std=0.0))
        out = {}
        with _rng_fork([self.device]):
            for mode, first in (("val_loss", False), ("val_first", True)):
                gen = torch.Generator(device=self.device).manual_seed(_step_seed(self.cfg.seed, 0, 0, mode))
                tot, n = 0.0, 0
                for vb in self.val_batches:
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                        tot += float(obj(vb, gen, first=first)) * vb["target"].shape[0]
                    n += vb["target"].shape[0]
                out[mode] = tot / max(1, n)
        return out

    def save(self) -> Path | None:
        """Checkpoint (rank 0 only) + loss curve."""
        if not self.dist.main:
            return None
        state = {
            "train_seconds": self.elapsed_before + (time.monotonic() - self.t_run),
            "epoch": self.sampler.epoch(self.step),
            "world_size": self.dist.world,
        }
        path = save_checkpoint(
            self.out,
            self.step,
            self.model.state_dict(),
            self.ema.state_dict(),
            self.run_config(),
            state,
            optim_state=self.optim.state_dict(),
            keep=self.cfg.keep_checkpoints,
        )
        plot_loss(read_metrics(self.metrics.path), self.out / LOSS_PNG,
                  title=f"stage {self.spec.number} ({self.spec.name}), {self.model_cfg_name()}")
        return path

    def model_cfg_name(self) -> str:
        return self.cfg.config

    # -- loop ------------------------------------------------------------------------
    def _stop_vote(self, local_stop: bool) -> bool:
        if not self.dist.enabled:
            return local_stop
        import torch.distributed as dist

        flag = torch.tensor([1.0 if local_stop else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def run(self) -> TrainResult:
        cfg = self.cfg
        self.t_run = time.monotonic()
        budget = cfg.minutes * 60.0 if cfg.minutes else None
        bar = None
        if cfg.progress and self.dist.main:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {self.spec.name}", unit="step",
                       dynamic_ncols=True, file=sys.stderr)
        acc_loss, acc_gn, acc_n, t_log = 0.0, 0.0, 0, time.monotonic()
        step_times: list[float] = []
        last_loss = last_val = None
        ckpt_path: Path | None = None
        ckpt_cost, val_cost = 5.0, 0.0
        stopped = "done"
        in_out = self.ckpt is not None and self.ckpt.resolve().is_relative_to(self.out.resolve())
        saved_at = self.step if (cfg.resume and in_out) else -1
        try:
            while self.step < cfg.steps:
                if budget is not None:
                    avg = (sum(step_times[-20:]) / len(step_times[-20:])) if step_times else 0.0
                    remaining = budget - (time.monotonic() - self.t_start)
                    if self._stop_vote(remaining < 2.0 * avg + ckpt_cost + 1.0):
                        stopped = "time budget"
                        break
                t0 = time.monotonic()
                loss, gn = self.train_step()
                step_times.append(time.monotonic() - t0)
                if not math.isfinite(loss):
                    raise TCCPError(f"{self.out}: loss became {loss} at step {self.step}; lower --lr or check the data")
                last_loss = loss
                acc_loss, acc_gn, acc_n = acc_loss + loss, acc_gn + gn, acc_n + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", val="-" if last_val is None else f"{last_val:.4f}", refresh=False)
                if self.dist.main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    now = time.monotonic()
                    self.metrics.append({
                        "kind": "train", "step": self.step, "loss": acc_loss / acc_n, "grad_norm": acc_gn / acc_n,
                        "lr": lr_at(cfg, self.step - 1), "epoch": round(self.sampler.epoch(self.step), 4),
                        "sec_per_step": (now - t_log) / acc_n,
                    })
                    acc_loss, acc_gn, acc_n, t_log = 0.0, 0.0, 0, now
                if self.dist.main and cfg.val_every > 0 and self.step % cfg.val_every == 0:
                    fits = budget is None or (budget - (time.monotonic() - self.t_start)) > val_cost + ckpt_cost + 1.0
                    if fits:
                        tv = time.monotonic()
                        v = self.validate()
                        val_cost = time.monotonic() - tv
                        if v is not None:
                            last_val = v["val_loss"]
                            self.metrics.append({"kind": "val", "step": self.step, **v})
                if cfg.ckpt_every > 0 and self.step % cfg.ckpt_every == 0:
                    tc = time.monotonic()
                    ckpt_path = self.save()
                    ckpt_cost = max(ckpt_cost * 0.5, time.monotonic() - tc)
                    saved_at = self.step
        except KeyboardInterrupt:
            stopped = "interrupted"
        finally:
            if bar is not None:
                bar.close()
        if self.dist.main and acc_n:
            self.metrics.append({"kind": "train", "step": self.step, "loss": acc_loss / acc_n,
                                 "grad_norm": acc_gn / acc_n, "lr": lr_at(cfg, max(0, self.step - 1)),
                                 "epoch": round(self.sampler.epoch(self.step), 4),
                                 "sec_per_step": (time.monotonic() - t_log) / acc_n})
        if saved_at != self.step:
            ckpt_path = self.save()
        elif self.dist.main and ckpt_path is None:
            ckpt_path = latest_checkpoint(self.out)
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier()
        sps = (sum(step_times) / len(step_times)) if step_times else None
        if self.dist.main:
            self.log(f"{self.spec.name}: stopped at step {self.step}/{cfg.steps} ({stopped})"
                     + (f", {sps:.3f} s/step" if sps else "") + (f", checkpoint {ckpt_path}" if ckpt_path else ""))
        if stopped == "interrupted":
            raise KeyboardInterrupt
        return TrainResult(self.step, ckpt_path, stopped, last_loss, last_val, sps)

    def close(self) -> None:
        if self.dist.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def train(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or resume) one stage; returns where it stopped and the checkpoint."""
    trainer = Trainer(cfg, log)
    try:
        return trainer.run()
    finally:
        trainer.close()


# --------------------------------------------------------------------------- export


def export_weights(ckpt: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """A flat weights-only copy of a run's latest checkpoint: EMA + raw weights in
    `dtype`, config, step, plus the run's metrics.jsonl and loss.png; no optimizer.
    Small enough to come back from a GPU machine (~11 MB for `small` in fp16, six
    files, one folder deep) and usable with `--resume-from` (Adam moments restart, so
    not bit-exact), `--init` or `--export-pack`."""
    src = latest_checkpoint(ckpt)
    if src is None:
        raise TCCPError(f"{ckpt}: no checkpoint found")
    ck = load_checkpoint(src)
    state = {k: v for k, v in ck["state"].items() if k not in ("param_groups", "has_optimizer")}
    out = save_checkpoint(out_dir, int(state["step"]), ck["model"] if ck["model"] is not None else ck["ema"],
                          ck["ema"], ck["config"], state, optim_state=None, weights_dtype=dtype, folder=out_dir)
    run = src.parent.parent if src.parent.name == "checkpoints" else src
    for name in (METRICS, LOSS_PNG):
        if (run / name).is_file() and not (out / name).exists():
            shutil.copyfile(run / name, out / name)
    return out


def export_pack(
    stage1_ckpt: str | os.PathLike,
    stage2_ckpt: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    card_info: dict | None = None,
    stage1_steps: int | None = None,
    sampler: Any = None,
    articulation: float | None = None,
    stage1_head: str | os.PathLike | None = None,
) -> Path:
    """Model pack for the engine: fp16 EMA weights of stage 1 (a coordinate run of
    `tccp.training.landmarks`) and stage 2 (a run of this trainer; None: a warp-only
    pack), written through `tccp.pack`. `stage1_ckpt` may also be a model pack: its
    stage 1 (weights, template, sampler steps) is carried over as it is, e.g. an
    avatar's base pack under a stage 2 fine-tuned on the person. `stage1_steps` None:
    the pack's own (4 for a run); `articulation` (gain on the generated lip opening)
    None: the pack's own (1 for a run); `sampler` (`tccp.pipeline.SamplerConfig`) None: the
    default sampler settings. `stage1_head`: a head-mode stage-1 run (or a pack holding
    one) for `--region head`; None carries over the `stage1_ckpt` pack's, if any."""
    from tccp import pack as pack_mod
    from tccp.diffusion.schedule import Schedule
    from tccp.models.config import MVConfig
    from tccp.pipeline import LatentNorm, SamplerConfig
    from tccp.training.landmarks import load_stage1_run

    info = dict(card_info or {})
    info.setdefault("training", {})
    size = 128
    p1 = Path(stage1_ckpt)
    if (p1 / "config.json").is_file() and (p1 / "stage1.safetensors").is_file():
        c1 = pack_mod.read_pack_config(p1)
        net, codec = pack_mod.load_stage1(p1)
        stage1_steps = int(c1["stage1"].get("steps", 4)) if stage1_steps is None else stage1_steps
        articulation = float(c1["stage1"].get("articulation", 1.0)) if articulation is None else articulation
        size = int(c1.get("crop_size") or 128)
        carried = ((c1.get("card") or {}).get("training") or {}).get("stage1") or {}
        info["training"]["stage1"] = {**carried, "pack": str(p1)}
    else:
        net, codec, ck1 = load_stage1_run(stage1_ckpt)
        if ck1["config"].get("stage") != "landmarks":
            raise TCCPError(f"{stage1_ckpt}: is not a stage-1 (landmarks) run")
        info["training"]["stage1"] = {"step": ck1["state"]["step"], "train_seconds": ck1["state"].get("elapsed_s"),
                                      "train_clips": ck1["config"].get("train_clips"),
                                      "val_clips": ck1["config"].get("val_clips"), "checkpoint": str(ck1["path"])}
    stage1_steps = 4 if stage1_steps is None else stage1_steps
    head = None
    head_src = stage1_head if stage1_head is not None else (
        p1 if (p1 / "stage1_head.safetensors").is_file() and (p1 / "config.json").is_file() else None)
    if head_src is not None:
        ph = Path(head_src)
        if (ph / "stage1_head.safetensors").is_file():
            head = pack_mod.load_stage1(ph, key="stage1_head")
            carried = ((pack_mod.read_pack_config(ph).get("card") or {}).get("training") or {}).get("stage1_head") or {}
            info["training"]["stage1_head"] = {**carried, "pack": str(ph)}
        else:
            hnet, hcodec, ckh = load_stage1_run(ph)
            if hnet.cfg.mode != "head":
                raise TCCPError(f"{ph}: is a {hnet.cfg.mode}-mode stage-1 run, --stage1-head needs a head-mode one")
            head = (hnet, hcodec)
            info["training"]["stage1_head"] = {"step": ckh["state"]["step"], "train_seconds": ckh["state"].get("elapsed_s"),
                                               "checkpoint": str(ckh["path"])}
    model2, schedule, norm, residual = None, None, None, None
    p2 = Path(stage2_ckpt) if stage2_ckpt is not None else None
    if p2 is not None and (p2 / "config.json").is_file() and (p2 / "stage2.safetensors").is_file():
        # a pack's stage 2 carried over as it is (weights, schedule, sampler, norm)
        c2 = pack_mod.read_pack_config(p2)
        model2 = pack_mod.load_stage2(p2)
        s2 = c2.get("stage2") or {}
        schedule = Schedule.from_dict(s2.get("schedule", {}))
        norm = LatentNorm(**s2.get("latent_norm", {"scale": 1.0, "shift": 0.0}))
        residual = {"scale": s2["residual_scale"]} if s2.get("residual_scale") is not None else None
        sampler = sampler if sampler is not None else (SamplerConfig.from_dict(s2["sampler"]) if "sampler" in s2 else None)
        size = int(c2.get("crop_size") or 128)
        carried = ((c2.get("card") or {}).get("training") or {}).get("stage2") or {}
        info["training"]["stage2"] = {**carried, "pack": str(p2)}
        stage2_ckpt = None
    if stage2_ckpt is not None:
        src = latest_checkpoint(stage2_ckpt)
        if src is None:
            raise TCCPError(f"{stage2_ckpt}: no checkpoint found")
        ck = load_checkpoint(src)
        if ck["config"].get("stage") != "faces":
            raise TCCPError(f"{src}: is a {ck['config'].get('stage')} checkpoint, expected faces (stage 2)")
        model2 = build_model(MVConfig.from_dict(ck["config"]["model"]))
        model2.load_state_dict(ck["ema"])
        schedule = Schedule.from_dict(ck["config"].get("schedule", {}))
        norm = LatentNorm(**ck["config"].get("latent_norm", {"scale": 1.0, "shift": 0.0}))
        residual = ck["config"].get("residual")
        size = int(ck["config"].get("crop_size") or 128)
        info["training"]["stage2"] = {"step": ck["state"]["step"], "train_seconds": ck["state"].get("train_seconds"),
                                      "train_clips": ck["config"].get("train_clips"),
                                      "val_clips": ck["config"].get("val_clips"), "checkpoint": str(ck["path"])}
    return pack_mod.save_pack(out_dir, net, codec, model2, schedule=schedule, sampler=sampler, latent_norm=norm,
                              crop_size=size, stage1_steps=stage1_steps, card=info, dtype=torch.float16,
                              residual_scale=(residual or {}).get("scale"),
                              articulation=1.0 if articulation is None else float(articulation), stage1_head=head)
