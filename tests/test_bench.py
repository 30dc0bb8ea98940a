"""`tccp bench` and the steps study: report structure and honesty, not speed (no timed
assertions: the machine is shared). Uses the same cached tiny pack, prepared sample
piece and ONNX export as tests/test_export.py."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export import onnx_export, sample_folder, shared_cache, tiny_pack

from tccp.cli import main as cli_main


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def clip(cache: Path):
    from export.realdata import load_real_clip

    return load_real_clip(sample_folder(cache), with_frames=True)


def test_bench_report(cache: Path, clip, tmp_path: Path) -> None:
    """Two backends, two streams batched, real windows with compositing: every number
    the issue asks for is there and self-consistent."""
    from export.bench import BenchConfig, plot_bench, run_bench

    onnx_export(cache)  # so the onnxruntime backend finds its export in the cache
    cfg = BenchConfig(backends=["torch", "onnxruntime"], streams=2, windows=2, repeat=2, warmup=1, steps=1)
    report = run_bench(tiny_pack(cache), "random:tiny (RANDOM WEIGHTS)", cfg, clip=clip, cache=str(cache / "exports"))
    assert report["random_weights"] and report["config"]["window"] == 4 and report["config"]["clip"] == "sample_piece"
    m = report["machine"]
    assert m["cpu"] and m["cpu_count"] >= 1 and m["torch"] == torch.__version__ and "load_average" in m
    runs = {r["backend"]: r for r in report["runs"]}
    assert list(runs) == ["torch", "onnxruntime"] and runs["torch"]["reference"]
    for r in runs.values():
        w = r["window_latency"]
        assert w["n"] == cfg.windows * cfg.repeat == len(r["latencies_ms"])
        assert 0 < w["min_ms"] <= w["p50_ms"] <= w["p95_ms"] <= w["p99_ms"] <= w["max_ms"]
        assert r["first_frame_latency"]["n"] == cfg.repeat and r["peak_rss_mb"] > 50
        # fps = composited frames / timed seconds: 2 streams x 3 new frames per window
        total_s = sum(r["latencies_ms"]) / 1000
        assert r["fps"] == pytest.approx(cfg.streams * 3 * w["n"] / total_s, rel=1e-6)
        assert r["model_latency"]["p50_ms"] <= w["max_ms"] and r["model_fps"] >= r["fps"]
    cmp = runs["onnxruntime"]["vs_torch_eager"]
    assert cmp["fps_ratio"] == pytest.approx(runs["onnxruntime"]["fps"] / runs["torch"]["fps"])
    assert cmp["max_abs_pixel_diff"] <= 2  # same faces from both backends
    assert report["flops_estimate"]["window_flops"] > 0 and "achieved_gflops_per_s" in runs["torch"]
    png = plot_bench(report, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    args = ["bench", "--model", str(tiny_pack(cache)), "--backend", "torch", "--windows", "1", "--repeat", "1",
            "--warmup", "0", "--steps", "1", "--clip", str(sample_folder(cache)), "--json", str(out), "--plot", str(png)]
    assert cli_main(args) == 0
    report = json.loads(out.read_text())
    assert [r["backend"] for r in report["runs"]] == ["torch"] and png.is_file()
    assert "fps" in capsys.readouterr().out
    # user errors: one line, exit 2, nothing written
    bad = tmp_path / "bad.json"
    for extra in (["--backend", "openvino"], ["--streams", "0"], ["--model", str(tmp_path / "none")]):
        argv = ["bench", "--json", str(bad), *extra]
        if "--model" not in extra:
            argv += ["--model", str(tiny_pack(cache))]
        assert cli_main(argv) == 2
    assert cli_main(["bench", "--model", str(tiny_pack(cache))]) == 2  # --json is required
    err = capsys.readouterr().err
    assert err.count("error:") == 4 and "Traceback" not in err and not bad.exists()


def test_window_slices_cycle_through_the_clip() -> None:
    from export.bench import _window_slices

    s = _window_slices(10, 3, 5)
    assert [(x.start, x.stop) for x in s] == [(0, 3), (3, 6), (6, 9), (0, 3), (3, 6)]


# --------------------------------------------------------------------------- steps study
class _Oracle:
    """A pipeline whose windows return the ground truth latents: the study's scores
    must then be those of a TAEF2 round trip (slot alignment, masks, units)."""

    def __init__(self, pipe, windows) -> None:
        from einops import rearrange

        self.autoencoder, self.norm, self.decode = pipe.autoencoder, pipe.norm, pipe.decode
        enc = lambda x: rearrange(pipe.autoencoder.encode_images(x), "n c h w -> 1 c n h w")  # noqa: E731
        self.truth = itertools.cycle([(enc(w.sketches)[:, :, 1:], enc(w.faces)[:, :, 1:]) for w in windows])
        self.calls: list[dict] = []

    def window(self, ctx, mel, ref, prev_sketch, prev_face, **kw):  # noqa: ANN001
        self.calls.append(kw)
        return next(self.truth)


def test_steps_study_oracle_scores(cache: Path) -> None:
    from export.steps_study import StudyConfig, held_out_windows, run_study
    from tccp.pack import load_pack

    windows = held_out_windows([sample_folder(cache)], frames=4, per_clip=2)
    assert len(windows) == 2 and windows[0].n == 4
    oracle = _Oracle(load_pack(tiny_pack(cache)), windows)
    report = run_study(oracle, windows, StudyConfig(steps=(1, 3), samplers=("ddim", "dpmpp_2m"), lip=True))
    assert [c["steps"] for c in oracle.calls[:2]] == [1, 1] and oracle.calls[-1] == {"steps": 3, "sampler": "dpmpp_2m",
                                                                                       "generator": oracle.calls[-1]["generator"]}
    for sampler in ("ddim", "dpmpp_2m"):
        for steps in ("1", "3"):
            cell = report["results"][sampler][steps]
            assert cell["sketch_latent_rmse"] == pytest.approx(0.0, abs=1e-6)
            assert 22.0 < cell["face_psnr_db"] < 60.0  # TAEF2 round trip inside the head mask
            assert cell["lip_lmd"] is not None and cell["lip_lmd"] < 0.08  # real faces: mediapipe finds them
            assert cell["lip_face_found"] == 1.0
            assert len(cell["per_window"]["face_psnr_db"]) == 2


def test_steps_study_runs_a_real_pipeline(cache: Path, tmp_path: Path) -> None:
    """The machinery on the random tiny model through `tccp bench --steps-sweep`-style
    args; same seed for every cell, so a repeated cell gives the same numbers."""
    from export.steps_study import StudyConfig, held_out_windows, plot_study, run_study
    from tccp.pack import load_pack

    windows = held_out_windows([sample_folder(cache)], frames=4, per_clip=1)
    pipe = load_pack(tiny_pack(cache))
    cfg = StudyConfig(steps=(1, 2), samplers=("ddim", "dpmpp_2m"), lip=False)
    a = run_study(pipe, windows, cfg)
    b = run_study(pipe, windows, StudyConfig(steps=(2,), samplers=("ddim",), lip=False))
    assert a["results"]["ddim"]["2"]["face_psnr_db"] == b["results"]["ddim"]["2"]["face_psnr_db"]
    assert np.isfinite(a["results"]["dpmpp_2m"]["1"]["face_psnr_db"]) and a["results"]["ddim"]["1"]["lip_lmd"] is None
    a["model"] = "random:tiny"
    assert plot_study(a, tmp_path / "s.png").is_file()


def test_steps_sweep_cli(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    # the bench flag delegates to the study; explicit clips via the study's own CLI
    from export.steps_study import main as study_main

    assert study_main(["--model", str(tiny_pack(cache)), "--clips", str(sample_folder(cache)), "--steps", "1",
                       "--samplers", "ddim", "--windows-per-clip", "1", "--no-lip", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"ddim"} and report["config"]["teacher_forced_slot0"]
    assert cli_main(["bench", "--steps-sweep", "--model", str(tiny_pack(cache)), "--prepared", str(tmp_path / "none"),
                     "--json", str(out)]) == 2


def test_clip_resized_to_the_pack_crop_size(cache: Path, clip) -> None:
    """A pack trained at another crop size gets area-resampled crops (as training's
    resized cache), masks and landmarks scaled alike."""
    from export.realdata import load_real_clip

    small = load_real_clip(sample_folder(cache), start=2, n=4, size=32)
    assert small.size == 32 and small.faces.shape == (4, 32, 32, 3) and small.masks.shape == (4, 32, 32)
    assert small.identity.shape == (32, 32, 3) and small.mel.shape == (4, 16, 80)
    np.testing.assert_allclose(small.landmarks, clip.landmarks[2:6] * 0.5, rtol=1e-6)
    assert abs(small.faces.astype(float).mean() - clip.faces[2:6].astype(float).mean()) < 2.0
