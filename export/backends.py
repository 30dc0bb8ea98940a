"""Runtime backends behind one small per-network interface, and the seam that lets the
unchanged pipelines (`tccp.pipeline.EditPipeline`, so the whole engine) run on any
of them.

The interface is per network, not per window: the sampler loops, classifier-free
guidance, latent normalisation, the landmark codec, the warps and the first-frame /
window logic stay in `tccp.pipelines` and are shared, so backends can only differ in
how fast (and how precisely) they evaluate the networks. Tensors cross the interface
as float32 torch tensors on the backend's device; a backend may compute in lower
precision inside.

    backend = get_backend("onnxruntime", pack, device="cpu")
    pipe = backend_pipeline(backend)          # an EditPipeline; engine.runner runs it as is
    # or in one call: pipe = load_pipeline(pack, backend="onnxruntime")
    # or as the engine takes it: PipelineRunner.from_pack(pack, loader=pipeline_loader("onnxruntime"))

The seam needs no change to the pipelines: `BackendLandmarkNet` has the surface of
`LandmarkNet` that `LandmarkGenerator` uses (`condition_tokens`, call, `cfg`),
`BackendMouthNet` that of `MVControlNet` for `MouthEditor` (`encode_conditions`,
`null_conditions`, call, `cfg`), `BackendAutoencoder` that of TAEF2's
`TinyAutoencoder` (`encode`, `decode`, `encode_images`, `decode_latents`, `encoder`,
`decoder`) and `BackendWhisper` that of `WhisperEncoder` (call, `n_layers`, `width`).
Each carries a zero-size parameter so that code reading a module's device/dtype from
its parameters (the pipelines, `engine.features`) keeps working.

Every backend also keeps `timings`: seconds spent per network since the last
`reset()`, which `tccp bench` reads for its per-network breakdown.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from einops import rearrange, repeat
from torch import nn

from tccp.errors import TCCPError
from tccp.pack import STAGE1_SCALE, STAGE1_STEPS

__all__ = [
    "BACKENDS",
    "NETWORKS",
    "HEAD_NETWORKS",
    "Backend",
    "Timings",
    "TorchBackend",
    "OnnxRuntimeBackend",
    "TensorRTBackend",
    "BackendLandmarkNet",
    "BackendMouthNet",
    "BackendAutoencoder",
    "BackendWhisper",
    "get_backend",
    "backend_pipeline",
    "load_pipeline",
    "pipeline_loader",
    "export_dir_for",
]

BACKENDS = ("torch", "onnxruntime", "tensorrt")
NETWORKS = ("whisper", "stage1_condition", "stage1_denoiser", "stage2_condition", "stage2_denoiser",
            "ae_encoder", "ae_decoder")  # a mouth-region window's networks; head mode's stage 1 adds HEAD_NETWORKS
HEAD_NETWORKS = ("stage1_head_condition", "stage1_head_denoiser")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Timings:
    """Seconds and calls per network (`with timings("stage2_denoiser"): ...`).
    `sync` (CUDA) synchronises before reading the clock, so GPU time lands on the
    network that spent it."""

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)

    def __call__(self, name: str) -> "_Span":
        return _Span(self, name)


class _Span:
    __slots__ = ("owner", "name", "t0")

    def __init__(self, owner: Timings, name: str) -> None:
        self.owner, self.name = owner, name

    def __enter__(self) -> None:
        if self.owner.sync:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        if self.owner.sync:
            torch.cuda.synchronize()
        self.owner.seconds[self.name] += time.perf_counter() - self.t0
        self.owner.calls[self.name] += 1


@runtime_checkable
class Backend(Protocol):
    """What the pipelines need from a runtime, one method per network."""

    name: str
    device: torch.device
    pack_config: dict[str, Any]  # the source pack's config.json
    has_stage2: bool
    timings: Timings

    def whisper(self, mel: torch.Tensor) -> torch.Tensor:
        """Whisper encoder: mel (B,80,T) -> (B,ceil(T/2),layers+1,width)."""

    def stage1_condition(self, audio: torch.Tensor, vad: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        """LandmarkNet.condition_tokens: (B,N,La,F), (B,N), (B,K,ref_dim) -> (B,N,La+K,width)."""

    def stage1_denoise(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, c_v: torch.Tensor,
                       flags: torch.Tensor) -> torch.Tensor:
        """One LandmarkNet call (trunk + control branch): (B,N,gen_dim) -> (B,N,gen_dim)."""

    def stage2_condition(self, mel: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
        """MVControlNet.encode_conditions: mel (B,N,16,80), ref latent (B,C,h,w) -> (B,N,L,D)."""

    def stage2_null(self, batch: int, frames: int) -> torch.Tensor:
        """The unconditional c_l of classifier-free guidance: (B,N,L,D)."""

    def stage2_denoise(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, c_v: torch.Tensor,
                       flags: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        """One MVControlNet call (U-Net + control branch + extra channels): (B,C,N,h,w)."""

    def ae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """TAEF2 encoder: (B,3,H,W) in [0,1] -> (B,32,H/8,W/8)."""

    def ae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """TAEF2 decoder: (B,32,h,w) -> (B,3,8h,8w) in [0,1]."""


def _stage1_cfg(pack_config: dict[str, Any], key: str = "stage1") -> Any:
    from tccp.models.landmarks import LandmarkNetConfig

    return LandmarkNetConfig.from_dict(pack_config[key]["model"])


def _stage2_cfg(pack_config: dict[str, Any]) -> Any:
    from tccp.models.config import MVConfig

    c2 = pack_config.get("stage2")
    return None if not c2 else MVConfig.from_dict(c2["model"])


# --------------------------------------------------------------------------- torch
class _CudaGraphed:
    """Replays one captured CUDA graph per input shape (the engine's shapes are few
    and fixed: window and first-frame, per batch size), which removes the per-kernel
    launch cost that dominates small models at batch 1. Inputs are copied into the
    captured static buffers; the output is cloned before the next replay reuses it.
    None arguments are passed through (they are part of the key)."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.graphs: dict[tuple, tuple[Any, list, torch.Tensor]] = {}

    def __call__(self, *args: Any) -> torch.Tensor:
        key = tuple(None if a is None else (tuple(a.shape), a.dtype) for a in args)
        entry = self.graphs.get(key)
        if entry is None:
            static = [None if a is None else a.clone() for a in args]
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
            if buf is not None:
                buf.copy_(a)
        graph.replay()
        return out.clone()


