"""`tccp train`: train stage 1 (landmarks) or stage 2 (faces); export a model pack.

    tccp train --stage landmarks --data data_prepared --out runs/s1 --minutes 25
    tccp train --stage faces --data data_prepared --out runs/s2 --init tccp/assets/models/default --minutes 60
    tccp train --stage faces --data data_prepared --out runs/s2 --resume --minutes 9
    tccp train --export-pack models/default --stage1 runs/s1 --stage2 runs/s2

Stage 1 (coordinates, `tccp.training.landmarks`) continues its run folder when it
exists; stage 2 (`tccp.training.trainer`) needs --resume for that.

See docs/training.md for the chunked GPU recipe and multi-GPU (torchrun) use.
"""

from __future__ import annotations

import argparse


RUN_FILES = ("config.json", "metrics.jsonl", "loss.png", "val.jsonl", "checkpoints", "cache")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n", 1)[1]
    g = p.add_argument_group("run")
    g.add_argument("--stage", choices=["landmarks", "faces", "faces-refctrl", "1", "2"],
                   help="landmarks = stage 1, faces = stage 2 (faces-refctrl: the reference through the control "
                        "branch, the measured alternative)")
    g.add_argument("--data", metavar="DIR", help="folder of prepared clips (tccp prepare)")
    g.add_argument("--out", metavar="DIR", help="run folder: checkpoints, metrics.jsonl, loss.png")
    g.add_argument("--config", default="mouth", help="stage-2 model config: tiny, mouth, small or paper (default mouth)")
    g.add_argument("--mode", choices=("mouth", "head"), default="mouth",
                   help="stage 1 (new run): mouth = lips and jaw on the source's pose prior (default); head = every "
                        "sketch point and the head pose, conditioned on the head-masked context (the paper's setting)")
    g.add_argument("--objective", choices=("regress", "v"), default="regress",
                   help="stage 1: deterministic regression head (default) or v-prediction diffusion")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (stage 2: total, default 5000; stage 1: "
                   "this many more)")
    g.add_argument("--batch", type=int, default=8, help="windows per step per process (default 8)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    g.add_argument("--resume-from", metavar="CKPT", help="continue into --out from this checkpoint folder (e.g. an "
                   "--export-weights copy; weights-only copies restart the Adam moments)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--minutes", type=float, default=None, help="stop cleanly with a checkpoint within M minutes")
    g.add_argument("--val-every", type=int, default=250, metavar="K", help="validation loss every K steps (0: never)")
    g.add_argument("--ckpt-every", type=int, default=500, metavar="K", help="checkpoint every K steps (0: only at the end)")
    g.add_argument("--init", metavar="PACK_OR_CKPT", help="start from these weights (pack, run, checkpoint or .safetensors)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (paper: 2e-4)")
    o.add_argument("--warmup", type=int, default=100, metavar="STEPS", help="linear lr warm-up steps (default 100)")
    o.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    o.add_argument("--motion-weight", type=float, default=0.0, metavar="W",
                   help="stage 1 (regression): weight of a loss on frame-to-frame motion (default 0)")
    o.add_argument("--audio-radius", type=int, default=2, metavar="R",
                   help="stage 1 (new run): each frame sees +-R video frames of Whisper features (default 2; "
                        "the bundled pack: see its config's stage1.audio.radius)")
    o.add_argument("--audio-mask", type=float, default=0.0, metavar="P",
                   help="stage 1: blank each audio token with probability P in training (default 0)")
    o.add_argument("--control-elsewhere", type=float, default=0.0, metavar="P",
                   help="stage 1 (mouth mode): with probability P a window's rest-of-face landmarks come from "
                        "another stretch of the same clip, so the mouth follows the audio, not the source "
                        "face's own speech motion (default 0)")
    o.add_argument("--control-elsewhere-motion", action="store_true",
                   help="with --control-elsewhere: take only the other stretch's motion (its points minus their "
                        "window mean plus this window's mean), so the pose and the lips' place stay the window's own")
    o.add_argument("--speed-perturb", default="", metavar="S1,S2",
                   help="stage 1: also train on every clip played at these speeds, e.g. 0.9,1.1 (audio resampled, "
                        "landmarks resampled in time; default none)")
    o.add_argument("--whisper", default="tiny.en", metavar="NAME",
                   help="stage 1, a new run: the vendored Whisper encoder it reads (tiny.en, the default; base after "
                        "scripts/vendor_whisper.py --name base)")
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--ema", type=float, default=0.9999, help="EMA decay cap (warmed up; see docs/training.md)")
    o.add_argument("--p-first", type=float, default=0.15, help="probability of a one-frame (first-frame) batch")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--prediction", choices=("eps", "v"), default="v",
                   help="model target: eps (paper) or v (keeps few-step x0 estimates bounded)")
    o.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    m = p.add_argument_group("misc")
    m.add_argument("--cache", metavar="FILE", help="stage 2: mouth-patch latent cache (default DATA/.cache-mouth.safetensors); "
                   "stage 1: Whisper feature cache folder (default DATA/.cache-whisper)")
    m.add_argument("--cache-frames", type=int, metavar="N", default=300,
                   help="stage 2: encode only the first N frames of each clip (CPU budget; default 300)")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (1 is fastest on cores shared with other jobs)")
    m.add_argument("--export-weights", metavar="DIR", help="after training, write an fp16 weights-only checkpoint here")
    e = p.add_argument_group("export a model pack (no training)")
    e.add_argument("--export-pack", metavar="PACK_DIR", help="write the engine's model pack from two runs")
    e.add_argument("--stage1", metavar="RUN_OR_CKPT", help="stage-1 (landmarks) run or checkpoint")
    e.add_argument("--stage1-head", metavar="RUN_OR_PACK", help="head-mode stage-1 run (or pack) for --region head; "
                   "default: carried over from a --stage1 pack")
    e.add_argument("--stage2", metavar="RUN_OR_CKPT", help="stage-2 (faces) run or checkpoint; omit for a warp-only pack")
    e.add_argument("--name", default=None, help="model card name for the pack")
    e.add_argument("--articulation", type=float, default=None, metavar="G",
                   help="gain on the generated lip opening stored in the pack (default: --stage1 pack's own, "
                        "1 for a run; the bundled pack: 1.25, docs/lipsync.md)")


