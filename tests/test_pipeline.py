"""Two-stage pipeline on latents, model pack I/O and `tccp info`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tccp.cli import main as cli_main
from tccp.errors import TCCPError
from tccp.models import MVControlNet, get_config
from tccp.pack import DEFAULT_PACK, load_pack, load_stage_state, read_pack_config, save_pack
from tccp.pipeline import LatentNorm, SamplerConfig, TCCPPipeline

CFG = get_config("tiny")
C, S, N = CFG.latent_channels, CFG.latent_size, CFG.frames


def _model(seed: int) -> MVControlNet:
    torch.manual_seed(seed)
    model = MVControlNet(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def pipe() -> TCCPPipeline:
    return TCCPPipeline(_model(1), _model(2), None, SamplerConfig("ddim", steps=3), latent_norm=LatentNorm(0.7, 0.1))


def _inputs(b: int = 2, n: int = N, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "context_lat": torch.randn(b, C, n, S, S, generator=g),
        "mel": torch.randn(b, n, 16, 80, generator=g),
        "ref_lat": torch.randn(b, C, S, S, generator=g),
    }


class _Spy:
    """Records the positional arguments of every forward call of a stage."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple] = []
        self.handle = model.register_forward_pre_hook(lambda m, args: self.calls.append(tuple(a.clone() if torch.is_tensor(a) else a for a in args)))

    def close(self) -> None:
        self.handle.remove()


def test_first_frame_shapes(pipe: TCCPPipeline) -> None:
    sketch, face = pipe.first_frame(**_inputs(n=1), generator=torch.Generator().manual_seed(0))
    assert sketch.shape == face.shape == (2, C, 1, S, S)
    assert torch.isfinite(face).all() and not torch.allclose(sketch, face)
    # no reference image: identity falls back to the null tokens
    sketch2, _ = pipe.first_frame(**{**_inputs(n=1), "ref_lat": None}, generator=torch.Generator().manual_seed(0))
    assert sketch2.shape == (2, C, 1, S, S)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_window_shapes_and_stage_wiring(pipe: TCCPPipeline, sampler: str) -> None:
    g = torch.Generator().manual_seed(3)
    prev_sketch, prev_face = torch.randn(2, C, S, S, generator=g), torch.randn(2, C, 1, S, S, generator=g)
    spy1, spy2 = _Spy(pipe.stage1), _Spy(pipe.stage2)
    try:
        sketch, face = pipe.window(**_inputs(), prev_sketch_lat=prev_sketch, prev_face_lat=prev_face,
                                   steps=2, sampler=sampler, cfg_scale=2.0, generator=g)
    finally:
        spy1.close(), spy2.close()
    assert sketch.shape == face.shape == (2, C, N - 1, S, S)
    norm = pipe.norm
    assert len(spy1.calls) == len(spy2.calls) == 2
    for call in spy1.calls:  # CFG: conditional + unconditional halves in one batch of 4
        x, t, tokens, c_v, flags = call
        assert x.shape[0] == 4 and flags[:, 0].eq(1).all() and flags[:, 1:].eq(0).all()
        assert torch.allclose(x[:2, :, 0], norm.to_model(prev_sketch))  # clean slot 0
        assert torch.allclose(c_v[:2], norm.to_model(_inputs()["context_lat"]))
    for x, t, tokens, c_v, flags in spy2.calls:
        assert torch.allclose(x[:2, :, 0], norm.to_model(prev_face[:, :, 0]))
        # stage 1's output latent is stage 2's control input, slot 0 = previous sketch
        assert torch.allclose(c_v[:2, :, 0], norm.to_model(prev_sketch), atol=1e-6)
        assert torch.allclose(norm.from_model(c_v[:2, :, 1:]), sketch, atol=1e-5)


def test_tracked_sketches_skip_stage1(pipe: TCCPPipeline) -> None:
    g = torch.Generator().manual_seed(4)
    tracked = torch.randn(2, C, N, S, S, generator=g)
    spy1 = _Spy(pipe.stage1)
    try:
        sketch, face = pipe.window(**_inputs(), prev_sketch_lat=tracked[:, :, 0], prev_face_lat=torch.randn(2, C, S, S),
                                   tracked_sketch_lat=tracked, generator=g)
        s1, f1 = pipe.first_frame(**_inputs(n=1), tracked_sketch_lat=tracked[:, :, :1], generator=g)
    finally:
        spy1.close()
    assert spy1.calls == []
    assert torch.allclose(sketch, tracked[:, :, 1:], atol=1e-5) and face.shape == (2, C, N - 1, S, S)
    assert torch.allclose(s1, tracked[:, :, :1], atol=1e-5)


