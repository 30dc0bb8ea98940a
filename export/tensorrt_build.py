"""TensorRT: fp16 engines built from the exported ONNX graphs, and their runtime.

One engine per graph with one optimisation profile: batch 1..max_batch (the engine
batches concurrent streams, and classifier-free guidance doubles the batch), frames
1..N (the first-frame step runs N = 1). The autoencoder graphs see every frame of
every stream in one call, so their batch range is max_batch x N. Other symbolic dims
take the range the export recorded per graph (`ranges` in manifest.json: Whisper's
mel frames 2..3000 (30 s) with 300 (a live session's 3 s) as the tuned shape, the
number of stage-1 reference tokens, the mouth patch size). Larger batches are run
in chunks by the backend rather than failing.

Written against the TensorRT 10 Python API (named I/O tensors, `execute_async_v3`),
with the explicit-batch flag passed where TensorRT 8 still needs it. Buffers are
torch CUDA tensors, so no pycuda is needed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from tccp.errors import TCCPError

__all__ = ["tensorrt_available", "require_tensorrt", "build_engine", "build_engines", "build_step", "trt_parity", "TRTGraph",
           "DEFAULT_MAX_BATCH"]

DEFAULT_MAX_BATCH = 16  # 8 streams x 2 (classifier-free guidance)
ENGINE_DIR = "tensorrt"


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def require_tensorrt() -> Any:
    """The tensorrt module, or a one-line TCCPError saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TCCPError("tensorrt: the TensorRT Python package is not installed (pip install tensorrt; "
                        "needs an NVIDIA GPU); use --format onnx or --backend onnxruntime/torch") from None
    if not torch.cuda.is_available():
        raise TCCPError("tensorrt: no CUDA device is available; TensorRT engines need an NVIDIA GPU")
    return trt


