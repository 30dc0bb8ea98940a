"""ONNX export of every network the engine runs per window, with a parity check.

One graph per network, not one graph per window: the sampler loop (step count,
sampler kind, classifier-free guidance) stays in Python and is shared by every
backend, so a graph exported once serves any sampler setting, and the first-frame
step (N = 1) and the window step (N = 8) run the same graph (`batch` and `frames` are
dynamic axes). Graphs:

    stage{1,2}_denoiser  x (B,C,N,h,w), t (B,) float, cond_tokens (B,N,L,D),
                         c_v (B,C,N,h,w), flags (B,N) -> eps (B,C,N,h,w)
                         (U-Net + control branch: one sampler step)
    stage{1,2}_audio     mel (B,N,16,80) -> audio_tokens (B,N,La,D)
    stage{1,2}_identity  ref (B,C,h,w) -> identity_tokens (B,Li,D)
    ae_encoder           images (B,3,S,S) in [0,1] -> latents (B,32,S/8,S/8)
    ae_decoder           latents -> images (B,3,S,S) in [0,1]

The learned null tokens of classifier-free guidance are constants, not graphs
(`constants.safetensors`). `t` is a float input (the network only ever uses it through
a sinusoidal embedding of `t.float()`), which keeps int64 tensors out of the graphs
for TensorRT's sake.

Exported with the TorchScript-based exporter (`dynamo=False`): the dynamo exporter
needs onnxscript, which is not a dependency, and the traced graphs already keep
batch and frame counts symbolic (the parity check runs other batch sizes and N = 1 to
prove it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tccp.errors import TCCPError

__all__ = [
    "EXPORT_FORMAT",
    "DEFAULT_OPSET",
    "TOLERANCE",
    "GraphSpec",
    "graph_specs",
    "export_onnx",
    "export_graphs",
    "parity_inputs",
    "parity_check",
    "check_report",
    "pack_hash",
    "load_manifest",
    "ort_session",
]

EXPORT_FORMAT = "tccp-export"
EXPORT_VERSION = 1
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
class DenoiserGraph(nn.Module):
    """One sampler step of one stage: U-Net with its control branch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond_tokens: torch.Tensor, c_v: torch.Tensor,
                flags: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, cond_tokens, c_v, flags)


class AudioGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.audio = model.conditions.audio

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.audio(mel)


class IdentityGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.identity = model.conditions.identity

    def forward(self, ref: torch.Tensor) -> torch.Tensor:
        return self.identity(ref)


class EncoderGraph(nn.Module):
    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.encoder = autoencoder.encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)


class DecoderGraph(nn.Module):
    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.decoder = autoencoder.decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents).clamp(0.0, 1.0)  # what TinyAutoencoder.decode returns


@dataclass
class GraphSpec:
    name: str
    module: nn.Module
    inputs: list[tuple[str, tuple[int | str, ...]]]  # symbolic dims: "batch", "frames"
    outputs: list[tuple[str, tuple[int | str, ...]]]

    def example(self, batch: int = 2, frames: int = 2) -> tuple[torch.Tensor, ...]:
        """Tracing inputs; batch and frames > 1 so no size-1 broadcast is baked in."""
        g = torch.Generator().manual_seed(0)
        dims = {"batch": batch, "frames": frames}
        out = []
        for name, shape in self.inputs:
            concrete = tuple(dims.get(d, d) if isinstance(d, str) else d for d in shape)
            x = torch.rand(concrete, generator=g)
            out.append(x * 999.0 if name == "t" else x)
        return tuple(out)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {n: {i: d for i, d in enumerate(s) if isinstance(d, str)} for n, s in self.inputs + self.outputs}


