"""Avatars: `tccp avatar create` on CPU from 3 s of a shared clip with a tiny random
base pack, bank-only (`--minutes 0`) and with a 2-step stage-2 fine-tune; then used by
`tccp run`, listed and shown, served (`GET /avatars`, offers, `ModelSessions`), and
refused with one-line errors when missing, corrupt or of version 1; the create
command's guards; `tccp run --live` without a microphone."""

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
    """A random-weight tiny pack at 64 px crops: the stand-in for the bundled pack."""
    from engine.runner import PipelineRunner
    from tccp.pack import save_pack

    r = PipelineRunner.random(size=64)
    return save_pack(tmp_path_factory.mktemp("base") / "tiny", r.pipeline.stage1.net, r.pipeline.stage1.codec,
                     r.pipeline.stage2.model, crop_size=r.size, card={"name": "tiny-random"})


@pytest.fixture(scope="module")
def clip() -> Path:
    return shared_file("data", "clips", "vr_face5.mp4")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder whose ./avatars holds the avatars the tests make."""
    return tmp_path_factory.mktemp("home")


def _create(root: Path, name: str, tiny_pack: Path, clip: Path, *extra: str) -> Path:
    from tccp.cli import main

    code = main(["avatar", "create", "--video", str(clip), "--max-seconds", "3", "--out", str(root / "avatars" / name),
                 "--init", str(tiny_pack), "--device", "cpu", "--refs", "4", "--no-progress", *extra])
    assert code == 0
    return root / "avatars" / name


@pytest.fixture(scope="module")
def avatar(root, tiny_pack, clip) -> Path:
    """A bank-only avatar (`--minutes 0`) through the CLI entry point, as a user makes it."""
    return _create(root, "me", tiny_pack, clip, "--minutes", "0")


@pytest.fixture(scope="module")
def tuned(root, tiny_pack, clip) -> Path:
    """An avatar whose stage 2 is fine-tuned for 2 steps."""
    return _create(root, "tuned", tiny_pack, clip, "--steps", "2")


def _cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "tccp.cli", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_error(code: int, err: str, words: str) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err


# --------------------------------------------------------------------------- create


def test_bank_only_avatar_is_the_base_pack_plus_a_bank(avatar, tiny_pack):
    from tccp.avatars.store import load_avatar
    from tccp.pack import load_pack
    from tccp.pipelines.faces import ReferenceBank

    names = sorted(p.name for p in avatar.iterdir())
    assert names == [".tccp-output", "AVATAR_CARD.md", "avatar.json", "config.json", "refs", "stage1.safetensors",
                     "stage2.safetensors"]
    assert sorted(p.name for p in (avatar / "refs").iterdir()) == \
        ["hires_00.png", "hires_01.png", "hires_02.png", "hires_03.png", "meshes.npy",
         "ref_00.png", "ref_01.png", "ref_02.png", "ref_03.png"]
    assert not [p for p in avatar.parent.iterdir() if p.name.startswith(".")]  # no work/temp folders left
    meta = json.loads((avatar / "avatar.json").read_text())
    assert meta["format"] == "tccp-avatar" and meta["version"] == 2 and meta["fine_tuned"] is False
    assert meta["training"] is None
    src = meta["sources"][0]
    assert src["train_frames"] + src["tail_frames"] == 75 and src["tail_frames"] >= 16
    # the references come from the training part only, from different moments
    frames = [r["frame"] for r in meta["refs"]]
    assert len(set(frames)) == 4 and max(frames) < src["train_frames"]
    for stage in ("stage1", "stage2"):  # the base pack's weights, byte for byte
        assert (avatar / f"{stage}.safetensors").read_bytes() == (tiny_pack / f"{stage}.safetensors").read_bytes()
    v = meta["validation"]
    assert list(v["reconstruction"]) == ["avatar"] and v["frames"] == src["tail_frames"]
    rec = v["reconstruction"]["avatar"]
    assert np.isfinite(rec["psnr_mouth"]) and rec["psnr_face_kept"] > rec["psnr_mouth"]
    assert v["summary"]["psnr_mouth"] == [None, rec["psnr_mouth"]]
    assert np.isfinite(v["stage1"]["tccp"]["lip_lmd"])
    card = (avatar / "AVATAR_CARD.md").read_text()
    for words in ("# Avatar card: me", "Data used", "vr_face5.mp4", "bank-only", "Reference bank", "refs/hires_00.png",
                  "mouth-box PSNR", "mouth-opening correlation"):
        assert words in card, words

    pipe = load_pack(avatar, with_autoencoder=False)  # the avatar folder is a model pack
    card_cfg = pipe.pack_config["card"]
    assert card_cfg["kind"] == "avatar" and card_cfg["fine_tuned"] is False
    assert card_cfg["base_card"]["name"] == "tiny-random"
    av = load_avatar(avatar)
    assert av.crops.shape == (4, 64, 64, 3) and av.meshes.shape == (4, 478, 2) and av.crop_size == 64
    assert all(h.shape[0] == h.shape[1] >= 128 for h in av.hires)  # source resolution, > the crop
    bank = av.bank(pipe.template)
    assert isinstance(bank, ReferenceBank) and len(bank) == 4 and len(bank.hires) == 4
    # the mouth shapes differ (farthest-point choice), the first is the most closed
    from tccp.face import headframe as hf

    heads, _ = hf.to_head(bank.meshes, pipe.template)
    assert np.argmin(hf.aperture(heads)) == 0
    assert list(bank.choose(heads)) == [0, 1, 2, 3]


def test_fine_tuned_avatar_keeps_stage1_and_tunes_stage2(tuned, tiny_pack):
    import torch

    from tccp.pack import load_pack, load_stage1, load_stage2

    meta = json.loads((tuned / "avatar.json").read_text())
    assert meta["fine_tuned"] is True and meta["training"]["steps"] == 2 and meta["training"]["stopped"] == "done"
    assert meta["training"]["checkpoint"] is None  # the temp work folder is gone
    v = meta["validation"]
    assert list(v["reconstruction"]) == ["base", "avatar"]
    assert all(x is not None and np.isfinite(x) for x in v["summary"]["psnr_mouth"])
    card = (tuned / "AVATAR_CARD.md").read_text()
    assert "| measure | base pack | avatar |" in card and "Stage 2 only" in card and "| 2 |" in card
    pipe = load_pack(tuned, with_autoencoder=False)
    assert pipe.pack_config["card"]["kind"] == "avatar" and pipe.pack_config["card"]["fine_tuned"] is True
    assert pipe.pack_config["card"]["training"]["stage2"]["step"] == 2
    assert pipe.pack_config["stage2"]["sampler"] == load_pack(tiny_pack, with_autoencoder=False).pack_config["stage2"]["sampler"]
    # stage 1 (weights and template) is the base pack's; stage 2 moved away from it
    (a, ca), (b, cb) = load_stage1(tuned), load_stage1(tiny_pack)
    assert np.array_equal(ca.template, cb.template)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    s2a, s2b = load_stage2(tuned).state_dict(), load_stage2(tiny_pack).state_dict()
    assert s2a.keys() == s2b.keys() and any(not torch.equal(s2a[k], s2b[k]) for k in s2a)


def test_avatar_adapts_stage1_to_the_persons_speech(tmp_path, tiny_pack):
    """--adapt-steps: the avatar's stage 1 is the base pack's fine-tuned on the training
    part's own speech (engine.adapt); stage 2 and the template stay the base pack's, the
    held-out tail is validated base vs avatar."""
    import torch

    from tccp.pack import load_stage1

    speaker = shared_file("data", "clips", "latentsync_demo3_video.mp4")
    out = _create(tmp_path, "adapted", tiny_pack, speaker, "--max-seconds", "8", "--minutes", "0",
                  "--adapt-steps", "5", "--adapt-seconds", "6")
    meta = json.loads((out / "avatar.json").read_text())
    assert meta["stage1"]["adapted"] is True and meta["stage1"]["frames"] >= 100, meta["stage1"]
    assert meta["fine_tuned"] is False
    assert (out / "stage2.safetensors").read_bytes() == (tiny_pack / "stage2.safetensors").read_bytes()
    (a, ca), (b, cb) = load_stage1(out), load_stage1(tiny_pack)
    assert np.array_equal(ca.template, cb.template)
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert list(meta["validation"]["reconstruction"]) == ["base", "avatar"]
    assert "adapted to this person's own speech" in (out / "AVATAR_CARD.md").read_text()


def test_create_guards(tmp_path, tiny_pack, clip, capfd, monkeypatch):
    """Refusals before any work (one line, exit 2, nothing written), the 0-step budget,
    and the warning when the fine-tuned avatar validates worse than its base pack."""
    from tccp.avatars import create
    from tccp.cli import main
    from tccp.pack import load_stage1, save_pack
    from tccp.training import trainer

    def run(*args: str) -> tuple[int, str]:
        code = main(["avatar", "create", "--video", str(clip), "--init", str(tiny_pack), *args])
        return code, capfd.readouterr().err

    out = tmp_path / "avatars" / "x"
    _one_error(*run("--out", str(out), "--minutes", "-1"), "--minutes -1.0: must be 0")
    _one_error(*run("--out", str(out), "--minutes", "0", "--steps", "3"), "pass one")
    _one_error(*run("--out", str(out), "--refs", "0"), "--refs 0: must be 1..16")
    warp = save_pack(tmp_path / "warp", *load_stage1(tiny_pack), None, crop_size=64)  # no stage 2
    code = main(["avatar", "create", "--video", str(clip), "--init", str(warp), "--out", str(out), "--minutes", "1"])
    _one_error(code, capfd.readouterr().err, "a warp-only pack (no stage 2 to fine-tune); pass --minutes 0")
    assert not (tmp_path / "avatars").exists()  # nothing written, not even the parent folder

    # a budget in which no step fits: an error, not a copy of the base pack called an avatar
    seen = {}

    class NoTimeTrainer:
        def __init__(self, cfg, log=None):
            seen["progress"], seen["minutes"], seen["init"] = cfg.progress, cfg.minutes, cfg.init

        def run(self):
            return trainer.TrainResult(0, None, "time budget", None, None, None)

        def close(self):
            pass

    monkeypatch.setattr(trainer, "Trainer", NoTimeTrainer)
    base_cfg = json.loads((tiny_pack / "config.json").read_text())
    cfg = create.AvatarConfig(videos=[str(clip)], out=str(out), minutes=0.5, progress=False)
    with pytest.raises(TCCPError, match=r"--minutes 0.5: too short, stage-2 fine-tuning got 0 steps"):
        create._train_stage2(cfg, tmp_path, tmp_path / "run", tmp_path / "c", tiny_pack, base_cfg, lambda m: None)
    assert seen == {"progress": False, "minutes": 0.5, "init": str(tiny_pack)}

    class Worse:
        path = out
        meta = {"fine_tuned": True, "refs": [{}] * 4, "training": {"steps": 9},
                "validation": {"summary": {"psnr_mouth": [14.7, 13.8], "aperture_corr": [0.5, 0.5]}}}

    monkeypatch.setattr(create, "create_avatar", lambda cfg: Worse())
    code, err = run("--out", str(out))
    assert code == 0 and "warning: the avatar reconstructs the held-out tail worse than the base pack" in err
    assert "14.70 -> 13.80 dB" in err


# --------------------------------------------------------------------------- run


def test_run_uses_the_avatar_by_name(avatar, tuned, clip, tmp_path, monkeypatch):
    """`tccp run --avatar NAME` from the folder holding ./avatars; the runner's bank is
    the avatar's, whatever bank the session brings."""
    from engine.model import load_model
    from engine.runner import SessionRefs, WindowRequest
    from tccp.avatars.store import load_avatar
    from tccp.cli import main
    from tccp.media import io as media
    from tccp.pipelines.faces import ReferenceBank

    monkeypatch.chdir(avatar.parent.parent)
    for name in ("me", "tuned"):
        out = tmp_path / f"{name}.mp4"
        code = main(["run", "--video", str(clip), "--max-seconds", "1.2", "--avatar", name, "--out", str(out),
                     "--steps", "1", "--quiet", "--mouth-scale", "0.5"])
        assert code == 0
        assert media.probe(out).n_frames == 30

    av = load_avatar("me")
    model = load_model(None, "cpu", avatar="me")
    try:
        runner = model.runner
        assert np.array_equal(runner.references.crops, av.crops) and len(runner.references.hires) == 4
        other = ReferenceBank.build(av.crops[-1:], av.meshes[-1:], runner.template)  # a session's own bank
        n = 4
        req = WindowRequest(mode="tracked", steps=0, sampler="ddim", guidance=1.0, window=8, crops=av.crops[:n],
                            meshes=av.meshes[:n], tokens=np.zeros((n, 1, 1), np.float32), vad=np.ones(n, np.float32),
                            mel=np.zeros((n, 16, 80), np.float32), refs=SessionRefs(other), state=None)
        res = runner.run_batch([req])[0]
        assert list(res.ref_index) == [0, 1, 2, 3]  # each frame's own mouth shape, from the avatar's bank
    finally:
        model.close()


