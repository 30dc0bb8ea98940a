"""`tccp bench`: speed of the per-window pipeline on real prepared windows.

What is timed is what the engine does per window after tracking: both stages
(condition encoders + sampler steps of the denoisers), TAEF2 encode of the crops and
decode of the faces (`engine.runner.PipelineRunner.run_batch`), then compositing each
face back into its source frame (`engine.composite.paste_back`). Face tracking and
cropping happen before (they run in the session's own thread, concurrently with the
model) and are not part of the number.

Method: the windows come from a prepared clip (default: a prepared piece of the
bundled sample); K streams are batched into one call, as `SharedModel` batches
concurrent sessions; warm-up calls are excluded; every window latency of every
repeat is kept, so p50/p95/p99 come from the full distribution. The torch eager
backend is always measured in the same run, so ratios compare like with like on a
machine whose load may change between runs.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.machine import RssSampler, machine_info

__all__ = ["BenchConfig", "add_arguments", "main", "run_bench", "plot_bench"]


@dataclass
class BenchConfig:
    backends: list[str] = field(default_factory=lambda: ["torch", "onnxruntime"])
    device: str = "cpu"
    steps: int = 4  # engine default (EngineConfig.steps)
    sampler: str = "ddim"
    guidance: float = 1.0
    streams: int = 1
    windows: int = 8
    repeat: int = 3
    warmup: int = 2
    window: int | None = None  # slots per window (default: the model's frames)
    mode: str = "generated"  # or "tracked" (stage 2 only, on tracked sketches)
    threads: int | None = None
    precision: str | None = None  # torch backend: fp32/fp16/bf16
    compile: bool = False
    cuda_graphs: bool = False
    seed: int = 0


def _stats(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, np.float64) * 1000.0
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "min_ms": float(a.min()),
            "max_ms": float(a.max()), "n": int(a.size)}


def _window_slices(clip_n: int, new: int, count: int) -> list[slice]:
    """`count` consecutive windows of `new` frames, cycling through the clip."""
    avail = max(1, clip_n // new)
    return [slice((i % avail) * new, (i % avail) * new + new) for i in range(count)]


def _requests(clip: Any, sl: slice, cfg: BenchConfig, window: int, states: list | None, ident: list | None) -> list:
    from engine.runner import WindowRequest

    return [WindowRequest(
        mode=cfg.mode, steps=cfg.steps, sampler=cfg.sampler, guidance=cfg.guidance, window=window,
        contexts=clip.contexts[sl], sketches=clip.sketches[sl], mel=clip.mel[sl], identity=clip.identity,
        state=None if states is None else states[k], seed=cfg.seed,
        identity_latent=None if ident is None else ident[k],
    ) for k in range(cfg.streams)]


def _composite(clip: Any, sl: slice, results: list, settings: Any, pool: Any = None) -> int:
    """Paste every stream's new faces into their source frames. With several streams
    each stream composites in its own worker, as each engine session does in its own
    thread pool (OpenCV releases the GIL); one stream composites inline."""
    from engine.composite import paste_back

    idx = range(sl.start, sl.stop)

    def one(res: Any) -> int:
        for j, i in enumerate(idx):
            paste_back(clip.frames[i], res.faces[j], clip.face_boxes[i], clip.masks[i], settings)
        return len(idx)

    if pool is None or len(results) == 1:
        return sum(one(r) for r in results)
    return sum(pool.map(one, results))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def bench_backend(name: str, pack: Path, clip: Any, cfg: BenchConfig, cache: str | None = None) -> dict[str, Any]:
    """Load one backend, warm it up, then time first frames and windows."""
    import torch

    from engine.composite import CompositeSettings
    from engine.config import EngineConfig
    from engine.runner import PipelineRunner
    from export.backends import load_pipeline

    opts: dict[str, Any] = {}
    if name == "torch":
        opts = {"precision": cfg.precision, "compile": cfg.compile, "cuda_graphs": cfg.cuda_graphs}
    elif name == "onnxruntime":
        opts = {"threads": cfg.threads, "cache": cache}
    elif name == "tensorrt":
        opts = {"cache": cache}
    if name == "torch_eager":  # the reference run, whatever the torch options
        name, opts = "torch", {"precision": "fp32"}
    t0 = time.perf_counter()
    pipe = load_pipeline(pack, backend=name, device=cfg.device, **opts)
    setup_s = time.perf_counter() - t0
    runner = PipelineRunner(pipe, size=clip.size)
    window = cfg.window or runner.frames
    new = window - 1
    settings = CompositeSettings(feather=EngineConfig().feather)
    slices = _window_slices(clip.n, new, cfg.windows + 1)
    cuda = cfg.device.startswith("cuda")

    def first() -> tuple[list, float]:
        _sync(cfg.device)
        t = time.perf_counter()
        res = runner.run_batch(_requests(clip, slices[0], cfg, window, None, None))
        _composite(clip, slice(slices[0].start, slices[0].start + 1), res, settings)  # the first frame
        _sync(cfg.device)
        return res, time.perf_counter() - t

    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=cfg.streams) if cfg.streams > 1 else None
    for _ in range(cfg.warmup):  # warm-up: first-frame path and one window path
        res, _ = first()
        runner.run_batch(_requests(clip, slices[1], cfg, window, [r.state for r in res], [r.identity_latent for r in res]))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first_s: list[float] = []
    window_s: list[float] = []
    model_s: list[float] = []
    parts: dict[str, list[float]] = {"stage1_incl_encode": [], "stage2_incl_decode": [], "composite": []}
    frames = 0
    outputs = None
    with RssSampler() as rss:
        t_all = 0.0
        for rep in range(cfg.repeat):
            res, dt = first()
            first_s.append(dt)
            if rep == 0:
                outputs = [res[0].faces.copy()]
            for m in range(cfg.windows):
                sl = slices[1 + m]
                reqs = _requests(clip, sl, cfg, window, [r.state for r in res], [r.identity_latent for r in res])
                _sync(cfg.device)
                t = time.perf_counter()
                res = runner.run_batch(reqs)
                _sync(cfg.device)
                tm = time.perf_counter()
                frames += _composite(clip, sl, res, settings, pool)
                t_end = time.perf_counter()
                window_s.append(t_end - t)
                model_s.append(tm - t)
                parts["stage1_incl_encode"].append(res[0].stage1_s)
                parts["stage2_incl_decode"].append(res[0].stage2_s)
                parts["composite"].append(t_end - tm)
                t_all += t_end - t
                if rep == 0 and m < 2:
                    outputs.append(res[0].faces.copy())
    if pool is not None:
        pool.shutdown()
    # the autoencoder alone, per window of one stream: at 128 px TAEF2 costs more
    # FLOPs than the small diffusion model, so it is worth seeing separately
    ae_enc, ae_dec = [], []
    lat = pipe.autoencoder.encode_images(clip.faces[:new])
    for _ in range(cfg.repeat):
        _sync(cfg.device)
        t = time.perf_counter()
        pipe.autoencoder.encode_images(clip.contexts[:new])
        _sync(cfg.device)
        t1 = time.perf_counter()
        pipe.autoencoder.decode(lat)
        _sync(cfg.device)
        ae_enc.append(t1 - t)
        ae_dec.append(time.perf_counter() - t1)
    out = {
        "backend": getattr(getattr(pipe, "backend", None), "name", name),
        "autoencoder_p50_ms": {"encode_window": float(np.median(ae_enc) * 1000),
                               "decode_window": float(np.median(ae_dec) * 1000), "frames": new},
        "setup_s": round(setup_s, 2),
        "window": window,
        "new_frames_per_window": new,
        "fps": frames / t_all if t_all > 0 else float("nan"),
        # the model call alone (no compositing): what a pipelined engine, compositing
        # the previous window while the model runs the next, could sustain
        "model_fps": frames / sum(model_s) if model_s else float("nan"),
        "window_latency": _stats(window_s),
        "model_latency": _stats(model_s),
        "first_frame_latency": _stats(first_s),
        # the engine runner's own split: stage 1 includes TAEF2 encoding of the crops,
        # stage 2 the rest of the call (its sampler steps and TAEF2 decoding)
        "breakdown_p50_ms": {k: float(np.percentile(v, 50) * 1000) for k, v in parts.items()},
        "peak_rss_mb": rss.peak / 2**20,
        "latencies_ms": [x * 1000 for x in window_s],
    }
    if cuda:
        out["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["_outputs"] = outputs
    return out


def run_bench(pack: Path, label: str, cfg: BenchConfig, clip: Any = None, cache: str | None = None,
              log: Any = None) -> dict[str, Any]:
    """Benchmark every backend of `cfg` (plus the torch eager reference) on `clip`."""
    import torch

    from export.realdata import sample_clip
    from tccp.pack import read_pack_config

    say = log or (lambda m: None)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    pc = read_pack_config(pack)
    size = int(pc.get("crop_size", 128))
    frames_cfg = int(pc["stage1"].get("frames", 8))
    window = cfg.window or frames_cfg
    if clip is None:
        need = min(125, (cfg.windows + 2) * (window - 1))
        clip = sample_clip(max(need, 2 * window), size, with_frames=True)
    if clip.frames is None:
        raise ValueError("bench needs the clip's source frames (load_real_clip(..., with_frames=True))")
    machine_before = machine_info(cfg.device)
    names = list(dict.fromkeys(cfg.backends))
    runs = []
    reference = None
    torch_plain = cfg.precision in (None, "fp32") and not cfg.compile and not cfg.cuda_graphs
    if cfg.device == "cpu" and torch_plain and "torch" in names:
        order = ["torch"] + [n for n in names if n != "torch"]
    else:
        order = ["torch_eager"] + names  # the eager reference is measured in the same run
    for name in order:
        say(f"benchmarking {name} ({cfg.streams} stream(s), {cfg.windows} windows x {cfg.repeat} repeats)")
        r = bench_backend(name, pack, clip, cfg, cache)
        r["reference"] = name in ("torch", "torch_eager") and reference is None
        outputs = r.pop("_outputs")
        if reference is None:
            reference = (r, outputs)
        else:
            ref, ref_out = reference
            r["vs_torch_eager"] = {
                "fps_ratio": r["fps"] / ref["fps"],
                "p50_latency_ratio": r["window_latency"]["p50_ms"] / ref["window_latency"]["p50_ms"],
                "max_abs_pixel_diff": int(max(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()
                                              for a, b in zip(outputs, ref_out))),
            }
        runs.append(r)
    flops = _flops(pc, cfg, window)
    for r in runs:
        if flops:
            r["achieved_gflops_per_s"] = flops["window_flops"] / (r["model_latency"]["p50_ms"] / 1000) / 1e9 * cfg.streams
    return {
        "model": label,
        "random_weights": "RANDOM" in label,
        "config": {**asdict(cfg), "window": window, "crop_size": size,
                   "stage_config": pc["stage1"], "clip": clip.name, "clip_frames": clip.n},
        "machine": {**machine_before, "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "flops_estimate": flops,
        "runs": runs,
    }


def _flops(pc: dict, cfg: BenchConfig, window: int) -> dict[str, Any] | None:
    """FLOPs per window from torch's FlopCounter (as `tccp info`): an estimate of the
    work, not a measurement of speed."""
    try:
        import torch

        from tccp.models.config import MVConfig
        from tccp.models.mvcontrolnet import MVControlNet, count_flops

        total = 0
        for k in ("stage1", "stage2"):
            if k == "stage1" and cfg.mode == "tracked":
                continue
            mc = MVConfig.from_dict(pc[k])
            torch.manual_seed(0)
            total += count_flops(MVControlNet(mc), mc, frames=window)
        mult = cfg.steps * (2 if cfg.guidance != 1.0 else 1)
        return {"window_flops": total * mult, "per_new_frame_flops": total * mult / (window - 1),
                "note": "networks only (FlopCounterMode: matmul/conv/attention), autoencoder excluded"}
    except Exception:  # noqa: BLE001 - an estimate must never fail the benchmark
        return None


# --------------------------------------------------------------------------- plot
def plot_bench(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Per-window latency distribution per backend and fps bars, one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tccp.io_utils import atomic_path

    runs = report["runs"]
    names = [r["backend"] for r in runs]
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    ax1.boxplot([r["latencies_ms"] for r in runs], whis=(1, 99), showfliers=True)
    ax1.set_xticks(range(1, len(names) + 1), names)
    for i, r in enumerate(runs, 1):
        ax1.scatter(np.full(len(r["latencies_ms"]), i) + np.random.default_rng(0).uniform(-0.15, 0.15, len(r["latencies_ms"])),
                    r["latencies_ms"], s=6, alpha=0.4)
        ax1.annotate(f"p95 {r['window_latency']['p95_ms']:.0f} ms", (i, r["window_latency"]["p95_ms"]),
                     textcoords="offset points", xytext=(18, 0), fontsize=8)
    ax1.set_ylabel("per-window latency (ms)")
    c = report["config"]
    ax1.set_title(f"{c['streams']} stream(s), window {c['window']}, {c['steps']} {c['sampler']} steps, {c['device']}",
                  fontsize=9)
    ax2.bar(names, [r["fps"] for r in runs], color=["#888888"] + ["#3a7"] * (len(runs) - 1))
    for i, r in enumerate(runs):
        ax2.annotate(f"{r['fps']:.1f}", (i, r["fps"]), ha="center", textcoords="offset points", xytext=(0, 2), fontsize=8)
    ax2.set_ylabel("frames per second (all streams)")
    model = report["model"]
    fig.suptitle(f"tccp bench: {model} on {report['machine']['cpu']} ({report['machine']['cpus_usable']} cpus)"
                 + (f", {report['machine']['gpu']}" if report["machine"].get("gpu") else ""), fontsize=10)
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return Path(path)


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PACK", help="model pack folder (default: the bundled pack)")
    src.add_argument("--config", metavar="NAME", help="RANDOM weights of a named config (paper, small, tiny); "
                     "clearly labelled in the output")
    p.add_argument("--backend", nargs="+", default=None, metavar="B",
                   help="backends: torch onnxruntime tensorrt (default: torch onnxruntime); torch eager is "
                        "always measured as the reference")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=None, help="sampler steps per stage (default: 4, the engine's)")
    p.add_argument("--sampler", choices=("ddim", "dpmpp_2m", "ddpm"), default="ddim")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale (!= 1 doubles the batch)")
    p.add_argument("--streams", type=int, default=1, metavar="K", help="concurrent streams batched per call")
    p.add_argument("--windows", type=int, default=8, metavar="M", help="timed windows per repeat")
    p.add_argument("--repeat", type=int, default=3, help="repeats of the M windows (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up rounds (default 2)")
    p.add_argument("--window", type=int, default=None, help="slots per window (default: the model's frames)")
    p.add_argument("--mode", choices=("generated", "tracked"), default="generated",
                   help="generated: both stages; tracked: stage 2 on tracked sketches")
    p.add_argument("--clip", metavar="PREPARED", help="prepared clip folder (default: prepared bundled sample)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and onnxruntime")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None, help="torch backend precision")
    p.add_argument("--compile", action="store_true", help="torch backend: torch.compile")
    p.add_argument("--cuda-graphs", action="store_true", help="torch backend: CUDA graphs (cuda only)")
    p.add_argument("--json", metavar="OUT.json", required=False, help="write the report here")
    p.add_argument("--plot", metavar="OUT.png", help="latency distribution per backend + fps bars")
    p.add_argument("--steps-sweep", action="store_true",
                   help="instead: quality vs steps study (export/steps_study.py) on held-out windows")
    p.add_argument("--prepared", metavar="DIR", default="data_prepared",
                   help="--steps-sweep: root of prepared clips holding the held-out clips")


def main(args: argparse.Namespace) -> int:
    import json
    import tempfile

    from rich.console import Console

    from export.packs import resolve_pack
    from tccp.errors import TCCPError
    from tccp.io_utils import atomic_path

    console = Console(stderr=True)
    if not args.json:
        raise TCCPError("--json OUT.json is required (the report is the point of a benchmark)")
    from tccp.io_utils import guard_output

    inputs = (args.model, args.clip, *(getattr(args, "clips", None) or []))
    json_out = guard_output(args.json, inputs=inputs)
    if args.plot and guard_output(args.plot, inputs=inputs) == json_out:
        raise TCCPError(f"{args.plot}: same file as --json; give the plot its own name")
    if args.steps_sweep:
        from export.steps_study import study_from_args

        return study_from_args(args)
    for name, v in (("--steps", args.steps), ("--streams", args.streams), ("--windows", args.windows),
                    ("--repeat", args.repeat)):
        if v is not None and v < 1:
            raise TCCPError(f"{name} {v}: must be at least 1")
    if args.window is not None and args.window < 2:
        raise TCCPError(f"--window {args.window}: must be at least 2")
    cfg = BenchConfig(
        backends=args.backend or ["torch", "onnxruntime"], device=args.device, steps=args.steps or 4,
        sampler=args.sampler, guidance=args.guidance, streams=args.streams, windows=args.windows,
        repeat=args.repeat, warmup=max(0, args.warmup), window=args.window, mode=args.mode, threads=args.threads,
        precision=args.precision, compile=args.compile, cuda_graphs=args.cuda_graphs,
    )
    from export.backends import BACKENDS

    for b in cfg.backends:
        if b not in BACKENDS:
            raise TCCPError(f"--backend {b}: unknown (choose from {', '.join(BACKENDS)})")
    with tempfile.TemporaryDirectory(prefix="tccp-bench-") as scratch:
        pack, label = resolve_pack(args.model, args.config, scratch)
        if args.config:
            console.print(f"[bold red]benchmarking RANDOM WEIGHTS of config {args.config!r} (speed only)[/]")
        clip = None
        if args.clip:
            from export.realdata import load_real_clip
            from tccp.pack import read_pack_config

            size = int(read_pack_config(pack).get("crop_size", 128))  # the crop size the pack runs at
            clip = load_real_clip(args.clip, with_frames=True, size=size)
        report = run_bench(pack, label, cfg, clip=clip, log=lambda m: console.print(m))
    with atomic_path(Path(args.json)) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot_bench(report, args.plot)
    _print(report)
    return 0


def _print(report: dict[str, Any]) -> None:
    m, c = report["machine"], report["config"]
    print(f"model {report['model']} | {c['streams']} stream(s), window {c['window']}, {c['steps']} {c['sampler']} "
          f"steps, guidance {c['guidance']:g}, {c['device']} | {m['cpu']} ({m['cpus_usable']} cpus, load "
          f"{m['load_average'][0]:.1f})" + (f" | {m['gpu']}" if m.get("gpu") else ""))
    for r in report["runs"]:
        w, f = r["window_latency"], r["first_frame_latency"]
        ratio = r.get("vs_torch_eager")
        extra = (f" | x{ratio['fps_ratio']:.2f} fps vs torch eager, max pixel diff {ratio['max_abs_pixel_diff']}"
                 if ratio else " | reference")
        mem = f"{r['peak_rss_mb']:.0f} MB RSS" + (f", {r['cuda_max_memory_allocated_mb']:.0f} MB CUDA"
                                                  if "cuda_max_memory_allocated_mb" in r else "")
        print(f"  {r['backend']:<22} {r['fps']:7.2f} fps ({r['model_fps']:.2f} model only) | window p50 {w['p50_ms']:.0f} p95 {w['p95_ms']:.0f} "
              f"p99 {w['p99_ms']:.0f} ms | first frame p50 {f['p50_ms']:.0f} ms | {mem}{extra}")
