"""ONNX export of every network the engine runs per window, with a parity check.

One graph per network, not one graph per window: the sampler loop (step count,
sampler kind, classifier-free guidance), the landmark codec, the warps and the
compositing stay in Python and are shared by every backend, so a graph exported once
serves any sampler setting, and the first-frame step (N = 1) and the window step
(N = 8) run the same graph (`batch` and `frames` are dynamic axes). Graphs:

    whisper            mel (B,80,T) -> features (B,T/2,layers+1,width)
    stage1_condition   audio (B,N,La,F), vad (B,N), refs (B,K,ref_dim)
                       -> ctx (B,N,La+K,width)          (LandmarkNet.condition_tokens)
    stage1_denoiser    x (B,N,gen_dim), t (B,), ctx, c_v (B,N,cv_dim), flags (B,N)
                       -> out (B,N,gen_dim)             (trunk + control branch)
    stage1_head_condition, stage1_head_denoiser
                       the same two for head mode's stage 1 (`--region head`), when
                       the pack has one (c_v: the head-masked context, CONTEXT_DIM)
    stage2_condition   mel (B,N,16,80), ref (B,C,h,w) -> tokens (B,N,L,D)
    stage2_denoiser    x (B,C,N,h,w), t (B,), tokens, c_v (B,C,N,h,w), flags (B,N),
                       extra (B,E,N,h,w) -> out (B,C,N,h,w)
                       (U-Net + control branch + inpainting channels: one sampler step)
    ae_encoder         images (B,3,H,W) in [0,1] -> latents (B,32,H/8,W/8)
    ae_decoder         latents -> images in [0,1]

A warp-only pack (no stage 2) exports whisper and the stage-1 graphs only: nothing
else runs for it. Constants (`constants.safetensors`): the head-frame templates of the
landmark codecs (mouth and head mode) and stage 2's learned null tokens (classifier-free guidance). `t` is a
float input (the networks only use it through a sinusoidal embedding of `t.float()`),
which keeps int64 tensors out of the graphs for TensorRT's sake.

Parity is checked on REAL inputs: a real clip (default: the bundled sample) is
tracked and run through `engine.runner.PipelineRunner` on the torch pipeline (two
streams restarting, then one continuing, so batch 2 and 1, N = 1 and 8, with and
without a clean slot) while every network call is recorded; each recorded call is
then replayed on both torch and onnxruntime. Max abs errors go into the manifest.

Exported with the TorchScript-based exporter (`dynamo=False`): the dynamo exporter
needs onnxscript, which is not a dependency, and the traced graphs keep batch and
frame counts symbolic (the parity cases run other batch sizes and N = 1 to prove it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tccp.errors import TCCPError

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "DEFAULT_OPSET",
    "TOLERANCE",
    "GraphSpec",
    "graph_specs",
    "export_onnx",
    "export_graphs",
    "record_calls",
    "parity_inputs",
    "parity_check",
    "check_report",
    "pack_hash",
    "load_manifest",
    "ort_session",
    "ort_options",
]

EXPORT_FORMAT = "tccp-export"
EXPORT_VERSION = 3  # 2: landmark stage 1 + mouth stage 2 + Whisper (pack format 2); 3: + head-mode stage 1
DEFAULT_OPSET = 17  # LayerNormalization is native from 17; onnx 1.17 / ORT 1.31 run up to 22
MAX_OPSET = 20  # highest opset the TorchScript exporter emits that onnx<1.18 checks cleanly
TOLERANCE: dict[str, dict[str, float]] = {
    # max |onnxruntime - torch| <= atol + rtol * max |torch|, per graph and input case
    "fp32": {"atol": 1e-4, "rtol": 1e-3},
    "fp16": {"atol": 1e-2, "rtol": 3e-2},
}
MANIFEST = "manifest.json"
CONSTANTS = "constants.safetensors"


# --------------------------------------------------------------------------- graph modules
class _Graph(nn.Module):
    """Base of the graph wrappers: always in eval mode (the exporter restores the
    training flag of the module it is given, recursively, after tracing)."""

    def train(self, mode: bool = True) -> "_Graph":
        return super().train(False)


class WhisperGraph(_Graph):
    def __init__(self, whisper: nn.Module) -> None:
        super().__init__()
        self.whisper = whisper

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.whisper(mel)


class Stage1ConditionGraph(_Graph):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, audio: torch.Tensor, vad: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        return self.net.condition_tokens(audio, vad, refs)


class Stage1DenoiserGraph(_Graph):
    """One stage-1 call: the landmark trunk with its control branch."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, c_v: torch.Tensor,
                flags: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, ctx, c_v, flags)


