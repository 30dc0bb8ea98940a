"""Stage-1 training data: landmark windows with Whisper audio tokens.

From each prepared clip: the stored sketch landmarks (face-crop px) put into the head
frame (`tccp.face.headframe`), the clip's audio turned into Whisper features in
several variants, and the per-frame voice activity. Features are computed once per
clip and variant and cached as fp16 `.npy` files (`cache_dir`); a CPU run spends
~2 minutes on them for the shared clips.

Feature variants (why several: the same model serves files and live calls):
- `full`: Whisper's native 30 s view (files);
- `stream0` / `stream2`: what a live session computes (3 s of past audio, 0 or 0.2 s
  of look-ahead), whose last frames lack right context;
- `noisy`: the full view of the audio plus noise at 10-20 dB SNR (robustness);
- `silenced`: the full view of the audio with ~30% of it replaced by faint noise in
  1-2 s stretches; the lips of those frames are replaced by the clip's rest shape
  (mouth closed), so the network learns that no voice means a resting mouth.

Windows (`LandmarkWindows.sample`) follow TCCP's first-frame conditioning: slot 0 is
the clean previous frame (flag 1) except with probability `p_first` (a one-frame
restart: no clean slot). Augmentation: mirror (x flipped, left/right points swapped),
pose jitter (small similarity on the whole window + per-frame tracking noise), audio
noise (the `noisy` variant). Only lip-sync clips (`PreparedClip.lipsync`) give windows.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from tccp.data.datasets import PreparedClip
from tccp.face import headframe as hf
from tccp.face.context import mirror_tokens
from tccp.models.landmarks import LandmarkCodec

__all__ = ["FEATURE_KINDS", "LandmarkDataConfig", "LandmarkClip", "load_landmark_clips", "clip_features",
           "LandmarkWindows", "speed_clip", "rest_shape", "reference_frames", "mirror_pose"]

FEATURE_KINDS = ("full", "stream0", "stream2", "noisy", "silenced")


@dataclass
class LandmarkDataConfig:
    window: int = 8
    refs: int = 4
    p_first: float = 0.15
    p_mirror: float = 0.5
    jitter: float = 0.01  # whole-window similarity jitter (scale, angle rad, offset)
    frame_noise: float = 0.003  # per-frame tracking noise, head-frame units
    slot0_noise: float = 0.002  # head-frame units: the clean slot is generated, not tracked, at inference
    radius: int = 2  # audio tokens: +-radius video frames of features per frame (the network's audio_radius)
    # mouth mode: probability that c_v (the rest of the face) comes from another stretch of
    # the same clip, so that the network cannot read the mouth's state from the cheeks' and
    # nose's own speech motion, which in a dub follow the original speech, not the new one
    p_control_other: float = 0.0
    # ... and with `control_other_motion` only its motion: the other stretch's points minus
    # their window mean plus this window's mean, so the slow part (pose, the lips' place
    # in the head frame) stays the window's own
    control_other_motion: bool = False
    # feature variant mix (sums to 1)
    mix: dict = field(default_factory=lambda: {"full": 0.5, "stream0": 0.1, "stream2": 0.1, "noisy": 0.1,
                                               "silenced": 0.2})


@dataclass
class LandmarkClip:
    name: str
    heads: np.ndarray  # (N, 478, 2) head-frame meshes (sketch points filled)
    pose: np.ndarray  # (N, 4) pose params in crop px / crop size
    vad: dict  # kind -> (N,) float32 voice activity
    features: dict  # kind -> (T50, layers, width) float16
    rest: np.ndarray  # (478, 2) head-frame mesh with the mouth at rest (closed)
    silent: np.ndarray  # (N,) bool: frames silenced in the `silenced` variant
    context: np.ndarray | None = None  # (N, CONTEXT_DIM) head-masked context tokens (head mode's c_v)

    @property
    def n(self) -> int:
        return len(self.heads)


def rest_shape(heads: np.ndarray, vad: np.ndarray | None = None, k: int = 5) -> np.ndarray:
    """The clip's closed mouth: mean mesh of the `k` frames with the smallest aperture."""
    ap = hf.aperture(heads)
    idx = np.argsort(ap)[:k]
    return heads[idx].mean(0).astype(np.float32)


