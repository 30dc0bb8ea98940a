"""Voice activity: is somebody speaking? (Silero VAD v5, ported to torch).

Used three ways: `tccp prepare` keeps clips without speech (music, silence) out of
lip-sync targets; stage 1 gets a per-frame voice-activity input so the mouth rests in
silence; `tccp eval` measures the mouth in silent stretches. Silero VAD separates
speech from music and noise far better than an energy threshold (on the shared clips:
music-only driving clips score 0.00-0.19 speech, talking clips 0.5-0.96).

Weights: `tccp/assets/vad/silero_vad_16k.safetensors` (MIT, from the `silero-vad` wheel,
`scripts/vendor_silero_vad.py`). The network sees 32 ms chunks (512 samples at 16 kHz
with 64 samples of left context) and carries an LSTM state across them; the whole
signal goes through as one batch of chunks and one LSTM pass.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tccp.errors import TCCPError

__all__ = ["VAD_PATH", "SileroVAD", "load_vad", "speech_probability", "frame_voice_activity", "StreamingVAD"]

VAD_PATH = Path(__file__).resolve().parents[1] / "assets" / "vad" / "silero_vad_16k.safetensors"
CHUNK = 512  # samples per decision (32 ms at 16 kHz)
CONTEXT = 64


class SileroVAD(nn.Module):
    """STFT as a conv, four convs, one LSTM, a sigmoid: P(speech) per 32 ms chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.stft = nn.Conv1d(1, 258, 256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, 3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, 3, padding=1)
        self.lstm = nn.LSTM(128, 128, batch_first=True)
        self.final = nn.Conv1d(128, 1, 1)

    def chunk_features(self, chunks: torch.Tensor) -> torch.Tensor:
        """(n, 576) chunks with left context -> (n, 128) LSTM inputs."""
        x = F.pad(chunks[:, None], (0, 64), mode="reflect")
        z = self.stft(x)
        z = (z[:, :129] ** 2 + z[:, 129:] ** 2).sqrt()
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            z = F.relu(conv(z))
        return z.squeeze(-1)

    def forward(self, chunks: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        """(n, 576) consecutive chunks -> (probabilities (n,), LSTM state)."""
        h, state = self.lstm(self.chunk_features(chunks)[None], state)
        p = torch.sigmoid(self.final(F.relu(h[0]).T[None]))[0, 0]
        return p, state


@lru_cache(maxsize=1)
def load_vad() -> SileroVAD:
    if not VAD_PATH.is_file():
        raise TCCPError(f"{VAD_PATH}: voice-activity weights missing (run scripts/vendor_silero_vad.py)")
    from safetensors.torch import load_file

    w = load_file(str(VAD_PATH))
    m = SileroVAD()
    state = {
        "stft.weight": w["stft_conv.weight"],
        "final.weight": w["final_conv.weight"],
        "final.bias": w["final_conv.bias"],
        "lstm.weight_ih_l0": w["lstm_cell.weight_ih"],
        "lstm.weight_hh_l0": w["lstm_cell.weight_hh"],
        "lstm.bias_ih_l0": w["lstm_cell.bias_ih"],
        "lstm.bias_hh_l0": w["lstm_cell.bias_hh"],
    }
    for i in range(1, 5):
        state[f"conv{i}.weight"] = w[f"conv{i}.weight"]
        state[f"conv{i}.bias"] = w[f"conv{i}.bias"]
    m.load_state_dict(state, strict=True)
    return m.eval().requires_grad_(False)


def _chunks(audio: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    x = torch.cat([context, audio])
    n = (len(x) - CONTEXT) // CHUNK
    idx = torch.arange(n)[:, None] * CHUNK + torch.arange(CHUNK + CONTEXT)[None]
    return x[idx]


@torch.inference_mode()
def speech_probability(audio: np.ndarray) -> np.ndarray:
    """16 kHz mono -> P(speech) per 32 ms chunk, (ceil(n / 512),) float32."""
    a = torch.as_tensor(np.asarray(audio, np.float32).reshape(-1))
    if a.numel() == 0:
        return np.zeros(0, np.float32)
    a = F.pad(a, (0, (-a.numel()) % CHUNK))
    p, _ = load_vad()(_chunks(a, torch.zeros(CONTEXT)))
    return p.numpy().astype(np.float32)


def frame_voice_activity(audio: np.ndarray, n_frames: int, fps: float = 25.0, sr: int = 16000) -> np.ndarray:
    """P(speech) resampled to video frames (linear interpolation at frame centres)."""
    if sr != 16000:
        raise ValueError("frame_voice_activity expects 16 kHz audio")
    p = speech_probability(audio)
    if len(p) == 0:
        return np.zeros(n_frames, np.float32)
    t = (np.arange(n_frames) + 0.5) / fps
    tc = (np.arange(len(p)) + 0.5) * CHUNK / sr
    return np.interp(t, tc, p).astype(np.float32)


class StreamingVAD:
    """The same decisions for live audio: feed blocks, read P(speech) per 32 ms chunk;
    the LSTM state and the 64-sample context carry across calls."""

    def __init__(self) -> None:
        self._pending = np.zeros(0, np.float32)
        self._context = torch.zeros(CONTEXT)
        self._state = None
        self.probs: list[float] = []  # one per finished chunk, from the stream's start

    @torch.inference_mode()
    def push(self, samples: np.ndarray) -> None:
        self._pending = np.concatenate([self._pending, np.asarray(samples, np.float32).reshape(-1)])
        n = len(self._pending) // CHUNK
        if n == 0:
            return
        a = torch.from_numpy(self._pending[: n * CHUNK].copy())
        self._pending = self._pending[n * CHUNK :]
        p, self._state = load_vad()(_chunks(a, self._context), self._state)
        self._context = a[-CONTEXT:].clone()
        self.probs.extend(p.tolist())

    def at(self, t_seconds: np.ndarray) -> np.ndarray:
        """P(speech) at the given stream times (held at the last known value)."""
        if not self.probs:
            return np.zeros(len(t_seconds), np.float32)
        tc = (np.arange(len(self.probs)) + 0.5) * CHUNK / 16000
        return np.interp(t_seconds, tc, np.asarray(self.probs)).astype(np.float32)
