"""ONNX export + parity on real inputs, backends through the unchanged pipelines,
TensorRT gating.

The models are the random-weight tiny ones of `PipelineRunner.random(size=64)` (a
tiny landmark network and a tiny mouth-patch MVControlNet) with every zero-initialised
layer nudged off zero, so every branch contributes and an export bug cannot hide
behind a layer that outputs zeros, saved as a real version-2 pack. Inputs are real: the
bundled sample clip, tracked by the engine's tracker and run through the engine's
runner, with real Whisper tokens, reference bank and stage-2 inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tccp.cli import main as cli_main
from tccp.errors import TCCPError

GRAPHS = {"whisper", "stage1_condition", "stage1_denoiser", "stage2_condition", "stage2_denoiser",
          "ae_encoder", "ae_decoder"}
STAGE1_GRAPHS = {"whisper", "stage1_condition", "stage1_denoiser"}


# --------------------------------------------------------------------------- shared set-up
# (plain functions so test_bench.py and test_engine_backends.py reuse the same cached
# packs, tracked clip and ONNX export within one pytest session)
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.getbasetemp() / "tccp-export-cache"
    path.mkdir(exist_ok=True)
    return path


def tiny_pack(cache: Path, stage2: bool = True) -> Path:
    """PipelineRunner.random(size=64)'s models as a version-2 pack (stage2=False: a
    warp-only pack)."""
    from engine.runner import PipelineRunner
    from tccp.pack import save_pack

    folder = cache / ("pack-tiny" if stage2 else "pack-tiny-warp")
    if not (folder / "config.json").is_file():
        r = PipelineRunner.random(size=64, stage2=stage2)
        net, model = r.pipeline.stage1.net, r.pipeline.stage2.model
        with torch.no_grad():  # zero-initialised layers (zero projections, conv_out) off zero
            for p in [*net.parameters(), *(model.parameters() if model is not None else [])]:
                if p.abs().sum() == 0:
                    p.normal_(0, 0.02)
        save_pack(folder, net, r.pipeline.stage1.codec, model, crop_size=r.size, dtype=torch.float32)
    return folder


def real_clip(cache: Path, frames: int = 32):
    """The first `frames` frames of the bundled sample at the tiny pack's 64 px
    (tracking cached in the shared folder)."""
    from export.realdata import sample_clip

    return sample_clip(frames, 64, cache=cache)


def onnx_export(cache: Path, stage2: bool = True) -> Path:
    """The pack exported by `tccp export` (with the parity check on the real clip), into
    the folder where `get_backend(..., cache=cache / "exports")` looks for it."""
    from export.backends import export_dir_for

    pack = tiny_pack(cache, stage2)
    out = export_dir_for(pack, "onnx", "fp32", cache / "exports")
    if not (out / "manifest.json").is_file():
        from tccp.media.io import sample_paths

        args = ["export", "--model", str(pack), "--format", "onnx", "--out", str(out),
                "--parity-clip", str(sample_paths()[0])]
        assert cli_main(args) == 0
    return out


def cached_env(cache: Path):
    """TCCP_CACHE pointed at the shared folder (tracks, on-the-fly exports), so no
    test writes into ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TCCP_CACHE", str(cache))
    return mp


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(export_cache: Path) -> Path:
    return export_cache


@pytest.fixture(scope="module")
def pack(cache: Path) -> Path:
    return tiny_pack(cache)


@pytest.fixture(scope="module")
def clip(cache: Path):
    return real_clip(cache)


@pytest.fixture(scope="module")
def exported(cache: Path) -> Path:
    return onnx_export(cache)


@pytest.fixture(scope="module")
def pipe(pack: Path):
    from tccp.pack import load_pack

    return load_pack(pack)


@pytest.fixture(scope="module")
def cases(pipe, clip):
    from export.onnx_export import parity_inputs

    return parity_inputs(pipe, clip)