class Stage2ConditionGraph(_Graph):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.conditions = model.conditions

    def forward(self, mel: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        return self.conditions(mel, ref)


class Stage2DenoiserGraph(_Graph):
    """One stage-2 sampler step: U-Net + control branch (+ the inpainting channels)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, c_v: torch.Tensor,
                flags: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, t, tokens, c_v, flags, extra)


class EncoderGraph(_Graph):
    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.encoder = autoencoder.encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)


class DecoderGraph(_Graph):
    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.decoder = autoencoder.decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents).clamp(0.0, 1.0)  # what TinyAutoencoder.decode returns


Dim = int | str


@dataclass
class GraphSpec:
    """One graph: its torch module, named inputs/outputs with symbolic dims, and the
    nominal size of each symbolic dim (tracing example; TensorRT's `opt` shape)
    with its (min, max) range for TensorRT profiles (`batch` and `frames` are set by
    the build)."""

    name: str
    module: nn.Module
    inputs: list[tuple[str, tuple[Dim, ...]]]
    outputs: list[tuple[str, tuple[Dim, ...]]]
    sizes: dict[str, int] = field(default_factory=dict)
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    time_input: str | None = None  # the input holding diffusion timesteps

    def concrete(self, shape: tuple[Dim, ...], **override: int) -> tuple[int, ...]:
        dims = {"batch": 2, "frames": 2, **self.sizes, **override}
        return tuple(dims[d] if isinstance(d, str) else int(d) for d in shape)

    def example(self) -> tuple[torch.Tensor, ...]:
        """Tracing inputs; batch and frames 2, so no size-1 broadcast is baked in."""
        g = torch.Generator().manual_seed(0)
        out = []
        for name, shape in self.inputs:
            x = torch.rand(self.concrete(shape), generator=g)
            out.append(x * 999.0 if name == self.time_input else x)
        return tuple(out)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {n: {i: d for i, d in enumerate(s) if isinstance(d, str)} for n, s in self.inputs + self.outputs}


def _crop_size(pipeline: Any) -> int:
    return int(pipeline.pack_config.get("crop_size") or pipeline.crop_size)


def _stage1_specs(prefix: str, net: nn.Module) -> list[GraphSpec]:
    """The condition and denoiser graphs of one `LandmarkNet` (mouth or head mode)."""
    c1 = net.cfg
    feat = c1.audio_layers * c1.audio_width
    return [
        GraphSpec(
            f"{prefix}_condition", Stage1ConditionGraph(net),
            [("audio", ("batch", "frames", c1.audio_tokens, feat)), ("vad", ("batch", "frames")),
             ("refs", ("batch", "refs", c1.ref_dim))],
            [("ctx", ("batch", "frames", "ctx_tokens", c1.width))],
            sizes={"refs": 4}, ranges={"refs": (1, 16)},
        ),
        GraphSpec(
            f"{prefix}_denoiser", Stage1DenoiserGraph(net),
            [("x", ("batch", "frames", c1.gen_dim)), ("t", ("batch",)),
             ("ctx", ("batch", "frames", "ctx_tokens", c1.width)), ("c_v", ("batch", "frames", c1.cv_dim)),
             ("flags", ("batch", "frames"))],
            [("out", ("batch", "frames", c1.gen_dim))],
            sizes={"ctx_tokens": c1.audio_tokens + 4},
            ranges={"ctx_tokens": (c1.audio_tokens + 1, c1.audio_tokens + 16)}, time_input="t",
        ),
    ]


def graph_specs(pipeline: Any) -> list[GraphSpec]:
    """The graphs of an `EditPipeline` (fp32 torch modules); see the module docstring."""
    from tccp.models.autoencoder import LATENT_CHANNELS

    specs: list[GraphSpec] = []
    wh = pipeline.whisper
    specs.append(GraphSpec(
        "whisper", WhisperGraph(wh), [("mel", ("batch", 80, "mel_frames"))],
        [("features", ("batch", "feature_frames", wh.n_layers + 1, wh.width))],
        sizes={"mel_frames": 300}, ranges={"mel_frames": (2, 3000)},
    ))
    specs += _stage1_specs("stage1", pipeline.stage1.net)
    head = getattr(pipeline, "stage1_head", None)
    if head is not None:
        specs += _stage1_specs("stage1_head", head.net)
    model = pipeline.stage2.model
    if model is None:  # warp-only pack: neither a denoiser nor the autoencoder ever runs
        return specs
    c2 = model.cfg
    c, s, d = c2.latent_channels, c2.latent_size, c2.cond_dim
    x0, y0, x1, y1 = pipeline.stage2.patch
    if (x1 - x0) != s * 8 or (y1 - y0) != s * 8:
        raise TCCPError(f"model pack: stage2 latent_size {s} does not match the {x1 - x0} px mouth patch "
                        f"of a {_crop_size(pipeline)} px crop")
    lat = ("batch", c, "frames", s, s)
    cond_in = [("mel", ("batch", "frames", c2.mel_frames, c2.mel_bins))]
    if c2.identity_tokens:
        cond_in.append(("ref", ("batch", c, s, s)))
    specs.append(GraphSpec("stage2_condition", Stage2ConditionGraph(model), cond_in,
                           [("tokens", ("batch", "frames", c2.cond_tokens, d))]))
    den_in = [("x", lat), ("t", ("batch",)), ("tokens", ("batch", "frames", c2.cond_tokens, d)), ("c_v", lat),
              ("flags", ("batch", "frames"))]
    if c2.extra_channels:
        den_in.append(("extra", ("batch", c2.extra_channels, "frames", s, s)))
    specs.append(GraphSpec("stage2_denoiser", Stage2DenoiserGraph(model), den_in, [("out", lat)], time_input="t"))
    ae = pipeline.stage2.autoencoder
    if ae is None:
        raise TCCPError("model pack: export needs the TAEF2 autoencoder (tccp/assets/taef2)")
    p = s * 8
    specs.append(GraphSpec("ae_encoder", EncoderGraph(ae), [("images", ("batch", 3, "height", "width"))],
                           [("latents", ("batch", LATENT_CHANNELS, "latent_height", "latent_width"))],
                           sizes={"height": p, "width": p}, ranges={"height": (p, p), "width": (p, p)}))
    specs.append(GraphSpec("ae_decoder", DecoderGraph(ae),
                           [("latents", ("batch", LATENT_CHANNELS, "latent_height", "latent_width"))],
                           [("images", ("batch", 3, "height", "width"))],
                           sizes={"latent_height": s, "latent_width": s},
                           ranges={"latent_height": (s, s), "latent_width": (s, s)}))
    return specs


# --------------------------------------------------------------------------- helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pack_hash(pack: str | os.PathLike) -> str:
    """sha256 over the pack's files and the TAEF2 and Whisper weights it runs with
    (the graphs contain them all), so an export can tell whether it still matches
    its source."""
    from tccp.media.whisper import WHISPER_DIR
    from tccp.models.autoencoder import ASSET_DIR

    folder = Path(pack)
    try:
        name = json.loads((folder / "config.json").read_text())["stage1"]["audio"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        name = "tiny.en"
    h = hashlib.sha256()
    files = [folder / "config.json", folder / "stage1.safetensors", folder / "stage2.safetensors",
             folder / "stage1_head.safetensors", ASSET_DIR / "encoder.safetensors", ASSET_DIR / "decoder.safetensors", WHISPER_DIR / f"{name}.safetensors"]
    for f in files:
        h.update(f.name.encode())
        h.update(_sha256(f).encode() if f.is_file() else b"missing")
    return h.hexdigest()


@contextlib.contextmanager
def _export_mode():
    """Tracing set-up: the TorchScript exporter warns about its own deprecation and
    about traced Python ints (the frame count used in reshapes), which the parity
    check makes moot, so the noise is silenced; `F.layer_norm` gets its normalised
    shape as plain ints (LandmarkNet normalises over `x.shape[-1:]`, which the tracer
    would otherwise keep symbolic, and the exporter refuses a symbolic LayerNorm
    shape; that last dim is a fixed width, so a constant is exact)."""
    import logging

    import torch.nn.functional as F

    layer_norm = F.layer_norm

    def static_layer_norm(x, normalized_shape, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        return layer_norm(x, tuple(int(d) for d in normalized_shape), *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        F.layer_norm = static_layer_norm
        try:
            # oneDNN only slows tracing down (it builds a kernel per traced conv shape)
            with torch.backends.mkldnn.flags(enabled=False):
                yield
        finally:
            F.layer_norm = layer_norm
            logging.getLogger("torch.onnx").setLevel(level)


# --------------------------------------------------------------------------- onnxruntime
# How sessions are threaded (see docs/export.md, "Threads"): measured on a shared
# 2-core machine, per-session thread pools that spin between calls were what made
# onnxruntime slower than torch at default threads. Every session of a process
# therefore shares ONE intra-op pool (as torch's OpenMP pool is shared by every
# module), sized like torch's, and its workers do not spin-wait after a call (the
# pipeline interleaves graph calls with torch and numpy work on the same cores).
ORT_SPIN = False


ORT_LEVELS = ("disable", "basic", "extended", "all")


def ort_options(threads: int | None = None, spin: bool | None = None, opt: str = "all") -> Any:
    """SessionOptions of every session this package creates (see ORT_SPIN); `opt`:
    graph optimisation level (disable, basic, extended, all)."""
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if opt not in levels:
        raise TCCPError(f"onnxruntime graph optimisation level {opt!r}: choose from {', '.join(ORT_LEVELS)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[opt]
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    spin = ORT_SPIN if spin is None else spin
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin else "0")
    return opts


def ort_session(path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                spin: bool | None = None, options: Any = None) -> Any:
    """An onnxruntime session: CUDA provider first when `device` is cuda and the
    installed onnxruntime has it; intra-op threads = torch's unless `threads`."""
    import onnxruntime as ort

    opts = options if options is not None else ort_options(threads, spin)
    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise TCCPError("--backend onnxruntime --device cuda: this onnxruntime has no CUDA provider "
                            "(pip install onnxruntime-gpu)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def load_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an export folder, checked (TCCPError naming the file if bad)."""
    from tccp.io_utils import read_descriptor

    path = Path(folder) / MANIFEST
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except ValueError:
            raw = None
        if isinstance(raw, dict) and raw.get("format") == EXPORT_FORMAT and raw.get("version") == 1:
            raise TCCPError(f"{path}: an export of a version 1 pack (sketch-latent stage 1); export the pack again")
    m = read_descriptor(path, EXPORT_FORMAT, EXPORT_VERSION, missing=f"{folder} is not a tccp export folder",
                        unreadable="export manifest", not_a="tccp export manifest", noun="export")
    for name, g in m.get("graphs", {}).items():
        if not (Path(folder) / g["file"]).is_file():
            raise TCCPError(f"{Path(folder) / g['file']}: graph {name} listed in the manifest is missing")
    return m


# --------------------------------------------------------------------------- export
def export_graphs(pipeline: Any, out: Path, opset: int = DEFAULT_OPSET, fp16: bool = False,
                  only: Any = None) -> dict[str, Any]:
    """Write every graph of `pipeline` (fp32 torch; `only`: a subset of graph names)
    into `out`; returns the manifest entries."""
    import onnx

    if not 14 <= opset <= MAX_OPSET:
        raise TCCPError(f"--opset {opset}: supported range is 14..{MAX_OPSET} (onnx {onnx.__version__})")
    graphs: dict[str, Any] = {}
    for spec in graph_specs(pipeline):
        if only is not None and spec.name not in only:
            continue
        path = out / f"{spec.name}.onnx"
        t0 = time.perf_counter()
        with _export_mode(), torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                spec.module.eval(), spec.example(), str(path), dynamo=False, opset_version=opset,
                input_names=[n for n, _ in spec.inputs], output_names=[n for n, _ in spec.outputs],
                dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
            )
        model = onnx.load(str(path))
        if fp16:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            # weights and activations in fp16, graph inputs/outputs stay fp32, so every
            # backend feeds the same tensors whatever the precision
            model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
            _toposort(model.graph)  # the converter appends its input casts at the end
            onnx.save(model, str(path))
        onnx.checker.check_model(model)
        graphs[spec.name] = {
            "file": path.name,
            "sha256": _sha256(path),
            "bytes": path.stat().st_size,
            "inputs": [{"name": n, "shape": list(s), "dtype": "float32"} for n, s in spec.inputs],
            "outputs": [{"name": n, "shape": list(s), "dtype": "float32"} for n, s in spec.outputs],
            "sizes": dict(spec.sizes),
            "ranges": {k: list(v) for k, v in spec.ranges.items()},
            "export_s": round(time.perf_counter() - t0, 2),
        }
    return graphs


def _toposort(graph: Any) -> None:
    """Reorder graph.node topologically in place (ONNX requires it; Kahn's order,
    stable with respect to the original order)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise RuntimeError("ONNX graph has a cycle or a dangling input")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _save_constants(pipeline: Any, path: Path) -> list[str]:
    from safetensors.numpy import save_file

    consts = {"stage1.template": np.ascontiguousarray(pipeline.stage1.codec.template, np.float32)}
    head = getattr(pipeline, "stage1_head", None)
    if head is not None:
        consts["stage1_head.template"] = np.ascontiguousarray(head.codec.template, np.float32)
    model = pipeline.stage2.model
    if model is not None:
        with torch.no_grad():
            consts["stage2.null"] = model.null_conditions(1, 1)[0, 0].detach().float().cpu().numpy()
    save_file(consts, str(path))
    return sorted(consts)


def export_onnx(
    pack: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    parity: bool = True,
    parity_clip: Any = None,
    source_label: str | None = None,
    build: Any = None,
    log: Any = None,
) -> dict[str, Any]:
    """Export a model pack to `out_dir` (written atomically) and check parity.

    `parity_clip`: a video with a face and speech (path) or an `export.realdata.RealClip`
    for the real-input parity check (default: the first 32 frames of the bundled
    sample). `build(tmp_dir, manifest, pipeline, cases)` runs inside the temp folder
    before the manifest is written (the TensorRT step; cases is None without parity),
    so a failed build leaves nothing behind. Raises TCCPError when parity fails."""
    import onnx

    from tccp.io_utils import atomic_dir
    from tccp.pack import load_pack

    say = log or (lambda msg: None)
    pack = Path(pack)
    pipe = load_pack(pack, device="cpu", dtype=torch.float32)  # with its head-mode stage 1, if any
    precision = "fp16" if fp16 else "fp32"
    crop = _crop_size(pipe)
    manifest: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "kind": "onnx",
        "opset": int(opset),
        "precision": precision,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": _ort_version()},
        "source": {"pack": source_label or str(pack.resolve()), "hash": pack_hash(pack)},
        "pack_config": pipe.pack_config,
        "crop_size": crop,
        "stage2": pipe.stage2.model is not None,
        "stage1_head": pipe.stage1_head is not None,
        "frames": int(pipe.stage1.net.cfg.frames),
        "whisper": {"layers": int(pipe.whisper.n_layers), "width": int(pipe.whisper.width),
                    "heads": int(pipe.whisper.heads)},
        "dynamic_axes": ["batch", "frames", "mel_frames", "refs", "height", "width"],
        "tolerance": {**TOLERANCE[precision], "rule": "max|onnxruntime - torch| <= atol + rtol * max|torch| per graph and case"},
    }
    with atomic_dir(Path(out_dir)) as tmp:
        say(f"exporting {precision} graphs (opset {opset})")
        manifest["graphs"] = export_graphs(pipe, tmp, opset=opset, fp16=fp16)
        manifest["constants"] = {"file": CONSTANTS, "keys": _save_constants(pipe, tmp / CONSTANTS)}
        cases = None
        if parity:
            clip = _parity_clip(parity_clip, crop)
            say(f"parity check on {clip.n} real frames of {clip.name}")
            cases = parity_inputs(pipe, clip)
            report = parity_check(tmp, pipe, cases, manifest["graphs"], TOLERANCE[precision])
            report["clip"], report["frames"] = clip.name, clip.n
            manifest["parity"] = report
            check_report(report, out_dir, "onnxruntime")
        if build is not None:
            build(tmp, manifest, pipe, cases)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _parity_clip(clip: Any, size: int) -> Any:
    from export.realdata import RealClip, load_real_clip, sample_clip

    if clip is None:
        return sample_clip(32, size)
    if isinstance(clip, RealClip):
        if clip.size != size:
            raise TCCPError(f"parity clip cut at {clip.size} px; the pack runs at {size} px")
        return clip
    return load_real_clip(clip, frames=32, size=size)


def check_report(report: dict[str, Any], where: Any, runtime: str) -> None:
    """TCCPError listing every graph whose parity error is above its bound."""
    if not report["passed"]:
        bad = [f"{n} ({g['max_abs']:.3g} > {g['bound']:.3g})" for n, g in report["graphs"].items() if not g["passed"]]
        raise TCCPError(f"{where}: {runtime} disagrees with torch above tolerance: {', '.join(bad)}")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# --------------------------------------------------------------------------- parity
@contextlib.contextmanager
def record_calls(pipeline: Any):
    """Record the inputs of every network call of a torch `EditPipeline` while the
    block runs: yields {graph name: [tuple of tensors, ...]} in the graphs' input order."""
    calls: dict[str, list[tuple]] = {}
    hooks = []

    def keep(name: str, args: tuple, n: int) -> None:
        calls.setdefault(name, []).append(tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args[:n]))

    def pre(name: str, n: int):  # noqa: ANN202
        return lambda module, args: keep(name, args, n)

    hooks.append(pipeline.whisper.register_forward_pre_hook(pre("whisper", 1)))
    nets = [("stage1", pipeline.stage1.net)]
    if getattr(pipeline, "stage1_head", None) is not None:
        nets.append(("stage1_head", pipeline.stage1_head.net))

    def conditions(prefix: str, original):  # noqa: ANN001, ANN202
        def condition_tokens(audio, vad, refs, drop_audio=None):  # noqa: ANN001, ANN202
            keep(f"{prefix}_condition", (audio, vad, refs), 3)
            return original(audio, vad, refs, drop_audio)
        return condition_tokens

    for prefix, net in nets:
        hooks.append(net.register_forward_pre_hook(pre(f"{prefix}_denoiser", 5)))
        net.condition_tokens = conditions(prefix, net.condition_tokens)
    model = pipeline.stage2.model
    if model is not None:
        n_cond = 2 if model.cfg.identity_tokens else 1
        hooks.append(model.conditions.register_forward_pre_hook(pre("stage2_condition", n_cond)))
        hooks.append(model.register_forward_pre_hook(pre("stage2_denoiser", 6 if model.cfg.extra_channels else 5)))
        ae = pipeline.stage2.autoencoder
        hooks.append(ae.encoder.register_forward_pre_hook(pre("ae_encoder", 1)))
        hooks.append(ae.decoder.register_forward_pre_hook(pre("ae_decoder", 1)))
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()
        for _, net in nets:
            del net.condition_tokens


@torch.inference_mode()
def parity_inputs(pipeline: Any, clip: Any, steps: int = 2, max_cases: int = 3) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per graph, up to `max_cases` input cases of distinct shapes, recorded from a
    real run of the engine's runner on `clip` with the torch pipeline: two streams
    restarting (first-frame step N = 1, then a window whose slot 0 is clean), then
    the first stream continuing alone (batch 1); Whisper as a live session calls it
    (up to the last 2 s of audio) and on a batch of two 0.5 s segments."""
    from engine.features import full_features_unpadded
    from engine.runner import PipelineRunner, SessionRefs
    from export.realdata import window_request
    from tccp.media.whisper import whisper_log_mel

    window = 8
    new = window - 1
    if clip.n < 4 * new:
        raise TCCPError(f"{clip.name}: parity needs at least {4 * new} frames, the clip has {clip.n}")
    runner = PipelineRunner(pipeline, size=clip.size)
    from tccp.models.landmarks import audio_radius

    tokens = clip.tokens(pipeline.whisper, radius=audio_radius(pipeline.stage1.net.cfg))
    bank = clip.bank(pipeline.template)
    refs = [SessionRefs(bank), SessionRefs(bank)]
    sr = clip.sr
    with record_calls(pipeline) as calls:
        full_features_unpadded(pipeline.whisper, clip.audio[: 2 * sr])
        half = sr // 2
        pipeline.whisper(torch.stack([whisper_log_mel(clip.audio[k * half:(k + 1) * half]) for k in range(2)]))
        starts = (0, 2 * new)
        reqs = [window_request(clip, slice(s, s + new), refs[k], tokens=tokens[s:s + new], steps=steps, seed=k)
                for k, s in enumerate(starts)]
        res = runner.run_batch(reqs)
        s = new
        runner.run_batch([window_request(clip, slice(s, s + new), refs[0], res[0].state, tokens=tokens[s:s + new],
                                         steps=steps, seed=0)])
        if getattr(pipeline, "stage1_head", None) is not None:
            _head_calls(pipeline.stage1_head, clip, tokens, new, steps)
    specs = {sp.name: sp for sp in graph_specs(pipeline)}
    cases: dict[str, list[dict[str, np.ndarray]]] = {}
    for name, spec in specs.items():
        seen: set = set()
        for args in calls.get(name, []):
            key = tuple(tuple(a.shape) for a in args)
            if key in seen or len(cases.get(name, [])) >= max_cases:
                continue
            seen.add(key)
            case = {}
            for (inp, _), a in zip(spec.inputs, args):
                case[inp] = np.ascontiguousarray(a.detach().float().cpu().numpy(), np.float32)
            cases.setdefault(name, []).append(case)
        if name not in cases:
            raise TCCPError(f"parity: the pipeline never called {name} on {clip.name}")
    return cases


def _head_calls(gen: Any, clip: Any, tokens: np.ndarray, new: int, steps: int) -> None:
    """Head mode's stage 1 on the clip as a head-region session calls it: its c_v, the
    head-masked context of each frame (`tccp.face.context`, as `tccp prepare` and the
    session make it), references from the clip; a first-frame step (N = 1) and a window
    for two streams, then one stream's next window."""
    from tccp.data.landmarks import reference_frames
    from tccp.face import geometry as fg
    from tccp.face import headframe as hf
    from tccp.face.context import context_tokens, masked_context

    n = 3 * new + 1
    cv = context_tokens(np.stack([masked_context(clip.frames[k], clip.landmarks[k], fg.context_box(clip.landmarks[k]),
                                                 clip.size) for k in range(n)])).astype(np.float32)
    heads, pose = hf.to_head(clip.meshes[:n], gen.codec.template)
    idx = reference_frames(heads, 4)
    refs = gen.references(heads[idx], pose.params(clip.size)[idx])
    tok, vad = tokens[:n].astype(np.float32), clip.vad[:n].astype(np.float32)
    w = new + 1
    starts = (0, 2 * new)
    pick = lambda a, hi: np.stack([a[s:s + hi] for s in starts])  # noqa: E731
    first = gen.window(pick(tok, 1), pick(vad, 1), pick(cv, 1), [refs, refs], None, seed=[0, 1], steps=steps)
    x = gen.window(pick(tok, w), pick(vad, w), pick(cv, w), [refs, refs], first[:, 0], seed=[0, 1], steps=steps)
    gen.window(tok[None, new:new + w], vad[None, new:new + w], cv[None, new:new + w], [refs], x[:1, new], seed=0,
               steps=steps)


def _ort_runner(folder: Path, entry: dict[str, Any]) -> Any:
    sess = ort_session(folder / entry["file"])
    return lambda case: sess.run(None, case)[0]


@torch.inference_mode()
def parity_check(
    folder: str | os.PathLike,
    pipeline: Any,
    cases: dict[str, list[dict[str, np.ndarray]]],
    graphs: dict[str, Any] | None = None,
    tolerance: dict[str, float] | None = None,
    runner: Any = None,
) -> dict[str, Any]:
    """Run every graph of an export folder and its torch module on the same real
    input cases (`parity_inputs`); report max abs error against the tolerance bound.
    `runner(folder, entry)` returns a callable `case dict -> numpy output` (default:
    onnxruntime on CPU)."""
    folder = Path(folder)
    graphs = graphs if graphs is not None else load_manifest(folder)["graphs"]
    tol = tolerance or TOLERANCE["fp32"]
    modules = {s.name: s.module.eval() for s in graph_specs(pipeline)}
    runner = runner or _ort_runner
    report: dict[str, Any] = {"tolerance": dict(tol), "graphs": {}, "passed": True}
    for name, entry in graphs.items():
        if name not in cases:
            raise TCCPError(f"parity: no input cases for graph {name}")
        run = runner(folder, entry)
        worst_err, worst_bound, out = 0.0, 0.0, []
        ok = True
        for case in cases[name]:
            args = [torch.from_numpy(case[i["name"]]) for i in entry["inputs"]]
            ref = modules[name](*args).float().numpy()
            got = run(case)
            err = float(np.abs(got.astype(np.float64) - ref).max()) if got.shape == ref.shape else float("inf")
            bound = tol["atol"] + tol["rtol"] * float(np.abs(ref).max())
            ok &= err <= bound
            out.append({"shapes": {k: list(v.shape) for k, v in case.items()}, "max_abs": err, "bound": bound})
            if err - bound > worst_err - worst_bound or len(out) == 1:
                worst_err, worst_bound = err, bound
        report["graphs"][name] = {"max_abs": worst_err, "bound": worst_bound, "passed": bool(ok), "cases": out}
        report["passed"] &= bool(ok)
    report["passed"] = bool(report["passed"])
    return report