def main(args: argparse.Namespace) -> int:
    from tccp.errors import TCCPError

    from tccp.io_utils import claim_dir, guard_output

    if args.export_pack:
        if not args.stage1:
            raise TCCPError("--export-pack needs --stage1 RUN (and --stage2 RUN, or none for a warp-only pack)")
        guard_output(args.export_pack, folder=True, kind="train", inputs=(args.stage1, args.stage2, args.stage1_head),
                     flag=None)
        from tccp.training.trainer import export_pack

        card = {"name": args.name} if args.name else {}
        path = export_pack(args.stage1, args.stage2, args.export_pack, card, articulation=args.articulation,
                           stage1_head=args.stage1_head)
        print(path)
        return 0
    missing = [f"--{k}" for k in ("stage", "data", "out") if not getattr(args, k)]
    if missing:
        raise TCCPError(f"tccp train: missing {', '.join(missing)}")
    if not 0.0 <= args.control_elsewhere <= 1.0:
        raise TCCPError(f"--control-elsewhere {args.control_elsewhere:g}: a probability, from 0 to 1")
    if args.control_elsewhere_motion and not args.control_elsewhere:
        raise TCCPError("--control-elsewhere-motion: give --control-elsewhere P too (how often)")
    if args.whisper != "tiny.en":
        from tccp.media.whisper import WHISPER_DIR

        if not (WHISPER_DIR / f"{args.whisper}.safetensors").is_file():
            raise TCCPError(f"--whisper {args.whisper}: no such vendored encoder in {WHISPER_DIR} "
                            f"(scripts/vendor_whisper.py --name {args.whisper} makes it)")
    from tccp.training.trainer import TrainConfig, export_weights, train

    # before any work: the run folder holds only this command's files (a new, empty or
    # earlier run folder), and the weights copy never lands on an input or other files
    inputs = (args.data, args.init, args.resume_from, args.cache)
    claim_dir(args.out, kind="train", inputs=inputs, known=RUN_FILES, flag=None)
    if args.export_weights:
        guard_output(args.export_weights, folder=True, kind="train", inputs=(*inputs, args.out), flag=None)

    if args.threads:
        import torch

        torch.set_num_threads(max(1, args.threads))
    if args.stage in ("landmarks", "1"):
        from tccp.training.landmarks import LandmarkTrainConfig, train_landmarks

        if not __import__("pathlib").Path(args.data).is_dir():
            raise TCCPError(f"{args.data}: data folder does not exist")
        if args.minutes is None and args.steps is None:
            raise TCCPError("--stage landmarks: give --minutes or --steps")
        res = train_landmarks(LandmarkTrainConfig(
            data=args.data, out=args.out, objective=args.objective, minutes=args.minutes, steps=args.steps,
            seed=args.seed, init=args.init, cache=args.cache, threads=args.threads, lr_schedule=args.lr_schedule,
            motion_weight=args.motion_weight, audio_mask=args.audio_mask, audio_radius=args.audio_radius,
            mode=args.mode, speeds=_speeds(args.speed_perturb), whisper=args.whisper,
            data_cfg={"p_control_other": args.control_elsewhere,
                      "control_other_motion": args.control_elsewhere_motion} if args.control_elsewhere else {}))
        print(res["run"])
        return 0

    cfg = TrainConfig(
        stage=args.stage,
        data=args.data,
        out=args.out,
        config=args.config,
        steps=5000 if args.steps is None else args.steps,
        batch=args.batch,
        lr=args.lr,
        warmup_steps=args.warmup,
        lr_schedule=args.lr_schedule,
        weight_decay=args.weight_decay,
        ema_decay=args.ema,
        p_first=args.p_first,
        seed=args.seed,
        val_every=args.val_every,
        ckpt_every=args.ckpt_every,
        minutes=args.minutes,
        device=args.device,
        bf16=not args.no_bf16,
        init=args.init,
        cache=args.cache,
        cache_frames=args.cache_frames,
        prediction=args.prediction,
        progress=not args.no_progress,
        resume=args.resume,
        resume_from=args.resume_from,
    )
    result = train(cfg)
    if args.export_weights and result.checkpoint is not None:
        print(export_weights(result.checkpoint, args.export_weights))
    elif result.checkpoint is not None:
        print(result.checkpoint)
    return 0


def _speeds(text: str) -> tuple[float, ...]:
    """'0.9,1.1' -> (0.9, 1.1); a one-line error for anything else."""
    from tccp.errors import TCCPError

    try:
        out = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise TCCPError(f"--speed-perturb {text!r}: give speeds like 0.9,1.1") from None
    if any(not 0.5 <= s <= 2.0 for s in out):
        raise TCCPError(f"--speed-perturb {text!r}: speeds must lie in 0.5-2")
    return out
