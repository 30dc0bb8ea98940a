"""Per-frame audio conditions for a session: Whisper tokens and voice activity.

Files: the whole driving track is pushed before the first frame, so the first window
computes Whisper's full-context features (and voice activity) of the whole track once
(`tccp.media.whisper.full_features`, ~0.7 s per minute of audio on 2 CPU threads) and
every window slices them. Live sessions only ever have the past: each window encodes
the last `context_s` seconds of received audio (unpadded, ~20-30 ms on CPU), ending
at the newest sample, exactly the view the model was trained on for live input
(`stream*` feature variants of `tccp.data.landmarks`).
"""

from __future__ import annotations

import numpy as np

from engine.align import AudioBuffer

__all__ = ["AudioFeatures"]


class AudioFeatures:
    def __init__(self, encoder, live: bool, fps: float = 25.0, context_s: float = 3.0, radius: int = 2) -> None:
        self.encoder = encoder
        self.live = live
        self.fps = float(fps)
        self.context_s = float(context_s)
        self.radius = radius
        self._full: np.ndarray | None = None  # file mode: (T50, L, D) from session time t0
        self._vad_full: np.ndarray | None = None
        self._t0 = 0.0

    def _empty(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        from tccp.media.whisper import tokens_per_frame

        span = tokens_per_frame(self.radius, self.fps)
        return (np.zeros((n, span, (self.encoder.n_layers + 1) * self.encoder.width), np.float32),
                np.zeros(n, np.float32))

    def for_frames(self, audio: AudioBuffer, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (n, La, F), voice activity (n,)) for frames at session `times`."""
        from tccp.media.vad import frame_voice_activity, speech_probability
        from tccp.media.whisper import frame_tokens, full_features

        times = np.asarray(times, np.float64)
        n = len(times)
        if not audio.received or n == 0:
            return self._empty(n)
        if not self.live:
            if self._full is None:
                self._t0 = max(0.0, audio._start / audio.sr)  # noqa: SLF001 - the buffer's first sample
                samples = audio.read(self._t0, audio.end_time)
                self._full = full_features(self.encoder, samples)
                nf = int(np.ceil(len(samples) / audio.sr * self.fps)) + 1
                self._vad_full = frame_voice_activity(samples, nf, self.fps)
            start = int(round((times[0] - self._t0) * self.fps))
            tok = frame_tokens(self._full, start, n, fps=self.fps, radius=self.radius)
            idx = np.clip(np.arange(start, start + n), 0, len(self._vad_full) - 1)
            return tok.astype(np.float32), self._vad_full[idx].astype(np.float32)
        # live: the last context_s seconds of audio up to the newest sample
        t_end = audio.end_time
        t_begin = max(t_end - self.context_s, audio._start / audio.sr)  # noqa: SLF001
        samples = audio.read(t_begin, t_end)
        if samples.size < 640:
            return self._empty(n)
        feats = full_features_unpadded(self.encoder, samples)
        start = int(round((times[0] - t_begin) * self.fps))
        tok = frame_tokens(feats, start, n, fps=self.fps, radius=self.radius)
        p = speech_probability(samples)
        tc = t_begin + (np.arange(len(p)) + 0.5) * 512 / 16000
        vad = np.interp(times + 0.5 / self.fps, tc, p).astype(np.float32)
        return tok.astype(np.float32), vad


def full_features_unpadded(encoder, samples: np.ndarray) -> np.ndarray:
    """All-layer features of a short signal without padding it to 30 s (the live view)."""
    import torch

    from tccp.media.whisper import whisper_log_mel

    with torch.inference_mode():
        dev = next(encoder.parameters()).device
        return encoder(whisper_log_mel(samples)[None].to(dev))[0].float().cpu().numpy()
