"""The engine runs on the exported (onnxruntime) backend, end to end, with the bundled pack."""

from __future__ import annotations

import pytest

from tccp.errors import TCCPError


def test_unknown_backend_is_a_one_line_error():
    from engine.runner import PipelineRunner

    with pytest.raises(TCCPError, match="--backend bogus"):
        PipelineRunner.from_pack(None, backend="bogus")


def test_run_on_onnxruntime_writes_a_video(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from tccp.pack import DEFAULT_PACK

    if not (DEFAULT_PACK / "config.json").is_file():
        pytest.skip("no bundled pack")
    monkeypatch.setenv("TCCP_CACHE", str(tmp_path / "cache"))  # export into the test's folder
    from tccp.cli import main
    from tccp.media.io import load_clip, sample_paths

    out = tmp_path / "ort.mp4"
    video, speech = sample_paths()
    assert main(["run", "--video", str(video), "--audio", str(speech), "--out", str(out),
                 "--backend", "onnxruntime", "--max-seconds", "1", "--quiet"]) == 0
    clip = load_clip(out, require_audio=True, min_frames=1)
    assert clip.n_frames == 25
