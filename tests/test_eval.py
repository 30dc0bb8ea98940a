"""Evaluation metrics on cases whose answer is known.

Synthetic arrays check the formulas; a real shared clip (vr_face3, first 3 s, clear
mouth motion) checks the whole chain through the face tracker: identical pair, a copy
delayed by 3 frames, a frozen mouth, pixels changed only outside / inside the head.
Tracked videos are cached per module (tracking dominates the cost).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import CLIPS, list_files, load_script
from tccp.errors import TCCPError
from tccp.metrics import (
    LIP_INDICES,
    PSNR_CAP,
    WindowLayout,
    best_lag,
    landmark_error,
    landmark_jitter,
    lip_lmd,
    masked_psnr,
    masked_ssim,
    pearson,
    seam_stats,
)
from tccp.metrics.fidelity import border_band

SHIFT = 3
CLIP = CLIPS / "vr_face3.mp4"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clip():
    if not CLIP.exists():
        pytest.skip(f"shared data not available: {CLIP}")
    from tccp.media.io import load_clip

    return load_clip(CLIP, max_seconds=3.0)


@pytest.fixture(scope="module")
def real(clip):
    from tccp.metrics.evaluate import track_frames

    tv = track_frames(clip.frames)
    assert tv.found.mean() > 0.95
    return tv


@pytest.fixture(scope="module")
def delayed(clip):
    """The clip delayed by SHIFT frames (the first frame held): generated lags real."""
    from tccp.metrics.evaluate import track_frames

    f = clip.frames
    return track_frames(np.concatenate([np.repeat(f[:1], SHIFT, 0), f[:-SHIFT]]))


@pytest.fixture(scope="module")
def frozen(clip):
    from tccp.metrics.evaluate import track_frames

    return track_frames(np.repeat(clip.frames[:1], len(clip.frames), 0))


def _cfg(**kw):
    from tccp.metrics.evaluate import EvalConfig

    kw.setdefault("identity", False)
    return EvalConfig(**kw)


# --------------------------------------------------------------------------- formulas


def test_lip_indices_are_mediapipe_facemesh_lips():
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_LIPS

    assert set(LIP_INDICES.tolist()) == {i for e in FACEMESH_LIPS for i in e}
    assert len(LIP_INDICES) == 40


def test_masked_psnr_known_values():
    a = np.zeros((2, 16, 16, 3), np.uint8)
    b = a.copy()
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    b[:, mask] = 10  # MSE 100 inside, 0 outside
    assert masked_psnr(a, b, mask) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-9)
    assert masked_psnr(a, b, ~mask) == PSNR_CAP
    assert masked_psnr(a, a) == PSNR_CAP
    assert math.isnan(masked_psnr(a, b, np.zeros((16, 16), bool)))
    assert masked_psnr(a, b, mask, per_frame=True).shape == (2,)


def test_masked_ssim_identical_is_one_and_noise_lowers_it():
    rng = np.random.default_rng(0)
    ramp = np.linspace(40, 200, 32)
    img = np.repeat((ramp[:, None] + ramp[None, :] / 4)[..., None], 3, axis=2).astype(np.uint8)
    assert masked_ssim(img, img) == 1.0
    noisy = np.clip(img.astype(int) + rng.integers(-40, 41, img.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[:, :16] = True
    half = img.copy()
    half[:, :16] = noisy[:, :16]  # noise only in the masked half
    assert masked_ssim(img, half, mask) < 0.9
    assert masked_ssim(img, half, ~mask & (np.arange(32)[None, :] >= 24)) > 0.99


def test_border_band_straddles_the_mask_edge():
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    band = border_band(mask, width=2)
    assert band[10, 20] and band[9, 20] and band[8, 20]  # on both sides of the edge
    assert not band[20, 20] and not band[2, 20]


def test_pearson_zero_variance_is_nan():
    x = np.sin(np.arange(50) / 3)
    assert math.isnan(pearson(x, np.full(50, 0.2)))
    assert math.isnan(pearson(np.full(50, 0.2) + 1e-12 * x, x))  # float noise counts as flat
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)


@pytest.mark.parametrize("k", [-4, 0, 5])
def test_best_lag_recovers_a_known_shift(k):
    rng = np.random.default_rng(1)
    base = np.convolve(rng.standard_normal(140), np.ones(5) / 5, mode="same")
    a = base[20:120]
    b = base[20 - k:120 - k]  # b[t] = a[t - k]: b lags a by k
    r = best_lag(a, b, max_lag=10)
    assert r.lag == k
    assert r.r_best == pytest.approx(1.0)


def test_best_lag_of_a_flat_signal_has_no_lag():
    r = best_lag(np.sin(np.arange(60) / 4), np.ones(60))
    assert r.lag is None and math.isnan(r.r0)


def test_landmark_error_is_in_inter_ocular_units():
    rng = np.random.default_rng(2)
    lm = rng.uniform(100, 300, (5, 478, 2))
    lm[:, 33] = [150, 200]
    lm[:, 263] = [250, 200]  # inter-ocular distance 100 px
    assert landmark_error(lm, lm) == 0.0
    assert lip_lmd(lm, lm) == 0.0
    moved = lm + np.array([6.0, 8.0])  # every point 10 px = 0.1 IOD away
    assert landmark_error(moved, lm) == pytest.approx(0.1)
    assert lip_lmd(moved, lm) == pytest.approx(0.1)
    assert landmark_error(2 * moved, 2 * lm) == pytest.approx(0.1)  # resolution-free
    with_gap = moved.copy()
    with_gap[1] = np.nan  # a frame without a face is skipped
    assert landmark_error(with_gap, lm) == pytest.approx(0.1)


def test_window_layout_and_seam_ratio():
    layout = WindowLayout(new_frames=7, first=1)
    assert np.flatnonzero(layout.is_boundary(30)).tolist() == [1, 8, 15, 22, 29]
    diffs = np.ones(30)
    diffs[0] = np.nan
    diffs[layout.is_boundary(30)] = 5.0
    s = seam_stats(diffs, layout)
    assert s["seam_ratio"] == pytest.approx(5.0)
    assert s["n_boundaries"] == 5
    assert np.flatnonzero(WindowLayout(new_frames=4, first=0).is_boundary(10)).tolist() == [0, 4, 8]


def test_jitter_is_zero_for_smooth_motion_and_grows_with_noise():
    t = np.arange(40)[:, None, None]
    lm = np.zeros((40, 478, 2))
    lm[:, 33] = [100, 100]
    lm[:, 263] = [200, 100]
    lm = lm + 2.0 * t  # constant velocity: no acceleration
    assert landmark_jitter(lm) == pytest.approx(0.0, abs=1e-12)
    noisy = lm + np.random.default_rng(3).normal(0, 1.0, lm.shape)
    assert landmark_jitter(noisy) > 0.01


# --------------------------------------------------------------------------- real clip


def test_identical_pair(clip, real):
    from tccp.metrics.evaluate import evaluate_arrays, track_frames

    again = track_frames(clip.frames)  # tracking is deterministic with a fresh tracker
    np.testing.assert_array_equal(again.landmarks, real.landmarks)
    m = evaluate_arrays(again, real, clip.audio, cfg=_cfg()).metrics
    assert m["mode"] == "reconstruction"
    assert m["lipsync"]["lip_lmd"] == 0.0
    assert m["lipsync"]["landmark_error"] == 0.0
    assert m["lipsync"]["lag_frames"] == 0
    assert m["lipsync"]["aperture_corr"] == pytest.approx(1.0)
    for region in ("head", "outside", "border"):
        assert m["fidelity"][region]["psnr"] == PSNR_CAP
    assert m["fidelity"]["head"]["ssim"] == 1.0
    assert m["fidelity"]["outside"]["ssim"] == 1.0
    assert m["fidelity"]["border"]["mae"] == 0.0
    assert m["temporal"]["jitter"]["ratio"] == pytest.approx(1.0)
    seams = m["temporal"]["seams"]
    assert seams["generated"] == seams["real"]
    assert m["lipsync"]["audio_sync"]["generated"] == m["lipsync"]["audio_sync"]["real"]
    json.dumps(m, allow_nan=False)  # strictly valid JSON


def test_delayed_copy_gives_lag_k(clip, real, delayed):
    from tccp.metrics.evaluate import evaluate_arrays

    m = evaluate_arrays(delayed, real, clip.audio, cfg=_cfg()).metrics
    assert m["lipsync"]["lag_frames"] == SHIFT
    assert m["lipsync"]["aperture_corr_at_lag"] > 0.9
    assert m["lipsync"]["aperture_corr"] < m["lipsync"]["aperture_corr_at_lag"]
    assert m["lipsync"]["lip_lmd"] > 0.02
    # swapping the roles: the "generated" video now leads
    assert best_lag(delayed.aperture, real.aperture).lag == -SHIFT
    # the audio offset moves with the video: delayed mouth -> offset larger by SHIFT
    off_real = m["lipsync"]["audio_sync"]["real"]["offset_frames"]
    off_gen = m["lipsync"]["audio_sync"]["generated"]["offset_frames"]
    if abs(off_real) + SHIFT <= 10:
        assert off_gen == off_real + SHIFT


def test_frozen_mouth_has_no_correlation(clip, real, frozen):
    from tccp.metrics.evaluate import evaluate_arrays

    m = evaluate_arrays(frozen, real, clip.audio, cfg=_cfg()).metrics
    r = m["lipsync"]["aperture_corr"]
    assert r is None or abs(r) < 0.2  # None: zero variance, reported as JSON null
    # the tracker's ROI feedback wobbles a little on a still image (mostly while it
    # settles in the first ~10 frames), so the frozen mouth is not exactly constant
    assert m["lipsync"]["aperture_std"]["generated"] < 0.25 * m["lipsync"]["aperture_std"]["real"]
    sync = m["lipsync"]["audio_sync"]["generated"]
    assert sync["r"] is None or abs(sync["r"]) < 0.2
    assert m["lipsync"]["lip_lmd"] > 0.02


def _regions(real, n, cfg):
    from tccp.metrics.evaluate import head_masks_for_frame

    h, w = real.frames.shape[1:3]
    return [head_masks_for_frame(real.landmarks[t], (h, w), cfg) for t in range(n)]


def test_changes_outside_the_head_are_detected(clip, real):
    from tccp.metrics.evaluate import TrackedVideo, evaluate_arrays

    cfg = _cfg()
    n = 12
    ref = real.head(n)
    regs = _regions(real, n, cfg)
    outside = ref.frames.copy()
    inside = ref.frames.copy()
    for t, reg in enumerate(regs):
        outside[t][reg.outside] = 255 - outside[t][reg.outside]
        inside[t][reg.head] = 255 - inside[t][reg.head]
    # same landmarks as the real video: only pixels differ
    m_out = evaluate_arrays(TrackedVideo(outside, ref.landmarks, ref.found), ref, None, cfg=cfg).metrics
    assert m_out["fidelity"]["head"]["psnr"] == PSNR_CAP
    assert m_out["fidelity"]["head"]["ssim"] == 1.0
    assert m_out["fidelity"]["outside"]["psnr"] < 20
    assert m_out["fidelity"]["outside"]["ssim"] < 0.5
    m_in = evaluate_arrays(TrackedVideo(inside, ref.landmarks, ref.found), ref, None, cfg=cfg).metrics
    assert m_in["fidelity"]["head"]["psnr"] < 20
    assert m_in["fidelity"]["outside"]["psnr"] == PSNR_CAP
    assert m_in["fidelity"]["border"]["psnr"] < 40  # the band's inner half changed


def test_seam_band_error_is_measured(clip, real):
    from tccp.metrics.evaluate import TrackedVideo, evaluate_arrays

    cfg = _cfg()
    n = 10
    ref = real.head(n)
    seamy = ref.frames.copy()
    for t, reg in enumerate(_regions(real, n, cfg)):
        seamy[t][reg.band] = np.clip(seamy[t][reg.band].astype(int) + 40, 0, 255)
    m = evaluate_arrays(TrackedVideo(seamy, ref.landmarks, ref.found), ref, None, cfg=cfg).metrics
    f = m["fidelity"]
    assert f["border"]["psnr"] < 30
    assert f["border"]["mae"] > 20
    assert f["outside"]["psnr"] == PSNR_CAP
    assert f["head"]["psnr"] > f["border"]["psnr"] + 5  # the band is a small part of the head


def test_window_joins_show_up_as_seams(clip, real):
    from tccp.metrics.evaluate import TrackedVideo, evaluate_arrays

    cfg = _cfg(window=8)
    layout = cfg.layout
    ref = real.head(36)  # 5 joins
    window_index = np.cumsum(layout.is_boundary(36))  # 0 for frame 0, then 1, 2, ...
    offset = np.where(window_index % 2 == 1, 25, 0)  # brightness alternates per window
    frames = np.clip(ref.frames.astype(np.int16) + offset[:, None, None, None], 0, 255).astype(np.uint8)
    m = evaluate_arrays(TrackedVideo(frames, ref.landmarks, ref.found), ref, None, cfg=cfg).metrics
    seams = m["temporal"]["seams"]
    assert seams["new_frames"] == 7
    assert seams["generated"]["seam_ratio"] > 2.5
    assert seams["real"]["seam_ratio"] < 2.0


def test_identity_similarity(clip, real):
    from tccp.metrics.identity import identity_similarity, load_embedder

    emb, why = load_embedder()
    if emb is None:
        from tccp.metrics.evaluate import evaluate_arrays

        m = evaluate_arrays(real.head(10), real.head(10), None, cfg=_cfg(identity=True)).metrics
        assert m["identity"] is None and m["identity_note"]
        pytest.skip(f"no face embedder: {why}")
    same = identity_similarity(emb, real.frames, real.frames, real.landmarks, real.landmarks,
                               real.found, max_frames=2)
    assert same["cosine"] == pytest.approx(1.0) and same["distance"] < 1e-6
    assert same["same_person_rate"] == 1.0
    # a mirrored face is the same person: still well under dlib's 0.6 threshold
    mirrored = real.frames[:, :, ::-1]
    w = real.frames.shape[2]
    mlm = real.landmarks.copy()
    mlm[..., 0] = w - mlm[..., 0]
    flip = identity_similarity(emb, real.frames, mirrored, real.landmarks, mlm, real.found, max_frames=2)
    assert flip["distance"] < 0.45
    # another person (vr_face5) is beyond it
    other_clip = CLIPS / "vr_face5.mp4"
    if other_clip.exists():
        from tccp.media.io import load_clip
        from tccp.metrics.evaluate import track_frames

        other = track_frames(load_clip(other_clip, max_frames=8, require_audio=False).frames)
        both = real.found[:8] & other.found
        diff = identity_similarity(emb, real.frames[:8], other.frames, real.landmarks[:8],
                                   other.landmarks, both, max_frames=2)
        assert diff["distance"] > 0.6 and diff["same_person_rate"] == 0.0


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def clip_files(clip, tmp_path_factory):
    """A 1.6 s real clip and a copy delayed by SHIFT frames, as mp4 with audio."""
    from tccp.media.io import write_video

    folder = tmp_path_factory.mktemp("eval_clips")
    n = 40
    frames = clip.frames[:n]
    audio = clip.audio[: int(round(n / clip.fps * clip.sr))]
    real = write_video(folder / "real.mp4", frames, audio=audio)
    gen = write_video(
        folder / "gen.mp4", np.concatenate([np.repeat(frames[:1], SHIFT, 0), frames[:-SHIFT]]), audio=audio
    )
    return real, gen


def test_cli_reconstruction_with_report(clip_files, tmp_out, capsys):
    from tccp.cli import main

    real, gen = clip_files
    stats = tmp_out / "stats.json"
    stats.write_text(json.dumps({"summary": {}, "windows": [
        {"window": i, "queue_wait": 0.01, "stage1": 0.05, "stage2": 0.1, "composite": 0.02, "e2e": 0.2}
        for i in range(5)
    ]}))
    out = tmp_out / "m.json"
    rep = tmp_out / "report"
    rc = main(["eval", "--real", str(real), "--generated", str(gen), "--json", str(out),
               "--report", str(rep), "--stats", str(stats), "--no-identity"])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["lipsync"]["lag_frames"] == SHIFT
    assert m["inputs"]["audio"] == str(real)  # reconstruction: the real clip's own audio
    assert m["identity"] is None and m["identity_note"] == "identity disabled"
    assert json.loads((rep / "metrics.json").read_text()) == m
    assert sorted(list_files(rep)) == [".tccp-output", "latency.png", "metrics.json", "strip.png", "timeline.png"]
    assert not [f for f in list_files(tmp_out) if ".tmp-" in f]  # no temp files left behind
    for png in ("latency.png", "strip.png", "timeline.png"):
        assert (rep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "LipLMD" in capsys.readouterr().out


def test_cli_without_real_reports_only_reference_free_measures(clip_files, tmp_out):
    from tccp.cli import main

    _, gen = clip_files
    out = tmp_out / "m.json"
    assert main(["eval", "--generated", str(gen), "--json", str(out), "--window", "6"]) == 0
    m = json.loads(out.read_text())
    assert m["mode"] == "no_reference"
    assert "fidelity" not in m and "identity" not in m and "lip_lmd" not in m["lipsync"]
    assert m["lipsync"]["audio_sync"]["generated"] is not None  # its own audio track
    assert m["temporal"]["seams"]["new_frames"] == 5
    assert m["temporal"]["jitter"]["generated"] > 0


def test_cli_user_errors_are_one_line(clip_files, tmp_out, capsys):
    from tccp.cli import main

    real, gen = clip_files
    cases = [
        (["eval", "--generated", str(tmp_out / "missing.mp4"), "--json", str(tmp_out / "a.json")], "missing.mp4"),
        (["eval", "--generated", str(gen)], "--json"),
        (["eval", "--generated", str(gen), "--json", str(tmp_out / "a.json"), "--window", "1"], "--window"),
        (["eval", "--generated", str(gen), "--json", str(tmp_out / "a.json"), "--stats", str(real)], "stats"),
        (["eval", "--suite"], "--json"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        last = err[-1]
        assert last.startswith("error: ") and needle in last
    assert not (tmp_out / "a.json").exists()


# --------------------------------------------------------------------------- suite


def test_suite_with_a_stand_in_generator(tmp_out):
    if not CLIP.exists():
        pytest.skip(f"shared data not available: {CLIP}")
    from tccp.media.io import load_clip, write_video
    from tccp.metrics.suite import SuiteConfig, format_table, run_suite

    calls = []

    def perfect(video: Path, out: Path, seconds: float, **kw) -> dict:
        c = load_clip(video, max_seconds=seconds)
        write_video(out, c.frames, audio=c.audio)
        calls.append(video)
        return {"windows": 0}

    cfg = SuiteConfig(clips=["vr_face3"], clips_dir=CLIPS, seconds=1.0, work=tmp_out,
                      eval=_cfg())
    res = run_suite(cfg, generator=perfect)
    assert calls == [CLIP]
    s = res["summary"]
    assert set(s) == {"tccp", "frozen", "blur", "real"}  # a stand-in has no tracked/warp modes
    # a generator that returns the clip is as good as the codec round trip...
    assert s["tccp"]["PSNR mouth"] == pytest.approx(s["real"]["PSNR mouth"], abs=1.5)
    assert s["tccp"]["LipLMD"] < 0.02 and s["tccp"]["sharp"] == pytest.approx(s["real"]["sharp"], abs=0.15)
    # ...the frozen mouth is clearly worse on the moving mouth, and the blur less sharp
    assert s["frozen"]["LipLMD"] > 2 * s["real"]["LipLMD"]
    assert s["frozen"]["PSNR mouth"] < s["real"]["PSNR mouth"] - 5
    assert s["blur"]["sharp"] < 0.5 * s["real"]["sharp"]
    # everyone leaves the face outside the mouth region as the source has it
    assert min(s[m]["PSNR kept"] for m in s) > 35
    assert res["clips"]["vr_face3"]["run_stats"] == {"windows": 0}
    table = format_table(res)
    for method in s:
        assert method in table
    from tccp.metrics.evaluate import to_jsonable

    json.dumps(to_jsonable(res), allow_nan=False)


def test_suite_unknown_clip_is_a_user_error(tmp_out):
    from tccp.metrics.suite import SuiteConfig, run_suite

    with pytest.raises(TCCPError, match="nope"):
        run_suite(SuiteConfig(clips=["nope"], clips_dir=tmp_out), generator=lambda *a: {})


def test_stage1_table_has_the_dub_row(monkeypatch):
    """The suite's stage-1 table measures stage 1 once more with the rest of the face
    from elsewhere in the clip (its meshes played backwards): a dub's situation, where
    the source face moves with other speech than the audio's."""
    if not CLIP.exists():
        pytest.skip(f"shared data not available: {CLIP}")
    import tccp.pipelines.landmarks as pl
    from engine.model import load_model
    from engine.refs import scan_video
    from tccp.media.io import load_clip
    from tccp.metrics.evaluate import track_frames
    from tccp.metrics.suite import STAGE1_METHODS, _stage1_summary, stage1_clip

    model = load_model(None, "cpu")
    try:
        pipe = model.runner.pipeline
        clip = load_clip(CLIP, max_seconds=2.0)
        real = track_frames(clip.frames)
        bank = scan_video(CLIP, pipe.stage1.codec.template, None, model.size, samples=12).bank
        seen = []
        real_generate = pl.generate_clip
        monkeypatch.setattr(pl, "generate_clip", lambda gen, tokens, vad, heads, refs, **kw:
                            seen.append(np.array(heads)) or real_generate(gen, tokens, vad, heads, refs, **kw))
        row = stage1_clip(pipe, real, clip.audio, clip.sr, clip.fps, bank)
    finally:
        model.close()
    assert len(seen) == 2 and np.allclose(seen[1], seen[0][::-1])  # own meshes, then backwards
    for m in ("tccp", "adapted", "elsewhere"):
        assert np.isfinite(row[m]["aperture_corr"]), (m, row[m])
    row.update(clip="x", speech_fraction=1.0)
    assert set(STAGE1_METHODS) <= set(_stage1_summary([row]))


def test_crossdub_pairs_and_speech_files():
    """`scripts/crossdub_eval.py`: every held-out video gets two other clips' speech, never
    its own, from clips whose real mouth can judge it; a `_noaudio` video's speech is its
    same-stem .wav (the dub would otherwise fail on a video without sound)."""
    xd = load_script("crossdub_eval")
    pairs = xd.default_pairs()
    assert len(pairs) == 2 * len(xd.VIDEOS) == len(set(pairs))
    assert all(a != b and b in xd.SPEECH for a, b in pairs)
    assert {a for a, _ in pairs} == set(xd.VIDEOS) and not {"lp_d20", "vx_emo_yomir"} & set(xd.SPEECH)
    if not xd.CLIPS.is_dir():
        pytest.skip("../shared/data/clips not present")
    assert xd.speech_file("edtalk_mouth_source_noaudio").name == "edtalk_mouth_source.wav"
    assert xd.speech_file("vr_face5") == xd.clip_file("vr_face5")
