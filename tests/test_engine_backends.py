"""The engine runs on the exported (onnxruntime) backend, end to end: the runner built
by `PipelineRunner.from_pack(pack, loader=pipeline_loader("onnxruntime"))` (which
exports the pack on first use into the cache) runs real windows, and so does a whole
`tccp run --backend onnxruntime`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_export import real_clip, tiny_pack

from tccp.errors import TCCPError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(export_cache: Path) -> Path:
    return export_cache


def test_unknown_backend_is_a_one_line_error():
    from export.backends import pipeline_loader

    with pytest.raises(TCCPError, match="--backend bogus") as e:
        pipeline_loader("bogus")
    assert "\n" not in str(e.value)


def _windows(runner, clip, steps: int = 2):
    """A restart window then a continuation, on real inputs (tokens from the runner's
    own Whisper, as a session's AudioFeatures computes them)."""
    from engine.runner import SessionRefs
    from export.realdata import window_request

    tok = clip.tokens(runner.pipeline.whisper)
    refs = SessionRefs(clip.bank(runner.template))
    a = runner.run_batch([window_request(clip, slice(0, 7), refs, tokens=tok[0:7], steps=steps)])[0]
    b = runner.run_batch([window_request(clip, slice(7, 14), refs, a.state, tokens=tok[7:14], steps=steps)])[0]
    return a, b


def test_from_pack_on_onnxruntime_runs_windows(cache: Path) -> None:
    pytest.importorskip("onnxruntime")
    from engine.runner import PipelineRunner
    from export.backends import OnnxRuntimeBackend, pipeline_loader

    pack = tiny_pack(cache)
    ort = pipeline_loader("onnxruntime")
    runner = PipelineRunner.from_pack(str(pack), loader=ort)
    assert isinstance(runner.pipeline.backend, OnnxRuntimeBackend) and runner.size == 64
    assert (cache / "exports").is_dir()  # exported on first use, into the cache
    clip = real_clip(cache)
    a, b = _windows(runner, clip)
    assert a.faces.shape == b.faces.shape == (7, 64, 64, 3) and b.state.latent.shape == (32, 5, 5)
    ra, rb = _windows(PipelineRunner.from_pack(str(pack)), clip)
    for x, y in ((a, ra), (b, rb)):
        assert np.abs(x.faces.astype(int) - y.faces.astype(int)).max() <= 3
        assert np.abs(x.targets - y.targets).max() < 1e-2
    # a second runner reuses the cached export (no new export folder)
    before = sorted(p.name for p in (cache / "exports").iterdir())
    PipelineRunner.from_pack(str(pack), loader=ort)
    assert sorted(p.name for p in (cache / "exports").iterdir()) == before


def test_run_cli_on_onnxruntime_writes_a_video(cache: Path, tmp_path: Path, capsys) -> None:
    """`tccp run --backend onnxruntime` on a pack: the whole engine (tracking, audio
    features, windows, compositing, encoding) on exported graphs."""
    pytest.importorskip("onnxruntime")
    from tccp.cli import main
    from tccp.media.io import load_clip, sample_paths

    out = tmp_path / "ort.mp4"
    video, speech = sample_paths()
    assert main(["run", "--model", str(tiny_pack(cache)), "--video", str(video), "--audio", str(speech),
                 "--out", str(out), "--backend", "onnxruntime", "--max-seconds", "1", "--quiet"]) == 0
    clip = load_clip(out, require_audio=True, min_frames=1)
    assert clip.n_frames == 25
    # the exported stage 1 cannot be trained: a torch copy of the pack's is adapted and runs beside the backend
    assert "stage 1 adapted to the person" in " ".join(capsys.readouterr().out.split())


def test_bundled_pack_on_onnxruntime(cache: Path) -> None:
    """The bundled pack through the exported path, once it is a version-2 pack."""
    pytest.importorskip("onnxruntime")
    from engine.runner import PipelineRunner
    from export.backends import pipeline_loader
    from tccp.pack import DEFAULT_PACK, read_pack_config

    try:
        read_pack_config(DEFAULT_PACK)
    except TCCPError:
        pytest.skip("the bundled pack is not a version-2 pack yet")
    from export.realdata import sample_clip

    runner = PipelineRunner.from_pack(None, loader=pipeline_loader("onnxruntime"))
    clip = sample_clip(32, runner.size)
    a, b = _windows(runner, clip, steps=1)
    assert a.faces.shape[0] == b.faces.shape[0] == 7
