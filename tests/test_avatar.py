"""Avatars: `tccp avatar create` on CPU from 3 s of a shared clip with a tiny random
base pack, then used by `tccp run`, by `tccp serve` (listing, offers, sessions) and
rejected with one-line errors when missing or corrupt; `tccp run --live` without a
microphone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_file
from tccp.errors import TCCPError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory) -> Path:
    """A random-weight tiny pack at 32 px crops: the stand-in for the bundled pack."""
    from engine.runner import PipelineRunner
    from tccp.pack import save_pack

    r = PipelineRunner.random("tiny", latent_size=4)
    return save_pack(tmp_path_factory.mktemp("base") / "tiny", r.pipeline.stage1, r.pipeline.stage2,
                     crop_size=32, card={"name": "tiny-random"})


@pytest.fixture(scope="module")
def clip() -> Path:
    return shared_file("data", "clips", "vr_face5.mp4")


@pytest.fixture(scope="module")
def avatar(tmp_path_factory, tiny_pack, clip) -> Path:
    """`tccp avatar create` through the CLI entry point, as a user runs it."""
    from tccp.cli import main

    root = tmp_path_factory.mktemp("home") / "avatars"
    code = main(["avatar", "create", "--video", str(clip), "--max-seconds", "3", "--out", str(root / "me"),
                 "--init", str(tiny_pack), "--config", "tiny", "--device", "cpu", "--steps", "2",
                 "--minutes", "3", "--refs", "3", "--no-progress"])
    assert code == 0
    return root / "me"


def _cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "tccp.cli", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- create


def test_create_writes_a_complete_avatar_pack(avatar, tiny_pack):
    from tccp.avatars.store import load_avatar
    from tccp.pack import load_pack, load_stage_state

    names = sorted(p.name for p in avatar.iterdir())
    assert names == [".tccp-output", "AVATAR_CARD.md", "avatar.json", "config.json", "refs", "stage1.safetensors",
                     "stage2.safetensors"]
    assert not [p for p in avatar.parent.iterdir() if p.name.startswith(".")]  # no work/temp folders left
    meta = json.loads((avatar / "avatar.json").read_text())
    src = meta["sources"][0]
    assert src["train_frames"] + src["tail_frames"] == 75 and src["tail_frames"] >= 16
    for stage in ("stage1", "stage2"):
        assert meta["training"][stage]["steps"] == 2
    v = meta["validation"]
    for key in ("stage2_val_loss", "face_psnr_db"):
        assert set(v[key]) == {"base", "avatar"} and all(np.isfinite(x) for x in v[key].values())
    assert v["val_windows"] > 0 and v["psnr_frames"] == src["tail_frames"]
    card = (avatar / "AVATAR_CARD.md").read_text()
    for words in ("Data used", "vr_face5.mp4", "stage-2 validation loss", "face PSNR", "base pack"):
        assert words in card

    av = load_avatar(avatar)
    assert av.refs.shape == (3, 32, 32, 3) and av.crop_size == 32
    frames = [r["frame"] for r in meta["refs"]]
    assert len(set(frames)) == 3  # three different moments
    pipe = load_pack(avatar)  # the avatar folder is a model pack
    assert pipe.pack_config["card"]["kind"] == "avatar"
    # fine-tuning moved the weights away from the base pack
    a, b = load_stage_state(avatar, 2), load_stage_state(tiny_pack, 2)
    assert any(not np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_references_cover_pose_and_mouth():
    from tccp.avatars.refs import ReferenceBank, select_references

    rng = np.random.default_rng(0)
    # frontal closed (most frames), turned head, open mouth; plus one tracking glitch
    groups = np.array([[0.0, 0.5, 0.02], [0.15, 0.5, 0.02], [0.0, 0.5, 0.25]])
    labels = np.repeat([0, 1, 2], [60, 20, 20])
    f = groups[labels] + rng.normal(0, 0.005, (100, 3))
    f = np.concatenate([f, [[3.0, -2.0, 5.0]]])
    chosen = select_references(f, 3)
    assert chosen[0] < 60  # the most typical frame first
    assert sorted(labels[chosen]) == [0, 1, 2]  # one of each pose / mouth shape, not the glitch
    bank = ReferenceBank(np.zeros((3, 8, 8, 3), np.uint8), np.array([[0.0, 0.5], [0.2, 0.5], [np.nan, np.nan]]))
    assert bank.choose(None) == 0
    assert bank.choose(None, current=1) == 1


# --------------------------------------------------------------------------- run


def test_run_uses_the_avatar_by_name(avatar, clip, tmp_path, monkeypatch):
    """`tccp run --avatar NAME` from the folder holding ./avatars: the run's identity
    comes from the avatar's references (the runner's reference bank)."""
    from engine.model import load_model
    from tccp.cli import main
    from tccp.media import io as media

    monkeypatch.chdir(avatar.parent.parent)
    out = tmp_path / "out.mp4"
    code = main(["run", "--video", str(clip), "--max-seconds", "1.2", "--avatar", "me", "--out", str(out),
                 "--steps", "1", "--quiet", "--mouth-scale", "0.5"])
    assert code == 0
    assert media.probe(out).n_frames == 30

    model = load_model(None, "cpu", "torch", avatar="me")
    try:
        runner = model.runner
        assert len(runner.references) == 3
        from engine.runner import WindowRequest

        z = np.zeros((7, 32, 32, 3), np.uint8)
        req = WindowRequest(mode="tracked", steps=1, sampler="ddim", guidance=1.0, window=8, contexts=z,
                            sketches=z, mel=np.zeros((7, 16, 80), np.float32), identity=z[0] + 200, state=None)
        res = runner.run_batch([req])[0]
        ref0 = runner._encode(runner.references.crops[:1])[0].numpy()
        own = runner._encode(req.identity[None])[0].numpy()
        got = res.identity_latent.numpy()
        assert np.allclose(got, ref0, atol=1e-3) and not np.allclose(got, own, atol=0.1)
        assert res.state.ref_index == 0
    finally:
        model.close()


def test_missing_or_corrupt_avatar_is_a_one_line_error(avatar, clip, tmp_path):
    from engine.model import load_model

    r = _cli("run", "--video", str(clip), "--avatar", "nosuch", "--out", str(tmp_path / "o.mp4"), cwd=tmp_path)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: avatar 'nosuch': not found"), r.stderr
    assert not (tmp_path / "o.mp4").exists()

    def broken(name: str, damage) -> Path:
        d = tmp_path / name
        shutil.copytree(avatar, d)
        damage(d)
        return d

    cases = {
        "no_json": (lambda d: (d / "avatar.json").unlink(), "avatar.json: missing"),
        "bad_json": (lambda d: (d / "avatar.json").write_text("{nope"), "unreadable avatar description"),
        "bad_ref": (lambda d: (d / "refs" / "ref_01.png").write_bytes(b"not a png"), "ref_01.png: reference image is unreadable"),
        "no_weights": (lambda d: (d / "stage1.safetensors").unlink(), "stage1.safetensors: missing"),
        "bad_weights": (lambda d: (d / "stage2.safetensors").write_bytes(b"\0" * 100), "stage2.safetensors: corrupt"),
    }
    for name, (damage, words) in cases.items():
        d = broken(name, damage)
        with pytest.raises(TCCPError) as exc:
            load_model(None, "cpu", "torch", avatar=str(d))
        msg = str(exc.value)
        assert words in msg and "\n" not in msg, (name, msg)
    with pytest.raises(TCCPError, match="--model and --avatar"):
        load_model(str(avatar), "cpu", "torch", avatar=str(avatar))
    r = _cli("run", "--video", str(clip), "--avatar", str(avatar), "--identity", str(clip), "--out",
             str(tmp_path / "o.mp4"), "--mouth-scale", "9")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--mouth-scale 9" in r.stderr


def test_avatar_list_and_show(avatar, capsys, monkeypatch):
    from tccp.cli import main

    monkeypatch.chdir(avatar.parent.parent)
    assert main(["avatar", "list"]) == 0
    assert "me" in capsys.readouterr().out
    assert main(["avatar", "show", "me"]) == 0
    assert "# Avatar card: me" in capsys.readouterr().out


# --------------------------------------------------------------------------- serve


async def _offer_sdp() -> tuple[object, str]:
    from aiortc import RTCPeerConnection

    from streaming.client import ClipVideoTrack

    pc = RTCPeerConnection()
    pc.addTrack(ClipVideoTrack(np.zeros((5, 32, 32, 3), np.uint8)))
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def test_serve_lists_avatars_and_offers_pick_one(avatar):
    import aiohttp

    from streaming.passthrough import PassthroughSession
    from streaming.server import ServerConfig, create_app, start_server

    picked: list = []

    async def factory(avatar=None):  # records what the server asked for
        picked.append(avatar)
        return PassthroughSession()

    cfg = ServerConfig(avatar_roots=(str(avatar.parent),), token="t")
    app = create_app(cfg, factory)
    runner, url = await start_server(app, "127.0.0.1", 0)
    auth = {"Authorization": "Bearer t"}
    pcs = []
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/avatars") as r:
                assert r.status == 401
            async with http.get(url + "/avatars", headers=auth) as r:
                listing = await r.json()
            assert [a["name"] for a in listing["avatars"]] == ["me"] and listing["avatars"][0]["refs"] == 3
            assert "path" not in listing["avatars"][0]
            for name, status, words in (("nosuch", 400, "not found"), ("../me", 400, "installed avatar"),
                                        ("me", 200, None), (None, 200, None)):
                pc, sdp = await _offer_sdp()
                pcs.append(pc)
                body = {"sdp": sdp, "type": "offer", **({"avatar": name} if name else {})}
                async with http.post(url + "/offer", json=body, headers=auth) as r:
                    data = await r.json()
                assert r.status == status, data
                if words:
                    assert words in data["error"]
        assert picked == ["me", None]
    finally:
        for pc in pcs:
            await pc.close()
        await runner.cleanup()


async def test_model_sessions_load_an_avatar_once(avatar, tiny_pack):
    from streaming.server import ModelSessions

    sessions = ModelSessions(str(tiny_pack), "cpu", steps=1, roots=[avatar.parent])
    try:
        assert sessions.default.runner.references is None  # dubbing: the caller's own face
        s1 = await sessions(avatar="me")
        s2 = await sessions(avatar="me")
        assert s1.model is s2.model and s1.model is not sessions.default
        assert len(s1.model.runner.references) == 3
        for s in (s1, s2):
            s.abort()
    finally:
        sessions.close()


# --------------------------------------------------------------------------- live


def test_run_live_without_a_microphone_is_a_one_line_error(tmp_path):
    try:
        from streaming.mic import list_input_devices

        if list_input_devices():
            pytest.skip("this machine has a microphone")
    except TCCPError:
        pass  # no audio system at all: exactly the case under test
    r = _cli("run", "--live", "--out", str(tmp_path / "live.mp4"), timeout=120)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no microphone found"), r.stderr
    assert not (tmp_path / "live.mp4").exists()