# --------------------------------------------------------------------------- export
def test_manifest_describes_every_graph(exported: Path, pack: Path) -> None:
    from export.onnx_export import load_manifest, pack_hash

    m = load_manifest(exported)
    assert set(m["graphs"]) == GRAPHS and m["stage2"] is True
    assert m["source"]["hash"] == pack_hash(pack) and m["precision"] == "fp32" and m["opset"] == 17
    assert m["tolerance"]["atol"] > 0 and "rule" in m["tolerance"] and m["crop_size"] == 64
    assert m["whisper"] == {"layers": 4, "width": 384, "heads": 6}
    g = m["graphs"]
    assert [i["name"] for i in g["stage1_denoiser"]["inputs"]] == ["x", "t", "ctx", "c_v", "flags"]
    assert g["stage1_denoiser"]["inputs"][0]["shape"] == ["batch", "frames", 114]
    assert [i["name"] for i in g["stage2_denoiser"]["inputs"]] == ["x", "t", "tokens", "c_v", "flags", "extra"]
    assert g["stage2_denoiser"]["inputs"][0]["shape"] == ["batch", 32, "frames", 5, 5]  # 40 px patch of 64 px
    assert g["stage2_denoiser"]["inputs"][5]["shape"] == ["batch", 65, "frames", 5, 5]
    assert [i["name"] for i in g["stage2_condition"]["inputs"]] == ["mel", "ref"]
    assert g["stage1_condition"]["inputs"][2]["shape"] == ["batch", "refs", 114]
    assert g["whisper"]["inputs"][0]["shape"] == ["batch", 80, "mel_frames"]
    assert g["ae_decoder"]["outputs"][0]["shape"] == ["batch", 3, "height", "width"]
    # parity ran on the engine's own calls on the real clip: every graph, several shapes
    par = m["parity"]
    assert par["passed"] and par["clip"] == "sample" and set(par["graphs"]) == GRAPHS
    for name, p in par["graphs"].items():
        assert p["passed"] and 0 <= p["max_abs"] <= p["bound"], name
        assert len(p["cases"]) >= 2, name
    shapes = [c["shapes"]["x"] for c in par["graphs"]["stage2_denoiser"]["cases"]]
    # two streams' first frame (N = 1), their first window, then one stream alone
    assert shapes == [[2, 32, 1, 5, 5], [2, 32, 7, 5, 5], [1, 32, 8, 5, 5]]
    assert [c["shapes"]["mel"] for c in par["graphs"]["whisper"]["cases"]][1][0] == 2
    for entry in g.values():
        assert (exported / entry["file"]).stat().st_size == entry["bytes"]
    from safetensors.numpy import load_file

    consts = load_file(str(exported / "constants.safetensors"))
    assert set(consts) == {"stage1.template", "stage2.null"} and consts["stage1.template"].shape == (478, 2)


def test_graphs_keep_shapes_dynamic(exported: Path, pipe, cases) -> None:
    """Shapes never seen at export or parity time (batch 3, frames 5, 6 reference
    tokens, 7 s of audio) still match torch."""
    from export.onnx_export import graph_specs, ort_session

    mods = {s.name: s.module for s in graph_specs(pipe)}

    def check(name: str, feed: dict) -> None:
        got = ort_session(exported / f"{name}.onnx").run(None, {k: v.numpy() for k, v in feed.items()})[0]
        with torch.inference_mode():
            ref = mods[name](*feed.values()).numpy()
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4 + 1e-3 * np.abs(ref).max(), name

    real = {k: torch.from_numpy(v) for k, v in cases["stage2_denoiser"][1].items()}  # (2, 32, 7, 5, 5)
    b, n = 3, 5
    feed = {k: torch.cat([v, v[:1]])[:b] for k, v in real.items()}
    feed = {k: (v[:, :, :n] if v.ndim == 5 else v[:, :n] if k in ("tokens", "flags") else v) for k, v in feed.items()}
    feed["t"] = torch.tensor([10.0, 500.0, 990.0])
    check("stage2_denoiser", feed)
    c1 = {k: torch.from_numpy(v) for k, v in cases["stage1_condition"][1].items()}
    c1["refs"] = torch.cat([c1["refs"], c1["refs"][:, :2]], 1)  # 6 reference tokens
    check("stage1_condition", c1)
    from tccp.media.whisper import whisper_log_mel

    check("whisper", {"mel": whisper_log_mel(np.random.default_rng(0).standard_normal(7 * 16000).astype(np.float32) * 0.1)[None]})


