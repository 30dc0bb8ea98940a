"""`tccp bench` and the steps study: report structure and honesty, not speed (no timed
assertions: the machine is shared). Uses the same cached tiny packs, tracked sample
clip and ONNX export as tests/test_export.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export import onnx_export, real_clip, tiny_pack

from tccp.cli import main as cli_main
from tccp.errors import TCCPError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(export_cache: Path) -> Path:
    return export_cache


@pytest.fixture(scope="module")
def clip(cache: Path):
    return real_clip(cache)


def test_bench_report(cache: Path, clip, tmp_path: Path) -> None:
    """Two backends interleaved, two streams batched, real windows with Whisper and
    compositing: every number the issue asks for is there and self-consistent."""
    from export.bench import PARTS, BenchConfig, plot_bench, run_bench

    onnx_export(cache)  # so the onnxruntime backend finds its export in the cache
    cfg = BenchConfig(backends=["torch", "onnxruntime"], streams=2, windows=2, repeat=2, warmup=1, steps=1)
    report = run_bench(tiny_pack(cache), "random:tiny (RANDOM WEIGHTS)", cfg, clip=clip, cache=str(cache / "exports"))
    assert report["random_weights"] and report["config"]["window"] == 8 and report["config"]["clip"] == "sample"
    assert report["config"]["stage2"] and report["config"]["parts"] == list(PARTS)
    m = report["machine"]
    assert m["cpu"] and m["cpu_count"] >= 1 and m["torch"] == torch.__version__ and "load_average" in m
    runs = {r["backend"]: r for r in report["runs"]}
    assert list(runs) == ["torch", "onnxruntime"] and runs["torch"]["reference"]
    assert runs["onnxruntime"]["threads"] == {"torch": 1, "onnxruntime": 1}
    for r in runs.values():
        w = r["window_latency"]
        assert w["n"] == cfg.windows * cfg.repeat == len(r["latencies_ms"])
        assert 0 < w["min_ms"] <= w["p50_ms"] <= w["p95_ms"] <= w["p99_ms"] <= w["max_ms"]
        assert r["first_frame_latency"]["n"] == cfg.repeat and r["peak_rss_mb"] > 50
        # fps = composited frames / timed seconds: 2 streams x 7 new frames per window
        total_s = sum(r["latencies_ms"]) / 1000
        assert r["fps"] == pytest.approx(cfg.streams * 7 * w["n"] / total_s, rel=1e-6)
        assert r["model_fps"] >= r["fps"]
        b = r["breakdown_ms"]
        assert set(b) == set(PARTS) and all(v >= 0 for v in b.values())
        assert b["audio"] > 0 and b["stage1"] > 0 and b["stage2"] > 0 and b["ae_encode"] > 0 and b["composite"] > 0
        assert sum(b.values()) == pytest.approx(w["mean_ms"], rel=0.02)  # the parts add up to the window
    cmp = runs["onnxruntime"]["vs_torch_eager"]
    assert cmp["fps_ratio"] == pytest.approx(runs["onnxruntime"]["fps"] / runs["torch"]["fps"])
    assert cmp["max_abs_pixel_diff"] <= 3  # same faces from both backends
    assert report["flops_estimate"]["window_flops"] > 0 and "achieved_gflops_per_s" in runs["torch"]
    png = plot_bench(report, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Warp-only pack, torch only, through the CLI; user errors are one line, exit 2,
    nothing written."""
    from tccp.media.io import sample_paths

    out, png = tmp_path / "b.json", tmp_path / "b.png"
    pack = tiny_pack(cache, stage2=False)
    other = tiny_pack(cache)  # --against: another pack in the same run (here one with stage 2)
    args = ["bench", "--model", str(pack), "--backend", "torch", "--windows", "1", "--repeat", "1",
            "--warmup", "0", "--steps", "2", "--clip", str(sample_paths()[0]), "--json", str(out), "--plot", str(png),
            "--against", str(other)]
    assert cli_main(args) == 0
    report = json.loads(out.read_text())
    assert [r["backend"] for r in report["runs"]] == [f"torch, pack {pack.name}", f"torch eager, pack {other.name}"]
    assert png.is_file() and not report["config"]["stage2"] and report["against"] == str(other)
    assert [r["pack"] for r in report["runs"]] == ["model", "against"]
    b = report["runs"][0]["breakdown_ms"]
    assert b["stage2"] == b["ae_encode"] == b["ae_decode"] == 0.0 and b["stage1"] > 0  # warp only
    assert report["runs"][1]["breakdown_ms"]["stage2"] > 0  # the other pack's own stage 2 ran
    ratio = report["runs"][1]["vs_torch_eager"]["fps_ratio"]
    assert ratio == pytest.approx(report["runs"][1]["fps"] / report["runs"][0]["fps"])
    assert "fps" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    for extra in (["--backend", "openvino"], ["--backend", "onnxruntime:threads=0"], ["--streams", "0"],
                  ["--model", str(tmp_path / "none")], ["--against", str(tmp_path / "none")]):
        argv = ["bench", "--json", str(bad), *extra]
        if "--model" not in extra:
            argv += ["--model", str(pack)]
        assert cli_main(argv) == 2
    assert cli_main(["bench", "--model", str(pack)]) == 2  # --json is required
    err = capsys.readouterr().err
    assert err.count("error:") == 6 and "Traceback" not in err and not bad.exists()


