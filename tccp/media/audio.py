"""Audio features: Wav2Lip log-mel spectrogram and per-video-frame windows.

The paper feeds the models mel spectrograms computed "with the same setting as
Wav2Lip" (16 kHz, 80 bins, hop 200 = 12.5 ms, so 80 mel frames per second, i.e.
3.2 mel frames per 25 fps video frame). The constants below are Wav2Lip's `hparams`
so that features (and any Wav2Lip-derived lip-sync model) are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["MelConfig", "MEL", "log_mel", "mel_windows", "mel_frame_rate", "energy_envelope", "mel_filters",
           "mel_key", "resample", "stft_magnitude"]

_MEL_ASSET = Path(__file__).resolve().parents[1] / "assets" / "mel_filters.npz"


@dataclass(frozen=True)
class MelConfig:
    sr: int = 16000
    n_fft: int = 800
    hop: int = 200
    win: int = 800
    n_mels: int = 80
    fmin: float = 55.0
    fmax: float = 7600.0
    preemphasis: float = 0.97
    ref_level_db: float = 20.0
    min_level_db: float = -100.0
    max_abs: float = 4.0


MEL = MelConfig()


def mel_frame_rate(cfg: MelConfig = MEL) -> float:
    """Mel frames per second (80 with the defaults)."""
    return cfg.sr / cfg.hop


def mel_key(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> str:
    """Name of a filterbank in `tccp/assets/mel_filters.npz`."""
    return f"sr{sr}_fft{n_fft}_mels{n_mels}_fmin{fmin:g}_fmax{fmax:g}"


@lru_cache(maxsize=8)
def mel_filters(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Slaney mel filterbank `(n_mels, 1 + n_fft // 2) float32`, as `librosa.filters.mel`.

    The banks the project uses ship precomputed (`scripts/vendor_mel_filters.py`):
    librosa's first use in a fresh install compiles its numba kernels for 10-19 s on
    this 2-core CPU, which used to stall the first window of a run or a call. Any other
    setting still asks librosa."""
    fmax = sr / 2 if fmax is None else fmax
    key = mel_key(sr, n_fft, n_mels, fmin, fmax)
    if _MEL_ASSET.is_file():
        with np.load(_MEL_ASSET) as banks:
            if key in banks.files:
                bank = banks[key]
                bank.setflags(write=False)  # cached and shared: callers copy before changing it
                return bank
    import librosa

    bank = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax).astype(np.float32)
    bank.setflags(write=False)
    return bank


def _mel_basis(cfg: MelConfig) -> np.ndarray:
    return mel_filters(cfg.sr, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)


def resample(wav: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """1-D `wav` at `target_sr` (float32, `ceil(len * target_sr / sr)` samples): soxr's
    high quality, which is what `librosa.resample` runs by default, called directly to
    skip librosa's imports."""
    import soxr

    wav = np.asarray(wav, dtype=np.float32)
    if sr == target_sr or wav.size == 0:
        return wav
    out = soxr.resample(wav, sr, target_sr, quality="HQ").astype(np.float32)
    n = int(np.ceil(wav.size * target_sr / sr))  # librosa's length: ceil, zero-padded or cut
    return out[:n] if out.size >= n else np.pad(out, (0, n - out.size))


def stft_magnitude(wav: np.ndarray, n_fft: int, hop: int, win: int) -> np.ndarray:
    """`|STFT|` `(1 + n_fft // 2, 1 + len // hop)`: periodic Hann window of `win`
    samples centred in `n_fft`, frames centred on `j * hop` with zero padding at the
    ends (`librosa.stft(center=True, pad_mode="constant")`, without its imports)."""
    from scipy.signal import get_window

    window = get_window("hann", win, fftbins=True).astype(np.float32)
    if win < n_fft:
        left = (n_fft - win) // 2
        window = np.pad(window, (left, n_fft - win - left))
    padded = np.pad(np.asarray(wav, dtype=np.float32), n_fft // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    return np.abs(np.fft.rfft(frames * window, axis=1)).astype(np.float32).T


def log_mel(audio: np.ndarray, sr: int = 16000, cfg: MelConfig = MEL) -> np.ndarray:
    """Normalised log-mel spectrogram `(T, 80) float32` in [-4, 4].

    `T = 1 + len(audio) // 200` (centred STFT), i.e. 80 frames per second at 16 kHz;
    mel frame `j` is centred on sample `j * 200`. Audio at another rate is resampled
    first so that the frame rate stays 80/s.
    """
    from scipy.signal import lfilter

    wav = np.asarray(audio, dtype=np.float32)
    if wav.ndim == 2:  # (channels, samples) or (samples, channels): mix to mono
        wav = wav.mean(axis=0 if wav.shape[0] < wav.shape[1] else 1)
    if sr != cfg.sr:
        wav = resample(wav, sr, cfg.sr)
    if wav.size == 0:
        return np.zeros((0, cfg.n_mels), np.float32)
    wav = lfilter([1.0, -cfg.preemphasis], [1.0], wav).astype(np.float32)
    spec = stft_magnitude(wav, cfg.n_fft, cfg.hop, cfg.win)
    mel = _mel_basis(cfg) @ spec
    min_level = np.exp(cfg.min_level_db / 20.0 * np.log(10.0))
    db = 20.0 * np.log10(np.maximum(min_level, mel)) - cfg.ref_level_db
    m = cfg.max_abs
    norm = (2 * m) * ((db - cfg.min_level_db) / (-cfg.min_level_db)) - m
    return np.clip(norm, -m, m).astype(np.float32).T.copy()


def mel_windows(
    mel: np.ndarray, n_frames: int, fps: float = 25.0, width: int = 16, cfg: MelConfig = MEL
) -> np.ndarray:
    """Mel window for each video frame: `(n_frames, width, 80)`.

    Frame `i` (shown at `i / fps` s) gets the `width` mel frames centred on mel frame
    `i * 80 / fps` (16 frames = 0.2 s: 0.1 s either side, enough to see a phoneme
    coming and going). Indices past either end repeat the edge frame, so every video
    frame gets a full window even when the audio is a little short.
    """
    mel = np.asarray(mel, dtype=np.float32)
    if mel.ndim != 2:
        raise ValueError(f"mel must be (T, n_mels), got shape {mel.shape}")
    if n_frames <= 0:
        return np.zeros((0, width, mel.shape[1]), np.float32)
    if mel.shape[0] == 0:
        # no audio at all: the quietest possible value
        return np.full((n_frames, width, mel.shape[1]), -cfg.max_abs, np.float32)
    centres = np.rint(np.arange(n_frames) * mel_frame_rate(cfg) / fps).astype(np.int64)
    idx = centres[:, None] - width // 2 + np.arange(width)[None, :]
    idx = np.clip(idx, 0, mel.shape[0] - 1)
    return mel[idx]


def energy_envelope(audio: np.ndarray, sr: int = 16000, fps: float = 25.0) -> np.ndarray:
    """RMS energy of the audio under each video frame: `(ceil(duration * fps),) float32`.

    Frame `i` covers `[i / fps, (i + 1) / fps)`; used by the evaluation to correlate
    mouth opening with loudness.
    """
    wav = np.asarray(audio, dtype=np.float32).reshape(-1)
    n = int(np.ceil(len(wav) * fps / sr - 1e-9))
    out = np.zeros(n, np.float32)
    for i in range(n):
        a = int(round(i * sr / fps))
        b = min(len(wav), int(round((i + 1) * sr / fps)))
        if b > a:
            seg = wav[a:b]
            out[i] = float(np.sqrt(np.mean(seg * seg)))
    return out
