"""`tccp export`: a model pack -> ONNX graphs (+ TensorRT engines), parity-checked.

    tccp export --model PACK --format onnx --out DIR [--fp16]
    tccp export --model PACK --format tensorrt --out DIR [--max-batch 16]

The output folder holds one graph per network the engine runs per window (Whisper,
stage-1 condition tokens and landmark network, stage-2 condition encoder and
denoiser, TAEF2 encoder and decoder; a warp-only pack has no stage-2 or TAEF2
graphs), the constants (landmark template, stage-2 null tokens) and manifest.json
(graphs with input/output names and shapes, opset, tolerance, parity results, source
pack hash). It appears only if the parity check against torch on real inputs (a
tracked real clip run through the engine's runner) passed. `--out` must be new, empty or an
earlier export (whose files alone are replaced); a folder of other files is refused
(`--force` adds the export beside them, replacing nothing it did not write).
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PACK", help="model pack folder (default: the bundled pack)")
    src.add_argument("--config", metavar="NAME", help="RANDOM weights of a named config (mouth, tiny, tiny-warp): "
                     "for testing the export path, not for use")
    p.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: new, empty or an earlier export "
                   "(replaced atomically); never a folder of other files")
    p.add_argument("--force", action="store_true", help="write into an existing folder that is not an earlier "
                   "export (its own files stay; a name clash is an error)")
    p.add_argument("--fp16", action="store_true", help="fp16 weights/activations in the ONNX graphs "
                   "(inputs/outputs stay fp32); TensorRT engines are always fp16")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--parity-clip", metavar="VIDEO", help="a video with one face and speech for the parity "
                   "check (its first 32 frames; default: the bundled sample)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity check (not recommended)")
    p.add_argument("--max-batch", type=int, default=None, help="TensorRT: largest denoiser batch "
                   "(streams x 2 with guidance; default 16)")
    p.add_argument("--opt-batch", type=int, default=1, help="TensorRT: batch the kernels are tuned for (default 1)")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace (default 4 GB)")


def main(args: argparse.Namespace) -> int:
    import tempfile

    from rich.console import Console

    from export.onnx_export import DEFAULT_OPSET, export_onnx
    from export.packs import resolve_pack
    from tccp.errors import TCCPError
    from tccp.io_utils import guard_output

    console = Console(stderr=True)
    # before any work: the output folder must not hold other files or an input
    guard_output(args.out, folder=True, kind="export", force=args.force, inputs=(args.model, args.parity_clip))
    build = None
    if args.format == "tensorrt":
        from export.tensorrt_build import DEFAULT_MAX_BATCH, build_step, require_tensorrt

        require_tensorrt()  # one line, before any work, where TensorRT is absent
        if args.fp16:
            console.print("note: --fp16 is implied for TensorRT; the ONNX graphs stay fp32")
        build = build_step(log=lambda m: console.print(m), max_batch=args.max_batch or DEFAULT_MAX_BATCH,
                           opt_batch=args.opt_batch, workspace_gb=args.workspace_gb)
    elif args.max_batch is not None:
        raise TCCPError("--max-batch applies to --format tensorrt only (ONNX graphs have a dynamic batch)")
    with tempfile.TemporaryDirectory(prefix="tccp-export-") as scratch:
        pack, label = resolve_pack(args.model, args.config, scratch)
        if args.config:
            console.print(f"[bold red]exporting RANDOM WEIGHTS of config {args.config!r}[/]")
        manifest = export_onnx(
            pack, args.out, fp16=args.fp16 and args.format == "onnx", opset=args.opset or DEFAULT_OPSET,
            parity=not args.no_parity, parity_clip=args.parity_clip, source_label=label, build=build,
            log=lambda m: console.print(m),
        )
    _print_summary(manifest, args.out)
    return 0


def _print_summary(m: dict, out: str) -> None:
    """One line per graph: size, parity error against its bound."""
    print(f"tccp export -> {out} ({m['precision']}, opset {m['opset']}, dynamic axes: {', '.join(m['dynamic_axes'])})")
    par = (m.get("parity") or {}).get("graphs", {})
    for name, g in m["graphs"].items():
        p = par.get(name)
        check = (f"parity max|err| {p['max_abs']:.2e} <= {p['bound']:.2e}" if p["passed"] else
                 f"PARITY FAILED {p['max_abs']:.2e} > {p['bound']:.2e}") if p else "parity skipped"
        print(f"  {name:<17} {g['bytes'] / 1e6:7.1f} MB  {check}")
    trt = m.get("tensorrt")
    if trt:
        tp = (trt.get("parity") or {}).get("graphs", {})
        for name, e in trt["engines"].items():
            extra = f", parity {tp[name]['max_abs']:.2e} <= {tp[name]['bound']:.2e}" if name in tp else ""
            print(f"  tensorrt {name}: {e['file']} (batch 1..{e['max_batch']}, built in {e['build_s']} s{extra})")
    if m.get("parity"):
        print(f"parity inputs: the engine's own calls on {m['parity']['frames']} real frames of {m['parity']['clip']}")
    print(f"source: {m['source']['pack']} (sha256 {m['source']['hash'][:16]}...)")