def _profile_shapes(shape: list[int | str], max_batch: int, opt_batch: int, frames: int,
                    sizes: dict[str, int] | None = None, ranges: dict[str, list[int]] | None = None
                    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of one input: batch 1..max_batch (opt_batch), frames
    1..frames (frames), any other symbolic dim its recorded range and nominal size."""
    sizes, ranges = sizes or {}, ranges or {}

    def dim(d: int | str, which: int) -> int:
        if d == "batch":
            return (1, opt_batch, max_batch)[which]
        if d == "frames":
            return (1, frames, frames)[which]
        if isinstance(d, str):
            lo, hi = ranges.get(d, (sizes[d], sizes[d]))
            return (int(lo), int(sizes.get(d, hi)), int(hi))[which]
        return int(d)

    return tuple(tuple(dim(d, k) for d in shape) for k in range(3))  # type: ignore[return-value]


def build_engine(onnx_path: Path, plan_path: Path, inputs: list[dict[str, Any]], *, max_batch: int,
                 opt_batch: int, frames: int, fp16: bool = True, workspace_gb: float = 4.0,
                 sizes: dict[str, int] | None = None, ranges: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Parse one ONNX graph and serialise an engine with one optimisation profile."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TCCPError(f"{onnx_path}: TensorRT cannot parse the graph ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    shapes = {}
    for spec in inputs:
        lo, opt, hi = _profile_shapes(spec["shape"], max_batch, opt_batch, frames, sizes, ranges)
        profile.set_shape(spec["name"], lo, opt, hi)
        shapes[spec["name"]] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
    config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TCCPError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    plan_path.write_bytes(bytes(plan))
    return {"file": str(plan_path.relative_to(plan_path.parent.parent)), "max_batch": max_batch,
            "profile": shapes, "fp16": fp16, "build_s": round(time.perf_counter() - t0, 1)}


def build_engines(folder: str | os.PathLike, manifest: dict[str, Any], *, max_batch: int = DEFAULT_MAX_BATCH,
                  opt_batch: int = 1, workspace_gb: float = 4.0, log: Callable[[str], None] | None = None
                  ) -> dict[str, Any]:
    """Build an fp16 engine for every graph of an export folder; adds and returns
    `manifest["tensorrt"]`."""
    trt = require_tensorrt()
    if max_batch < 1 or not 1 <= opt_batch <= max_batch:
        raise TCCPError(f"--max-batch {max_batch} / --opt-batch {opt_batch}: need 1 <= opt <= max")
    folder = Path(folder)
    (folder / ENGINE_DIR).mkdir(exist_ok=True)
    frames = max(int(manifest["frames"]), 8)  # the engine's window (8) may exceed the model's training N
    engines = {}
    for name, g in manifest["graphs"].items():
        per_frame = name.startswith("ae_")  # every frame of every stream in one call
        mb = max_batch * frames if per_frame else max_batch
        ob = opt_batch * frames if per_frame else opt_batch
        if log:
            log(f"building TensorRT engine {name} (batch 1..{mb})")
        engines[name] = build_engine(folder / g["file"], folder / ENGINE_DIR / f"{name}.plan", g["inputs"],
                                     max_batch=mb, opt_batch=ob, frames=frames, fp16=True,
                                     workspace_gb=workspace_gb, sizes=g.get("sizes"), ranges=g.get("ranges"))
    manifest["tensorrt"] = {"version": trt.__version__, "device": torch.cuda.get_device_name(0),
                            "precision": "fp16", "engines": engines}
    return manifest["tensorrt"]


def trt_parity(folder: Path, manifest: dict[str, Any], pipeline: Any, cases: Any) -> dict[str, Any]:
    """The ONNX parity check, run on the TensorRT engines on the same real input cases
    (fp16 tolerance)."""
    from export.onnx_export import TOLERANCE, parity_check

    device = torch.device("cuda")
    engines = manifest["tensorrt"]["engines"]

    def runner(folder: Path, entry: dict[str, Any]) -> Any:
        name = Path(entry["file"]).stem
        graph = TRTGraph(folder / engines[name]["file"], device)
        return lambda case: graph(**{k: torch.from_numpy(v) for k, v in case.items()}).float().cpu().numpy()

    return parity_check(folder, pipeline, cases, manifest["graphs"], TOLERANCE["fp16"], runner=runner)


def build_step(log: Callable[[str], None] | None = None, **kwargs: Any) -> Callable[..., None]:
    """`export_onnx(build=...)` hook: build the engines inside the temp folder, then
    check them against torch on the same real inputs as the ONNX graphs."""
    def step(tmp: Path, manifest: dict[str, Any], pipeline: Any = None, cases: Any = None) -> None:
        from export.onnx_export import check_report

        build_engines(tmp, manifest, log=log, **kwargs)
        if cases is not None:
            if log:
                log("parity check of the TensorRT engines")
            report = trt_parity(tmp, manifest, pipeline, cases)
            manifest["tensorrt"]["parity"] = report
            check_report(report, tmp.name, "tensorrt")

    return step


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT64": torch.int64,
                 "BOOL": torch.bool, "BF16": torch.bfloat16, "INT8": torch.int8}


class TRTGraph:
    """One deserialised engine; call with torch tensors, get torch CUDA tensors back."""

    def __init__(self, plan: str | os.PathLike, device: torch.device) -> None:
        trt = require_tensorrt()
        plan = Path(plan)
        if not plan.is_file():
            raise TCCPError(f"{plan}: TensorRT engine missing")
        self.device = device
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise TCCPError(f"{plan}: cannot deserialise (built with another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_in[n]]
        self.outputs = [n for n in names if not is_in[n]]
        self.dtypes = {n: _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        keep = []
        for name in self.inputs:
            x = inputs[name].to(self.device, self.dtypes[name]).contiguous()
            keep.append(x)
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        outs = []
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
            outs.append(out)
            self.context.set_tensor_address(name, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return outs[0]