def test_missing_corrupt_or_old_avatar_is_a_one_line_error(avatar, clip, tmp_path, capfd):
    from engine.model import load_model
    from tccp.cli import main

    code = main(["run", "--video", str(clip), "--avatar", "nosuch", "--out", str(tmp_path / "o.mp4")])
    _one_error(code, capfd.readouterr().err, "error: avatar 'nosuch': not found")
    assert not (tmp_path / "o.mp4").exists()

    def v1(d: Path) -> None:
        meta = json.loads((d / "avatar.json").read_text())
        meta.update(version=1, refs=[{"file": "refs/ref_00.png", "sketch_pose": [0.0, 0.5]}])
        (d / "avatar.json").write_text(json.dumps(meta))

    cases = {
        "no_json": (lambda d: (d / "avatar.json").unlink(), "avatar.json: missing"),
        "bad_json": (lambda d: (d / "avatar.json").write_text("{nope"), "unreadable avatar description"),
        "v1": (v1, "avatar.json: a version 1 avatar"),
        "v9": (lambda d: (d / "avatar.json").write_text(json.dumps({"format": "tccp-avatar", "version": 9})),
               "avatar version 9 is newer"),
        "bad_ref": (lambda d: (d / "refs" / "ref_01.png").write_bytes(b"not a png"),
                    "ref_01.png: reference image is unreadable"),
        "no_hires": (lambda d: (d / "refs" / "hires_02.png").unlink(), "hires_02.png: reference image missing"),
        "no_meshes": (lambda d: (d / "refs" / "meshes.npy").unlink(), "meshes.npy: reference landmarks missing"),
        "bad_meshes": (lambda d: np.save(d / "refs" / "meshes.npy", np.zeros((3, 478, 2), np.float32)),
                       "meshes.npy: reference landmarks have shape (3, 478, 2)"),
        "no_weights": (lambda d: (d / "stage1.safetensors").unlink(), "stage1.safetensors: missing"),
        "bad_weights": (lambda d: (d / "stage2.safetensors").write_bytes(b"\0" * 100), "stage2.safetensors: corrupt"),
        "old_pack": (lambda d: (d / "config.json").write_text(json.dumps({"format": "tccp-pack", "version": 1})),
                     "a version 1 pack"),
    }
    for name, (damage, words) in cases.items():
        d = tmp_path / name
        shutil.copytree(avatar, d)
        damage(d)
        with pytest.raises(TCCPError) as exc:
            load_model(None, "cpu", avatar=str(d))
        msg = str(exc.value)
        assert words in msg and "\n" not in msg, (name, msg)
    # through the CLI: exit 2, one line, no output
    code = main(["run", "--video", str(clip), "--avatar", str(tmp_path / "v1"), "--out", str(tmp_path / "o.mp4")])
    _one_error(code, capfd.readouterr().err, "a version 1 avatar")
    assert not (tmp_path / "o.mp4").exists()
    with pytest.raises(TCCPError, match="--model and --avatar"):
        load_model(str(avatar), "cpu", avatar=str(avatar))
    code = main(["run", "--video", str(clip), "--avatar", str(avatar), "--identity", str(clip), "--out",
                 str(tmp_path / "o.mp4")])
    _one_error(code, capfd.readouterr().err, "--identity and --avatar")


