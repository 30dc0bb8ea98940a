"""Audio features: Wav2Lip log-mel (shape, scale, timing) and per-frame windows."""

from __future__ import annotations

import numpy as np
import pytest

from tccp.media.audio import MEL, energy_envelope, log_mel, mel_frame_rate, mel_windows

SR = 16000


def _tone(seconds: float, freq: float = 1000.0, amp: float = 0.1, sr: int = SR) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_log_mel_shape_is_80_frames_per_second() -> None:
    assert mel_frame_rate() == 80.0
    for seconds in (1.0, 2.5):
        m = log_mel(_tone(seconds))
        assert m.dtype == np.float32
        assert m.shape == (1 + int(seconds * SR) // MEL.hop, 80)


def test_log_mel_range_and_silence() -> None:
    m = log_mel(_tone(1.0, amp=0.9))
    assert m.min() >= -4.0 and m.max() <= 4.0
    assert m.max() > 0.0  # a loud tone is well above the floor
    silence = log_mel(np.zeros(SR, np.float32))
    assert np.all(silence == -4.0)


def test_log_mel_peak_bin_tracks_frequency() -> None:
    import librosa

    centres = librosa.mel_frequencies(n_mels=80 + 2, fmin=MEL.fmin, fmax=MEL.fmax)[1:-1]
    for freq in (300.0, 1000.0, 4000.0):
        m = log_mel(_tone(1.0, freq=freq))
        peak = int(np.argmax(m[10:-10].mean(axis=0)))
        assert abs(centres[peak] - freq) / freq < 0.1, (freq, centres[peak])


def test_log_mel_db_scale_matches_wav2lip_normalisation() -> None:
    """Doubling the amplitude adds 6.02 dB, i.e. 8 * 6.02 / 100 in normalised units."""
    quiet = log_mel(_tone(1.0, amp=0.02))
    loud = log_mel(_tone(1.0, amp=0.04))
    band = quiet[10:-10].mean(axis=0) > -2.0  # bins with signal, far from clipping
    assert band.sum() >= 2
    step = (loud[10:-10, band] - quiet[10:-10, band]).mean()
    assert step == pytest.approx(8 * 20 * np.log10(2) / 100, abs=0.01)


def test_log_mel_resamples_other_rates_to_same_timeline() -> None:
    a16 = log_mel(_tone(1.0, sr=16000), sr=16000)
    a44 = log_mel(_tone(1.0, sr=44100), sr=44100)
    assert a44.shape == a16.shape
    assert np.abs(a44[5:-5] - a16[5:-5]).mean() < 0.05


def test_click_lands_in_the_centre_of_its_video_frames_window() -> None:
    audio = np.zeros(2 * SR, np.float32)
    t_click = 1.2  # video frame 30
    audio[int(t_click * SR): int(t_click * SR) + 40] = 0.9
    m = log_mel(audio)
    assert abs(int(np.argmax(m.mean(axis=1))) - t_click * 80) <= 1
    w = mel_windows(m, n_frames=50)
    loudest_slot = int(np.argmax(w[30].mean(axis=1)))
    assert loudest_slot in (7, 8, 9)


def test_mel_windows_indexing_and_edge_padding() -> None:
    T = 200
    mel = np.repeat(np.arange(T, dtype=np.float32)[:, None], 80, axis=1)  # row j holds j
    n = 62  # 2.48 s of video; frame 61 is centred at mel frame 195
    w = mel_windows(mel, n_frames=n, fps=25, width=16)
    assert w.shape == (n, 16, 80)
    for i in range(n):
        centre = int(np.rint(i * 80 / 25))
        want = np.clip(np.arange(centre - 8, centre + 8), 0, T - 1)
        assert np.array_equal(w[i, :, 0], want), i
    assert np.all(w[0, :8] == 0)  # before the start: first frame repeated
    assert np.all(w[-1, -4:] == T - 1)  # past the end: last frame repeated


def test_mel_windows_empty_inputs() -> None:
    assert mel_windows(np.zeros((0, 80), np.float32), 5).shape == (5, 16, 80)
    assert np.all(mel_windows(np.zeros((0, 80), np.float32), 5) == -4.0)
    assert mel_windows(np.zeros((10, 80), np.float32), 0).shape == (0, 16, 80)


def test_energy_envelope_per_video_frame() -> None:
    audio = np.concatenate([np.zeros(SR // 2, np.float32), np.full(SR // 2, 0.5, np.float32)])
    e = energy_envelope(audio, SR, fps=25)
    assert e.shape == (25,) and e.dtype == np.float32
    assert np.all(e[:12] == 0.0) and np.allclose(e[13:], 0.5)
    # a partial last frame still gets a value
    assert energy_envelope(np.ones(700, np.float32), SR).shape == (2,)


# -- the live path does not touch librosa (its numba kernels compile for 10-19 s on a
#    fresh install, inside the first window); what replaces it must equal it

def _librosa_log_mel(wav: np.ndarray, sr: int) -> np.ndarray:
    """Reference: `log_mel` as it was written on librosa."""
    import librosa
    from scipy.signal import lfilter

    w = np.asarray(wav, np.float32)
    if sr != MEL.sr:
        w = librosa.resample(w, orig_sr=sr, target_sr=MEL.sr).astype(np.float32)
    w = lfilter([1.0, -MEL.preemphasis], [1.0], w).astype(np.float32)
    spec = np.abs(librosa.stft(y=w, n_fft=MEL.n_fft, hop_length=MEL.hop, win_length=MEL.win))
    basis = librosa.filters.mel(sr=MEL.sr, n_fft=MEL.n_fft, n_mels=MEL.n_mels, fmin=MEL.fmin, fmax=MEL.fmax)
    db = 20.0 * np.log10(np.maximum(1e-5, basis.astype(np.float32) @ spec)) - MEL.ref_level_db
    return np.clip(8.0 * (db + 100.0) / 100.0 - 4.0, -4.0, 4.0).astype(np.float32).T


@pytest.mark.parametrize("sr,n", [(16000, 48000), (44100, 30001), (48000, 4800), (16000, 900)])
def test_log_mel_equals_the_librosa_computation(sr: int, n: int) -> None:
    rng = np.random.default_rng(sr + n)
    t = np.arange(n) / sr
    wav = (0.3 * np.sin(2 * np.pi * 440 * t * (1 + t)) + 0.05 * rng.standard_normal(n)).astype(np.float32)
    ours, ref = log_mel(wav, sr=sr), _librosa_log_mel(wav, sr)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-3


def test_shipped_mel_filters_equal_librosa() -> None:
    import librosa

    from tccp.media.audio import _MEL_ASSET, mel_filters

    assert _MEL_ASSET.is_file()  # the asset is what the live path reads
    whisper = librosa.filters.mel(sr=16000, n_fft=400, n_mels=80)
    wav2lip = librosa.filters.mel(sr=MEL.sr, n_fft=MEL.n_fft, n_mels=MEL.n_mels, fmin=MEL.fmin, fmax=MEL.fmax)
    np.testing.assert_allclose(mel_filters(16000, 400, 80), whisper, atol=1e-7)
    np.testing.assert_allclose(mel_filters(MEL.sr, MEL.n_fft, MEL.n_mels, MEL.fmin, MEL.fmax), wav2lip, atol=1e-7)
    # a bank that is not shipped is still computed (by librosa)
    np.testing.assert_allclose(mel_filters(16000, 512, 40), librosa.filters.mel(sr=16000, n_fft=512, n_mels=40),
                               atol=1e-7)


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_resample_equals_librosa(sr: int) -> None:
    import librosa

    from tccp.media.audio import resample

    wav = np.random.default_rng(sr).standard_normal(sr // 3 + 7).astype(np.float32)
    ours, ref = resample(wav, sr, 16000), librosa.resample(wav, orig_sr=sr, target_sr=16000)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_audio_features_do_not_import_librosa() -> None:
    """Wav2Lip mel (any rate) and Whisper's log-mel, in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from tccp.media.audio import log_mel\n"
            "from tccp.media.whisper import whisper_log_mel\n"
            "x = np.random.default_rng(0).standard_normal(48000).astype(np.float32)\n"
            "log_mel(x, sr=48000); log_mel(x[:16000]); whisper_log_mel(x[:16000])\n"
            "assert 'librosa' not in sys.modules, 'librosa was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