def reference_frames(heads: np.ndarray, k: int) -> np.ndarray:
    """Indices of `k` reference frames spread over the mouth shapes of a clip: the most
    closed mouth first, then farthest-point sampling on the lip shape."""
    m = heads[:, list(hf.LIPS)].reshape(len(heads), -1)
    idx = [int(np.argmin(hf.aperture(heads)))]
    d = np.linalg.norm(m - m[idx[0]], axis=1)
    while len(idx) < min(k, len(heads)):
        j = int(np.argmax(d))
        idx.append(j)
        d = np.minimum(d, np.linalg.norm(m - m[j], axis=1))
    while len(idx) < k:
        idx.append(idx[-1])
    return np.asarray(idx)


def _silence_plan(n_samples: int, seed: int, sr: int = 16000) -> np.ndarray:
    """Boolean sample mask of 1-2 s stretches covering ~30 % of the signal."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(n_samples, bool)
    pos = int(rng.uniform(0.5, 2.0) * sr)
    while pos < n_samples:
        ln = int(rng.uniform(1.0, 2.0) * sr)
        mask[pos : pos + ln] = True
        pos += ln + int(rng.uniform(2.0, 4.5) * sr)
    return mask


def _variant_audio(audio: np.ndarray, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    if kind == "noisy":
        p = float(np.mean(audio.astype(np.float64) ** 2)) + 1e-8
        snr = rng.uniform(10, 20)
        return (audio + rng.standard_normal(len(audio)).astype(np.float32) * np.sqrt(p / 10 ** (snr / 10))).astype(np.float32), None
    if kind == "silenced":
        mask = _silence_plan(len(audio), seed)
        out = audio.copy()
        out[mask] = rng.standard_normal(int(mask.sum())).astype(np.float32) * 10 ** (rng.uniform(-70, -50) / 20)
        return out, mask
    return audio, None


def view_features(encoder, audio: np.ndarray, kind: str) -> np.ndarray:
    """Whisper features (T50, layers + 1, width) of 16 kHz `audio` as the `kind` sees
    them: streamed like a live session ('stream0' / 'stream2': 0 / 0.2 s of look-ahead)
    or Whisper's full view (every other kind; their audio variant is made before)."""
    from tccp.media import whisper

    if kind in ("stream0", "stream2"):
        return whisper.stream_features(encoder, audio, lookahead_s=0.2 if kind == "stream2" else 0.0)
    return whisper.full_features(encoder, audio)


def clip_features(clip: PreparedClip, encoder, kind: str,
                  cache_dir: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(features (T50, L, D) fp16, per-frame voice activity (N,), silenced-frame mask or
    None) of one clip and variant, cached under `cache_dir` when given."""
    return _features(lambda: clip.audio, int(clip.meta["n_frames"]), clip.fps, lambda: clip.voice, clip.name,
                     f"{clip.meta.get('source')}|{clip.meta.get('created')}", encoder, kind, cache_dir)


def _features(audio: Callable[[], np.ndarray], n: int, fps: float, voice: Callable[[], np.ndarray] | None,
              name: str, ident: str, encoder, kind: str,
              cache_dir: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`clip_features` of any 16 kHz track of `n` frames (`ident` names it in the cache
    key, with the encoder's `name`; no encoder: read the cache as tiny.en's). `audio()`
    and `voice()` (its stored voice activity; None: run the detector) are called only
    when the variant is not cached."""
    from tccp.media.vad import frame_voice_activity

    model_name = getattr(encoder, "name", "tiny.en")
    key = hashlib.sha1(f"{ident}|{model_name}|{kind}".encode()).hexdigest()[:12]
    cache = Path(cache_dir) / f"{name}-{kind}-{key}.npz" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            return z["features"], z["vad"], (z["silent"] if "silent" in z.files else None)
    seed = int(key[:8], 16)
    audio, mask = _variant_audio(audio(), kind, seed)
    feats = view_features(encoder, audio, kind)
    stored = voice is not None and kind in ("full", "stream0", "stream2")
    vad = voice() if stored else frame_voice_activity(audio, n, fps)
    silent = None
    if mask is not None:
        t = ((np.arange(n) + 0.5) / fps * 16000).astype(int).clip(0, len(mask) - 1)
        silent = mask[t]
    out = {"features": feats.astype(np.float16), "vad": vad.astype(np.float32)}
    if silent is not None:
        out["silent"] = silent
    if cache is not None:
        from tccp.io_utils import atomic_path

        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **out)
    return out["features"], out["vad"], silent


