"""Runtime backends behind one small interface, and the seam that lets the unchanged
`tccp.pipeline.TCCPPipeline` (and so the engine) run on any of them.

The interface is per network, not per window: the sampler loop, classifier-free
guidance, latent normalisation and the first-frame/window logic stay in the pipeline
and are shared, so backends can only differ in how fast (and how precisely) they
evaluate the networks. Tensors cross the interface as float32 torch tensors on the
backend's device; a backend may compute in lower precision inside.

    backend = get_backend("onnxruntime", pack, device="cpu")
    pipe = backend_pipeline(backend)          # a TCCPPipeline; engine.runner runs it as is
    # or in one call: pipe = load_pipeline(pack, backend="onnxruntime")

The seam needs no change to the pipeline: `BackendStage` is an `nn.Module` with the
surface of `MVControlNet` the pipeline uses (call, `encode_conditions`,
`null_conditions`, `cfg`) and `BackendAutoencoder` has the surface of TAEF2's
`TinyAutoencoder` (`encode`, `decode`, `encode_images`, `decode_latents`). Both carry
a zero-size parameter so code that reads a module's device/dtype from its parameters
(the pipeline, the engine's per-stage timers) keeps working.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from einops import rearrange, repeat
from torch import nn

from tccp.errors import TCCPError

__all__ = [
    "BACKENDS",
    "Backend",
    "TorchBackend",
    "OnnxRuntimeBackend",
    "TensorRTBackend",
    "BackendStage",
    "BackendAutoencoder",
    "get_backend",
    "backend_pipeline",
    "load_pipeline",
    "export_dir_for",
]

BACKENDS = ("torch", "onnxruntime", "tensorrt")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@runtime_checkable
class Backend(Protocol):
    """What the pipeline needs from a runtime, one method per network."""

    name: str
    device: torch.device
    pack_config: dict[str, Any]  # the source pack's config.json (stage configs, sampler, norm)

    def denoise_stage1(self, x: torch.Tensor, t: torch.Tensor, cond_tokens: torch.Tensor,
                       c_v: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """One stage-1 U-Net + control branch call: (B,C,N,h,w) -> eps (B,C,N,h,w)."""

    def denoise_stage2(self, x: torch.Tensor, t: torch.Tensor, cond_tokens: torch.Tensor,
                       c_v: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """Same for stage 2."""

    def encode_conditions(self, stage: int, mel: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
        """c_l of a stage: mel (B,N,16,80), ref latent (B,C,h,w) or None -> (B,N,L,D)."""

    def null_conditions(self, stage: int, batch: int, frames: int) -> torch.Tensor:
        """The unconditional c_l of classifier-free guidance: (B,N,L,D)."""

    def ae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """TAEF2 encoder: (B,3,S,S) in [0,1] -> (B,32,S/8,S/8)."""

    def ae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """TAEF2 decoder: (B,32,h,w) -> (B,3,8h,8w) in [0,1]."""


def _stage_cfg(pack_config: dict[str, Any], stage: int) -> Any:
    from tccp.models.config import MVConfig

    return MVConfig.from_dict(pack_config[f"stage{stage}"])


# --------------------------------------------------------------------------- torch
class _CudaGraphed:
    """Replays one captured CUDA graph per input shape (the engine's shapes are few
    and fixed: window and first-frame, per batch size), which removes the per-kernel
    launch cost that dominates small models at batch 1. Inputs are copied into the
    captured static buffers; the output is cloned before the next replay reuses it."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.graphs: dict[tuple, tuple[Any, list[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        entry = self.graphs.get(key)
        if entry is None:
            static = [a.clone() for a in args]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up allocations outside the capture
                    self.fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.fn(*static)
            entry = self.graphs[key] = (graph, static, out)
        graph, static, out = entry
        for buf, a in zip(static, args):
            buf.copy_(a)
        graph.replay()
        return out.clone()