def test_avatar_list_and_show(avatar, tuned, tmp_path, capfd, monkeypatch):
    from tccp.cli import main

    monkeypatch.chdir(avatar.parent.parent)
    broken = avatar.parent / "zz_broken"
    shutil.copytree(avatar, broken)
    (broken / "refs" / "meshes.npy").unlink()
    try:
        assert main(["avatar", "list"]) == 0
        out = capfd.readouterr().out.splitlines()
        me = [x for x in out if x.startswith("me ")]
        assert len(me) == 1 and "bank-only, 4 refs" in me[0] and "mouth PSNR" in me[0]
        assert any(x.startswith("tuned ") and "fine-tuned, 4 refs" in x for x in out)
        assert any(x.startswith("zz_broken ") and "BROKEN:" in x and "meshes.npy" in x for x in out)
    finally:
        shutil.rmtree(broken)
    assert main(["avatar", "show", "me"]) == 0
    assert "# Avatar card: me" in capfd.readouterr().out


# --------------------------------------------------------------------------- serve


async def _offer_sdp() -> tuple[object, str]:
    from aiortc import RTCPeerConnection

    from streaming.client import ClipVideoTrack

    pc = RTCPeerConnection()
    pc.addTrack(ClipVideoTrack(np.zeros((5, 32, 32, 3), np.uint8)))
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def test_serve_lists_avatars_and_offers_pick_one(avatar, tuned):
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
            assert [a["name"] for a in listing["avatars"]] == ["me", "tuned"]
            assert all(a["refs"] == 4 and "path" not in a for a in listing["avatars"])
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
        assert len(s1.model.runner.references) == 4
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