def test_parse_backend_options() -> None:
    from export.bench import parse_backend

    assert parse_backend("torch") == ("torch", {})
    assert parse_backend("onnxruntime:threads=1,spin=1,opt=basic,precision=fp16") == (
        "onnxruntime", {"threads": 1, "spin": True, "opt": "basic", "precision": "fp16"})
    assert parse_backend("torch:precision=bf16,compile=0") == ("torch", {"precision": "bf16", "compile": False})
    for bad in ("openvino", "onnxruntime:threads", "onnxruntime:colour=red", "tensorrt:threads=2"):
        with pytest.raises(TCCPError):
            parse_backend(bad)


def test_window_slices_cycle_through_the_clip() -> None:
    from export.bench import _window_slices

    s = _window_slices(10, 3, 5)
    assert [(x.start, x.stop) for x in s] == [(0, 3), (3, 6), (6, 9), (0, 3), (3, 6)]


# --------------------------------------------------------------------------- steps study
def test_steps_study_on_a_real_pipeline(cache: Path, tmp_path: Path) -> None:
    """The machinery on the random tiny model: steps 0 is the warp-only rung (the same
    for every sampler), a repeated cell gives the same numbers (same seed and noise)."""
    from export.steps_study import StudyConfig, held_out_windows, plot_study, run_study
    from tccp.media.io import sample_paths
    from tccp.pack import load_pack

    windows = held_out_windows([sample_paths()[0]], per_clip=2, size=64, max_frames=32)
    assert len(windows) == 2 and all(w.start >= 16 for w in windows) and windows[0].bank_frames == slice(0, 16)
    pipe = load_pack(tiny_pack(cache))
    cfg = StudyConfig(steps=(0, 1), samplers=("ddim", "dpmpp_2m"), lip=True)
    a = run_study(pipe, windows, cfg)
    b = run_study(pipe, windows, StudyConfig(steps=(1,), samplers=("ddim",), lip=False))
    res = a["results"]
    assert res["ddim"]["1"]["face_psnr_db"] == b["results"]["ddim"]["1"]["face_psnr_db"]
    assert res["ddim"]["0"]["face_psnr_db"] == res["dpmpp_2m"]["0"]["face_psnr_db"]
    # the warped reference of the same person is a plausible mouth: mediapipe finds the
    # face and the lips sit near the real ones; random weights are worse than the warp
    assert 15.0 < res["ddim"]["0"]["face_psnr_db"] < 60.0 and res["ddim"]["0"]["lip_face_found"] == 1.0
    assert res["ddim"]["0"]["lip_lmd"] < res["ddim"]["1"]["lip_lmd"]
    assert a["config"]["teacher_forced_slot0"] and a["scored_frames_per_window"] == 7
    a["model"] = "random:tiny"
    assert plot_study(a, tmp_path / "s.png").is_file()
    warp = run_study(load_pack(tiny_pack(cache, stage2=False)), windows[:1], StudyConfig(steps=(0, 2), lip=False))
    assert list(warp["results"]["ddim"]) == ["0"]  # no stage 2: only the warp-only rung exists


def test_steps_sweep_cli(cache: Path, tmp_path: Path) -> None:
    from export.steps_study import main as study_main
    from tccp.media.io import sample_paths

    out = tmp_path / "s.json"
    assert study_main(["--model", str(tiny_pack(cache)), "--clips", str(sample_paths()[0]), "--steps", "0", "1",
                       "--windows-per-clip", "1", "--no-lip", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]["ddim"]) == {"0", "1"} and report["config"]["mode"] == "tracked"
    assert np.isfinite(report["results"]["ddim"]["1"]["face_psnr_db"]) and report["machine"]["cpu"]
    # the bench flag delegates to the study; a missing prepared root is a one-line error
    assert cli_main(["bench", "--steps-sweep", "--model", str(tiny_pack(cache)), "--prepared", str(tmp_path / "none"),
                     "--json", str(out)]) == 2