def _resample_frames(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Rows of `a` (frames first) linearly interpolated at fractional frame times `t`."""
    i0 = np.floor(t).astype(int).clip(0, len(a) - 1)
    i1 = (i0 + 1).clip(0, len(a) - 1)
    w = (t - i0).astype(np.float32).reshape((-1,) + (1,) * (a.ndim - 1))
    return (a[i0] * (1 - w) + a[i1] * w).astype(a.dtype)


def speed_clip(clip: PreparedClip, base: LandmarkClip, speed: float, encoder, kinds: Sequence[str],
               cache_dir: str | os.PathLike | None) -> LandmarkClip:
    """Speed perturbation (Kaldi's 3-way recipe for small speech corpora): the clip played
    `speed` times faster, audio resampled (tempo and pitch move together) and the
    landmark track resampled in time to match, so the network hears more voices and
    speaking rates than the 50 clips have. Frame j of the result is the source's frame
    j * speed; its Whisper features are computed on the resampled audio (cached)."""

    @functools.cache
    def fast() -> np.ndarray:  # resampled only if a variant is not cached yet
        from tccp.media.audio import resample

        return resample(clip.audio, round(16000 * speed), 16000)

    n = int(np.floor((base.n - 1) / speed)) + 1
    t = np.arange(n) * speed
    feats, vads, silent = {}, {}, np.zeros(n, bool)
    for kind in kinds:
        f, v, s = _features(fast, n, clip.fps, None, f"{clip.name}@{speed:g}",
                            f"{clip.meta.get('source')}|{clip.meta.get('created')}|speed {speed:g}",
                            encoder, kind, cache_dir)
        feats[kind], vads[kind] = f, v[:n]
        if s is not None:
            silent = s[:n]
    heads = _resample_frames(base.heads, t)
    ctx = None if base.context is None else _resample_frames(base.context, t)
    return LandmarkClip(f"{base.name}@{speed:g}", heads, _resample_frames(base.pose, t), vads, feats, base.rest,
                        silent, ctx)


def load_landmark_clips(folders: Sequence[str | os.PathLike], template: np.ndarray, encoder=None,
                        kinds: Sequence[str] = FEATURE_KINDS, cache_dir: str | os.PathLike | None = None,
                        only_lipsync: bool = True, progress=None, context: bool = False,
                        speeds: Sequence[float] = ()) -> list[LandmarkClip]:
    """Prepared clip folders -> `LandmarkClip`s (features computed or read from cache);
    `context`: also the head-masked context tokens (head mode, `tccp.face.context`);
    `speeds`: also each clip played at these speeds (`speed_clip`), as clips of their own."""
    from tccp.face.context import context_tokens
    from tccp.media.whisper import load_whisper

    encoder = encoder or load_whisper()
    out = []
    for i, folder in enumerate(folders):
        clip = PreparedClip(folder)
        if only_lipsync and not clip.lipsync:
            continue
        mesh = hf.to_mesh(clip.landmarks, clip.landmark_index)
        heads, pose = hf.to_head(mesh, template)
        feats, vads, silent = {}, {}, np.zeros(clip.n_frames, bool)
        for kind in kinds:
            f, v, s = clip_features(clip, encoder, kind, cache_dir)
            feats[kind], vads[kind] = f, v[: clip.n_frames]
            if s is not None:
                silent = s[: clip.n_frames]
        params = pose.params(clip.size)
        ctx = context_tokens(clip.contexts) if context else None
        base = LandmarkClip(clip.name, heads, params, vads, feats, rest_shape(heads), silent, ctx)
        out.append(base)
        out.extend(speed_clip(clip, base, s, encoder, kinds, cache_dir) for s in speeds if s != 1)
        if progress is not None:
            progress(i + 1, len(folders))
    return out


def mirror_pose(params: np.ndarray) -> np.ndarray:
    """Pose params (log scale, angle, origin x, y in crop units) of the horizontally
    mirrored crop: the angle changes sign, the origin's x goes to 1 - x."""
    p = np.array(params, np.float32, copy=True)
    p[..., 1] = -p[..., 1]
    p[..., 2] = 1.0 - p[..., 2]
    return p


class LandmarkWindows:
    """Random training windows over `LandmarkClip`s (see module docstring)."""

    def __init__(self, clips: Sequence[LandmarkClip], codec: LandmarkCodec, cfg: LandmarkDataConfig | None = None,
                 seed: int = 0) -> None:
        from tccp.face.sketch import SKETCH_INDICES

        self.clips = [c for c in clips if c.n >= (cfg or LandmarkDataConfig()).window]
        if codec.mode == "head" and any(c.context is None for c in self.clips):
            raise ValueError("head mode needs the clips' context tokens (load_landmark_clips(context=True))")
        if not self.clips:
            raise ValueError("no lip-sync clip long enough for one window")
        self.codec = codec
        self.cfg = cfg or LandmarkDataConfig()
        self.rng = np.random.default_rng(seed)
        w = np.array([c.n for c in self.clips], np.float64)
        self.weights = w / w.sum()
        self.mirror = hf.mirror_permutation(codec.template, SKETCH_INDICES)
        kinds = [k for k in self.cfg.mix if k in self.clips[0].features]
        p = np.array([self.cfg.mix[k] for k in kinds], np.float64)
        self.kinds, self.kind_p = kinds, p / p.sum()

    def _augment(self, heads: np.ndarray, rng: np.random.Generator, mirror: bool) -> np.ndarray:
        h = heads
        if mirror:
            h = h[:, self.mirror] * np.array([-1.0, 1.0], np.float32)
        j = self.cfg.jitter
        a = (1 + rng.uniform(-j, j)) * np.exp(1j * rng.uniform(-j, j))
        b = complex(rng.uniform(-j, j), rng.uniform(-j, j))
        h = hf.apply_similarity(np.full(len(h), a), np.full(len(h), b), h)
        return (h + rng.normal(0, self.cfg.frame_noise, h.shape)).astype(np.float32)

    def sample(self, batch: int) -> dict[str, torch.Tensor]:
        from tccp.media.whisper import frame_tokens

        cfg, codec, rng = self.cfg, self.codec, self.rng
        n = cfg.window
        keys = ("x", "audio", "vad", "refs", "cv", "flags")
        out: dict[str, list] = {k: [] for k in keys}
        for _ in range(batch):
            clip = self.clips[rng.choice(len(self.clips), p=self.weights)]
            kind = self.kinds[rng.choice(len(self.kinds), p=self.kind_p)]
            i0 = int(rng.integers(0, clip.n - n + 1))
            mirror = rng.random() < cfg.p_mirror
            heads = clip.heads[i0 : i0 + n].copy()
            if kind == "silenced":
                sil = clip.silent[i0 : i0 + n]
                heads[sil] = np.where(np.isin(np.arange(hf.N_MESH), hf.MOUTH)[:, None], clip.rest, heads[sil])
            ref_idx = rng.choice(clip.n, cfg.refs, replace=clip.n < cfg.refs)
            both = self._augment(np.concatenate([heads, clip.heads[ref_idx]]), rng, mirror)
            win, refs = both[:n], both[n:]
            anchor = codec.anchor(refs)
            pose, ref_pose = clip.pose[i0 : i0 + n], clip.pose[ref_idx]
            if codec.mode == "head":
                cv = clip.context[i0 : i0 + n]
                if mirror:
                    pose, ref_pose, cv = mirror_pose(pose), mirror_pose(ref_pose), mirror_tokens(cv)
            elif cfg.p_control_other > 0 and rng.random() < cfg.p_control_other:
                j0 = int(rng.integers(0, clip.n - n + 1))
                cv = codec.control(self._augment(clip.heads[j0 : j0 + n], rng, mirror))
                if cfg.control_other_motion:
                    cv = cv - cv.mean(0, keepdims=True) + codec.control(win).mean(0, keepdims=True)
            else:
                cv = codec.control(win)
            x = codec.encode(win, anchor, pose, ref_pose.mean(0))
            flags = np.zeros(n, np.float32)
            if rng.random() >= cfg.p_first:
                flags[0] = 1.0
                x[0] += rng.normal(0, cfg.slot0_noise / codec.scale, x.shape[1])
            out["x"].append(x)
            out["audio"].append(frame_tokens(clip.features[kind], i0, n, fps=25.0,
                                                 radius=self.cfg.radius).astype(np.float32))
            out["vad"].append(clip.vad[kind][i0 : i0 + n])
            out["refs"].append(codec.refs(refs))
            out["cv"].append(cv)
            out["flags"].append(flags)
        return {k: torch.from_numpy(np.stack(v)) for k, v in out.items()}
