"""The torch Whisper encoder and the voice-activity detector, on real audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tccp.media.vad import StreamingVAD, frame_voice_activity, speech_probability
from tccp.media.whisper import (
    StreamingWhisper,
    frame_tokens,
    full_features,
    load_whisper,
    stream_features,
    whisper_log_mel,
)

REF = Path(__file__).parent / "data" / "whisper_tiny_en_ref.npz"


@pytest.fixture(scope="module")
def encoder():
    torch.set_num_threads(1)
    return load_whisper("tiny.en")


@pytest.fixture(scope="module")
def ref():
    d = np.load(REF)
    return d["audio"].astype(np.float32) / 32767, d["features"].astype(np.float32)


def test_matches_packaged_model(encoder, ref):
    """Last-layer features of 2 s of speech, against ctranslate2 running the wheel's own
    model.bin on an independently computed (librosa) log-mel, stored once."""
    audio, expected = ref
    got = full_features(encoder, audio)[:, -1]
    assert got.shape == (100, 384)
    err = np.abs(got - expected).max() / np.abs(expected).max()
    assert err < 5e-3, err
    cos = (got * expected).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert cos.min() > 0.999


def test_int8_rows_load_close_to_the_fp16_encoder(encoder, ref, tmp_path):
    """`scripts/vendor_whisper.py --int8` (the Whisper base experiment's form): blocks' matrices int8 with a
    scale per row, half the bytes; the loader dequantises, and the features stay close."""
    from conftest import load_script
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    vendor = load_script("vendor_whisper")
    src = vendor.DST / "tiny.en.safetensors"
    with safe_open(str(src), "np") as f:
        meta = f.metadata()
    q = vendor.quantize_rows(load_file(str(src)))
    assert q["blocks.0.qkv.weight"].dtype == np.int8 and q["conv1.weight"].dtype == np.float16
    save_file(q, str(tmp_path / "tiny.en.safetensors"), metadata=meta)
    assert (tmp_path / "tiny.en.safetensors").stat().st_size < 0.6 * src.stat().st_size
    small = load_whisper("tiny.en", folder=tmp_path)
    assert small.name == "tiny.en"
    audio, _ = ref
    a, b = full_features(encoder, audio), full_features(small, audio)
    assert a.shape == b.shape
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert 0 < rel < 0.05, rel
    cos = (a[:, -1] * b[:, -1]).sum(-1) / np.linalg.norm(a[:, -1], axis=-1) / np.linalg.norm(b[:, -1], axis=-1)
    assert cos.mean() > 0.995


def test_all_layers_and_rates(encoder, ref):
    audio, _ = ref
    f = full_features(encoder, audio)
    assert f.shape == (int(np.ceil(len(audio) / 320)), 5, 384)
    assert f.dtype == np.float32 and np.isfinite(f).all()
    tok = frame_tokens(f, 0, 50)
    assert tok.shape == (50, 10, 5 * 384)
    # frame 10's tokens are feature frames 16..25 (+-2 video frames around 2*10+1)
    np.testing.assert_array_equal(tok[10].reshape(10, 5, 384), f[16:26])
    # edges are padded, not wrapped
    np.testing.assert_array_equal(tok[0].reshape(10, 5, 384)[:4], np.repeat(f[:1], 4, 0))


def test_long_audio_is_chunked(encoder):
    rng = np.random.default_rng(0)
    audio = (0.05 * rng.standard_normal(16000 * 40)).astype(np.float32)
    f = full_features(encoder, audio)
    assert f.shape[0] == 2000 and np.isfinite(f).all()
    assert np.abs(f[1400:1600]).sum(axis=(1, 2)).min() > 0  # the overlap seam is filled


def test_streaming_replay_matches_incremental(encoder, ref):
    """`stream_features` (training's replay) equals pushing blocks into a live
    `StreamingWhisper`, and its features near full context agree with full ones."""
    audio, _ = ref
    replay = stream_features(encoder, audio, hop_frames=7, lookahead_s=0.0)
    sw = StreamingWhisper(encoder, context_s=3.0)
    hop = 4480
    for pos in range(0, len(audio), hop):
        sw.push(audio[pos : pos + hop])
        sw.compute(min(len(audio), pos + hop))
    live = sw.get(0, replay.shape[0])
    np.testing.assert_allclose(live, replay, atol=1e-5)
    full = full_features(encoder, audio)
    cos = (full[:, 2] * replay[:, 2]).sum(-1) / np.linalg.norm(full[:, 2], axis=-1) / np.linalg.norm(replay[:, 2], axis=-1)
    assert cos.mean() > 0.6  # same signal, less context: related, not equal


def test_bad_audio(encoder):
    with pytest.raises(ValueError):
        whisper_log_mel(np.zeros(10, np.float32))
    assert full_features(encoder, np.zeros(0, np.float32)).shape == (0, 5, 384)
    f = full_features(encoder, np.zeros(16000, np.float32))  # digital silence: finite
    assert np.isfinite(f).all()


def test_vad_speech_vs_silence_and_noise(ref):
    audio, _ = ref
    assert speech_probability(audio).mean() > 0.5
    assert speech_probability(np.zeros(32000, np.float32)).max() < 0.1
    rng = np.random.default_rng(1)
    assert speech_probability((0.1 * rng.standard_normal(32000)).astype(np.float32)).mean() < 0.3
    v = frame_voice_activity(audio, 50)
    assert v.shape == (50,) and 0 <= v.min() and v.max() <= 1


def test_streaming_vad_matches_batch(ref):
    audio, _ = ref
    batch = speech_probability(audio)
    s = StreamingVAD()
    for pos in range(0, len(audio), 700):  # blocks that do not align with chunks
        s.push(audio[pos : pos + 700])
    n = len(s.probs)
    np.testing.assert_allclose(np.array(s.probs), batch[:n], atol=1e-4)
    assert n >= len(audio) // 512
