"""`tccp avatar`: create, list and inspect avatar packs.

    tccp avatar create --video me.mp4 [--video more.mp4] --out avatars/me [--minutes 10] [--device cuda]
    tccp avatar list
    tccp avatar show me

An avatar is a model pack fine-tuned on one person plus reference images of them;
`tccp run/serve/demo --avatar NAME` use it (NAME: ./avatars/NAME or ~/.tccp/avatars/NAME).
See docs/avatars.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


# what `avatar create --work DIR` keeps there (tccp.avatars.create)
WORK_FILES = ("clips", "data", "tail", "runs", "pack", "latents.safetensors", "tail_latents.safetensors")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n", 1)[1]
    sub = p.add_subparsers(dest="avatar_command", metavar="ACTION")
    c = sub.add_parser("create", help="fine-tune the bundled pack on a person's videos")
    c.add_argument("--video", action="append", required=True, metavar="PERSON.mp4",
                   help="a clip of the person speaking (repeat for more clips)")
    c.add_argument("--out", required=True, metavar="avatars/NAME", help="avatar folder to write")
    c.add_argument("--minutes", type=float, default=10.0,
                   help="fine-tuning budget for both stages (default 10; GPU minutes go much further)")
    c.add_argument("--steps", type=int, default=None, help="at most this many optimizer steps per stage")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    c.add_argument("--config", default=None, metavar="NAME",
                   help="model config to fine-tune (tiny/small/demo/paper; default: the base pack's own)")
    c.add_argument("--init", default=None, metavar="PACK", help="base model pack (default: the bundled pack)")
    c.add_argument("--refs", type=int, default=4, help="reference images to keep (default 4)")
    c.add_argument("--max-seconds", type=float, default=None, metavar="S", help="use only the first S s of each clip")
    c.add_argument("--tail", type=float, default=0.15, help="held-out fraction at the end of each clip (default 0.15)")
    c.add_argument("--batch", type=int, default=None, help="windows per step (default 4 on CPU, 32 on CUDA)")
    c.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (default 1e-4)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for torch")
    c.add_argument("--work", default=None, metavar="DIR", help="keep intermediate files (prepared clips, runs) here")
    c.add_argument("--force", action="store_true", help="replace an existing avatar folder")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("list", help="installed avatars (./avatars, ~/.tccp/avatars)")
    s = sub.add_parser("show", help="print an avatar's card")
    s.add_argument("name", metavar="NAME_OR_DIR")


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
    cfg = AvatarConfig(
        videos=list(args.video), out=args.out, minutes=args.minutes, steps=args.steps, device=args.device,
        config=args.config, init=args.init, refs=args.refs, max_seconds=args.max_seconds, tail=args.tail,
        batch=args.batch, lr=args.lr, seed=args.seed, work=args.work, force=args.force,
        progress=not args.no_progress,
    )
    parent = Path(args.out).parent
    made_parent = not parent.exists()
    try:
        res = create_avatar(cfg)
    except BaseException:
        if made_parent and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()  # a run that produced nothing leaves nothing
        raise
    s = res.meta["validation"]["summary"]

    def f(x, spec):
        return "n/a" if x is None else format(x, spec)

    print(f"avatar: {res.path}")
    print(f"  stage-2 validation loss  base {f(s['stage2_val_loss'][0], '.4f')}  ->  avatar {f(s['stage2_val_loss'][1], '.4f')}")
    print(f"  face PSNR (head mask)    base {f(s['face_psnr_db'][0], '.2f')} dB  ->  avatar {f(s['face_psnr_db'][1], '.2f')} dB")
    print(f"  card: {res.path / 'AVATAR_CARD.md'}")
    base, avatar = s["face_psnr_db"]
    if base is not None and avatar is not None and avatar < base:
        print(f"warning: the avatar reconstructs the held-out tail worse than the base pack (face PSNR "
              f"{base:.2f} -> {avatar:.2f} dB); fine-tune longer (--minutes, --steps) or give more footage",
              file=sys.stderr)
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
        psnr = (v.get("face_psnr_db") or [None, None])[1]
        extra = f", face PSNR {psnr:.2f} dB" if isinstance(psnr, (int, float)) else ""
        print(f"{it['name']:<20} {it['refs']} refs, created {it.get('created') or '?'}{extra}  ({it['path']})")
    return 0


def _show(name: str) -> int:
    from tccp.avatars.store import CARD_FILE, load_avatar

    av = load_avatar(name)
    card = av.path / CARD_FILE
    if card.is_file():
        sys.stdout.write(card.read_text())
    else:
        print(f"{av.name}: {len(av.refs)} refs at {av.crop_size} px ({av.path}); no {CARD_FILE}")
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