class TorchBackend:
    """Eager PyTorch (the reference), optionally in fp16/bf16 with torch.compile and/or
    CUDA graphs on GPU. The pipeline's sampler arithmetic stays fp32 whatever the
    network precision: only the network calls are cast."""

    name = "torch"

    def __init__(self, pipeline: Any, device: str | torch.device = "cpu", precision: str = "fp32",
                 compile: bool = False, cuda_graphs: bool = False) -> None:
        if precision not in _DTYPES:
            raise TCCPError(f"--precision {precision}: choose from {', '.join(_DTYPES)}")
        self.device = torch.device(device)
        if cuda_graphs and self.device.type != "cuda":
            raise TCCPError("--cuda-graphs needs --device cuda")
        self.dtype = _DTYPES[precision]
        self.precision = precision
        self.pack_config = dict(pipeline.pack_config)
        self.models = {1: pipeline.stage1.to(self.device, self.dtype).eval(),
                       2: pipeline.stage2.to(self.device, self.dtype).eval()}
        self.autoencoder = pipeline.autoencoder.to(self.device, self.dtype) if pipeline.autoencoder else None
        self.compiled = compile
        self.cuda_graphs = cuda_graphs
        self._fwd = {k: self._wrap(m, compile, cuda_graphs) for k, m in self.models.items()}
        if compile and self.autoencoder is not None:
            self._enc = torch.compile(self.autoencoder.encoder, dynamic=False)
            self._dec = torch.compile(self.autoencoder.decoder, dynamic=False)
        elif self.autoencoder is not None:
            self._enc, self._dec = self.autoencoder.encoder, self.autoencoder.decoder
        if compile or cuda_graphs or precision != "fp32":
            self.name = "torch[" + ",".join(
                [precision] + (["compile"] if compile else []) + (["cudagraphs"] if cuda_graphs else [])) + "]"

    @staticmethod
    def _wrap(model: nn.Module, compile: bool, cuda_graphs: bool) -> Callable[..., torch.Tensor]:
        if compile:
            # reduce-overhead = inductor kernels replayed through CUDA graphs
            return torch.compile(model, mode="reduce-overhead" if cuda_graphs else "default", dynamic=False)
        if cuda_graphs:
            return _CudaGraphed(model)
        return model

    def _denoise(self, stage: int, x, t, cond_tokens, c_v, flags) -> torch.Tensor:  # noqa: ANN001
        dt = self.dtype
        with torch.inference_mode():
            out = self._fwd[stage](x.to(self.device, dt), t.to(self.device), cond_tokens.to(self.device, dt),
                                   c_v.to(self.device, dt), flags.to(self.device, dt))
        return out.float()

    def denoise_stage1(self, x, t, cond_tokens, c_v, flags) -> torch.Tensor:  # noqa: ANN001
        return self._denoise(1, x, t, cond_tokens, c_v, flags)

    def denoise_stage2(self, x, t, cond_tokens, c_v, flags) -> torch.Tensor:  # noqa: ANN001
        return self._denoise(2, x, t, cond_tokens, c_v, flags)

    @torch.inference_mode()
    def encode_conditions(self, stage: int, mel: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
        ref = None if ref is None else ref.to(self.device, self.dtype)
        return self.models[stage].encode_conditions(mel.to(self.device, self.dtype), ref).float()

    @torch.inference_mode()
    def null_conditions(self, stage: int, batch: int, frames: int) -> torch.Tensor:
        return self.models[stage].null_conditions(batch, frames).float()

    @torch.inference_mode()
    def ae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._enc(images.to(self.device, self.dtype)).float()

    @torch.inference_mode()
    def ae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._dec(latents.to(self.device, self.dtype)).float().clamp(0.0, 1.0)


# --------------------------------------------------------------------------- graphs
class _GraphBackend:
    """Shared logic of the exported-graph backends: c_l assembly from the audio and
    identity graphs plus the stored null tokens, and batch chunking for runtimes
    with a maximum batch (TensorRT optimisation profiles)."""

    name = "graphs"

    def __init__(self, folder: str | os.PathLike, device: str | torch.device) -> None:
        from safetensors.numpy import load_file

        from export.onnx_export import load_manifest

        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        self.device = torch.device(device)
        self.pack_config = self.manifest["pack_config"]
        self.cfgs = {k: _stage_cfg(self.pack_config, k) for k in (1, 2)}
        consts = load_file(str(self.folder / self.manifest["constants"]["file"]))
        self.consts = {k: torch.from_numpy(v).to(self.device) for k, v in consts.items()}
        self.graph_inputs = {n: [i["name"] for i in g["inputs"]] for n, g in self.manifest["graphs"].items()}
        self.max_batch: dict[str, int] = {}

    def _call(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _run(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        cap = self.max_batch.get(name)
        b = next(iter(inputs.values())).shape[0]
        if cap is None or b <= cap:
            return self._call(name, **inputs)
        parts = [self._call(name, **{k: v[i:i + cap] for k, v in inputs.items()}) for i in range(0, b, cap)]
        return torch.cat(parts)

    def _denoise(self, stage: int, x, t, cond_tokens, c_v, flags) -> torch.Tensor:  # noqa: ANN001
        if c_v is None or flags is None:
            raise ValueError(f"{self.name}: the exported denoiser always takes c_v and flags")
        return self._run(f"stage{stage}_denoiser", x=x, t=t.float(), cond_tokens=cond_tokens, c_v=c_v, flags=flags)

    def denoise_stage1(self, x, t, cond_tokens, c_v, flags) -> torch.Tensor:  # noqa: ANN001
        return self._denoise(1, x, t, cond_tokens, c_v, flags)

    def denoise_stage2(self, x, t, cond_tokens, c_v, flags) -> torch.Tensor:  # noqa: ANN001
        return self._denoise(2, x, t, cond_tokens, c_v, flags)

    def encode_conditions(self, stage: int, mel: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
        b, n = mel.shape[:2]
        audio = self._run(f"stage{stage}_audio", mel=mel)
        if not self.cfgs[stage].identity_tokens:
            return audio
        if ref is None:  # no reference: the identity's null tokens (as MVControlNet does)
            ident = repeat(self.consts[f"stage{stage}.null_identity"], "l d -> b l d", b=b)
        else:
            ident = self._run(f"stage{stage}_identity", ref=ref)
        return torch.cat([audio, repeat(ident, "b l d -> b n l d", n=n)], dim=2)

    def null_conditions(self, stage: int, batch: int, frames: int) -> torch.Tensor:
        parts = [self.consts[f"stage{stage}.null_audio"]]
        if self.cfgs[stage].identity_tokens:
            parts.append(self.consts[f"stage{stage}.null_identity"])
        return repeat(torch.cat(parts, dim=0), "l d -> b n l d", b=batch, n=frames)

    def ae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._run("ae_encoder", images=images)

    def ae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run("ae_decoder", latents=latents)


class OnnxRuntimeBackend(_GraphBackend):
    """The exported graphs in onnxruntime (CPU provider here; CUDA provider when the
    onnxruntime-gpu build is installed and `device` is cuda)."""

    name = "onnxruntime"

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu", threads: int | None = None) -> None:
        from export.onnx_export import ort_session

        super().__init__(folder, device)
        self.sessions = {n: ort_session(self.folder / g["file"], str(self.device), threads)
                         for n, g in self.manifest["graphs"].items()}
        self.name = "onnxruntime" if self.manifest.get("precision") == "fp32" else f"onnxruntime[{self.manifest['precision']}]"

    def _call(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        feed = {k: np.ascontiguousarray(inputs[k].detach().float().cpu().numpy()) for k in self.graph_inputs[name]}
        out = self.sessions[name].run(None, feed)[0]
        return torch.from_numpy(out).to(self.device, torch.float32)


class TensorRTBackend(_GraphBackend):
    """The TensorRT engines built by `tccp export --format tensorrt` (fp16, one
    optimisation profile per graph; larger batches are run in chunks)."""

    name = "tensorrt"

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cuda") -> None:
        from export.tensorrt_build import TRTGraph, require_tensorrt

        require_tensorrt()
        super().__init__(folder, device)
        if self.device.type != "cuda":
            raise TCCPError("--backend tensorrt needs --device cuda")
        info = self.manifest.get("tensorrt")
        if not info:
            raise TCCPError(f"{self.folder}: has no TensorRT engines (export with --format tensorrt)")
        self.graphs = {n: TRTGraph(self.folder / e["file"], self.device) for n, e in info["engines"].items()}
        self.max_batch = {n: int(e["max_batch"]) for n, e in info["engines"].items()}

    def _call(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        return self.graphs[name](**{k: inputs[k] for k in self.graph_inputs[name]}).float()


# --------------------------------------------------------------------------- pipeline seam
class BackendStage(nn.Module):
    """Looks like an `MVControlNet` to `TCCPPipeline`; every call goes to the backend."""

    def __init__(self, backend: Backend, stage: int) -> None:
        super().__init__()
        self.backend = backend
        self.stage = int(stage)
        self.cfg = _stage_cfg(backend.pack_config, stage)
        self._denoise = backend.denoise_stage1 if stage == 1 else backend.denoise_stage2
        # device/dtype anchor for code that reads them from parameters (see module doc)
        self.anchor = nn.Parameter(torch.empty(0, device=backend.device), requires_grad=False)

    def encode_conditions(self, mel: torch.Tensor, ref_latent: torch.Tensor | None = None,
                          drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        if drop_mask is not None:
            raise ValueError("condition dropout is a training feature; backends only run inference")
        return self.backend.encode_conditions(self.stage, mel, ref_latent)

    def null_conditions(self, batch: int, frames: int) -> torch.Tensor:
        return self.backend.null_conditions(self.stage, batch, frames)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond_tokens: torch.Tensor,
                c_v: torch.Tensor | None = None, cond_flags: torch.Tensor | None = None) -> torch.Tensor:
        if cond_flags is None:
            cond_flags = x_t.new_zeros(x_t.shape[0], x_t.shape[2])
        return self._denoise(x_t, t, cond_tokens, c_v, cond_flags)


class BackendAutoencoder(nn.Module):
    """Looks like TAEF2's `TinyAutoencoder` to the pipeline and the engine runner."""

    def __init__(self, backend: Backend, batch_size: int = 64) -> None:
        super().__init__()
        self.backend = backend
        self.batch_size = int(batch_size)
        self.anchor = nn.Parameter(torch.empty(0, device=backend.device), requires_grad=False)

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.ae_encode(x.to(self.device, torch.float32))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.backend.ae_decode(z.to(self.device, torch.float32)).clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.inference_mode()
    def encode_images(self, images: np.ndarray, batch_size: int | None = None) -> torch.Tensor:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
        bs = batch_size or self.batch_size
        out = []
        for i in range(0, len(images), bs):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + bs]))
            out.append(self.encode(rearrange(x, "b h w c -> b c h w").to(self.device, torch.float32) / 255.0))
        if not out:
            raise ValueError("no images to encode")
        return torch.cat(out)

    @torch.inference_mode()
    def decode_latents(self, z: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        if z.ndim == 3:
            z = z[None]
        bs = batch_size or self.batch_size
        out = [rearrange(self.decode(z[i:i + bs]).mul(255.0).round_(), "b c h w -> b h w c").to(torch.uint8).cpu().numpy()
               for i in range(0, len(z), bs)]
        return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


def backend_pipeline(backend: Backend) -> Any:
    """A `TCCPPipeline` whose networks all run on `backend` (sampler, schedule and
    latent normalisation from the backend's pack config)."""
    from tccp.diffusion.schedule import Schedule
    from tccp.pipeline import LatentNorm, SamplerConfig, TCCPPipeline

    pc = backend.pack_config
    pipe = TCCPPipeline(
        BackendStage(backend, 1), BackendStage(backend, 2), BackendAutoencoder(backend),
        sampler=SamplerConfig.from_dict(pc.get("sampler", {})),
        schedule=Schedule.from_dict(pc.get("schedule", {})),
        latent_norm=LatentNorm(**pc.get("latent_norm", {})),
    )
    pipe.pack_config = dict(pc)
    pipe.backend = backend
    return pipe


# --------------------------------------------------------------------------- factory
def export_dir_for(pack: str | os.PathLike, kind: str, precision: str, cache: str | os.PathLike | None = None) -> Path:
    """Cache folder of the on-the-fly export of `pack` (keyed by the pack's hash)."""
    from export.onnx_export import pack_hash
    from export.realdata import cache_root

    root = Path(cache) if cache is not None else cache_root() / "exports"
    return root / f"{pack_hash(pack)[:16]}-{kind}-{precision}"


def _is_export(path: Path | None) -> bool:
    return path is not None and (path / "manifest.json").is_file()


def get_backend(
    name: str,
    pack: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    *,
    precision: str | None = None,
    compile: bool = False,
    cuda_graphs: bool = False,
    export_dir: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    threads: int | None = None,
) -> Backend:
    """A backend by name for a model pack (None: the bundled default pack).

    onnxruntime/tensorrt run an export folder: `export_dir`, or `pack` itself when it
    is one, else the pack is exported (with the parity check) into a cache folder
    keyed by its hash on first use. `precision`: torch fp32 (default on CPU) / fp16 /
    bf16 (default fp16 on CUDA); onnxruntime fp32 (default) or fp16 graphs; tensorrt
    always builds fp16 engines."""
    from tccp.pack import DEFAULT_PACK

    if name not in BACKENDS:
        raise TCCPError(f"--backend {name}: unknown (choose from {', '.join(BACKENDS)})")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TCCPError("--device cuda: no CUDA device is available (use --device cpu)")
    folder = Path(pack) if pack is not None else DEFAULT_PACK
    if name == "torch":
        from tccp.pack import load_pack

        if _is_export(folder):
            raise TCCPError(f"{folder}: is an export folder; the torch backend needs the model pack")
        prec = precision or ("fp16" if device.type == "cuda" else "fp32")
        return TorchBackend(load_pack(folder, device="cpu", dtype=torch.float32), device, prec, compile, cuda_graphs)
    if compile or cuda_graphs:
        raise TCCPError(f"--compile/--cuda-graphs apply to the torch backend, not {name}")
    if name == "tensorrt":
        from export.tensorrt_build import require_tensorrt

        require_tensorrt()
    target = Path(export_dir) if export_dir is not None else (folder if _is_export(folder) else None)
    if target is None:
        kind = "tensorrt" if name == "tensorrt" else "onnx"
        prec = "fp16" if name == "tensorrt" else (precision or "fp32")
        target = export_dir_for(folder, kind, prec, cache)
        if not _is_export(target):
            from export.onnx_export import export_onnx

            build = None
            if name == "tensorrt":
                from export.tensorrt_build import build_step

                build = build_step()
            export_onnx(folder, target, fp16=prec == "fp16" and name != "tensorrt", build=build)
    if name == "onnxruntime":
        return OnnxRuntimeBackend(target, device, threads)
    return TensorRTBackend(target, device)


def load_pipeline(pack: str | os.PathLike | None = None, backend: str = "torch", device: str | torch.device = "cpu",
                  **options: Any) -> Any:
    """`backend_pipeline(get_backend(backend, pack, device, **options))`: the one call
    the engine needs (`engine.runner.PipelineRunner(load_pipeline(...))`)."""
    return backend_pipeline(get_backend(backend, pack, device, **options))
