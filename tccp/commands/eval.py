"""`tccp eval`: quality metrics of a generated video, or of the model on held-out clips.

    tccp eval --real REAL.mp4 --generated GEN.mp4 [--audio A] --json OUT.json [--report DIR]
    tccp eval --generated GEN.mp4 --audio A --json OUT.json       (no ground truth: dubbing)
    tccp eval --suite [--clips ...] [--model PACK] [--steps N] --json OUT.json

See docs/evaluation.md for what each number means.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tccp.errors import TCCPError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generated", metavar="GEN.mp4", help="the generated video")
    parser.add_argument("--real", metavar="REAL.mp4",
                        help="the real video it reconstructs (omit for dubbing: then only "
                             "measures that need no ground truth)")
    parser.add_argument("--audio", metavar="FILE",
                        help="driving audio (default: the real video's track, else the generated one's)")
    parser.add_argument("--json", metavar="OUT.json", help="write the metrics here")
    parser.add_argument("--report", metavar="DIR", help="also write plots, a frame strip and the JSON here")
    parser.add_argument("--stats", metavar="FILE", help="a run's stats JSON: adds a per-window latency plot")
    parser.add_argument("--window", type=int, default=8,
                        help="window size incl. the conditioning slot (default 8: joins every 7 frames)")
    parser.add_argument("--first-frames", type=int, default=1,
                        help="frames generated alone before the first window (default 1)")
    parser.add_argument("--max-lag", type=int, default=10, help="lag search range in frames (default 10)")
    parser.add_argument("--max-seconds", type=float, help="evaluate only the first N seconds")
    parser.add_argument("--no-identity", action="store_true", help="skip the face-embedding similarity")
    parser.add_argument("--force", action="store_true",
                        help="write into an existing --report/--work folder that tccp eval did not make "
                             "(its own files stay; only eval's files are written)")
    suite = parser.add_argument_group("suite (model on held-out clips vs baselines)")
    suite.add_argument("--suite", action="store_true", help="run the pipeline on held-out clips and compare")
    suite.add_argument("--clips", nargs="+", metavar="CLIP",
                       help="clip names or files (default: tccp.data.datasets.VALIDATION_CLIPS)")
    suite.add_argument("--model", metavar="PACK", help="model pack (default: the bundled one)")
    suite.add_argument("--steps", type=int, help="sampler steps (default: the engine's)")
    suite.add_argument("--seconds", type=float, default=4.0,
                       help="seconds of each clip to run (default 4)")
    suite.add_argument("--no-tracked", action="store_true",
                       help="skip the upper-bound run of stage 2 on tracked landmarks")
    suite.add_argument("--region", choices=("mouth", "head"), default="mouth",
                       help="what the engine edits (default mouth; head: the whole-head mode, which needs a pack "
                            "with a head-mode stage 1)")
    suite.add_argument("--work", metavar="DIR", help="keep generated videos here (default: a temp folder)")


def _config(args: argparse.Namespace):
    from tccp.metrics.evaluate import EvalConfig

    if args.window < 2:
        raise TCCPError(f"--window {args.window}: must be at least 2 (conditioning slot + 1 new frame)")
    if args.first_frames < 0:
        raise TCCPError(f"--first-frames {args.first_frames}: must be 0 or more")
    if args.max_lag < 1:
        raise TCCPError(f"--max-lag {args.max_lag}: must be at least 1")
    return EvalConfig(window=args.window, first_frames=args.first_frames, max_lag=args.max_lag,
                      identity=not args.no_identity)


def _f(x, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec) if isinstance(x, float) else str(x)


def _summary(m: dict) -> str:
    lips, fid, tmp = m.get("lipsync", {}), m.get("fidelity"), m.get("temporal", {})
    lines = [f"{m['mode']}: {m['frames']} frames"]
    if "lip_lmd" in lips:
        lines.append(f"  LipLMD {_f(lips['lip_lmd'], '.4f')}  mouth r {_f(lips['aperture_corr'])}  "
                     f"lag {_f(lips['lag_frames'])} frames")
    for who, s in (lips.get("audio_sync") or {}).items():
        if s:
            lines.append(f"  mouth vs audio ({who}): r {_f(s['r'])}, best offset "
                         f"{_f(s['offset_frames'])} frames (r {_f(s['r_best'])})")
    if fid:
        lines.append(f"  PSNR head {_f(fid['head']['psnr'], '.2f')}  outside {_f(fid['outside']['psnr'], '.2f')}  "
                     f"border {_f(fid['border']['psnr'], '.2f')} dB;  SSIM head {_f(fid['head']['ssim'])}  "
                     f"outside {_f(fid['outside']['ssim'])}")
    j = tmp.get("jitter", {})
    seams = tmp.get("seams", {})
    line = f"  jitter {_f(j.get('generated'), '.4f')}"
    if "ratio" in j:
        line += f" (x{_f(j['ratio'], '.2f')} real)"
    line += f"  seam ratio {_f((seams.get('generated') or {}).get('seam_ratio'), '.2f')}"
    if seams.get("real"):
        line += f" (real {_f(seams['real'].get('seam_ratio'), '.2f')})"
    lines.append(line)
    if "identity" in m:
        ident = m["identity"]
        lines.append(f"  identity cosine {_f(ident['cosine'])}" if ident else
                     f"  identity: n/a ({m.get('identity_note')})")
    return "\n".join(lines)


REPORT_FILES = ("metrics.json", "timeline.png", "strip.png", "latency.png")


def _check_max_seconds(value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise TCCPError(f"--max-seconds {value}: must be a positive number of seconds")


def main(args: argparse.Namespace) -> int:
    if args.suite:
        return _main_suite(args)
    if not args.generated:
        raise TCCPError("--generated: required (or use --suite)")
    if not args.json and not args.report:
        raise TCCPError("--json/--report: say where to write the metrics")
    _check_max_seconds(args.max_seconds)
    cfg = _config(args)
    from tccp.io_utils import claim_dir, ensure_writable_dir, guard_output
    from tccp.metrics.evaluate import evaluate_files, write_json
    from tccp.metrics.report import load_stats, write_report

    # check outputs before minutes of tracking: never over an input, never into a
    # folder of someone else's files
    inputs = (args.generated, args.real, args.audio, args.stats)
    if args.json:
        guard_output(args.json, inputs=inputs)
        ensure_writable_dir(Path(args.json).parent, name=args.json)
    if args.report:
        claim_dir(args.report, inputs=inputs, kind="eval", force=args.force, known=REPORT_FILES)
    stats = load_stats(args.stats) if args.stats else None
    result = evaluate_files(args.generated, args.real, args.audio, cfg, max_seconds=args.max_seconds)
    if args.json:
        write_json(result.metrics, args.json)
    if args.report:
        write_report(result, args.report, stats=stats)
    print(_summary(result.metrics))
    for note in result.metrics.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    return 0


def _main_suite(args: argparse.Namespace) -> int:
    from tccp.io_utils import claim_dir, ensure_writable_dir, guard_output
    from tccp.metrics.suite import SuiteConfig, format_table, run_suite

    if not args.json:
        raise TCCPError("--json: required with --suite")
    if args.seconds is not None and not (math.isfinite(args.seconds) and args.seconds > 0):
        raise TCCPError(f"--seconds {args.seconds}: must be a positive number of seconds")
    if args.steps is not None and args.steps < 0:
        raise TCCPError(f"--steps {args.steps}: must be 0 or more")
    clip_files = [c for c in (args.clips or []) if Path(c).exists()]
    guard_output(args.json, inputs=(*clip_files, args.model))
    ensure_writable_dir(Path(args.json).parent, name=args.json)
    if args.work:
        claim_dir(args.work, inputs=(*clip_files, args.model), kind="eval", force=args.force)
    cfg = SuiteConfig(
        clips=tuple(args.clips) if args.clips else None,
        model=args.model,
        steps=args.steps,
        seconds=args.seconds,
        work=Path(args.work) if args.work else None,
        tracked=not args.no_tracked,
        region=args.region,
        eval=_config(args),
    )
    result = run_suite(cfg, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    from tccp.metrics.evaluate import write_json

    write_json(result, args.json)
    print(format_table(result))
    return 0