# real time on a shared 2-core CPU: when other jobs load it, a frame can miss by a few ms;
# rerun once (pytest-rerunfailures) -- a real regression fails both times
@pytest.mark.flaky(reruns=1, reruns_delay=5)
def test_bench_live_replays_in_real_time_and_reports_the_call(cache: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """`tccp bench --live`: the bundled sample through a warmed live session and its
    playout for 3 s (warp-only tiny pack): every number is there and consistent; user
    errors are one line, nothing written."""
    out = tmp_path / "live.json"
    pack = tiny_pack(cache, stage2=False)
    plot = tmp_path / "live.png"
    argv = ["bench", "--live", "--model", str(pack), "--seconds", "3", "--size", "192", "--threads", "1",
            "--json", str(out), "--plot", str(plot), "--adapt-steps", "5", "--adapt-seconds", "1"]
    assert cli_main(argv) == 0
    report = json.loads(out.read_text())
    # the second replay adapted (or said why not: 1 s of the call holds under 3 s of speech)
    ad = report["live_adapt"]["adapt"]
    assert ad["state"] in ("adapted", "not adapted") and ad["started_s"] <= ad["ended_s"], ad
    assert ad["state"] == "adapted" or "of speech" in ad["note"], ad
    assert report["adapt_config"] == {"steps": 5, "seconds": 1.0}
    assert len(report["live"]["generated_share_per_s"]) == 3 and plot.stat().st_size > 10_000
    assert report["mode"] == "live" and report["config"]["steps"] == 0 and report["config"]["size"] == [192, 192]
    assert report["warm_up"]["windows"] >= 2 and report["warm_up"]["window_ms"] > 0
    live = report["live"]
    assert live["frames_in"] == 75 and 60 <= live["frames_sent"] <= 75
    assert live["first_frame_ms"] < 200  # the caller's own first frame at once
    assert 0.0 <= live["generated_share"] <= 1.0
    assert live["frames_generated"] == round(live["generated_share"] * live["frames_sent"])
    if live["frames_generated"]:
        assert live["first_generated_ms"] >= live["playout_delay_ms"]["start"] - 50
    lat = live["frame_latency_ms"]
    assert lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert abs(live["av_offset_ms"]) <= 30  # sound delayed exactly as picture (20 ms audio frames)
    assert "generated" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    for extra in (["--seconds", "0"], ["--size", "8"], ["--clip", str(tmp_path / "none.mp4")],
                  ["--playout-delay", "-1"], ["--adapt-steps", "-2"]):
        assert cli_main(["bench", "--live", "--model", str(pack), "--json", str(bad), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 5 and "Traceback" not in err and not bad.exists()


def test_bench_startup_times_a_file_run_to_its_first_frame(cache: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """`tccp bench --startup`: the same file run without adapting, adapting with the
    start tracked twice, and tracked once (the session replays the adaptation's
    tracking), in one sitting: every variant reported, the replay where it should be."""
    out, plot = tmp_path / "startup.json", tmp_path / "startup.png"
    pack = tiny_pack(cache, stage2=False)
    argv = ["bench", "--startup", "--model", str(pack), "--seconds", "1", "--adapt-steps", "100", "--repeat", "1",
            "--adapt-seconds", "4", "--json", str(out), "--plot", str(plot)]
    assert cli_main(argv) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "startup" and report["config"]["adapt_steps"] == 100 and report["machine"]["cpu"]
    names = list(report["runs"])  # (any other --adapt-steps N adds N's two variants beside 100's)
    assert names == ["no adaptation", "adapt 100 steps, start tracked twice", "adapt 100 steps, start tracked once"]
    for name, (r,) in report["runs"].items():
        assert r["frames"] == 25 and 0 < r["first_frame_s"] <= r["total_s"], (name, r)
        if name == "no adaptation":
            assert r["adapted"] is None and r["frames_replayed"] is None
        else:
            assert r["adapted"], r["note"]
            # tracked once: the session took every frame it needed from the adaptation's pass
            assert r["frames_replayed"] == (25 if name.endswith("once") else 0), (name, r)
            assert r["adapt_s"] < r["first_frame_s"]
    assert report["summary"]["adapt 100 steps, start tracked twice"]["first_frame_vs_tracked_twice"] == 1.0
    assert plot.stat().st_size > 10_000 and "first frame" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    for extra in (["--seconds", "0"], ["--clip", str(tmp_path / "none.mp4")], ["--adapt-steps", "-2"]):
        assert cli_main(["bench", "--startup", "--model", str(pack), "--json", str(bad), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "Traceback" not in err and not bad.exists()
