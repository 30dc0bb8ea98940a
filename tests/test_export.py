"""ONNX export + parity on real prepared windows, backends, TensorRT gating.

The model is the `tiny` config with random weights whose zero-initialised layers
(zero convs, output conv, temporal convs) are nudged off zero, so every branch
contributes and an export bug cannot hide behind a layer that outputs zeros. Inputs
are real: a prepared piece of the bundled sample, encoded with TAEF2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tccp.cli import main as cli_main
from tccp.errors import TCCPError

GRAPHS = {"stage1_denoiser", "stage2_denoiser", "stage1_audio", "stage2_audio", "stage1_identity",
          "stage2_identity", "ae_encoder", "ae_decoder"}


# --------------------------------------------------------------------------- shared set-up
# (plain functions so test_bench.py reuses the same cached pack/clip/export per session)
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.getbasetemp() / "tccp-export-cache"
    path.mkdir(exist_ok=True)
    return path


def tiny_pack(cache: Path) -> Path:
    from export.packs import random_pack

    folder = cache / "pack-tiny"
    return folder if (folder / "config.json").is_file() else random_pack("tiny", folder, seed=0)


def sample_folder(cache: Path) -> Path:
    from export.realdata import prepare_sample

    return prepare_sample(16, 64, cache=cache / "samples")


def onnx_export(cache: Path) -> Path:
    """The pack exported by `tccp export` (with the parity check on the real clip), into
    the folder where `get_backend(..., cache=cache / "exports")` looks for it."""
    from export.backends import export_dir_for

    pack = tiny_pack(cache)
    out = export_dir_for(pack, "onnx", "fp32", cache / "exports")
    if not (out / "manifest.json").is_file():
        args = ["export", "--model", str(pack), "--format", "onnx", "--out", str(out),
                "--parity-clip", str(sample_folder(cache))]
        assert cli_main(args) == 0
    return out


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two OpenMP threads on two shared, busy cores spend most of their time waiting
    for each other (10x slower here); results do not depend on the thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def pack(cache: Path) -> Path:
    return tiny_pack(cache)


@pytest.fixture(scope="module")
def clip(cache: Path):
    from export.realdata import load_real_clip

    return load_real_clip(sample_folder(cache))


@pytest.fixture(scope="module")
def exported(cache: Path) -> Path:
    return onnx_export(cache)


@pytest.fixture(scope="module")
def pipe(pack: Path):
    from tccp.pack import load_pack

    return load_pack(pack)


# --------------------------------------------------------------------------- export
def test_manifest_describes_every_graph(exported: Path, pack: Path) -> None:
    from export.onnx_export import load_manifest, pack_hash

    m = load_manifest(exported)
    assert set(m["graphs"]) == GRAPHS
    assert m["source"]["hash"] == pack_hash(pack) and m["precision"] == "fp32" and m["opset"] == 17
    assert m["tolerance"]["atol"] > 0 and "rule" in m["tolerance"]
    den = m["graphs"]["stage1_denoiser"]
    assert [i["name"] for i in den["inputs"]] == ["x", "t", "cond_tokens", "c_v", "flags"]
    assert den["inputs"][0]["shape"] == ["batch", 32, "frames", 8, 8]
    assert den["outputs"][0]["name"] == "eps"
    assert m["graphs"]["ae_decoder"]["outputs"][0]["shape"] == ["batch", 3, 64, 64]
    # parity ran on the real prepared clip, every graph, at two batch/frame shapes
    par = m["parity"]
    assert par["passed"] and par["clip"] == "sample_piece" and set(par["graphs"]) == GRAPHS
    for g in par["graphs"].values():
        assert g["passed"] and g["max_abs"] <= g["bound"] and len(g["cases"]) == 2
    shapes = [c["shapes"]["x"] for c in par["graphs"]["stage2_denoiser"]["cases"]]
    assert shapes == [[2, 32, 4, 8, 8], [1, 32, 1, 8, 8]]  # window batch 2 and first frame N=1
    for g in m["graphs"].values():
        assert (exported / g["file"]).stat().st_size == g["bytes"]
    assert (exported / "constants.safetensors").is_file()


def test_graphs_keep_batch_and_frames_dynamic(exported: Path, pipe, clip) -> None:
    """Shapes never seen at export or parity time (batch 3, frames 7) still match torch."""
    from export.onnx_export import ort_session

    sess = ort_session(exported / "stage2_denoiser.onnx")
    g = torch.Generator().manual_seed(5)
    b, n = 3, 7
    args = (torch.randn(b, 32, n, 8, 8, generator=g), torch.tensor([10.0, 500.0, 990.0]),
            torch.randn(b, n, 6, 32, generator=g), torch.randn(b, 32, n, 8, 8, generator=g), torch.zeros(b, n))
    with torch.inference_mode():
        ref = pipe.stage2(*args).numpy()
    got = sess.run(None, dict(zip(["x", "t", "cond_tokens", "c_v", "flags"], [a.numpy() for a in args])))[0]
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4 + 1e-3 * np.abs(ref).max()


def test_parity_check_catches_a_wrong_graph(exported: Path, pack: Path, clip) -> None:
    """Parity is not vacuous: graphs checked against a slightly different model fail."""
    from export.onnx_export import TOLERANCE, check_report, load_manifest, parity_check
    from tccp.pack import load_pack

    other = load_pack(pack)
    with torch.no_grad():
        other.stage2.unet.decoder.conv_out.weight.mul_(1.01)  # a 1 % change in one layer
        other.stage1.conditions.audio.pos.add_(torch.randn_like(other.stage1.conditions.audio.pos) * 0.05)
    graphs = {k: v for k, v in load_manifest(exported)["graphs"].items() if k.startswith(("stage1_audio", "stage2_den", "stage1_den"))}
    report = parity_check(exported, other, clip, graphs, TOLERANCE["fp32"])
    assert not report["passed"]
    assert not report["graphs"]["stage2_denoiser"]["passed"] and not report["graphs"]["stage1_audio"]["passed"]
    assert report["graphs"]["stage1_denoiser"]["passed"]  # untouched network still agrees
    with pytest.raises(TCCPError) as e:
        check_report(report, exported, "onnxruntime")
    assert "\n" not in str(e.value) and "stage2_denoiser" in str(e.value)


def test_fp16_graphs_pass_their_tolerance(tmp_path: Path, pipe, clip) -> None:
    from export.onnx_export import TOLERANCE, export_graphs, parity_check

    graphs = export_graphs(pipe, tmp_path, fp16=True, only={"stage1_audio", "ae_decoder"})
    assert set(graphs) == {"stage1_audio", "ae_decoder"}
    report = parity_check(tmp_path, pipe, clip, graphs, TOLERANCE["fp16"])
    assert report["passed"], report["graphs"]
    # and they really are fp16 inside (about half the bytes of the fp32 weights)
    import onnx

    model = onnx.load(str(tmp_path / "ae_decoder.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_export_cli_errors(tmp_path: Path, pack: Path, capsys: pytest.CaptureFixture) -> None:
    """(The successful `tccp export` run is the `exported` fixture.) A bad pack and a
    bad opset are one-line errors and leave no output behind."""
    bad = tmp_path / "bad"
    assert cli_main(["export", "--model", str(tmp_path / "nope"), "--out", str(bad)]) == 2
    assert cli_main(["export", "--model", str(pack), "--out", str(bad), "--opset", "9", "--no-parity"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 2 and "Traceback" not in err
    assert not bad.exists() and not list(tmp_path.glob(".bad.tmp-*"))


def test_manifest_errors_are_one_line(tmp_path: Path) -> None:
    from export.onnx_export import load_manifest

    with pytest.raises(TCCPError, match="not a tccp export folder"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(TCCPError, match="unreadable"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "tccp-export", "version": 1,
                                                         "graphs": {"ae_decoder": {"file": "gone.onnx"}}}))
    with pytest.raises(TCCPError, match="gone.onnx"):
        load_manifest(tmp_path)


# --------------------------------------------------------------------------- backends
def _window(pipeline, clip, steps: int, sampler: str, cfg_scale: float):
    """One engine-shaped window on real latents: first frame, then a window."""
    ae = pipeline.autoencoder
    from einops import rearrange

    def enc(x):
        return rearrange(ae.encode_images(x), "n c h w -> 1 c n h w")

    n = pipeline.stage1.cfg.frames
    ctx, mel, ref = enc(clip.contexts[:n]), torch.from_numpy(clip.mel[None, :n]), ae.encode_images(clip.identity[None])
    g = torch.Generator().manual_seed(1)
    sk0, face0 = pipeline.first_frame(ctx[:, :, :1], mel[:, :1], ref, steps=steps, sampler=sampler,
                                      cfg_scale=cfg_scale, generator=g)
    sk, face = pipeline.window(ctx, mel, ref, sk0, face0, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                               generator=g)
    return face0, sk, face, pipeline.decode(face)


@pytest.mark.parametrize("sampler,cfg_scale", [("ddim", 2.0), ("dpmpp_2m", 1.0)])
def test_backends_agree_on_a_pipeline_window(exported: Path, pack: Path, clip, sampler: str, cfg_scale: float) -> None:
    """torch and onnxruntime backends through the unchanged TCCPPipeline (incl. CFG)."""
    from export.backends import load_pipeline

    ref = _window(load_pipeline(pack, backend="torch"), clip, 2, sampler, cfg_scale)
    got = _window(load_pipeline(exported, backend="onnxruntime"), clip, 2, sampler, cfg_scale)
    for a, b in zip(ref[:3], got[:3]):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-3 * a.abs().max() + 1e-4  # latents, relative to their scale
    assert np.abs(ref[3].numpy().astype(int) - got[3].numpy().astype(int)).max() <= 2  # uint8 faces


def test_torch_backend_is_the_plain_pipeline(pack: Path, clip) -> None:
    """The seam adds nothing: a torch-backend pipeline equals load_pack's bit for bit."""
    from export.backends import Backend, BackendStage, load_pipeline
    from tccp.pack import load_pack

    via = load_pipeline(pack, backend="torch")
    assert isinstance(via.backend, Backend) and isinstance(via.stage1, BackendStage)
    assert via.device == torch.device("cpu") and via.dtype == torch.float32
    assert via.sampler == load_pack(pack).sampler
    a, b = _window(load_pack(pack), clip, 2, "ddim", 1.0), _window(via, clip, 2, "ddim", 1.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_engine_runner_runs_an_onnx_backend(exported: Path, clip) -> None:
    """engine.runner.PipelineRunner drives a backend pipeline unchanged (batch of 2)."""
    from engine.runner import PipelineRunner, WindowRequest
    from export.backends import load_pipeline

    runner = PipelineRunner(load_pipeline(exported, backend="onnxruntime"))
    reqs = [WindowRequest(mode="generated", steps=1, sampler="ddim", guidance=1.0, window=4,
                          contexts=clip.contexts[:3], sketches=clip.sketches[:3], mel=clip.mel[:3],
                          identity=clip.identity, state=None, seed=s) for s in (0, 1)]
    res = runner.run_batch(reqs)
    assert len(res) == 2 and res[0].faces.shape == (3, 64, 64, 3) and res[0].faces.dtype == np.uint8
    assert res[0].state.face.shape == (32, 8, 8)


def test_get_backend_errors(pack: Path, exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from export.backends import get_backend

    with pytest.raises(TCCPError, match="unknown"):
        get_backend("openvino", pack)
    with pytest.raises(TCCPError, match="export folder"):
        get_backend("torch", exported)
    with pytest.raises(TCCPError, match="torch backend"):
        get_backend("onnxruntime", exported, compile=True)
    if not torch.cuda.is_available():
        with pytest.raises(TCCPError, match="no CUDA device"):
            get_backend("torch", pack, device="cuda")


# --------------------------------------------------------------------------- TensorRT
def test_tensorrt_absent_is_one_line(tmp_path: Path, pack: Path, capsys: pytest.CaptureFixture) -> None:
    from export.tensorrt_build import require_tensorrt, tensorrt_available

    if tensorrt_available() and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present: the real build is tested below")
    with pytest.raises(TCCPError) as e:
        require_tensorrt()
    assert "\n" not in str(e.value) and "tensorrt" in str(e.value).lower()
    out = tmp_path / "trt"
    assert cli_main(["export", "--model", str(pack), "--format", "tensorrt", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tensorrt:") and err.count("\n") == 1 and not out.exists()


def test_tensorrt_build_and_backend(tmp_path: Path, pack: Path, cache: Path, clip) -> None:
    """Real engines (fp16, batch profile 1..4) from the exported graphs, checked against
    torch by the build's own parity step, then run through the pipeline."""
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA device")
    from export.backends import load_pipeline
    from export.onnx_export import export_onnx
    from export.tensorrt_build import build_step

    out = tmp_path / "trt"
    m = export_onnx(pack, out, parity_clip=sample_folder(cache), build=build_step(max_batch=4))
    assert set(m["tensorrt"]["engines"]) == GRAPHS and m["tensorrt"]["parity"]["passed"]
    assert m["tensorrt"]["engines"]["ae_encoder"]["max_batch"] == 4 * 4  # streams x frames
    ref = _window(load_pipeline(pack, backend="torch", device="cuda", precision="fp32"), clip, 2, "ddim", 2.0)
    got = _window(load_pipeline(out, backend="tensorrt", device="cuda"), clip, 2, "ddim", 2.0)
    for a, b in zip(ref[:3], got[:3]):
        assert (a - b).abs().max() <= 3e-2 * a.abs().max() + 1e-2  # fp16 engines


def test_torch_cuda_fast_paths(pack: Path, clip) -> None:
    """fp16 + CUDA graphs and bf16 agree with fp32 eager on the GPU (skips without one).
    (torch.compile was checked on CPU by hand: relative latent error 4e-5, 1 grey level;
    it compiles for minutes, too slow for the suite.)"""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from export.backends import load_pipeline

    ref = _window(load_pipeline(pack, backend="torch", device="cuda", precision="fp32"), clip, 2, "ddim", 2.0)
    for opts in ({"precision": "fp16", "cuda_graphs": True}, {"precision": "bf16"}):
        pipe = load_pipeline(pack, backend="torch", device="cuda", **opts)
        for _ in range(2):  # the second pass replays the captured graphs
            got = _window(pipe, clip, 2, "ddim", 2.0)
            for a, b in zip(ref[:3], got[:3]):
                assert (a - b).abs().max() <= 5e-2 * a.abs().max() + 1e-2, opts
