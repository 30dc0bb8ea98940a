"""`tccp prepare CLIP... --out DIR`: clips -> prepared training samples (see tccp.data.prepare)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tccp.errors import TCCPError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("clips", nargs="+", metavar="CLIP", help="video files (mp4, mov, ...)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (one sub-folder per clip)")
    parser.add_argument("--size", type=int, default=128,
                        help="face crop size in px (multiple of 8, 32..512; default 128)")
    parser.add_argument(
        "--audio",
        metavar="FILE",
        help="audio for clips that have no audio track and no same-stem .wav beside them",
    )
    parser.add_argument("--workers", type=int, default=1, help="clips prepared in parallel (default 1)")
    parser.add_argument("--crf", type=int, default=16,
                        help="H.264 quality of the crops, 0..51 (lower = better, bigger; default 16)")
    parser.add_argument("--force", action="store_true", help="re-prepare clips that are already complete (also "
                        "one whose folder holds another clip of the same name)")


def _bar(total: int | None, unit: str = "clip", desc: str = "prepare"):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    if not sys.stderr.isatty():
        return None  # logs and tests: no bar, one line per error
    # draw on a duplicate of the terminal's fd: prepare silences fd 2 while mediapipe
    # prints its C++ log lines, and the bar must stay visible meanwhile
    term = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    bar = tqdm(total=total, unit=unit, desc=desc, file=term)
    bar.term = term  # closed by _close
    return bar


def _close(bar) -> None:
    if bar is not None:
        bar.close()
        bar.term.close()


def main(args: argparse.Namespace) -> int:
    from tccp.data.prepare import PrepareConfig, check_settings, folder_size, prepare_clip, prepare_clips
    from tccp.io_utils import ensure_writable_dir

    if args.workers < 1:
        raise TCCPError(f"--workers {args.workers}: must be at least 1")
    cfg = PrepareConfig(size=args.size, crf=args.crf)
    check_settings(cfg)  # --size / --crf bounds, before anything is created
    out = Path(args.out)
    created = not out.exists()
    ensure_writable_dir(out)  # fail in the first second, not after the first clip
    t0 = time.perf_counter()
    try:
        if len(args.clips) == 1:
            bar = _bar(None, unit="frame", desc=Path(args.clips[0]).name)
            name = Path(args.clips[0]).name

            def progress(phase: str, done: int, total: int) -> None:
                bar.total = total
                bar.set_description_str(f"{name} {phase}", refresh=False)
                bar.n = done
                bar.refresh()

            try:
                folder = prepare_clip(
                    args.clips[0], out, args.size, args.audio, cfg, args.force,
                    progress if bar is not None else None,
                )
            finally:
                _close(bar)
            print(f"prepared {folder} in {time.perf_counter() - t0:.1f} s")
            return 0
        bar = _bar(len(args.clips))
        counts = {"done": 0, "skipped": 0, "unusable": 0, "failed": 0}

        def report(r) -> None:
            counts[r.status] += 1
            if r.status in ("failed", "unusable"):
                line = f"error: {r.error}" if r.status == "failed" else f"warning: {r.error}; skipped"
                if bar is not None:
                    bar.write(line, file=bar.term)
                else:
                    print(line, file=sys.stderr, flush=True)
            if bar is not None:
                bar.set_postfix_str(r.clip.name, refresh=False)
                bar.update(1)

        prepare_clips(args.clips, out, cfg, args.audio, args.workers, args.force, on_result=report)
        _close(bar)
        dt = time.perf_counter() - t0
        size = folder_size(out) / 2**20
        unusable = f"unusable {counts['unusable']} (silent or no face), " if counts["unusable"] else ""
        print(
            f"prepared {counts['done']}, skipped {counts['skipped']} (already complete), {unusable}"
            f"failed {counts['failed']} of {len(args.clips)} clips in {dt:.0f} s; "
            f"{out}: {size:.1f} MiB"
        )
        return 2 if counts["failed"] else 0
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that produced nothing leaves nothing
