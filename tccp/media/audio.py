"""Audio features: Wav2Lip log-mel spectrogram and per-video-frame windows.

The paper feeds the models mel spectrograms computed "with the same setting as
Wav2Lip" (16 kHz, 80 bins, hop 200 = 12.5 ms, so 80 mel frames per second, i.e.
3.2 mel frames per 25 fps video frame). The constants below are Wav2Lip's `hparams`
so that features (and any Wav2Lip-derived lip-sync model) are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["MelConfig", "MEL", "log_mel", "mel_windows", "mel_frame_rate", "energy_envelope"]


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


@lru_cache(maxsize=4)
def _mel_basis(cfg: MelConfig) -> np.ndarray:
    import librosa

    return librosa.filters.mel(
        sr=cfg.sr, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax
    ).astype(np.float32)


def log_mel(audio: np.ndarray, sr: int = 16000, cfg: MelConfig = MEL) -> np.ndarray:
    """Normalised log-mel spectrogram `(T, 80) float32` in [-4, 4].

    `T = 1 + len(audio) // 200` (centred STFT), i.e. 80 frames per second at 16 kHz;
    mel frame `j` is centred on sample `j * 200`. Audio at another rate is resampled
    first so that the frame rate stays 80/s.
    """
    import librosa
    from scipy.signal import lfilter

    wav = np.asarray(audio, dtype=np.float32)
    if wav.ndim == 2:  # (channels, samples) or (samples, channels): mix to mono
        wav = wav.mean(axis=0 if wav.shape[0] < wav.shape[1] else 1)
    if sr != cfg.sr:
        wav = librosa.resample(wav, orig_sr=sr, target_sr=cfg.sr).astype(np.float32)
    if wav.size == 0:
        return np.zeros((0, cfg.n_mels), np.float32)
    wav = lfilter([1.0, -cfg.preemphasis], [1.0], wav).astype(np.float32)
    spec = np.abs(
        librosa.stft(y=wav, n_fft=cfg.n_fft, hop_length=cfg.hop, win_length=cfg.win)
    )
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