def graph_specs(pipeline: Any) -> list[GraphSpec]:
    """The graphs of a `TCCPPipeline` (fp32 torch modules) at its pack's crop size."""
    specs: list[GraphSpec] = []
    size = int(pipeline.pack_config.get("crop_size") or pipeline.stage1.cfg.latent_size * 8)
    for k, model in ((1, pipeline.stage1), (2, pipeline.stage2)):
        cfg = model.cfg
        c, s, d = cfg.latent_channels, cfg.latent_size, cfg.cond_dim
        if s * 8 != size:
            raise TCCPError(f"model pack: stage{k} latent_size {s} does not match crop size {size}")
        lat = ("batch", c, "frames", s, s)
        specs.append(GraphSpec(
            f"stage{k}_denoiser", DenoiserGraph(model),
            [("x", lat), ("t", ("batch",)), ("cond_tokens", ("batch", "frames", cfg.cond_tokens, d)),
             ("c_v", lat), ("flags", ("batch", "frames"))],
            [("eps", lat)],
        ))
        specs.append(GraphSpec(
            f"stage{k}_audio", AudioGraph(model), [("mel", ("batch", "frames", cfg.mel_frames, cfg.mel_bins))],
            [("audio_tokens", ("batch", "frames", cfg.audio_tokens, d))],
        ))
        if cfg.identity_tokens:
            specs.append(GraphSpec(
                f"stage{k}_identity", IdentityGraph(model), [("ref", ("batch", c, s, s))],
                [("identity_tokens", ("batch", cfg.identity_tokens, d))],
            ))
    if pipeline.autoencoder is None:
        raise TCCPError("model pack: export needs the TAEF2 autoencoder (tccp/assets/taef2)")
    from tccp.models.autoencoder import DOWNSCALE, LATENT_CHANNELS

    h = size // DOWNSCALE
    specs.append(GraphSpec("ae_encoder", EncoderGraph(pipeline.autoencoder), [("images", ("batch", 3, size, size))],
                           [("latents", ("batch", LATENT_CHANNELS, h, h))]))
    specs.append(GraphSpec("ae_decoder", DecoderGraph(pipeline.autoencoder), [("latents", ("batch", LATENT_CHANNELS, h, h))],
                           [("images", ("batch", 3, size, size))]))
    return specs


# --------------------------------------------------------------------------- helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pack_hash(pack: str | os.PathLike) -> str:
    """sha256 over the pack's files and the TAEF2 weights (the graphs contain both), so
    an export can tell whether it still matches its source."""
    from tccp.models.autoencoder import ASSET_DIR

    folder = Path(pack)
    h = hashlib.sha256()
    files = [folder / "config.json", folder / "stage1.safetensors", folder / "stage2.safetensors",
             ASSET_DIR / "encoder.safetensors", ASSET_DIR / "decoder.safetensors"]
    for f in files:
        h.update(f.name.encode())
        h.update(_sha256(f).encode() if f.is_file() else b"missing")
    return h.hexdigest()


@contextlib.contextmanager
def _quiet_export():
    """The TorchScript exporter warns about its own deprecation and about traced
    Python ints (the frame count used in reshapes); the parity check is what proves
    the graphs right, so the noise is silenced."""
    import logging

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            # oneDNN only slows tracing down (it builds a kernel per traced conv shape)
            with torch.backends.mkldnn.flags(enabled=False):
                yield
        finally:
            logging.getLogger("torch.onnx").setLevel(level)


