"""`tccp demo` (what `make demo` runs): the bundled sample dubbed with the bundled speech.

Writes `out/demo.mp4` and `out/demo_preview.png`, a grid of a few frames with the
original | the sketch of stage 1's landmarks that drove stage 2 | the edited frame,
and a last row of mouth close-ups at source resolution (original above, edited below),
so a reader can see at a glance what each stage did and whether the mouth is sharp.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

__all__ = ["add_arguments", "main", "preview_image"]

DEMO_FILES = ("demo.mp4", "demo_preview.png")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", default="out", help="output folder (default: out/)")
    p.add_argument("--model", metavar="PACK", help="model pack (default: the bundled pack)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps per stage")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--avatar", metavar="NAME_OR_DIR", help="speak as this avatar (tccp avatar create)")
    p.add_argument("--mouth-scale", type=float, default=1.0, metavar="F",
                   help="lip opening factor: 0 closed, 1 as the pack renders it, >1 exaggerated")
    p.add_argument("--region", choices=("mouth", "head"), default="mouth",
                   help="mouth: edit the lower face (default); head: the whole head, expression and pose from "
                        "stage 1's head mode (avatar replacement; warp only)")
    p.add_argument("--max-seconds", type=float, default=None, metavar="S")
    p.add_argument("--preview-frames", type=int, default=4)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--force", action="store_true", help="write into an existing --out-dir that holds other files "
                   "(they stay; only demo.mp4 and demo_preview.png are written)")


def _fit(img: np.ndarray, h: int) -> np.ndarray:
    import cv2

    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    scale = h / img.shape[0]
    return cv2.resize(img, (max(1, round(img.shape[1] * scale)), h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def mouth_closeup(frame: np.ndarray, box) -> np.ndarray:
    """The mouth of a frame at source resolution: the part of the face box around the
    lips (x 25-75 %, y 55-95 % of the box)."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    s = x1 - x0
    fx0, fy0, fx1, fy1 = 0.25, 0.55, 0.75, 0.95
    h, w = frame.shape[:2]
    a = int(max(0, x0 + fx0 * s)), int(max(0, y0 + fy0 * s))
    b = int(min(w, x0 + fx1 * s)), int(min(h, y0 + fy1 * s))
    if b[0] - a[0] < 4 or b[1] - a[1] < 4:
        return np.zeros((8, 8, 3), np.uint8)
    return frame[a[1]:b[1], a[0]:b[0]]


def preview_image(rows: list[tuple], height: int = 256) -> np.ndarray:
    """Stack rows into one RGB image: original | target sketch | output, and below
    them a row of mouth close-ups at source resolution (original above, output below)."""
    lines = []
    closeups = []
    for row in rows:
        orig, sketch, gen = row[0], row[1], row[2]
        box = row[3] if len(row) > 3 else None
        if box is not None:
            half = height // 2
            pair = np.concatenate([_fit(mouth_closeup(orig, box), half), _fit(mouth_closeup(gen, box), half)], 0)
            closeups.append(pair)
        tiles = [_fit(orig, height), _fit(sketch, height), _fit(gen, height)]
        gap = np.full((height, 4, 3), 255, np.uint8)
        line = tiles[0]
        for t in tiles[1:]:
            line = np.concatenate([line, gap, t], axis=1)
        lines.append(line)
    if closeups:
        h = max(c.shape[0] for c in closeups)
        gap = np.full((h, 4, 3), 255, np.uint8)
        line = closeups[0]
        for c in closeups[1:]:
            line = np.concatenate([line, gap, np.pad(c, ((0, h - c.shape[0]), (0, 0), (0, 0)), constant_values=255)], 1)
        lines.append(line)
    width = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, 4), (0, width - line.shape[1]), (0, 0)), constant_values=255) for line in lines]
    return np.concatenate(lines, axis=0)


def write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    from tccp.errors import TCCPError
    from tccp.io_utils import atomic_path

    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), np.ascontiguousarray(image[:, :, ::-1])):
            raise TCCPError(f"{path}: could not write the preview image")


def main(args: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.filerun import run_file
    from engine.model import load_model
    from tccp.commands.run import make_progress, print_summary, print_warnings, quiet_native_stderr
    from tccp.media.io import sample_paths

    from tccp.io_utils import claim_dir

    video, speech = sample_paths()
    out_dir = Path(args.out_dir)
    # the demo writes demo.mp4 and demo_preview.png: never into a folder of other files
    claim_dir(out_dir, kind="demo", inputs=(video, speech, args.model), known=DEMO_FILES, force=args.force)
    from engine.model import check_mouth_scale

    cfg = EngineConfig(mouth_scale=check_mouth_scale(args.mouth_scale), region=args.region)
    if args.steps is not None:
        cfg = cfg.with_(steps=args.steps, min_steps=max(1, min(cfg.min_steps, args.steps)))
    model = load_model(args.model, args.device, allow_random=args.avatar is None, avatar=args.avatar)
    from engine.model import check_region
    from tccp.errors import TCCPError

    try:
        check_region(model, args.region)
    except TCCPError:
        model.close()
        raise
    caught: list = []
    try:
        with quiet_native_stderr() as caught, make_progress("demo", quiet=args.quiet) as bar:
            result = run_file(
                video, out_dir / "demo.mp4", model, audio=speech, config=cfg,
                max_seconds=args.max_seconds, progress=bar, adapt_progress=bar.adapting,
                preview_frames=max(1, args.preview_frames),
            )
    finally:
        model.close()
        print_warnings(caught)
    preview = out_dir / "demo_preview.png"
    if result.preview:
        write_png(preview, preview_image(result.preview))
    print_summary(result, title="tccp demo")
    print(f"preview: {preview}")
    return 0