def test_parity_check_catches_a_wrong_graph(exported: Path, pack: Path, cases) -> None:
    """Parity is not vacuous: graphs checked against a slightly different model fail."""
    from export.onnx_export import TOLERANCE, check_report, load_manifest, parity_check
    from tccp.pack import load_pack

    other = load_pack(pack)
    with torch.no_grad():
        other.stage2.model.unet.decoder.conv_out.weight.mul_(1.01)  # a 1 % change in one layer
        other.stage1.net.audio_pos.add_(torch.randn_like(other.stage1.net.audio_pos) * 0.05)
    keep = ("stage1_condition", "stage1_denoiser", "stage2_denoiser")
    graphs = {k: v for k, v in load_manifest(exported)["graphs"].items() if k in keep}
    report = parity_check(exported, other, cases, graphs, TOLERANCE["fp32"])
    assert not report["passed"]
    assert not report["graphs"]["stage2_denoiser"]["passed"] and not report["graphs"]["stage1_condition"]["passed"]
    assert report["graphs"]["stage1_denoiser"]["passed"]  # the untouched network still agrees
    with pytest.raises(TCCPError) as e:
        check_report(report, exported, "onnxruntime")
    assert "\n" not in str(e.value) and "stage2_denoiser" in str(e.value)


def test_fp16_graphs_pass_their_tolerance(tmp_path: Path, pipe, cases) -> None:
    import onnx

    from export.onnx_export import TOLERANCE, export_graphs, parity_check

    graphs = export_graphs(pipe, tmp_path, fp16=True, only={"stage2_denoiser", "ae_decoder"})
    assert set(graphs) == {"stage2_denoiser", "ae_decoder"}
    report = parity_check(tmp_path, pipe, cases, graphs, TOLERANCE["fp16"])
    assert report["passed"], report["graphs"]
    model = onnx.load(str(tmp_path / "ae_decoder.onnx"))  # fp16 inside, fp32 at the edges
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_warp_only_pack_exports_what_exists(cache: Path) -> None:
    """No stage 2: Whisper and the stage-1 graphs only (nothing else ever runs), and the
    backend pipeline still runs the warp-only rung end to end."""
    from engine.runner import PipelineRunner, SessionRefs
    from export.backends import load_pipeline
    from export.onnx_export import load_manifest
    from export.realdata import window_request

    out = onnx_export(cache, stage2=False)
    m = load_manifest(out)
    assert set(m["graphs"]) == STAGE1_GRAPHS and m["stage2"] is False and m["parity"]["passed"]
    pipe = load_pipeline(out, backend="onnxruntime")
    assert pipe.stage2.model is None and pipe.stage2.device == torch.device("cpu")
    runner = PipelineRunner(pipe)
    clip = real_clip(cache)
    tok = clip.tokens(pipe.whisper)
    res = runner.run_batch([window_request(clip, slice(0, 7), SessionRefs(clip.bank(pipe.template)),
                                           tokens=tok[:7], steps=2)])[0]
    assert res.faces.shape == (7, 64, 64, 3) and res.state.latent is None
    with pytest.raises(TCCPError, match="no ae_encoder graph"):
        pipe.stage2.autoencoder.encode(torch.zeros(1, 3, 40, 40))


