"""`tccp bench`: speed of the per-window pipeline on real inputs, per backend.

What is timed is what a live engine session does per window after tracking, for K
streams batched into one model call (as `engine.model.SharedModel` batches
concurrent sessions):

    audio       Whisper on the last 3 s of audio of each stream (a live session's
                view, `export.realdata.live_tokens`) -> the window's audio tokens
    stage1      landmark condition tokens + the landmark network call(s)
    ae_encode   TAEF2 encoding of the mouth-patch inputs (masked source, warped
                reference, sketch) and of new reference patches
    stage2      condition encoder + the denoiser's sampler steps
    ae_decode   TAEF2 decoding of the new patches
    other       the rest of `PipelineRunner.run_batch`: landmark codec, warps and
                masks of the stage-2 inputs, sampler arithmetic, blending the patch
    composite   pasting every new face into its source frame (`engine.composite.paste_mouth`)

Face tracking and cropping happen before (in the session's own thread, concurrently
with the model) and are not part of the number. The per-network parts come from the
backends' own clocks (`export.backends.Timings`), so they are the same for every
backend; `other` is what the run_batch call cost beyond them.

Method: the windows come from a real clip (default: the bundled sample, tracked by
the engine's tracker); warm-up calls are excluded; the backends are loaded side by
side and measured INTERLEAVED, one repeat of M windows each in turn (the order
rotating every repeat), so a change of load on a shared machine hits every backend
alike; torch eager is always one of them, so every ratio compares like with like in
the same run. Every window latency of every repeat is kept, so p50/p95/p99 come from
the full distribution. A backend can be given with options, for side-by-side
studies: `onnxruntime:threads=1,spin=1,opt=basic,precision=fp16`.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from export.machine import RssSampler, machine_info
from tccp.errors import TCCPError

__all__ = ["BenchConfig", "PARTS", "parse_backend", "add_arguments", "main", "run_bench", "plot_bench",
           "run_live_bench"]

PARTS = ("audio", "stage1", "ae_encode", "stage2", "ae_decode", "other", "composite")
_NET_PARTS = {"stage1_condition": "stage1", "stage1_denoiser": "stage1", "stage1_head_condition": "stage1",
              "stage1_head_denoiser": "stage1", "ae_encoder": "ae_encode",
              "stage2_condition": "stage2", "stage2_denoiser": "stage2", "ae_decoder": "ae_decode"}


@dataclass
class BenchConfig:
    backends: list[str] = field(default_factory=lambda: ["torch", "onnxruntime"])
    device: str = "cpu"
    steps: int = 4  # stage-2 sampler steps (engine default; 0 = warp only)
    sampler: str = "ddim"
    guidance: float = 1.0
    streams: int = 1
    windows: int = 8
    repeat: int = 3
    warmup: int = 2
    mode: str = "generated"  # or "tracked" (stage 2 only, on the tracked landmarks)
    threads: int | None = None  # torch and onnxruntime threads (None: each its default)
    precision: str | None = None  # torch backend: fp32/fp16/bf16
    compile: bool = False
    cuda_graphs: bool = False
    seed: int = 0


def parse_backend(spec: str) -> tuple[str, dict[str, Any]]:
    """'onnxruntime:threads=1,spin=1' -> ('onnxruntime', {'threads': 1, 'spin': True})."""
    from export.backends import BACKENDS

    name, _, rest = spec.partition(":")
    if name not in BACKENDS:
        raise TCCPError(f"--backend {spec}: unknown (choose from {', '.join(BACKENDS)}, optionally "
                        "with :key=value options)")
    opts: dict[str, Any] = {}
    allowed = {"torch": {"precision", "compile", "cuda_graphs"},
               "onnxruntime": {"threads", "spin", "opt", "precision"}, "tensorrt": set()}[name]
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq or k not in allowed:
            raise TCCPError(f"--backend {spec}: option {item!r} (allowed for {name}: {', '.join(sorted(allowed)) or 'none'})")
        if k == "threads":
            if not v.isdigit() or int(v) < 1:
                raise TCCPError(f"--backend {spec}: threads must be a positive integer")
            opts[k] = int(v)
        elif k in ("spin", "compile", "cuda_graphs"):
            opts[k] = v.lower() in ("1", "true", "yes", "on")
        else:
            opts[k] = v
    return name, opts


def _stats(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, np.float64) * 1000.0
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "min_ms": float(a.min()),
            "max_ms": float(a.max()), "n": int(a.size)}


def _window_slices(clip_n: int, new: int, count: int) -> list[slice]:
    """`count` consecutive windows of `new` frames, cycling through the clip."""
    avail = max(1, clip_n // new)
    return [slice((i % avail) * new, (i % avail) * new + new) for i in range(count)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class _Subject:
    """One backend under test: its pipeline, runner, streams and measurements."""

    def __init__(self, label: str, name: str, opts: dict[str, Any], pack: Path, clip: Any, cfg: BenchConfig,
                 cache: str | None) -> None:
        import torch

        from engine.composite import CompositeSettings
        from engine.config import EngineConfig
        from engine.runner import PipelineRunner, SessionRefs
        from export.backends import load_pipeline

        self.label, self.cfg, self.clip = label, cfg, clip
        if name != "torch":
            opts = {"cache": cache, **opts}
            if cfg.threads and name == "onnxruntime":
                opts.setdefault("threads", cfg.threads)
        t0 = time.perf_counter()
        self.pipe = load_pipeline(pack, backend=name, device=cfg.device, **opts)
        self.setup_s = time.perf_counter() - t0
        if cfg.guidance != 1.0:
            self.pipe.stage2.sampler = replace(self.pipe.stage2.sampler, cfg_scale=float(cfg.guidance))
        self.backend = self.pipe.backend
        self.runner = PipelineRunner(self.pipe, size=clip.size)
        self.settings = CompositeSettings(feather=EngineConfig().feather, colour_match=EngineConfig().colour_match)
        self.bank = clip.bank(self.pipe.template)
        self.refs = [SessionRefs(self.bank) for _ in range(cfg.streams)]
        self.pool = ThreadPoolExecutor(max_workers=cfg.streams) if cfg.streams > 1 else None
        self.threads = {"torch": torch.get_num_threads(), "onnxruntime": getattr(self.backend, "threads", None)}
        self.window_s: list[float] = []
        self.first_s: list[float] = []
        self.parts: dict[str, list[float]] = {p: [] for p in PARTS}
        self.frames = 0
        self.outputs: list[np.ndarray] = []

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def _composite(self, sl: slice, results: list) -> int:
        """Paste every stream's new faces into their source frames. With several
        streams each composites in its own worker, as each engine session does in its
        own thread pool (OpenCV releases the GIL); one stream composites inline."""
        from engine.composite import paste_mouth

        clip, tri = self.clip, self.runner.triangulation

        def one(res: Any) -> int:
            for j, i in enumerate(range(sl.start, sl.stop)):
                paste_mouth(clip.frames[i], res.faces[j], clip.boxes[i], res.masks[j], res.targets[j], self.bank,
                            int(res.ref_index[j]), tri, self.settings, source_mesh=clip.meshes[i])
            return sl.stop - sl.start

        if self.pool is None or len(results) == 1:
            return sum(one(r) for r in results)
        return sum(self.pool.map(one, results))

    def window(self, sl: slice, states: list | None, record: bool) -> list:
        """One timed window of every stream (a restart when `states` is None)."""
        from export.realdata import live_tokens, window_request

        cfg, clip, dev = self.cfg, self.clip, self.cfg.device
        timings = self.backend.timings
        _sync(dev)
        t0 = time.perf_counter()
        n = sl.stop - sl.start
        from tccp.models.landmarks import audio_radius

        radius = audio_radius(self.pipe.stage1.net.cfg)
        tokens = [live_tokens(self.pipe.whisper, clip, sl.start, n, radius=radius) for _ in range(cfg.streams)]
        _sync(dev)
        t1 = time.perf_counter()
        reqs = [window_request(clip, sl, self.refs[k], None if states is None else states[k], tokens=tokens[k],
                               steps=cfg.steps, mode=cfg.mode, sampler=cfg.sampler, seed=cfg.seed + k)
                for k in range(cfg.streams)]
        timings.reset()
        res = self.runner.run_batch(reqs)
        _sync(dev)
        t2 = time.perf_counter()
        net = timings.snapshot()
        frames = self._composite(sl, res)
        t3 = time.perf_counter()
        if record:
            if states is None:
                self.first_s.append(t3 - t0)
            else:
                self.window_s.append(t3 - t0)
                self.frames += frames
                parts = dict.fromkeys(PARTS, 0.0)
                parts["audio"] = t1 - t0
                for k, v in net.items():
                    if k in _NET_PARTS:
                        parts[_NET_PARTS[k]] += v
                parts["other"] = max(0.0, (t2 - t1) - sum(v for k, v in net.items() if k in _NET_PARTS))
                parts["composite"] = t3 - t2
                for k, v in parts.items():
                    self.parts[k].append(v)
        return res

    def result(self, rss_peak: int) -> dict[str, Any]:
        total = sum(self.window_s)
        out = {
            "backend": self.label,
            "runtime": self.backend.name,
            "threads": self.threads,
            "setup_s": round(self.setup_s, 2),
            "fps": self.frames / total if total > 0 else float("nan"),
            "window_latency": _stats(self.window_s),
            "first_frame_latency": _stats(self.first_s),
            # mean seconds per window of each part (they add up to the mean latency)
            "breakdown_ms": {k: float(np.mean(v) * 1000) for k, v in self.parts.items()},
            "breakdown_p50_ms": {k: float(np.percentile(v, 50) * 1000) for k, v in self.parts.items()},
            "peak_rss_mb": rss_peak / 2**20,
            "latencies_ms": [x * 1000 for x in self.window_s],
        }
        model = sum(self.window_s) - sum(self.parts["composite"]) - sum(self.parts["audio"])
        # the model call alone: what a pipelined engine (audio and compositing of the
        # neighbouring windows overlapping the model call) could sustain
        out["model_fps"] = self.frames / model if model > 0 else float("nan")
        return out


def run_bench(pack: Path, label: str, cfg: BenchConfig, clip: Any = None, cache: str | None = None,
              log: Any = None, against: Path | None = None) -> dict[str, Any]:
    """Benchmark every backend of `cfg` plus the torch eager reference on `clip`.
    `against`: another pack (e.g. the one before a change) measured in torch eager in
    the same interleaved run, so the two packs' figures share the machine's load."""
    import torch

    from export.realdata import sample_clip
    from tccp.pack import read_pack_config

    say = log or (lambda m: None)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    pc = read_pack_config(pack)
    size = int(pc.get("crop_size", 128))
    if against is not None and int(read_pack_config(against).get("crop_size", 128)) != size:
        raise TCCPError(f"{against}: runs at another crop size than {pack}; --against needs the same")
    window = 8
    new = window - 1
    if clip is None:
        clip = sample_clip(min(125, max(4 * new, (cfg.windows + 1) * new)), size)
    if clip.size != size:
        raise TCCPError(f"clip cut at {clip.size} px; the pack runs at {size} px")
    if clip.n < 2 * new:
        raise TCCPError(f"{clip.name}: the benchmark needs at least {2 * new} frames")
    machine_before = machine_info(cfg.device)
    specs = [parse_backend(b) for b in dict.fromkeys(cfg.backends)]
    torch_plain = cfg.precision in (None, "fp32") and not cfg.compile and not cfg.cuda_graphs
    labels: list[tuple[str, str, dict[str, Any]]] = []
    ref_label = None
    for spec, (name, opts) in zip(dict.fromkeys(cfg.backends), specs):
        if name == "torch":
            opts = {"precision": cfg.precision, "compile": cfg.compile, "cuda_graphs": cfg.cuda_graphs, **opts}
            plain = opts.get("precision") in (None, "fp32") and not opts.get("compile") and not opts.get("cuda_graphs")
            if plain and ref_label is None and torch_plain:
                ref_label = spec
        labels.append((spec, name, opts))
    if ref_label is None:  # the eager reference is measured in the same run, first
        ref_label = "torch eager"
        labels.insert(0, (ref_label, "torch", {"precision": "fp32"}))
    else:
        labels.sort(key=lambda x: x[0] != ref_label)
    subjects = []
    for lab, name, opts in labels:
        lab = lab if against is None else f"{lab}, pack {Path(pack).name}"  # two packs: say which is which
        say(f"loading {lab}")
        subjects.append(_Subject(lab, name, opts, pack, clip, cfg, cache))
    if against is not None:
        lab = f"torch eager, pack {Path(against).name}"
        say(f"loading {lab}")
        subjects.append(_Subject(lab, "torch", {"precision": "fp32"}, Path(against), clip, cfg, cache))
        subjects[-1].against = True
    slices = _window_slices(clip.n, new, cfg.windows + 1)
    for s in subjects:  # warm-up: first-frame path and one window path
        say(f"warming up {s.label}")
        for _ in range(cfg.warmup):
            res = s.window(slices[0], None, False)
            s.window(slices[1], [r.state for r in res], False)
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    say(f"measuring {', '.join(s.label for s in subjects)} interleaved: {cfg.repeat} x {cfg.windows} windows, "
        f"{cfg.streams} stream(s)")
    with RssSampler() as rss:
        for rep in range(cfg.repeat):
            order = subjects[rep % len(subjects):] + subjects[:rep % len(subjects)]
            for s in order:
                res = s.window(slices[0], None, True)
                if rep == 0:
                    s.outputs.append(res[0].faces.copy())
                for m in range(cfg.windows):
                    res = s.window(slices[1 + m], [r.state for r in res], True)
                    if rep == 0 and m < 2:
                        s.outputs.append(res[0].faces.copy())
    runs = []
    ref = subjects[0]
    for s in subjects:
        s.close()
        r = s.result(rss.peak)
        r["reference"] = s is ref
        r["pack"] = "against" if getattr(s, "against", False) else "model"
        if s is not ref:
            rr = runs[0]
            r["vs_torch_eager"] = {
                "fps_ratio": r["fps"] / rr["fps"],
                "model_fps_ratio": r["model_fps"] / rr["model_fps"],
                "p50_latency_ratio": r["window_latency"]["p50_ms"] / rr["window_latency"]["p50_ms"],
                "max_abs_pixel_diff": int(max(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()
                                              for a, b in zip(s.outputs, ref.outputs))),
            }
        runs.append(r)
    flops = _flops(pc, cfg, window)
    for r in runs:
        if flops:
            model_ms = r["breakdown_ms"]["stage1"] + r["breakdown_ms"]["stage2"]
            if model_ms > 0:
                r["achieved_gflops_per_s"] = flops["window_flops"] * cfg.streams / (model_ms / 1000) / 1e9
    return {
        "model": label,
        "against": None if against is None else str(against),
        "random_weights": "RANDOM" in label,
        "config": {**asdict(cfg), "window": window, "crop_size": size, "stage2": pc.get("stage2") is not None,
                   "stage1_objective": pc["stage1"]["model"].get("objective"), "clip": clip.name, "clip_frames": clip.n,
                   "parts": list(PARTS)},
        "machine": {**machine_before, "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "flops_estimate": flops,
        "runs": runs,
    }


def _flops(pc: dict, cfg: BenchConfig, window: int) -> dict[str, Any] | None:
    """FLOPs per continued window of the networks the breakdown calls stage1 and
    stage2, from torch's FlopCounter (as `tccp info`): an estimate of the work, not a
    measurement of speed (Whisper and TAEF2 excluded)."""
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from tccp.models.config import MVConfig
        from tccp.models.landmarks import LandmarkNet, LandmarkNetConfig
        from tccp.models.mvcontrolnet import MVControlNet, count_flops

        total = 0
        if cfg.mode != "tracked":
            c1 = LandmarkNetConfig.from_dict(pc["stage1"]["model"])
            torch.manual_seed(0)
            net = LandmarkNet(c1).eval()
            audio = torch.zeros(1, window, c1.audio_tokens, c1.audio_layers * c1.audio_width)
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                ctx = net.condition_tokens(audio, torch.zeros(1, window), torch.zeros(1, 4, c1.ref_dim))
                net(torch.zeros(1, window, c1.gen_dim), torch.zeros(1, dtype=torch.long), ctx,
                    torch.zeros(1, window, c1.cv_dim), torch.zeros(1, window))
            calls = 1 if c1.objective == "regress" else int(pc["stage1"].get("steps", 4))
            total += int(counter.get_total_flops()) * calls
        if pc.get("stage2") and cfg.steps > 0:
            mc = MVConfig.from_dict(pc["stage2"]["model"])
            torch.manual_seed(0)
            total += count_flops(MVControlNet(mc), mc, frames=window) * cfg.steps * (2 if cfg.guidance != 1.0 else 1)
        return {"window_flops": total, "per_new_frame_flops": total / (window - 1),
                "note": "stage-1 and stage-2 networks per continued window (FlopCounterMode: matmul/conv/"
                        "attention); Whisper and TAEF2 excluded"}
    except Exception:  # noqa: BLE001 - an estimate must never fail the benchmark
        return None


# --------------------------------------------------------------------------- --live
def run_live_bench(pack: Path, label: str, clip_path: str | Path | None = None, seconds: float = 20.0,
                   size: int = 512, device: str = "cpu", threads: int | None = None, delay_s: float | None = None,
                   steps: int | None = None, log: Any = None, adapt_steps: int = 0,
                   adapt_seconds: float = 15.0) -> dict[str, Any]:
    """`tccp bench --live`: replay a clip in real time through one live engine session
    and its playout, in process (`streaming.live.replay`; no WebRTC, so no codec or
    network time): the model is loaded and warmed first, as `tccp serve` does.

    Reports the time to the first frame and the first generated frame sent (from the
    first frame pushed), the generated share of the frames sent (and per second), per-frame
    latency (arrival -> sent) percentiles, the A/V offset between the sent audio and video
    (median audio delay minus median video delay) and the engine's own counters.
    `adapt_steps > 0`: the same replay a second time with the call adapting stage 1 to the
    clip's speaker (`EngineConfig.live_adapt`), reported as `live_adapt` beside the baseline
    `live`, with when the adaptation ran and what it cost the call."""
    import asyncio

    import cv2

    from engine.config import EngineConfig
    from engine.model import SharedModel
    from engine.runner import PipelineRunner
    from streaming.live import TrackerPool, live_config, replay, warm_up
    from streaming.server import set_threads
    from tccp.media.io import read_audio, read_video, sample_paths

    say = log or (lambda m: None)
    nthreads = set_threads(threads)
    path = Path(clip_path) if clip_path else sample_paths()[0]
    video = read_video(path, fps=25.0, max_seconds=min(seconds, 30.0))
    h, w = video.frames[0].shape[:2]
    k = size / max(h, w)
    tw, th = max(2, int(round(w * k / 2)) * 2), max(2, int(round(h * k / 2)) * 2)
    frames = np.stack([cv2.resize(f, (tw, th), interpolation=cv2.INTER_AREA) for f in video.frames])
    audio = read_audio(path, sr=16000, max_seconds=len(frames) / 25.0)
    machine = machine_info(device)
    say(f"loading {label}")
    t0 = time.perf_counter()
    model = SharedModel(PipelineRunner.from_pack(str(pack), device=device))
    load_s = time.perf_counter() - t0
    pool = TrackerPool(1)
    try:
        base = EngineConfig() if steps is None else EngineConfig(steps=steps)
        cfg = live_config(model, base)
        pool.wait_ready(60)
        lent = pool.take()
        say("warming up")
        warm = warm_up(model, cfg, tracker=lent)
        if lent is not None:
            lent.close()
        say(f"replaying {path.name} at {tw}x{th} for {seconds:g} s in real time")
        result = asyncio.run(replay(model, frames, audio, cfg, seconds, delay_s=delay_s, window_s=warm.window_s,
                                    tracker=pool.take()))
        adapted = None
        if adapt_steps > 0:
            say(f"again, adapting stage 1 to the caller ({adapt_steps} steps on the first {adapt_seconds:g} s)")
            acfg = cfg.with_(live_adapt=True, adapt_steps=adapt_steps, adapt_seconds=adapt_seconds)
            adapted = asyncio.run(replay(model, frames, audio, acfg, seconds, delay_s=delay_s,
                                         window_s=warm.window_s, tracker=pool.take()))
    finally:
        model.close()
        pool.close()
    return {
        "mode": "live",
        "model": label,
        "random_weights": "RANDOM" in label,
        "config": {"clip": path.name, "size": [tw, th], "seconds": seconds, "device": device,
                   "steps": cfg.steps if cfg.steps is not None else int(getattr(model.runner, "default_steps", 4)),
                   "threads": nthreads, "playout_delay_s": delay_s},
        "machine": {**machine, "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "load_s": round(load_s, 2),
        "warm_up": {"seconds": round(warm.seconds, 2), "window_ms": None if warm.window_s is None
                    else round(1000 * warm.window_s, 1), "windows": warm.windows},
        "live": result,
        **({} if adapted is None else {
            "live_adapt": adapted,
            "adapt_config": {"steps": adapt_steps, "seconds": adapt_seconds},
            "generated_share_vs_baseline": round(adapted["generated_share"] / result["generated_share"], 3)
            if result["generated_share"] else None}),
    }


def plot_live(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """The share of frames sent that were edited, per second of the replay: the baseline
    and (when measured) the call adapting stage 1, with the adaptation's training span."""
    from matplotlib.figure import Figure

    from tccp.io_utils import save_png

    fig = Figure(figsize=(9, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    runs = [("live", "baseline")] + ([("live_adapt", "adapting to the caller")] if "live_adapt" in report else [])
    for key, name in runs:
        r = report[key]
        share = [np.nan if v is None else 100 * v for v in r["generated_share_per_s"]]
        ax.step(np.arange(len(share)) + 0.5, share, where="mid",
                label=f"{name}: {100 * r['generated_share']:.0f}% of {r['frames_sent']} frames")
        a = r.get("adapt")
        if a and a.get("started_s") is not None:
            end = a["ended_s"] if a.get("ended_s") is not None else len(share)
            ax.axvspan(a["started_s"], end, color="tab:orange", alpha=0.15,
                       label=f"training ({a['state']}, {end - a['started_s']:.0f} s)")
    c, m = report["config"], report["machine"]
    ax.set_title(f"{report['model']}: live replay of {c['clip']} {c['size'][0]}x{c['size'][1]}, "
                 f"{m['cpu']} ({m['cpus_usable']} cpus)", fontsize=9)
    ax.set_xlabel("seconds of the call")
    ax.set_ylabel("frames sent edited (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save_png(fig, path)


def _print_live(report: dict[str, Any]) -> None:
    m, c, r = report["machine"], report["config"], report["live"]
    load = m["load_average"][0] if m.get("load_average") else float("nan")
    fmt = lambda v, spec=".0f": "-" if v is None else format(v, spec)  # noqa: E731
    lat = r["frame_latency_ms"]
    print(f"model {report['model']} | live replay of {c['clip']} {c['size'][0]}x{c['size'][1]} for {c['seconds']:g} s, "
          f"{c['steps']} steps, {c['device']}, {c['threads']} thread(s) | {m['cpu']} ({m['cpus_usable']} cpus, load "
          f"{load:.1f})")
    print(f"  first frame {fmt(r['first_frame_ms'])} ms, first generated {fmt(r['first_generated_ms'])} ms | "
          f"generated {100 * r['generated_share']:.0f}% of {r['frames_sent']} frames sent | latency p50 "
          f"{fmt(lat['p50'])} p90 {fmt(lat['p90'])} p99 {fmt(lat['p99'])} ms | A/V offset "
          f"{fmt(r['av_offset_ms'], '+.0f')} ms | playout delay {fmt(r['playout_delay_ms']['start'])} -> "
          f"{fmt(r['playout_delay_ms']['end'])} ms | warm-up {report['warm_up']['seconds']:.1f} s")
    if "live_adapt" in report:
        a = report["live_adapt"]
        ad = a.get("adapt") or {}
        print(f"  adapting to the caller: generated {100 * a['generated_share']:.0f}% of {a['frames_sent']} frames "
              f"sent (x{report['generated_share_vs_baseline'] or 0:.2f} the baseline) | {ad.get('state')}: "
              f"training from {fmt(ad.get('started_s'), '.1f')} s to {fmt(ad.get('ended_s'), '.1f')} s | "
              f"{ad.get('note', '')}")


# --------------------------------------------------------------------------- plot
def plot_bench(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Per-window latency distribution per backend, and the per-part breakdown as
    stacked bars with fps on top, one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tccp.io_utils import save_png

    runs = report["runs"]
    names = [r["backend"] for r in runs]
    fig = Figure(figsize=(12, 4.4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.3, 1]})
    ax1.boxplot([r["latencies_ms"] for r in runs], whis=(1, 99), showfliers=True)
    ax1.set_xticks(range(1, len(names) + 1), names)
    rng = np.random.default_rng(0)
    for i, r in enumerate(runs, 1):
        lat = r["latencies_ms"]
        ax1.scatter(np.full(len(lat), i) + rng.uniform(-0.15, 0.15, len(lat)), lat, s=6, alpha=0.4)
        ax1.annotate(f"p95 {r['window_latency']['p95_ms']:.0f} ms", (i, r["window_latency"]["p95_ms"]),
                     textcoords="offset points", xytext=(18, 0), fontsize=8)
    lat_all = np.concatenate([r["latencies_ms"] for r in runs]) if runs else np.ones(1)
    if lat_all.max() > 20 * max(lat_all.min(), 1e-3):  # backends far apart: keep each readable
        ax1.set_yscale("log")
    ax1.set_ylabel("per-window latency (ms)")
    c = report["config"]
    ax1.set_title(f"{c['streams']} stream(s), window {c['window']}, {c['steps']} {c['sampler']} steps, {c['device']}",
                  fontsize=9)
    bottom = np.zeros(len(runs))
    colours = ["#8c6bb1", "#4c72b0", "#55a868", "#c44e52", "#dd8452", "#999999", "#ccb974"]
    for part, col in zip(PARTS, colours):
        vals = np.array([r["breakdown_ms"][part] for r in runs])
        ax2.bar(names, vals, bottom=bottom, color=col, label=part)
        bottom += vals
    for i, r in enumerate(runs):
        ratio = r.get("vs_torch_eager")
        txt = f"{r['fps']:.1f} fps" + (f" (x{ratio['fps_ratio']:.2f})" if ratio else "")
        ax2.annotate(txt, (i, bottom[i]), ha="center", textcoords="offset points", xytext=(0, 2), fontsize=8)
    ax2.set_ylabel("mean ms per window")
    ax2.set_ylim(0, bottom.max() * 1.35)  # headroom: the legend never covers an fps label
    ax2.legend(fontsize=7, loc="upper right", ncol=4)
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    m = report["machine"]
    fig.suptitle(f"tccp bench: {report['model']} on {m['cpu']} ({m['cpus_usable']} cpus)"
                 + (f", {m['gpu']}" if m.get("gpu") else ""), fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    from export.packs import RANDOM_CONFIGS

    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PACK", help="model pack folder (default: the bundled pack)")
    src.add_argument("--config", metavar="NAME", help=f"RANDOM weights of a named config ({', '.join(RANDOM_CONFIGS)}); "
                     "clearly labelled in the output")
    p.add_argument("--backend", nargs="+", default=None, metavar="B",
                   help="backends: torch onnxruntime tensorrt (default: torch onnxruntime), each optionally with "
                        "options, e.g. onnxruntime:threads=1,spin=1,opt=basic,precision=fp16; torch eager is "
                        "always measured as the reference")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=None, help="stage-2 sampler steps (default: 4, the engine's; 0 = warp only)")
    p.add_argument("--sampler", choices=("ddim", "dpmpp_2m", "ddpm"), default="ddim")
    p.add_argument("--guidance", type=float, default=1.0, help="stage-2 CFG scale (!= 1 doubles the batch)")
    p.add_argument("--streams", type=int, default=1, metavar="K", help="concurrent streams batched per call")
    p.add_argument("--windows", type=int, default=8, metavar="M", help="timed windows per repeat")
    p.add_argument("--repeat", type=int, default=3, help="repeats of the M windows (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up rounds (default 2)")
    p.add_argument("--mode", choices=("generated", "tracked"), default="generated",
                   help="generated: both stages; tracked: stage 2 on the tracked landmarks")
    p.add_argument("--clip", metavar="VIDEO", help="a video with one face and speech (default: the bundled sample)")
    p.add_argument("--against", metavar="PACK", help="also measure this pack in torch eager in the same run "
                   "(interleaved), e.g. the pack before a change; its fps ratio is against --model's torch eager")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and onnxruntime "
                   "(default: each library's default; onnxruntime's is torch's count)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None, help="torch backend precision")
    p.add_argument("--compile", action="store_true", help="torch backend: torch.compile")
    p.add_argument("--cuda-graphs", action="store_true", help="torch backend: CUDA graphs (cuda only)")
    p.add_argument("--json", metavar="OUT.json", required=False, help="write the report here")
    p.add_argument("--plot", metavar="OUT.png", help="latency distribution + per-part breakdown per backend")
    p.add_argument("--live", action="store_true",
                   help="instead: replay --clip in real time through a live session and its playout "
                        "(first frame, first generated frame, generated share, latency, A/V offset)")
    p.add_argument("--startup", action="store_true",
                   help="instead: time a file run (--clip with its own audio) to its first frame, with and without "
                        "adapting stage 1 and with the source's start tracked once or twice (export/startup.py)")
    p.add_argument("--seconds", type=float, default=None,
                   help="--live: how long to replay (default 20); --startup: seconds of output (default 6)")
    p.add_argument("--size", type=int, default=512, help="--live: longest side of the replayed video (default 512)")
    p.add_argument("--playout-delay", type=float, default=None, metavar="S",
                   help="--live: playout delay at the start (default: from the warm-up, as tccp serve)")
    p.add_argument("--adapt-steps", type=int, default=None, metavar="N",
                   help="--live: replay a second time with the call adapting stage 1 to the clip's speaker "
                        "(N steps), reported beside the first (what the adaptation costs the call); --startup: "
                        "the steps compared with 100 (default: tccp run's)")
    p.add_argument("--adapt-seconds", type=float, default=15.0, metavar="S",
                   help="--live --adapt-steps: how much of the call the adaptation learns from (default 15)")
    p.add_argument("--steps-sweep", action="store_true",
                   help="instead: quality vs stage-2 steps study (export/steps_study.py)")
    p.add_argument("--prepared", metavar="DIR", default="data_prepared",
                   help="--steps-sweep: root of prepared clips holding the held-out clips")


def main(args: argparse.Namespace) -> int:
    import tempfile

    from rich.console import Console

    from export.packs import resolve_pack
    from tccp.io_utils import guard_output

    console = Console(stderr=True)
    if not args.json:
        raise TCCPError("--json OUT.json is required (the report is the point of a benchmark)")
    inputs = (args.model, args.clip, getattr(args, "against", None), *(getattr(args, "clips", None) or []))
    json_out = guard_output(args.json, inputs=inputs)
    if args.plot and guard_output(args.plot, inputs=inputs) == json_out:
        raise TCCPError(f"{args.plot}: same file as --json; give the plot its own name")
    if args.steps_sweep:
        from export.steps_study import study_from_args

        return study_from_args(args)
    if getattr(args, "startup", False):
        return _startup_main(args, console)
    if getattr(args, "live", False):
        return _live_main(args, console)
    for name, v in (("--streams", args.streams), ("--windows", args.windows), ("--repeat", args.repeat),
                    ("--threads", args.threads)):
        if v is not None and v < 1:
            raise TCCPError(f"{name} {v}: must be at least 1")
    if args.steps is not None and args.steps < 0:
        raise TCCPError(f"--steps {args.steps}: must be at least 0")
    cfg = BenchConfig(
        backends=args.backend or ["torch", "onnxruntime"], device=args.device,
        steps=4 if args.steps is None else args.steps, sampler=args.sampler, guidance=args.guidance,
        streams=args.streams, windows=args.windows, repeat=args.repeat, warmup=max(0, args.warmup), mode=args.mode,
        threads=args.threads, precision=args.precision, compile=args.compile, cuda_graphs=args.cuda_graphs,
    )
    for b in cfg.backends:
        parse_backend(b)  # one-line error before any work
    with tempfile.TemporaryDirectory(prefix="tccp-bench-") as scratch:
        pack, label = resolve_pack(args.model, args.config, scratch)
        if args.config:
            console.print(f"[bold red]benchmarking RANDOM WEIGHTS of config {args.config!r} (speed only)[/]")
        clip = None
        if args.clip:
            from export.realdata import load_real_clip
            from tccp.pack import read_pack_config

            size = int(read_pack_config(pack).get("crop_size", 128))  # the crop size the pack runs at
            clip = load_real_clip(args.clip, frames=min(125, (cfg.windows + 1) * 7), size=size)
        against = None
        if getattr(args, "against", None):
            from tccp.pack import read_pack_config

            against = Path(args.against)
            read_pack_config(against)  # one-line error for a folder that is not a pack
        report = run_bench(pack, label, cfg, clip=clip, log=lambda m: console.print(m), against=against)
    return _write_report(args, report, plot_bench, _print)


def _write_report(args: argparse.Namespace, report: dict[str, Any], plot: Any, show: Any) -> int:
    """Every bench mode ends alike: the JSON (atomically), the plot when asked, the summary."""
    import json

    from tccp.io_utils import atomic_path

    with atomic_path(Path(args.json)) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    show(report)
    return 0


def _startup_main(args: argparse.Namespace, console: Any) -> int:
    import tempfile

    from engine.adapt import check_adapt_options
    from engine.config import EngineConfig
    from export.packs import resolve_pack
    from export.startup import plot_startup, print_startup, run_startup_bench

    seconds = 6.0 if args.seconds is None else args.seconds
    if not 1.0 <= seconds <= 600:
        raise TCCPError(f"--seconds {seconds}: must be between 1 and 600")
    if args.clip and not Path(args.clip).is_file():
        raise TCCPError(f"{args.clip}: no such file")
    if args.repeat < 1:
        raise TCCPError(f"--repeat {args.repeat}: must be at least 1")
    steps = EngineConfig().adapt_steps if not args.adapt_steps else args.adapt_steps
    check_adapt_options(steps, args.adapt_seconds)
    with tempfile.TemporaryDirectory(prefix="tccp-bench-") as scratch:
        pack, label = resolve_pack(args.model, args.config, scratch)
        report = run_startup_bench(pack, label, args.clip, seconds, steps, args.adapt_seconds,
                                   repeat=args.repeat, log=lambda m: console.print(m))
    return _write_report(args, report, plot_startup, print_startup)


def _live_main(args: argparse.Namespace, console: Any) -> int:
    import tempfile

    from export.packs import resolve_pack

    args.seconds = 20.0 if args.seconds is None else args.seconds
    args.adapt_steps = args.adapt_steps or 0
    if not 1.0 <= args.seconds <= 3600:
        raise TCCPError(f"--seconds {args.seconds}: must be between 1 and 3600")
    if not 64 <= args.size <= 4096:
        raise TCCPError(f"--size {args.size}: must be between 64 and 4096")
    if args.threads is not None and args.threads < 1:
        raise TCCPError(f"--threads {args.threads}: must be at least 1")
    if args.playout_delay is not None and not 0.05 <= args.playout_delay <= 10:
        raise TCCPError(f"--playout-delay {args.playout_delay}: must be between 0.05 and 10 seconds")
    if args.clip and not Path(args.clip).is_file():
        raise TCCPError(f"{args.clip}: no such file")
    if args.steps is not None and args.steps < 0:
        raise TCCPError(f"--steps {args.steps}: must be at least 0")
    from engine.adapt import check_adapt_options

    check_adapt_options(args.adapt_steps, args.adapt_seconds)
    with tempfile.TemporaryDirectory(prefix="tccp-bench-") as scratch:
        pack, label = resolve_pack(args.model, args.config, scratch)
        if args.config:
            console.print(f"[bold red]benchmarking RANDOM WEIGHTS of config {args.config!r} (speed only)[/]")
        report = run_live_bench(pack, label, args.clip, args.seconds, args.size, args.device, args.threads,
                                args.playout_delay, args.steps, log=lambda m: console.print(m),
                                adapt_steps=args.adapt_steps, adapt_seconds=args.adapt_seconds)
    return _write_report(args, report, plot_live, _print_live)


def _print(report: dict[str, Any]) -> None:
    m, c = report["machine"], report["config"]
    load = m["load_average"][0] if m.get("load_average") else float("nan")
    print(f"model {report['model']} | {c['streams']} stream(s), window {c['window']}, {c['steps']} {c['sampler']} "
          f"steps, guidance {c['guidance']:g}, {c['device']} | {m['cpu']} ({m['cpus_usable']} cpus, load "
          f"{load:.1f})" + (f" | {m['gpu']}" if m.get("gpu") else ""))
    for r in report["runs"]:
        w, f = r["window_latency"], r["first_frame_latency"]
        ratio = r.get("vs_torch_eager")
        extra = (f" | x{ratio['fps_ratio']:.2f} fps vs torch eager, max pixel diff {ratio['max_abs_pixel_diff']}"
                 if ratio else " | reference")
        th = r["threads"]
        threads = f"torch {th['torch']}" + (f", ort {th['onnxruntime']}" if th.get("onnxruntime") else "")
        print(f"  {r['backend']:<22} {r['fps']:7.2f} fps ({r['model_fps']:.2f} model only) | window p50 "
              f"{w['p50_ms']:.0f} p95 {w['p95_ms']:.0f} p99 {w['p99_ms']:.0f} ms | first frame p50 {f['p50_ms']:.0f} ms "
              f"| {r['peak_rss_mb']:.0f} MB RSS | threads {threads}{extra}")
        b = r["breakdown_ms"]
        print("      per window (ms): " + ", ".join(f"{k} {b[k]:.1f}" for k in PARTS))