def test_pipeline_deterministic_and_streams_independent(pipe: TCCPPipeline) -> None:
    prev = dict(prev_sketch_lat=torch.ones(2, C, S, S), prev_face_lat=torch.zeros(2, C, S, S))
    a = pipe.window(**_inputs(), **prev, generator=torch.Generator().manual_seed(7))
    b = pipe.window(**_inputs(), **prev, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # a change in stream 1's inputs leaves stream 0 untouched (same noise draw)
    other = _inputs()
    other["context_lat"][1] = torch.randn_like(other["context_lat"][1])
    c = pipe.window(**other, **prev, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[1][0], c[1][0]) and not torch.equal(a[1][1], c[1][1])


# --------------------------------------------------------------------------- pack
def _run(p: TCCPPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    return p.window(**_inputs(), prev_sketch_lat=torch.ones(2, C, S, S), prev_face_lat=torch.zeros(2, C, S, S),
                    generator=torch.Generator().manual_seed(11))


def test_pack_roundtrip_fp32_identical(pipe: TCCPPipeline, tmp_path: Path) -> None:
    out = save_pack(tmp_path / "pack", pipe.stage1, pipe.stage2, sampler=pipe.sampler, latent_norm=pipe.norm,
                    card={"training": {"note": "test"}}, dtype=torch.float32)
    assert sorted(f.name for f in out.iterdir()) == [".tccp-output", "config.json", "stage1.safetensors",
                                                     "stage2.safetensors"]  # .tccp-output: io_utils' marker
    loaded = load_pack(out, with_autoencoder=False)
    assert loaded.sampler == pipe.sampler and loaded.norm == pipe.norm
    assert loaded.pack_config["card"]["training"]["note"] == "test"
    assert all(torch.equal(x, y) for x, y in zip(_run(pipe), _run(loaded)))


def test_pack_fp16_is_the_rounded_model(pipe: TCCPPipeline, tmp_path: Path) -> None:
    out = save_pack(tmp_path / "pack16", pipe.stage1, pipe.stage2, sampler=pipe.sampler, latent_norm=pipe.norm)
    assert read_pack_config(out)["dtype"] == "float16"
    loaded = load_pack(out, with_autoencoder=False)
    rounded = [MVControlNet(CFG), MVControlNet(CFG)]
    for r, m in zip(rounded, (pipe.stage1, pipe.stage2)):
        r.load_state_dict({k: v.half().float() for k, v in m.state_dict().items()})
    ref = TCCPPipeline(*rounded, None, pipe.sampler, latent_norm=pipe.norm)
    assert all(torch.equal(x, y) for x, y in zip(_run(ref), _run(loaded)))
    state = load_stage_state(out, 2)
    assert state.keys() == pipe.stage2.state_dict().keys()
    # saving over an existing pack replaces it
    save_pack(out, pipe.stage2, pipe.stage1)
    assert torch.equal(load_stage_state(out, 1)["unet.time_embed.mlp.0.weight"],
                       pipe.stage2.state_dict()["unet.time_embed.mlp.0.weight"].half().float())


def test_pack_with_autoencoder(pipe: TCCPPipeline, tmp_path: Path) -> None:
    pytest.importorskip("tccp.models.autoencoder")
    try:
        from tccp.models.autoencoder import load_autoencoder

        load_autoencoder()
    except FileNotFoundError:
        pytest.skip("TAEF2 weights not vendored")
    cfg32 = get_config("tiny", latent_channels=32)
    out = save_pack(tmp_path / "pack", MVControlNet(cfg32), MVControlNet(cfg32))
    loaded = load_pack(out)
    img = loaded.decode(torch.zeros(1, 32, 2, S, S))
    assert img.shape == (1, 2, 8 * S, 8 * S, 3) and img.dtype == torch.uint8


def _one_line(exc: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg


def test_broken_packs_are_one_line_errors(pipe: TCCPPipeline, tmp_path: Path) -> None:
    with pytest.raises(TCCPError) as e:
        load_pack(tmp_path / "missing", with_autoencoder=False)
    _one_line(e, tmp_path / "missing")

    good = save_pack(tmp_path / "good", pipe.stage1, pipe.stage2)
    cases = {
        "no_config": lambda d: (d / "config.json").unlink(),
        "bad_json": lambda d: (d / "config.json").write_text("{not json"),
        "not_a_pack": lambda d: (d / "config.json").write_text(json.dumps({"hello": 1})),
        "no_weights": lambda d: (d / "stage2.safetensors").unlink(),
        "truncated": lambda d: (d / "stage1.safetensors").write_bytes((d / "stage1.safetensors").read_bytes()[:1000]),
        "wrong_shapes": lambda d: (d / "config.json").write_text(
            json.dumps({**read_pack_config(d), "stage1": get_config("tiny", base_channels=24).to_dict()})
        ),
        "bad_config_key": lambda d: (d / "config.json").write_text(
            json.dumps({**read_pack_config(d), "stage2": {**CFG.to_dict(), "wings": 2}})
        ),
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


def test_default_pack_location() -> None:
    assert DEFAULT_PACK.parts[-4:] == ("tccp", "assets", "models", "default")


def test_info_command(capsys: pytest.CaptureFixture, pipe: TCCPPipeline, tmp_path: Path) -> None:
    assert cli_main(["info", "--config", "tiny", "--steps", "4", "--cfg-scale", "2"]) == 0
    out = capsys.readouterr().out
    assert "GFLOPs" in out and "stage1" in out and "first frame" in out
    pack = save_pack(tmp_path / "p", pipe.stage1, pipe.stage2)
    assert cli_main(["info", "--pack", str(pack), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total_params"] == 2 * sum(p.numel() for p in pipe.stage1.parameters())
    assert report["window_flops"] > report["first_frame_flops"] > 0
    assert cli_main(["info", "--pack", str(tmp_path / "nope")]) == 2