def test_head_mode_stage1_is_exported_checked_and_run_by_the_backend(cache: Path, tmp_path: Path) -> None:
    """A pack with a head-mode stage 1 exports its two graphs too, checked on real
    inputs (the sample's head-masked contexts and tokens), and an export folder runs
    `--region head` on them: the backend's head generator gives torch's landmarks."""
    from engine.runner import PipelineRunner
    from export.backends import BackendLandmarkNet, load_pipeline
    from export.onnx_export import load_manifest
    from tccp.face.context import CONTEXT_DIM
    from tccp.media.io import sample_paths
    from tccp.models.landmarks import LandmarkCodec, LandmarkNet, LandmarkNetConfig
    from tccp.pack import load_pack, save_pack

    runner = PipelineRunner.random(size=64, stage2=False)
    torch.manual_seed(3)
    hc = LandmarkCodec(runner.template, "head")
    hn = LandmarkNet(LandmarkNetConfig(mode="head", gen_dim=hc.gen_dim, cv_dim=hc.cv_dim, ref_dim=hc.ref_dim,
                                       width=32, depth=1, control_depth=1, heads=2))
    with torch.no_grad():
        for p in hn.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    pack = save_pack(tmp_path / "pack", runner.pipeline.stage1.net, runner.pipeline.stage1.codec, None,
                     stage1_head=(hn, hc), crop_size=64, dtype=torch.float32)
    out = tmp_path / "export"
    assert cli_main(["export", "--model", str(pack), "--format", "onnx", "--out", str(out),
                     "--parity-clip", str(sample_paths()[0])]) == 0
    m = load_manifest(out)
    assert set(m["graphs"]) == STAGE1_GRAPHS | {"stage1_head_condition", "stage1_head_denoiser"}
    assert m["stage1_head"] is True and m["parity"]["passed"]
    for name in ("stage1_head_condition", "stage1_head_denoiser"):
        shapes = [c["shapes"] for c in m["parity"]["graphs"][name]["cases"]]
        assert {s["flags" if "flags" in s else "vad"][0] for s in shapes} == {1, 2}, shapes  # batch 1 and 2
    den = [c["shapes"] for c in m["parity"]["graphs"]["stage1_head_denoiser"]["cases"]]
    assert {s["c_v"][2] for s in den} == {CONTEXT_DIM} and {s["x"][1] for s in den} == {1, 8}  # N = 1 and 8
    ort = load_pipeline(out, backend="onnxruntime")
    assert isinstance(ort.stage1_head.net, BackendLandmarkNet) and ort.stage1_head.codec.mode == "head"
    ref = load_pack(pack, with_autoencoder=False).stage1_head
    rng = np.random.default_rng(0)
    heads = np.asarray(runner.template, np.float32)[None] + rng.normal(0, 0.01, (4, *runner.template.shape))
    pose = rng.normal(0, 0.05, (4, 4)).astype(np.float32)
    cfg = hn.cfg
    audio = rng.normal(0, 1, (1, 8, cfg.audio_tokens, cfg.audio_layers * cfg.audio_width)).astype(np.float32)
    vad, cv = np.ones((1, 8), np.float32), rng.uniform(0, 1, (1, 8, CONTEXT_DIM)).astype(np.float32)
    outs = [g.window(audio, vad, cv, [g.references(heads.astype(np.float32), pose)], None, seed=0, steps=2)
            for g in (ref, ort.stage1_head)]
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-3)
    assert np.abs(outs[0]).max() > 1e-3  # a network that outputs something


def test_export_cli_errors(tmp_path: Path, pack: Path, capsys: pytest.CaptureFixture) -> None:
    """(The successful `tccp export` run is the `exported` fixture.) A bad or old pack,
    a bad opset and --max-batch with onnx are one-line errors leaving nothing behind."""
    bad = tmp_path / "bad"
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"format": "tccp-pack", "version": 1, "stage1": {}}))
    assert cli_main(["export", "--model", str(tmp_path / "nope"), "--out", str(bad)]) == 2
    assert cli_main(["export", "--model", str(old), "--out", str(bad)]) == 2
    assert cli_main(["export", "--model", str(pack), "--out", str(bad), "--opset", "9", "--no-parity"]) == 2
    assert cli_main(["export", "--model", str(pack), "--out", str(bad), "--max-batch", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 4 and "Traceback" not in err and "version 1" in err
    assert not bad.exists() and not list(tmp_path.glob(".bad.tmp-*"))


def test_manifest_errors_are_one_line(tmp_path: Path) -> None:
    from export.onnx_export import load_manifest

    with pytest.raises(TCCPError, match="not a tccp export folder"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(TCCPError, match="unreadable"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "tccp-export", "version": 1, "graphs": {}}))
    with pytest.raises(TCCPError, match="version 1"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "tccp-export", "version": 2,
                                                         "graphs": {"ae_decoder": {"file": "gone.onnx"}}}))
    with pytest.raises(TCCPError, match="gone.onnx"):
        load_manifest(tmp_path)


# --------------------------------------------------------------------------- backends
def _run(pipeline, clip, steps: int = 2, cfg_scale: float = 1.0):
    """Two streams restarting, then both continuing: the engine's windows on real inputs."""
    from dataclasses import replace

    from engine.runner import PipelineRunner, SessionRefs
    from export.realdata import window_request

    pipeline.stage2.sampler = replace(pipeline.stage2.sampler, cfg_scale=cfg_scale)
    runner = PipelineRunner(pipeline)
    tok = clip.tokens(pipeline.whisper)
    bank = clip.bank(pipeline.template)
    refs = [SessionRefs(bank), SessionRefs(bank)]
    sl = [slice(0, 7), slice(14, 21)]
    a = runner.run_batch([window_request(clip, s, refs[k], tokens=tok[s], steps=steps, seed=k) for k, s in enumerate(sl)])
    sl2 = [slice(7, 14), slice(21, 28)]
    b = runner.run_batch([window_request(clip, s, refs[k], a[k].state, tokens=tok[s], steps=steps, seed=k)
                          for k, s in enumerate(sl2)])
    return a + b, tok