class TorchBackend:
    """Eager PyTorch (the reference), optionally in fp16/bf16 with torch.compile and/or
    CUDA graphs on GPU. The pipelines' sampler arithmetic stays fp32 whatever the
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
        self.codec = pipeline.stage1.codec
        self.stage1_head = pipeline.stage1_head  # head mode's stage 1 stays as loaded (CPU, fp32): ~2 ms a window
        self.timings = Timings(sync=self.device.type == "cuda")
        dev, dt = self.device, self.dtype
        self.net = pipeline.stage1.net.to(dev, dt).eval()
        self.model = pipeline.stage2.model.to(dev, dt).eval() if pipeline.stage2.model is not None else None
        self.has_stage2 = self.model is not None
        ae = pipeline.stage2.autoencoder
        self.autoencoder = ae.to(dev, dt).eval() if ae is not None else None
        self.whisper_model = pipeline.whisper.to(dev, dt).eval()
        self.compiled = compile
        self.cuda_graphs = cuda_graphs
        wrap = lambda fn: self._wrap(fn, compile, cuda_graphs)  # noqa: E731
        self._s1 = wrap(self.net)
        self._s2 = wrap(self.model) if self.model is not None else None
        self._wh = wrap(self.whisper_model) if not cuda_graphs else self.whisper_model  # T varies per call
        if self.autoencoder is not None:
            self._enc, self._dec = wrap(self.autoencoder.encoder), wrap(self.autoencoder.decoder)
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

    def _in(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(self.device, self.dtype)

    @torch.inference_mode()
    def whisper(self, mel: torch.Tensor) -> torch.Tensor:
        with self.timings("whisper"):
            return self._wh(self._in(mel)).float()

    @torch.inference_mode()
    def stage1_condition(self, audio, vad, refs) -> torch.Tensor:  # noqa: ANN001
        with self.timings("stage1_condition"):
            return self.net.condition_tokens(self._in(audio), self._in(vad), self._in(refs)).float()

    @torch.inference_mode()
    def stage1_denoise(self, x, t, ctx, c_v, flags) -> torch.Tensor:  # noqa: ANN001
        with self.timings("stage1_denoiser"):
            return self._s1(self._in(x), t.to(self.device), self._in(ctx), self._in(c_v), self._in(flags)).float()

    @torch.inference_mode()
    def stage2_condition(self, mel, ref) -> torch.Tensor:  # noqa: ANN001
        with self.timings("stage2_condition"):
            return self.model.encode_conditions(self._in(mel), self._in(ref)).float()

    @torch.inference_mode()
    def stage2_null(self, batch: int, frames: int) -> torch.Tensor:
        return self.model.null_conditions(batch, frames).float()

    @torch.inference_mode()
    def stage2_denoise(self, x, t, tokens, c_v, flags, extra) -> torch.Tensor:  # noqa: ANN001
        with self.timings("stage2_denoiser"):
            return self._s2(self._in(x), t.to(self.device), self._in(tokens), self._in(c_v), self._in(flags),
                            self._in(extra)).float()

    @torch.inference_mode()
    def ae_encode(self, images: torch.Tensor) -> torch.Tensor:
        with self.timings("ae_encoder"):
            return self._enc(self._in(images)).float()

    @torch.inference_mode()
    def ae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self.timings("ae_decoder"):
            return self._dec(self._in(latents)).float().clamp(0.0, 1.0)


# --------------------------------------------------------------------------- graphs
class _GraphBackend:
    """Shared logic of the exported-graph backends: the stored constants (template,
    null tokens), per-network timing, and batch chunking for runtimes with a maximum
    batch (TensorRT optimisation profiles)."""

    name = "graphs"

    def __init__(self, folder: str | os.PathLike, device: str | torch.device) -> None:
        from safetensors.numpy import load_file

        from export.onnx_export import load_manifest

        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        self.device = torch.device(device)
        self.pack_config = self.manifest["pack_config"]
        self.has_stage2 = bool(self.manifest.get("stage2")) and "stage2_denoiser" in self.manifest["graphs"]
        self.timings = Timings(sync=self.device.type == "cuda")
        consts = load_file(str(self.folder / self.manifest["constants"]["file"]))
        self.template = consts["stage1.template"]
        self.head_template = consts.get("stage1_head.template")  # None: no head-mode stage 1 in this export
        self.null = torch.from_numpy(consts["stage2.null"]).to(self.device) if "stage2.null" in consts else None
        self.graph_inputs = {n: [i["name"] for i in g["inputs"]] for n, g in self.manifest["graphs"].items()}
        self.max_batch: dict[str, int] = {}

    def _call(self, name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _run(self, name: str, **inputs: torch.Tensor | None) -> torch.Tensor:
        if name not in self.graph_inputs:
            raise TCCPError(f"{self.folder}: this export has no {name} graph (a warp-only pack has no stage 2)")
        feed = {k: inputs[k] for k in self.graph_inputs[name]}
        with self.timings(name):
            cap = self.max_batch.get(name)
            b = next(iter(feed.values())).shape[0]
            if cap is None or b <= cap:
                return self._call(name, feed)
            return torch.cat([self._call(name, {k: v[i:i + cap] for k, v in feed.items()}) for i in range(0, b, cap)])

    def whisper(self, mel: torch.Tensor) -> torch.Tensor:
        return self._run("whisper", mel=mel)

    def stage1_condition(self, audio, vad, refs) -> torch.Tensor:  # noqa: ANN001
        return self._run("stage1_condition", audio=audio, vad=vad, refs=refs)

    def stage1_denoise(self, x, t, ctx, c_v, flags) -> torch.Tensor:  # noqa: ANN001
        if c_v is None:
            raise ValueError(f"{self.name}: the exported stage-1 network always takes its control input c_v")
        return self._run("stage1_denoiser", x=x, t=t.float(), ctx=ctx, c_v=c_v, flags=flags)

    def stage1_head_condition(self, audio, vad, refs) -> torch.Tensor:  # noqa: ANN001
        return self._run("stage1_head_condition", audio=audio, vad=vad, refs=refs)

    def stage1_head_denoise(self, x, t, ctx, c_v, flags) -> torch.Tensor:  # noqa: ANN001
        return self._run("stage1_head_denoiser", x=x, t=t.float(), ctx=ctx, c_v=c_v, flags=flags)

    def stage2_condition(self, mel, ref) -> torch.Tensor:  # noqa: ANN001
        if ref is None and "ref" in self.graph_inputs.get("stage2_condition", []):
            raise ValueError(f"{self.name}: the exported stage-2 condition encoder needs the reference latent")
        return self._run("stage2_condition", mel=mel, ref=ref)

    def stage2_null(self, batch: int, frames: int) -> torch.Tensor:
        if self.null is None:
            raise TCCPError(f"{self.folder}: this export has no stage 2")
        return repeat(self.null, "l d -> b n l d", b=batch, n=frames)

    def stage2_denoise(self, x, t, tokens, c_v, flags, extra) -> torch.Tensor:  # noqa: ANN001
        if c_v is None or flags is None:
            raise ValueError(f"{self.name}: the exported stage-2 denoiser always takes c_v and flags")
        return self._run("stage2_denoiser", x=x, t=t.float(), tokens=tokens, c_v=c_v, flags=flags, extra=extra)

    def ae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._run("ae_encoder", images=images)

    def ae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run("ae_decoder", latents=latents)


class OnnxRuntimeBackend(_GraphBackend):
    """The exported graphs in onnxruntime (CPU provider here; CUDA provider when the
    onnxruntime-gpu build is installed and `device` is cuda). Threads: see
    `export.onnx_export.ort_options` and docs/export.md."""

    name = "onnxruntime"

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu", threads: int | None = None,
                 spin: bool | None = None, opt: str = "all") -> None:
        from export.onnx_export import ort_options, ort_session

        super().__init__(folder, device)
        self.options = ort_options(threads, spin, opt)
        self.threads = self.options.intra_op_num_threads
        self.sessions = {n: ort_session(self.folder / g["file"], str(self.device), options=self.options)
                         for n, g in self.manifest["graphs"].items()}
        self.name = "onnxruntime" if self.manifest.get("precision") == "fp32" else f"onnxruntime[{self.manifest['precision']}]"

    def _call(self, name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # CPU float32 contiguous tensors cross as zero-copy numpy views both ways
        feed = {k: np.ascontiguousarray(v.detach().to("cpu", torch.float32).numpy()) for k, v in inputs.items()}
        out = self.sessions[name].run(None, feed)[0]
        t = torch.from_numpy(out)
        return t if self.device.type == "cpu" else t.to(self.device)


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

    def _call(self, name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.graphs[name](**inputs).float()


# --------------------------------------------------------------------------- pipeline seam
class _Anchored(nn.Module):
    """A module whose only parameter is a zero-size device/dtype anchor."""

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend  # a plain object, not a submodule
        self.anchor = nn.Parameter(torch.empty(0, device=backend.device), requires_grad=False)


class BackendLandmarkNet(_Anchored):
    """Looks like a `LandmarkNet` to `LandmarkGenerator`; every call goes to the backend
    (`head`: head mode's stage 1, an export's `stage1_head_*` graphs)."""

    def __init__(self, backend: Backend, head: bool = False) -> None:
        super().__init__(backend)
        self.head = head
        self.cfg = _stage1_cfg(backend.pack_config, "stage1_head" if head else "stage1")

    def condition_tokens(self, audio: torch.Tensor, vad: torch.Tensor, refs: torch.Tensor,
                         drop_audio: torch.Tensor | None = None) -> torch.Tensor:
        if drop_audio is not None:
            raise ValueError("condition dropout is a training feature; backends only run inference")
        if self.head:
            return self.backend.stage1_head_condition(audio, vad, refs)
        return self.backend.stage1_condition(audio, vad, refs)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, c_v: torch.Tensor | None,
                flags: torch.Tensor) -> torch.Tensor:
        if self.head:
            return self.backend.stage1_head_denoise(x, t, ctx, c_v, flags)
        return self.backend.stage1_denoise(x, t, ctx, c_v, flags)


class BackendMouthNet(_Anchored):
    """Looks like an `MVControlNet` to `MouthEditor`; every call goes to the backend."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self.cfg = _stage2_cfg(backend.pack_config)

    def encode_conditions(self, mel: torch.Tensor, ref_latent: torch.Tensor | None = None,
                          drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        if drop_mask is not None:
            raise ValueError("condition dropout is a training feature; backends only run inference")
        return self.backend.stage2_condition(mel, ref_latent)

    def null_conditions(self, batch: int, frames: int) -> torch.Tensor:
        return self.backend.stage2_null(batch, frames)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond_tokens: torch.Tensor, c_v: torch.Tensor | None = None,
                cond_flags: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
        if cond_flags is None:
            cond_flags = x_t.new_zeros(x_t.shape[0], x_t.shape[2])
        return self.backend.stage2_denoise(x_t, t, cond_tokens, c_v, cond_flags, extra)


class _Half(_Anchored):
    """`autoencoder.encoder` / `.decoder`: callable, and a parameter for device/dtype."""

    def __init__(self, backend: Backend, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(backend)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class BackendAutoencoder(nn.Module):
    """Looks like TAEF2's `TinyAutoencoder` to the pipelines and the engine."""

    def __init__(self, backend: Backend, batch_size: int = 64) -> None:
        super().__init__()
        self.backend = backend
        self.batch_size = int(batch_size)
        self.encoder = _Half(backend, backend.ae_encode)
        self.decoder = _Half(backend, backend.ae_decode)

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


class BackendWhisper(_Anchored):
    """Looks like `tccp.media.whisper.WhisperEncoder` to `engine.features` and
    `tccp.media.whisper.full_features` / `StreamingWhisper`."""

    def __init__(self, backend: Backend, n_layers: int, width: int, heads: int) -> None:
        super().__init__(backend)
        self.n_layers, self.width, self.heads = int(n_layers), int(width), int(heads)

    @property
    def feature_dim(self) -> int:
        return (self.n_layers + 1) * self.width

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.backend.whisper(mel)


def _whisper_shape(backend: Backend) -> tuple[int, int, int]:
    if isinstance(backend, TorchBackend):
        w = backend.whisper_model
        return w.n_layers, w.width, w.heads
    info = getattr(backend, "manifest", {}).get("whisper")
    if not info:
        raise TCCPError(f"{getattr(backend, 'folder', backend)}: export has no Whisper description")
    return int(info["layers"]), int(info["width"]), int(info["heads"])


def backend_pipeline(backend: Backend) -> Any:
    """An `EditPipeline` whose networks all run on `backend` (codec, sampler, schedule
    and latent normalisation from the backend's pack config)."""
    from tccp.diffusion.schedule import Schedule
    from tccp.pipeline import EditPipeline, LatentNorm, SamplerConfig

    pc = backend.pack_config
    c1 = pc["stage1"]
    c2 = pc.get("stage2") or {}
    net = BackendLandmarkNet(backend)
    codec = getattr(backend, "codec", None)  # torch: the loaded pack's own codec
    if codec is None:
        codec = _codec(backend.template, net, c1)
    pipe = EditPipeline.build(
        net, codec, BackendMouthNet(backend) if backend.has_stage2 else None, BackendAutoencoder(backend),
        BackendWhisper(backend, *_whisper_shape(backend)), crop_size=int(pc.get("crop_size", 128)),
        schedule=Schedule.from_dict(c2.get("schedule", {"prediction": "v"})),
        sampler=SamplerConfig.from_dict(c2.get("sampler", {})), latent_norm=LatentNorm(**c2.get("latent_norm", {})),
        stage1_steps=int(c1.get("steps", STAGE1_STEPS)), residual_scale=c2.get("residual_scale"),
    )
    pipe.pack_config = dict(pc)
    pipe.backend = backend
    pipe.stage1_head = _head_generator(backend)
    return pipe


def _head_generator(backend: Backend) -> Any:
    """Head mode's stage 1: the torch backend's own (the pack's, as loaded), else one on
    an export's `stage1_head_*` graphs; None when there is none."""
    if isinstance(backend, TorchBackend):
        return backend.stage1_head
    template = getattr(backend, "head_template", None)
    ch = backend.pack_config.get("stage1_head")
    if template is None or not isinstance(ch, dict):
        return None
    from tccp.diffusion.schedule import Schedule
    from tccp.pipelines.landmarks import LandmarkGenerator

    net = BackendLandmarkNet(backend, head=True)
    return LandmarkGenerator(net, _codec(template, net, ch), Schedule(prediction="v"), steps=int(ch.get("steps", STAGE1_STEPS)))


def _codec(template: Any, net: BackendLandmarkNet, stage_config: dict[str, Any]) -> Any:
    """The landmark codec of an exported stage 1 (mouth or head mode): its template from
    the export's constants, its scale from the pack config."""
    from tccp.models.landmarks import LandmarkCodec

    return LandmarkCodec(np.asarray(template, np.float32), net.cfg.mode, float(stage_config.get("scale", STAGE1_SCALE)))


# --------------------------------------------------------------------------- factory
def export_dir_for(pack: str | os.PathLike, kind: str, precision: str, cache: str | os.PathLike | None = None) -> Path:
    """Cache folder of the on-the-fly export of `pack` (keyed by the pack's hash)."""
    from export.onnx_export import EXPORT_VERSION, pack_hash
    from export.realdata import cache_root

    root = Path(cache) if cache is not None else cache_root() / "exports"
    return root / f"{pack_hash(pack)[:16]}-v{EXPORT_VERSION}-{kind}-{precision}"


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
    spin: bool | None = None,
    opt: str = "all",
) -> Backend:
    """A backend by name for a model pack (None: the bundled default pack).

    onnxruntime/tensorrt run an export folder: `export_dir`, or `pack` itself when it
    is one, else the pack is exported (with the parity check) into a cache folder
    keyed by its hash on first use. `precision`: torch fp32 (default on CPU) / fp16 /
    bf16 (default fp16 on CUDA); onnxruntime fp32 (default) or fp16 graphs; tensorrt
    always builds fp16 engines. `threads` / `spin` / `opt`: onnxruntime's intra-op
    threads (default: torch's count), spin-waiting (default off) and graph
    optimisation level (default all); see docs/export.md."""
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
        return OnnxRuntimeBackend(target, device, threads, spin, opt)
    return TensorRTBackend(target, device)


def load_pipeline(pack: str | os.PathLike | None = None, backend: str = "torch", device: str | torch.device = "cpu",
                  **options: Any) -> Any:
    """`backend_pipeline(get_backend(backend, pack, device, **options))`: an
    `EditPipeline` on any backend, ready for `engine.runner.PipelineRunner`. A pack's
    head-mode stage 1 (`--region head`) runs on the backend too (exported graphs since
    export format 3; with an older `export_dir` beside a pack, on torch from the pack);
    a file run's stage 1 adapted to the person (`engine.adapt`) is a torch copy of the
    pack's stage 1."""
    from tccp.pack import DEFAULT_PACK, load_head_generator

    pipe = backend_pipeline(get_backend(backend, pack, device, **options))
    folder = Path(pack) if pack is not None else DEFAULT_PACK
    if not _is_export(folder):
        if pipe.stage1_head is None:
            pipe.stage1_head = load_head_generator(folder, "cpu")
        pipe.pack_folder = folder  # engine.adapt trains a torch copy of the pack's stage 1 from here
    return pipe


def pipeline_loader(backend: str, **options: Any) -> Callable[..., Any]:
    """The engine's hook: `loader(pack, device="cpu") -> EditPipeline` on `backend`
    (`engine.runner.PipelineRunner.from_pack(pack, device, loader=...)`,
    `engine.model.load_model`; the engine takes loaders so it never imports
    `export`). `options` go to `get_backend`. An unknown name is a one-line
    TCCPError at once, not at load time."""
    if backend not in BACKENDS:
        raise TCCPError(f"--backend {backend}: unknown (choose from {', '.join(BACKENDS)})")

    def load(pack: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Any:
        return load_pipeline(pack, backend=backend, device=device, **options)

    load.backend = backend  # type: ignore[attr-defined]
    return load
