"""Model pack I/O (format 2), the stage-2 mouth editor and `tccp info`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tccp.cli import main as cli_main
from tccp.errors import TCCPError
from tccp.pack import DEFAULT_PACK, load_pack, load_stage1, load_stage2, read_pack_config, save_pack

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runner():
    from engine.runner import PipelineRunner

    return PipelineRunner.random(size=64)


def _save(runner, path: Path, stage2: bool = True, dtype=torch.float16) -> Path:
    p = runner.pipeline
    return save_pack(path, p.stage1.net, p.stage1.codec, p.stage2.model if stage2 else None,
                     crop_size=runner.size, dtype=dtype, card={"name": "tiny-random"})


def test_pack_roundtrip(runner, tmp_path: Path) -> None:
    pack = _save(runner, tmp_path / "pack", dtype=torch.float32)
    cfg = read_pack_config(pack)
    assert cfg["version"] == 2 and cfg["region"] == "mouth" and cfg["crop_size"] == 64
    net, codec = load_stage1(pack)
    ref = runner.pipeline.stage1
    np.testing.assert_array_equal(codec.template, ref.codec.template)
    for (k, a), (_, b) in zip(net.state_dict().items(), ref.net.state_dict().items()):
        assert torch.equal(a, b), k
    m2 = load_stage2(pack)
    for (k, a), (_, b) in zip(m2.state_dict().items(), runner.pipeline.stage2.model.state_dict().items()):
        assert torch.equal(a, b), k
    pipe = load_pack(pack)
    assert pipe.crop_size == 64 and pipe.whisper is not None and pipe.stage2.autoencoder is not None


def test_fp16_pack_is_the_rounded_model(runner, tmp_path: Path) -> None:
    pack = _save(runner, tmp_path / "p16")
    net, _ = load_stage1(pack)
    for (k, a), (_, b) in zip(net.state_dict().items(), runner.pipeline.stage1.net.state_dict().items()):
        assert torch.equal(a, b.half().float()), k


def test_warp_only_pack(runner, tmp_path: Path) -> None:
    pack = _save(runner, tmp_path / "warp", stage2=False)
    assert not (pack / "stage2.safetensors").exists()
    assert read_pack_config(pack)["stage2"] is None
    assert load_stage2(pack) is None and load_pack(pack).stage2.model is None


def _one_line(exc: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg


def test_broken_packs_are_one_line_errors(runner, tmp_path: Path) -> None:
    with pytest.raises(TCCPError) as e:
        load_pack(tmp_path / "missing", with_autoencoder=False)
    _one_line(e, tmp_path / "missing")
    good = _save(runner, tmp_path / "good")
    cases = {
        "no_config": lambda d: (d / "config.json").unlink(),
        "bad_json": lambda d: (d / "config.json").write_text("{not json"),
        "not_a_pack": lambda d: (d / "config.json").write_text(json.dumps({"hello": 1})),
        "no_weights": lambda d: (d / "stage2.safetensors").unlink(),
        "truncated": lambda d: (d / "stage1.safetensors").write_bytes((d / "stage1.safetensors").read_bytes()[:1000]),
        "wrong_shapes": lambda d: (d / "config.json").write_text(json.dumps(
            {**read_pack_config(d), "stage1": {**read_pack_config(d)["stage1"],
                                                "model": {**read_pack_config(d)["stage1"]["model"], "width": 48}}})),
        "bad_config_key": lambda d: (d / "config.json").write_text(json.dumps(
            {**read_pack_config(d), "stage2": {**read_pack_config(d)["stage2"],
                                                "model": {**read_pack_config(d)["stage2"]["model"], "wings": 2}}})),
    }
    for name, breaker in cases.items():
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        breaker(d)
        with pytest.raises(TCCPError) as e:
            load_pack(d, with_autoencoder=False)
        _one_line(e, d)


def test_version_1_pack_names_its_version(tmp_path: Path) -> None:
    """A pack from before the mouth editor: one line naming the version, no traceback."""
    d = tmp_path / "old"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"format": "tccp-pack", "version": 1, "stage1": {}, "stage2": {}}))
    with pytest.raises(TCCPError, match="version 1") as e:
        load_pack(d)
    _one_line(e, d)
    code = cli_main(["run", "--video", "x.mp4", "--out", str(tmp_path / "o.mp4"), "--model", str(d)])
    assert code == 2


def test_default_pack_location() -> None:
    assert DEFAULT_PACK.parts[-4:] == ("tccp", "assets", "models", "default")


def test_editor_pins_slot0_and_uses_each_stream_seed(runner) -> None:
    editor = runner.pipeline.stage2
    x0, y0, x1, y1 = editor.patch
    side = x1 - x0
    rng = np.random.default_rng(0)
    inputs = [{"masked": rng.integers(0, 255, (4, side, side, 3), dtype=np.uint8),
               "warped": rng.integers(0, 255, (4, side, side, 3), dtype=np.uint8),
               "sketches": rng.integers(0, 255, (4, side, side, 3), dtype=np.uint8),
               "mask": np.ones((4, side, side), np.float32), "ref": np.zeros(4, int)} for _ in range(2)]
    from tccp.pipelines.faces import ReferenceBank

    s = runner.size
    bank = ReferenceBank(rng.integers(0, 255, (1, s, s, 3), dtype=np.uint8), np.zeros((1, 478, 2), np.float32),
                         np.zeros((1, 80), np.float32))
    prev = torch.randn(2, 32, side // 8, side // 8)
    mel = np.zeros((2, 4, 16, 80), np.float32)
    out = editor.window(inputs, [bank, bank], mel, prev, steps=2, seed=[1, 2])
    assert out.shape == (2, 32, 4, side // 8, side // 8)
    assert torch.equal(out[:, :, 0], prev)
    alone = editor.window(inputs[1:], [bank], mel[1:], prev[1:], steps=2, seed=[2])
    assert torch.allclose(alone[0], out[1], atol=1e-4)  # independent of the batch it shares


def test_info_command(capsys: pytest.CaptureFixture, runner, tmp_path: Path) -> None:
    pack = _save(runner, tmp_path / "p")
    assert cli_main(["info", "--pack", str(pack), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    n1 = sum(p.numel() for p in runner.pipeline.stage1.net.parameters())
    n2 = sum(p.numel() for p in runner.pipeline.stage2.model.parameters())
    assert report["stage1_params"] == n1 and report["stage2_params"] == n2
    assert report["window_flops"] > 0
    assert cli_main(["info", "--pack", str(tmp_path / "nope")]) == 2


def test_pixel_residual_keeps_the_warp_where_the_correction_is_zero(runner) -> None:
    """The correction is added to the warp's own pixels: no correction gives the warp
    back exactly (not its autoencoder round trip); a corrected latent changes it by the
    decoded difference."""
    editor = runner.pipeline.stage2
    x0, y0, x1, y1 = editor.patch
    side = x1 - x0
    rng = np.random.default_rng(1)
    warped = rng.integers(0, 255, (2, 3, side, side, 3), dtype=np.uint8)
    from einops import rearrange

    lat = rearrange(editor.encode(warped), "b n c h w -> b c n h w")
    roundtrip = editor.decode(lat)
    assert np.abs(roundtrip.astype(int) - warped).mean() > 1  # the round trip alone loses detail
    assert np.array_equal(editor.pixel_residual(roundtrip, warped), warped)
    changed = editor.decode(lat + 0.5)
    out = editor.pixel_residual(changed, warped)
    want = np.clip(warped.astype(int) + changed.astype(int) - roundtrip.astype(int), 0, 255)
    assert np.array_equal(out, want) and not np.array_equal(out, warped)
    # the runner hands over the latents it already encoded for the denoiser: same result
    assert np.array_equal(editor.pixel_residual(changed, warped, lat), out)
    # a gain scales the change: 0 is the warp, 0.5 half way (rounded)
    assert np.array_equal(editor.pixel_residual(changed, warped, lat, gain=0.0), warped)
    half = np.clip(np.rint(warped + 0.5 * (changed.astype(np.float32) - roundtrip)), 0, 255)
    assert np.array_equal(editor.pixel_residual(changed, warped, lat, gain=0.5), half)
    inputs = [{"warped": w} for w in warped]
    assert torch.equal(editor.encode_warped(inputs), lat)