def test_torch_backend_is_the_plain_pipeline(pack: Path, clip) -> None:
    """The seam adds nothing: a torch-backend pipeline equals load_pack's bit for bit."""
    from export.backends import Backend, BackendLandmarkNet, BackendMouthNet, load_pipeline
    from tccp.pack import load_pack

    via = load_pipeline(pack, backend="torch")
    assert isinstance(via.backend, Backend) and isinstance(via.stage1.net, BackendLandmarkNet)
    assert isinstance(via.stage2.model, BackendMouthNet) and via.stage1.net.cfg.objective == "regress"
    assert via.device == torch.device("cpu") and via.stage2.dtype == torch.float32
    plain = load_pack(pack)
    assert via.stage2.sampler == plain.stage2.sampler and via.crop_size == plain.crop_size == 64
    (a, ta), (b, tb) = _run(plain, clip), _run(via, clip)
    assert np.array_equal(ta, tb)
    for x, y in zip(a, b):
        assert np.array_equal(x.faces, y.faces) and np.array_equal(x.targets, y.targets)
        assert torch.equal(x.state.latent, y.state.latent)
    assert via.backend.timings.calls["stage2_denoiser"] > 0


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_onnxruntime_backend_agrees_with_torch(exported: Path, pack: Path, clip, cfg_scale: float) -> None:
    """torch and onnxruntime through the unchanged pipelines and runner (incl. CFG,
    whose unconditional half uses the exported null tokens): same landmarks, same
    faces to a grey level or two, every network on the backend's clock."""
    from export.backends import NETWORKS, load_pipeline

    ref, tok_ref = _run(load_pipeline(pack, backend="torch"), clip, cfg_scale=cfg_scale)
    pipe = load_pipeline(exported, backend="onnxruntime")
    got, tok = _run(pipe, clip, cfg_scale=cfg_scale)
    assert np.abs(tok - tok_ref).max() <= 1e-3 * np.abs(tok_ref).max()
    for a, b in zip(ref, got):
        assert np.abs(a.targets - b.targets).max() < 1e-2  # crop px
        assert np.abs(a.faces.astype(int) - b.faces.astype(int)).max() <= 3
        assert (a.state.latent - b.state.latent).abs().max() <= 1e-3 * a.state.latent.abs().max() + 1e-4
    assert set(pipe.backend.timings.calls) == set(NETWORKS)


def test_backend_modules_have_the_surfaces_the_pipelines_use(exported: Path, pipe, clip) -> None:
    from engine.features import full_features_unpadded
    from export.backends import load_pipeline
    from tccp.media.whisper import full_features

    b = load_pipeline(exported, backend="onnxruntime")
    for m in (b.stage1.net, b.stage2.model, b.stage2.autoencoder.encoder, b.whisper):
        p = next(m.parameters())  # the zero-size anchor
        assert p.numel() == 0 and p.device == torch.device("cpu") and p.dtype == torch.float32
    assert b.whisper.n_layers == pipe.whisper.n_layers and b.whisper.width == pipe.whisper.width
    assert b.stage1.net.cfg == pipe.stage1.net.cfg and b.stage2.model.cfg == pipe.stage2.model.cfg
    assert np.array_equal(b.template, pipe.template) and b.stage1.codec.scale == pipe.stage1.codec.scale
    # Whisper through the engine's feature makers (30 s padded chunk; live unpadded view)
    a = full_features(b.whisper, clip.audio)
    r = full_features(pipe.whisper, clip.audio)
    assert a.shape == r.shape and np.abs(a - r).max() <= 1e-3 * np.abs(r).max()
    live = full_features_unpadded(b.whisper, clip.audio[:8000])
    assert live.shape == (25, 5, 384)
    lat = b.stage2.autoencoder.encode_images(clip.crops[:3, 12:52, 12:52])
    assert lat.shape == (3, 32, 5, 5) and b.stage2.autoencoder.decode_latents(lat).shape == (3, 40, 40, 3)
    null = b.stage2.model.null_conditions(2, 3)
    assert torch.allclose(null, pipe.stage2.model.null_conditions(2, 3))
    with pytest.raises(ValueError, match="training"):
        b.stage1.net.condition_tokens(torch.zeros(1, 1, 10, 1920), torch.zeros(1, 1), torch.zeros(1, 4, 114),
                                      drop_audio=torch.zeros(1, dtype=torch.bool))


