"""`tccp avatar`: create, list and inspect avatars.

    tccp avatar create --video me.mp4 [--video more.mp4] --out avatars/me [--minutes 10] [--device cuda]
    tccp avatar create --video me.mp4 --out avatars/me --minutes 0     # bank-only: no fine-tuning, quick
    tccp avatar list
    tccp avatar show me

An avatar is the person's reference bank (frames covering their mouth shapes) plus a
model pack: a copy of the base pack (--minutes 0), or the base pack's stage 1 with a
stage 2 fine-tuned on the person. `tccp run/serve/demo --avatar NAME` use it (NAME:
./avatars/NAME or ~/.tccp/avatars/NAME). See docs/avatars.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator


# what `avatar create --work DIR` keeps there (tccp.avatars.create)
WORK_FILES = ("clips", "data", "runs", "pack", "eval", "mouth_latents.safetensors", "mouth_latents.safetensors.parts",
              # written by the version-1 avatar create
              "tail", "latents.safetensors", "tail_latents.safetensors")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n", 1)[1]
    sub = p.add_subparsers(dest="avatar_command", metavar="ACTION")
    c = sub.add_parser("create", help="an avatar from a person's videos: reference bank, optional fine-tuning")
    c.add_argument("--video", action="append", required=True, metavar="PERSON.mp4",
                   help="a clip of the person speaking (repeat for more clips)")
    c.add_argument("--out", required=True, metavar="avatars/NAME", help="avatar folder to write")
    c.add_argument("--minutes", type=float, default=None,
                   help="stage-2 fine-tuning budget (default 10, or 0 when the base pack is warp-only); "
                        "0: no fine-tuning, a bank-only avatar in seconds")
    c.add_argument("--steps", type=int, default=None,
                   help="at most this many optimizer steps (0: no fine-tuning, like --minutes 0)")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    c.add_argument("--init", default=None, metavar="PACK", help="base model pack (default: the bundled pack)")
    c.add_argument("--refs", type=int, default=8, help="reference frames in the bank (default 8, at most 16)")
    c.add_argument("--max-seconds", type=float, default=None, metavar="S", help="use only the first S s of each clip")
    c.add_argument("--tail", type=float, default=0.15, help="held-out fraction at the end of each clip (default 0.15)")
    c.add_argument("--eval-seconds", type=float, default=6.0, metavar="S",
                   help="held-out seconds the validation reconstructs (default 6)")
    c.add_argument("--batch", type=int, default=None, help="windows per step (default 4 on CPU, 32 on CUDA)")
    c.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (default 1e-4)")
    c.add_argument("--adapt-steps", type=int, default=300, metavar="N",
                   help="fine-tune stage 1 (lip motion) on the videos' own speech for N steps (default 300; 0: the "
                        "base pack's stage 1); the avatar carries it, live calls included")
    c.add_argument("--adapt-seconds", type=float, default=60.0, metavar="S",
                   help="seconds of each video the stage-1 adaptation learns from (default 60)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for torch")
    c.add_argument("--work", default=None, metavar="DIR", help="keep intermediate files (split clips, prepared "
                   "data, runs) here; prepared data is reused by a later run")
    c.add_argument("--force", action="store_true", help="replace an existing avatar folder")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("list", help="installed avatars (./avatars, ~/.tccp/avatars)")
    s = sub.add_parser("show", help="print an avatar's card")
    s.add_argument("name", metavar="NAME_OR_DIR")


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """mediapipe/TFLite write a log line to fd 2 for every frame tracked on its own
    (the reference bank's candidates, the validation's outputs), bypassing Python.
    Meanwhile fd 2 goes to /dev/null and Python's `sys.stderr` (progress bars, the
    log, one-line errors) to a duplicate of the real stderr."""
    fd = 2
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    old = sys.stderr
    sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8",
                           errors="backslashreplace")
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        sys.stderr.flush()
        sys.stderr.close()
        sys.stderr = old
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def _create(args: argparse.Namespace) -> int:
    from tccp.avatars.create import AvatarConfig, create_avatar

    if args.threads is not None:
        import torch

        if args.threads < 1:
            from tccp.errors import TCCPError

            raise TCCPError(f"--threads {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
    from tccp.io_utils import claim_dir, guard_output

    # before any work: the avatar folder is new, empty or an earlier avatar (--force
    # replaces only what avatar create wrote); the work folder holds only its own files
    guard_output(args.out, folder=True, kind="avatar", force=args.force,
                 inputs=(*args.video, args.init, args.work))
    if args.work:
        claim_dir(args.work, kind="avatar", inputs=(*args.video, args.init), known=WORK_FILES, flag=None)
    if not args.eval_seconds > 0:
        from tccp.errors import TCCPError

        raise TCCPError(f"--eval-seconds {args.eval_seconds}: must be positive")
    from engine.adapt import check_adapt_options

    check_adapt_options(args.adapt_steps, args.adapt_seconds)
    cfg = AvatarConfig(
        videos=list(args.video), out=args.out, minutes=args.minutes, steps=args.steps, device=args.device,
        init=args.init, refs=args.refs, max_seconds=args.max_seconds, tail=args.tail,
        eval_seconds=args.eval_seconds, batch=args.batch, lr=args.lr, seed=args.seed, work=args.work,
        adapt_steps=args.adapt_steps, adapt_seconds=args.adapt_seconds,
        force=args.force, progress=not args.no_progress,
    )
    parent = Path(args.out).parent
    made_parent = not parent.exists()
    try:
        with _native_stderr_silenced():
            res = create_avatar(cfg)
    except BaseException:
        if made_parent and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()  # a run that produced nothing leaves nothing
        raise
    s = res.meta["validation"]["summary"]

    def f(x, spec):
        return "n/a" if x is None else format(x, spec)

    tuned = res.meta["fine_tuned"]
    adapted = bool((res.meta.get("stage1") or {}).get("adapted"))
    print(f"avatar: {res.path} ({len(res.meta['refs'])} references; "
          + (f"stage 2 fine-tuned, {res.meta['training']['steps']} steps" if tuned else
             "the base pack's stage 2, no fine-tuning")
          + ("; stage 1 adapted to the person's speech)" if adapted else ")"))
    if not adapted:
        print(f"  stage 1 not adapted: {(res.meta.get('stage1') or {}).get('note', '')}")
    (b_psnr, a_psnr), (b_r, a_r) = s["psnr_mouth"], s["aperture_corr"]
    if tuned or adapted:
        print(f"  held-out mouth PSNR       base {f(b_psnr, '.2f')} dB  ->  avatar {f(a_psnr, '.2f')} dB")
        print(f"  mouth-opening correlation base {f(b_r, '.3f')}  ->  avatar {f(a_r, '.3f')}")
    else:
        print(f"  held-out mouth PSNR {f(a_psnr, '.2f')} dB, mouth-opening correlation {f(a_r, '.3f')}")
    print(f"  card: {res.path / 'AVATAR_CARD.md'}")
    if tuned and b_psnr is not None and a_psnr is not None and a_psnr < b_psnr:
        print(f"warning: the avatar reconstructs the held-out tail worse than the base pack (mouth PSNR "
              f"{b_psnr:.2f} -> {a_psnr:.2f} dB); fine-tune longer (--minutes, --steps), give more footage, "
              "or use --minutes 0 (the base pack's weights with your reference bank)", file=sys.stderr)
    return 0


def _list() -> int:
    from tccp.avatars.store import avatar_roots, list_avatars

    items = list_avatars()
    if not items:
        print("no avatars installed (looked in " + ", ".join(str(r) for r in avatar_roots()) + ")")
        return 0
    for it in items:
        if not it.get("ok"):
            print(f"{it['name']:<20} BROKEN: {it['error']}")
            continue
        v = it.get("validation") or {}
        psnr = (v.get("psnr_mouth") or [None, None])[1]
        extra = f", mouth PSNR {psnr:.2f} dB" if isinstance(psnr, (int, float)) else ""
        kind = "fine-tuned" if it.get("fine_tuned") else "bank-only"
        print(f"{it['name']:<20} {kind}, {it['refs']} refs, created {it.get('created') or '?'}{extra}  ({it['path']})")
    return 0


def _show(name: str) -> int:
    from tccp.avatars.store import CARD_FILE, load_avatar

    av = load_avatar(name)
    card = av.path / CARD_FILE
    if card.is_file():
        sys.stdout.write(card.read_text())
    else:
        print(f"{av.name}: {len(av)} refs at {av.crop_size} px ({av.path}); no {CARD_FILE}")
    return 0


def main(args: argparse.Namespace) -> int:
    action = getattr(args, "avatar_command", None)
    if action == "create":
        return _create(args)
    if action == "list":
        return _list()
    if action == "show":
        return _show(args.name)
    print("usage: tccp avatar {create,list,show} ... (see tccp avatar --help)", file=sys.stderr)
    return 1