def ort_session(path: str | os.PathLike, device: str = "cpu", threads: int | None = None) -> Any:
    """An onnxruntime session: CUDA provider first when `device` is cuda and the
    installed onnxruntime has it; intra-op threads = torch's (fair comparisons)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
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
        spec.module.eval()
        t0 = time.perf_counter()
        with _quiet_export(), torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                spec.module, spec.example(), str(path), dynamo=False, opset_version=opset,
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

    consts = {}
    for k, model in ((1, pipeline.stage1), (2, pipeline.stage2)):
        c = model.conditions
        consts[f"stage{k}.null_audio"] = c.null_audio.detach().float().cpu().numpy()
        if c.identity is not None:
            consts[f"stage{k}.null_identity"] = c.null_identity.detach().float().cpu().numpy()
    save_file(consts, str(path))
    return sorted(consts)


def export_onnx(
    pack: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    parity: bool = True,
    parity_clip: str | os.PathLike | None = None,
    source_label: str | None = None,
    build: Any = None,
    log: Any = None,
) -> dict[str, Any]:
    """Export a model pack to `out_dir` (written atomically) and check parity.

    `parity_clip`: a prepared clip folder for the real-input parity check (default: a
    short prepared piece of the bundled sample). `build(tmp_dir, manifest, pipeline,
    clip)` runs inside the temp folder before the manifest is written (the TensorRT
    step; clip is None without parity), so a failed build leaves nothing behind. Raises TCCPError when parity fails."""
    import onnx

    from tccp.io_utils import atomic_dir
    from tccp.pack import load_pack

    say = log or (lambda msg: None)
    pack = Path(pack)
    pipe = load_pack(pack, device="cpu", dtype=torch.float32)
    precision = "fp16" if fp16 else "fp32"
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
        "crop_size": int(pipe.pack_config.get("crop_size") or pipe.stage1.cfg.latent_size * 8),
        "frames": int(pipe.stage1.cfg.frames),
        "dynamic_axes": ["batch", "frames"],
        "tolerance": {**TOLERANCE[precision], "rule": "max|onnxruntime - torch| <= atol + rtol * max|torch| per graph and case"},
    }
    with atomic_dir(Path(out_dir)) as tmp:
        say(f"exporting {precision} graphs (opset {opset})")
        manifest["graphs"] = export_graphs(pipe, tmp, opset=opset, fp16=fp16)
        manifest["constants"] = {"file": CONSTANTS, "keys": _save_constants(pipe, tmp / CONSTANTS)}
        clip = None
        if parity:
            from export.realdata import load_real_clip, sample_clip

            clip = load_real_clip(parity_clip) if parity_clip else sample_clip(16, manifest["crop_size"])
            say(f"parity check on {clip.n} real frames of {clip.name}")
            report = parity_check(tmp, pipe, clip, manifest["graphs"], TOLERANCE[precision])
            manifest["parity"] = report
            check_report(report, out_dir, "onnxruntime")
        if build is not None:
            build(tmp, manifest, pipe, clip)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_report(report: dict[str, Any], where: Any, runtime: str) -> None:
    """TCCPError listing every graph whose parity error is above its bound."""
    if not report["passed"]:
        bad = [f"{n} ({g['max_abs']:.3g} > {g['bound']:.3g})" for n, g in report["graphs"].items() if not g["passed"]]
        raise TCCPError(f"{where}: {runtime} disagrees with torch above tolerance: {', '.join(bad)}")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# --------------------------------------------------------------------------- parity
@torch.inference_mode()
def parity_inputs(pipeline: Any, clip: Any, seed: int = 0) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per graph, input cases built from a real prepared clip (torch fp32 computes the
    intermediate tensors): a window batch of 2 (two consecutive windows, one with a
    clean conditioning slot) and a one-frame first-frame batch of 1."""
    from einops import rearrange

    from tccp.diffusion.schedule import Schedule

    ae = pipeline.autoencoder
    cfg = pipeline.stage1.cfg
    n = cfg.frames
    if clip.n < 2 * n:
        raise TCCPError(f"{clip.name}: parity needs at least {2 * n} frames, the clip has {clip.n}")
    norm = pipeline.norm
    schedule: Schedule = pipeline.schedule
    g = torch.Generator().manual_seed(seed)

    def images(x: np.ndarray) -> torch.Tensor:
        return rearrange(torch.from_numpy(np.ascontiguousarray(x)), "b h w c -> b c h w").float() / 255.0

    def windows(lat: torch.Tensor) -> torch.Tensor:  # (2n, C, h, w) -> (2, C, n, h, w) in model space
        return norm.to_model(rearrange(lat[: 2 * n], "(b n) c h w -> b c n h w", b=2))

    faces_img = images(clip.faces[: 2 * n])
    face_lat = ae.encoder(faces_img)
    ctx_lat = ae.encoder(images(clip.contexts[: 2 * n]))
    sk_lat = ae.encoder(images(clip.sketches[: 2 * n]))
    ref = norm.to_model(ae.encoder(images(np.stack([clip.identity, clip.faces[0]]))))
    mel = torch.from_numpy(clip.mel[: 2 * n]).float()
    mel_w = rearrange(mel, "(b n) t f -> b n t f", b=2)

    cases: dict[str, list[dict[str, np.ndarray]]] = {
        "ae_encoder": [{"images": faces_img[:n].numpy()}, {"images": images(clip.contexts[:1]).numpy()}],
        "ae_decoder": [{"latents": face_lat[:n].numpy()}, {"latents": sk_lat[:1].numpy()}],
    }
    for k, model, target, cond in ((1, pipeline.stage1, sk_lat, ctx_lat), (2, pipeline.stage2, face_lat, sk_lat)):
        cases[f"stage{k}_audio"] = [{"mel": mel_w.numpy()}, {"mel": mel_w[:1, :1].numpy()}]
        if model.conditions.identity is not None:
            cases[f"stage{k}_identity"] = [{"ref": ref.numpy()}, {"ref": ref[:1].numpy()}]
        x0, c_v = windows(target), windows(cond)
        t = torch.tensor([999.0, 250.0])
        noise = torch.randn(x0.shape, generator=g)
        x_t = schedule.q_sample(x0, t.long(), noise)
        flags = torch.zeros(2, n)
        flags[0, 0] = 1.0  # window 0 has its clean conditioning slot, as in the engine
        x_t[0, :, 0] = x0[0, :, 0]
        tokens = model.encode_conditions(mel_w, ref)
        first_x = torch.randn((1,) + x0.shape[1:2] + (1,) + x0.shape[3:], generator=g)
        cases[f"stage{k}_denoiser"] = [
            {"x": x_t.numpy(), "t": t.numpy(), "cond_tokens": tokens.numpy(), "c_v": c_v.numpy(), "flags": flags.numpy()},
            {"x": first_x.numpy(), "t": np.array([999.0], np.float32),
             "cond_tokens": model.encode_conditions(mel_w[:1, :1], ref[:1]).numpy(),
             "c_v": c_v[:1, :, :1].numpy(), "flags": np.zeros((1, 1), np.float32)},
        ]
    return {name: [{k: np.ascontiguousarray(v, np.float32) for k, v in case.items()} for case in cs]
            for name, cs in cases.items()}