def test_get_backend_errors(pack: Path, exported: Path) -> None:
    from export.backends import get_backend

    with pytest.raises(TCCPError, match="unknown"):
        get_backend("openvino", pack)
    with pytest.raises(TCCPError, match="export folder"):
        get_backend("torch", exported)
    with pytest.raises(TCCPError, match="torch backend"):
        get_backend("onnxruntime", exported, compile=True)
    with pytest.raises(TCCPError, match="optimisation level"):
        get_backend("onnxruntime", exported, opt="max")
    if not torch.cuda.is_available():
        with pytest.raises(TCCPError, match="no CUDA device"):
            get_backend("torch", pack, device="cuda")


def test_onnxruntime_sessions_do_not_spin(exported: Path) -> None:
    """The threading fix of docs/export.md: one thread count for every session (torch's
    unless given), no spin-waiting unless asked for."""
    from export.backends import get_backend

    be = get_backend("onnxruntime", exported)
    assert be.threads == torch.get_num_threads() == 1
    opts = be.options
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spun = get_backend("onnxruntime", exported, threads=2, spin=True, opt="basic")
    assert spun.threads == 2 and spun.options.get_session_config_entry("session.intra_op.allow_spinning") == "1"


# --------------------------------------------------------------------------- TensorRT
def test_tensorrt_profiles_cover_the_engine_shapes() -> None:
    """Profile shapes (no TensorRT needed): batch and frames from the build, other
    symbolic dims from the export's recorded ranges."""
    from export.tensorrt_build import _profile_shapes

    lo, opt, hi = _profile_shapes(["batch", 80, "mel_frames"], 16, 1, 8, {"mel_frames": 300}, {"mel_frames": [2, 3000]})
    assert (lo, opt, hi) == ((1, 80, 2), (1, 80, 300), (16, 80, 3000))
    lo, opt, hi = _profile_shapes(["batch", 32, "frames", 5, 5], 4, 2, 8)
    assert (lo, opt, hi) == ((1, 32, 1, 5, 5), (2, 32, 8, 5, 5), (4, 32, 8, 5, 5))


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


def test_tensorrt_build_and_backend(tmp_path: Path, pack: Path, clip) -> None:
    """Real engines (fp16, batch profile 1..4) from the exported graphs, checked against
    torch by the build's own parity step, then run through the pipelines."""
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA device")
    from export.backends import load_pipeline
    from export.onnx_export import export_onnx
    from export.tensorrt_build import build_step

    out = tmp_path / "trt"
    m = export_onnx(pack, out, parity_clip=clip, build=build_step(max_batch=4))
    assert set(m["tensorrt"]["engines"]) == GRAPHS and m["tensorrt"]["parity"]["passed"]
    assert m["tensorrt"]["engines"]["ae_encoder"]["max_batch"] == 4 * 8  # streams x frames
    ref, _ = _run(load_pipeline(pack, backend="torch", device="cuda", precision="fp32"), clip, cfg_scale=2.0)
    got, _ = _run(load_pipeline(out, backend="tensorrt", device="cuda"), clip, cfg_scale=2.0)
    for a, b in zip(ref, got):
        assert np.abs(a.faces.astype(int) - b.faces.astype(int)).mean() <= 2.0  # fp16 engines


def test_torch_cuda_fast_paths(pack: Path, clip) -> None:
    """fp16 + CUDA graphs and bf16 agree with fp32 eager on the GPU (skips without one)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from export.backends import load_pipeline

    ref, _ = _run(load_pipeline(pack, backend="torch", device="cuda", precision="fp32"), clip, cfg_scale=2.0)
    for opts in ({"precision": "fp16", "cuda_graphs": True}, {"precision": "bf16"}):
        pipe = load_pipeline(pack, backend="torch", device="cuda", **opts)
        for _ in range(2):  # the second pass replays the captured graphs
            got, _ = _run(pipe, clip, cfg_scale=2.0)
            for a, b in zip(ref, got):
                assert np.abs(a.faces.astype(int) - b.faces.astype(int)).mean() <= 3.0, opts