def _ort_runner(folder: Path, entry: dict[str, Any]) -> Any:
    sess = ort_session(folder / entry["file"])
    return lambda case: sess.run(None, case)[0]


@torch.inference_mode()
def parity_check(
    folder: str | os.PathLike,
    pipeline: Any,
    clip: Any,
    graphs: dict[str, Any] | None = None,
    tolerance: dict[str, float] | None = None,
    runner: Any = None,
) -> dict[str, Any]:
    """Run every graph of an export folder and its torch module on the same real
    inputs; report max abs error against the tolerance bound. `runner(folder, entry)`
    returns a callable `case dict -> numpy output` (default: onnxruntime on CPU)."""
    folder = Path(folder)
    graphs = graphs if graphs is not None else load_manifest(folder)["graphs"]
    tol = tolerance or TOLERANCE["fp32"]
    modules = {s.name: s.module.eval() for s in graph_specs(pipeline)}
    inputs = parity_inputs(pipeline, clip)
    runner = runner or _ort_runner
    report: dict[str, Any] = {"clip": clip.name, "frames": clip.n, "tolerance": dict(tol), "graphs": {}, "passed": True}
    for name, entry in graphs.items():
        run = runner(folder, entry)
        worst_err, worst_bound, cases = 0.0, 0.0, []
        ok = True
        for case in inputs[name]:
            ref = modules[name](*(torch.from_numpy(case[i["name"]]) for i in entry["inputs"])).float().numpy()
            got = run(case)
            err = float(np.abs(got.astype(np.float64) - ref).max())
            bound = tol["atol"] + tol["rtol"] * float(np.abs(ref).max())
            ok &= err <= bound and got.shape == ref.shape
            cases.append({"shapes": {k: list(v.shape) for k, v in case.items()}, "max_abs": err, "bound": bound})
            if err - bound > worst_err - worst_bound or not cases[:-1]:
                worst_err, worst_bound = err, bound
        report["graphs"][name] = {"max_abs": worst_err, "bound": worst_bound, "passed": bool(ok), "cases": cases}
        report["passed"] &= bool(ok)
    report["passed"] = bool(report["passed"])
    return report
