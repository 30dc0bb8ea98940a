"""Stage 1 adapted to the person from the source video's own speech (file runs).

Why: stage 1 is trained on ~50 speakers and is limited by that data (docs/lipsync.md):
on a new person its mouth follows the speech at r ~0.5-0.6 and damps the opening. But
a dubbing job brings minutes of exactly what it lacks: the person's own voice with
their own mouth, in the source video. A short fine-tune of a copy of the pack's stage 1
on those pairs (the training loss of `tccp.training.landmarks`, ~100 steps, seconds on
a CPU) teaches it this person's articulation; the copy drives only this run (the
shared model is untouched). Measured on the held-out clips (adapting on the part of
each clip after the evaluated seconds): docs/lipsync.md, "Adapting to the person".

Used by `engine.filerun` (the source's first `seconds`, or from `start_s`); a source
without enough speech, without a face or without audio is not adapted (a note says
why). A live call has no source speech before it starts: with
`EngineConfig.live_adapt` it adapts on its own first seconds, in the background
(`LiveAdapter`, on the streamed feature views the call runs on).
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = ["AdaptConfig", "AdaptResult", "LiveAdapter", "TrackedStart", "adapt_net", "adaptable_pipeline", "check_adapt_options", "adapt_from_video", "adapt_from_videos",
           "clips_from_video", "face_runs", "shift_clip", "sync_offset", "synced", "trainable_stage1"]


@dataclass
class AdaptConfig:
    steps: int = 100
    """Fine-tuning steps (0: no adaptation)."""
    seconds: float = 15.0
    """How much of the source video (from `start_s`) is tracked and learned from."""
    lr: float = 1e-4
    batch: int = 16
    min_speech_s: float = 3.0
    """Less voiced audio than this in the learned part: not adapted."""
    seed: int = 0
    mix: dict = field(default_factory=lambda: {"full": 1.0})
    """Audio-feature views trained on (`tccp.data.landmarks` kinds): files run on full
    Whisper features; a live call's stage 1 sees streamed ones ('stream0'/'stream2')."""
    sync_check: bool = True
    """Probe each video's own A/V sync with the network first (`sync_offset`) and learn
    from pairs shifted back into sync when its mouth runs clearly off its audio."""
    keep_track: bool = False
    """Keep what tracking the source's start gave (`AdaptResult.track`, one video from
    its start only): a file run's session replays it instead of tracking it again."""
    progress: Callable[[int, int, str], None] | None = field(default=None, repr=False, compare=False)
    """`progress(done, total, phase)`, phase 'tracking' (frames) then 'training' (steps):
    the 10-20 s before a file run's first frame is not a silent wait (`tccp run`'s bar)."""


@dataclass
class TrackedStart:
    """The first frames of a video as the adaptation tracked them, with the tracker
    that made them (in its state after the last one): `engine.prep.ReplayTracker`
    material. Whoever takes it closes it (`replay()` hands the tracker over)."""

    observations: list
    keys: list
    tracker: Any

    def replay(self) -> Any:
        from engine.prep import ReplayTracker

        tr, self.tracker = self.tracker, None
        return ReplayTracker(self.observations, self.keys, tr)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


@dataclass
class AdaptResult:
    generator: Any = None  # tccp.pipelines.landmarks.LandmarkGenerator on the adapted copy; None: not adapted
    note: str = ""
    frames: int = 0
    speech_s: float = 0.0
    seconds: float = 0.0  # wall time
    losses: list = field(default_factory=list, repr=False)
    track: TrackedStart | None = field(default=None, repr=False)  # with `AdaptConfig.keep_track`
    sync_lags: list = field(default_factory=list)
    """Per video, the frames its mouth was found off its own audio and shifted by before
    learning (`sync_offset`; 0: in sync)."""

    def summary(self) -> dict:
        return {"adapted": self.generator is not None, "note": self.note, "frames": self.frames,
                "speech_s": round(self.speech_s, 2), "seconds": round(self.seconds, 2), "sync_lags": self.sync_lags,
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None}


def check_adapt_options(steps: int | None, seconds: float) -> None:
    """The `--adapt-steps N` / `--adapt-seconds S` of every command (`run`, `serve`,
    `avatar create`, `bench --live`): a one-line `TCCPError` unless N >= 0 (None: not
    given) and S > 0."""
    from tccp.errors import TCCPError

    if (steps or 0) < 0 or not seconds > 0:
        raise TCCPError(f"--adapt-steps {steps} / --adapt-seconds {seconds}: "
                        "steps must be 0 (off) or more, seconds positive")


def adaptable_pipeline(model: Any, cfg: Any) -> Any:
    """The model's pipeline when a run with `cfg` (an `EngineConfig`) has a stage 1 that
    adapting can replace: mouth region, generated landmarks, no stage 1 of its own,
    `adapt_steps > 0`, and a pipeline with a stage 1 and a Whisper encoder (not a random
    test model or a stand-in runner); else None. File runs and live sessions both ask."""
    if not (cfg.adapt_steps > 0 and cfg.region == "mouth" and cfg.landmarks == "generated" and cfg.stage1 is None):
        return None
    pipe = getattr(getattr(model, "runner", None), "pipeline", None)
    if getattr(pipe, "stage1", None) is None or getattr(pipe, "whisper", None) is None:
        return None
    return pipe


def face_runs(has_face: np.ndarray, min_len: int) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive frames with a face, at least `min_len` long."""
    from tccp.face.track import _runs

    return [(a, b) for a, b in _runs(has_face) if b - a >= min_len]


def adapt_net(net: Any, codec: Any, clips: Sequence[Any], cfg: AdaptConfig,
              stop: Callable[[], bool] | None = None) -> tuple[Any, list[float]]:
    """A fine-tuned copy of `net` on `clips` (`tccp.data.landmarks.LandmarkClip`s with
    the feature kinds of `cfg.mix`); `net` itself is not touched. Deterministic for a
    seed. `stop()` true between two steps: None is returned (the caller went away)."""
    from tccp.data.landmarks import LandmarkDataConfig, LandmarkWindows
    from tccp.diffusion.schedule import Schedule
    from tccp.models.landmarks import audio_radius
    from tccp.training.landmarks import LandmarkTrainConfig, _loss

    # torch's functional AdamW, the same update as torch.optim.AdamW(lr, weight_decay=0.01):
    # the optimiser class's constructor imports torch._dynamo (~2.5 s of this CPU holding
    # the GIL: a 3 s freeze of a live call's frames, measured; 2.5 s before a file run's
    # first frame); the function does not
    from torch.optim.adamw import adamw

    torch.manual_seed(cfg.seed)
    m = copy.deepcopy(net).float().train().requires_grad_(True)
    params = list(m.parameters())
    state = [(torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)) for p in params]
    data = LandmarkWindows(clips, codec, LandmarkDataConfig(mix=dict(cfg.mix), radius=audio_radius(net.cfg)),
                           seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    tcfg, schedule, losses = LandmarkTrainConfig(data="", out=""), Schedule(prediction="v"), []
    for step in range(cfg.steps):
        if stop is not None and stop():
            return None, losses
        if cfg.progress is not None:
            cfg.progress(step, cfg.steps, "training")
        loss = _loss(m, data.sample(cfg.batch), schedule, tcfg, gen)
        for p in params:
            p.grad = None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        live = [i for i, p in enumerate(params) if p.grad is not None]  # as the class: unused params untouched
        with torch.no_grad():
            adamw([params[i] for i in live], [params[i].grad for i in live], [state[i][0] for i in live],
                  [state[i][1] for i in live], [], [state[i][2] for i in live], foreach=False, amsgrad=False,
                  beta1=0.9, beta2=0.999, lr=cfg.lr, weight_decay=0.01, eps=1e-8, maximize=False)
        losses.append(float(loss.detach()))
    if cfg.progress is not None:
        cfg.progress(cfg.steps, cfg.steps, "training")
    return m.eval().requires_grad_(False), losses


def _track(video: Path, start: int, n: int, fps: float, keep: bool = False,
           progress: Callable[[int, int, str], None] | None = None
           ) -> tuple[np.ndarray, np.ndarray, TrackedStart | None]:
    """(n, 478, 2) image-px meshes (zeros where no face), the (n,) has-face mask, and
    with `keep` (from the start only) the observations and the open tracker. The
    tracker is configured as a session's (`engine.prep.WindowPreparer`) and fed the
    same frames with the same times, so a session can continue from it."""
    from engine.prep import frame_key
    from tccp.face.track import FaceTracker, FaceTrackerConfig
    from tccp.media import io as media

    keep = keep and start == 0
    meshes = np.zeros((n, 478, 2), np.float32)
    ok = np.zeros(n, bool)
    observations, keys = [], []
    tr = FaceTracker(FaceTrackerConfig(fps=fps))
    if progress is not None:
        progress(0, n, "tracking")
    try:
        for i, (t, frame) in enumerate(media.iter_video(video, fps=fps, max_frames=start + n)):
            if i < start:
                continue
            obs = tr.update(frame, float(t))
            if keep:
                observations.append(obs)
                keys.append(frame_key(frame))
            if obs is not None:
                meshes[i - start], ok[i - start] = obs.landmarks[:, :2], True
            if progress is not None and (i - start + 1) % 25 == 0:
                progress(i - start + 1, n, "tracking")
    except BaseException:
        tr.close()
        raise
    if not keep:
        tr.close()
        return meshes, ok, None
    return meshes, ok, TrackedStart(observations, keys, tr)


def clips_from_video(video: str | Path, codec: Any, whisper: Any, seconds: float, start_s: float = 0.0,
                     fps: float = 25.0, min_speech_s: float = 3.0,
                     audio_path: str | Path | None = None, keep_track: bool = False,
                     progress: Callable[[int, int, str], None] | None = None
                     ) -> tuple[list, float, str, TrackedStart | None]:
    """Training clips (`LandmarkClip`, 'full' features) from `seconds` of `video` from
    `start_s`: its tracked mouths paired with its own audio (its track, or `audio_path`:
    the same speech as a separate file, aligned with the video from its start). Returns
    (clips, seconds of speech, note, tracked start); no clips (and a note saying why)
    when there is nothing to learn. The tracked start (`keep_track`, `start_s` 0, when
    the video was tracked) belongs to the caller, who closes it."""
    from tccp.media import io as media
    from tccp.media import whisper as wh
    from tccp.media.vad import frame_voice_activity

    video = Path(video)
    info = media.probe(video)
    source = Path(audio_path) if audio_path is not None else video
    if audio_path is None and not info.has_audio:
        from tccp.data.prepare import sibling_audio

        near = sibling_audio(video)
        hint = f" (if {near.name} beside it is that speech: tccp run --adapt-audio {near.name})" if near is not None else ""
        return [], 0.0, f"{video.name} has no audio of its own to learn the person's speech from{hint}", None
    seconds = max(0.0, min(seconds, info.duration - start_s))
    n = int(seconds * fps)
    if n < 2 * 8:
        return [], 0.0, f"{video.name}: under a second of video after {start_s:.1f} s", None
    sr = 16000
    audio = media.read_audio(source, sr=sr, max_seconds=start_s + seconds)[int(round(start_s * sr)):]
    audio = audio[: int(round(seconds * sr))]
    vad = frame_voice_activity(audio, n, fps).astype(np.float32)
    speech_s = float((vad > 0.5).sum() / fps)
    if speech_s < min_speech_s:
        return [], speech_s, (f"{video.name}: {speech_s:.1f} s of speech in the {seconds:.0f} s learned from "
                              f"(under {min_speech_s:.0f} s)"), None
    meshes, ok, tracked = _track(video, int(round(start_s * fps)), n, fps, keep=keep_track, progress=progress)
    try:
        clips = _clips(video.stem, meshes, ok, vad, {"full": wh.full_features(whisper, audio)}, codec)
    except BaseException:
        if tracked is not None:
            tracked.close()
        raise
    frames = sum(c.n for c in clips)
    if frames < 2 * fps:
        return [], speech_s, f"{video.name}: a face in only {frames} of {n} frames learned from", tracked
    return clips, speech_s, "", tracked


MIN_CLIP = 16
"""Frames a clip needs to be learned from (two 8-frame windows)."""


def _clips(name: str, meshes: np.ndarray, ok: np.ndarray, vad: np.ndarray, features: dict, codec: Any) -> list:
    """`LandmarkClip`s of the runs of >= MIN_CLIP face frames: (n, 478, 2) meshes (any pixel
    frame: the head frame removes the similarity), (n,) voice activity and the
    segment's 50 Hz features per kind (the same for every kind's voice activity)."""
    from tccp.data.landmarks import LandmarkClip, rest_shape
    from tccp.face import headframe as hf

    clips = []
    for a, b in face_runs(ok, MIN_CLIP):
        heads, _ = hf.to_head(meshes[a:b], codec.template)
        clips.append(LandmarkClip(f"{name}[{a}:{b}]", heads, np.zeros((b - a, 4), np.float32),
                                  {k: vad[a:b] for k in features},
                                  {k: np.asarray(f, np.float16)[2 * a: 2 * b] for k, f in features.items()},
                                  rest_shape(heads), np.zeros(b - a, bool)))
    return clips


SYNC_MAX_LAG = 8
SYNC_MIN_LAG = 3
SYNC_MIN_GAIN = 0.15
SYNC_MIN_R = 0.3
"""A source whose own audio runs off its video: the mouth the pack's stage 1 draws
from the audio matches the tracked mouth best `lag` frames apart, with r >= SYNC_MIN_R
there and SYNC_MIN_GAIN above r at lag 0, for |lag| >= SYNC_MIN_LAG (3 frames, 120 ms
at 25 fps: beyond the 1-2 frames by which lips lead speech anyway). Learning from such
pairs as they are would teach the copy that offset, and a dub would carry it."""


def sync_offset(generator: Any, clips: Sequence[Any], kind: str = "full") -> tuple[int, float, float]:
    """(lag, r at lag 0, r at lag): how many frames the tracked mouths of `clips` follow
    the mouths `generator` draws from their audio (> 0: the video's mouth comes after
    its sound), from the length-weighted mean of each clip's lag curve
    (`tccp.metrics.lipsync.best_lag`, +-SYNC_MAX_LAG). The pack's stage 1 is a sync
    probe like SyncNet's in dataset curation: no extra model."""
    from tccp.data.landmarks import reference_frames
    from tccp.face import headframe as hf
    from tccp.media.whisper import frame_tokens
    from tccp.metrics.lipsync import best_lag
    from tccp.models.landmarks import audio_radius
    from tccp.pipelines.landmarks import generate_clip

    curves, weights = [], []
    for c in clips:
        if c.n < 4 * SYNC_MAX_LAG:
            continue
        refs = generator.references(c.heads[reference_frames(c.heads, 4)])
        tokens = frame_tokens(np.asarray(c.features[kind], np.float32), 0, c.n,
                              radius=audio_radius(generator.net.cfg)).astype(np.float32)
        gen = generate_clip(generator, tokens, c.vad[kind], c.heads, refs)
        res = best_lag(hf.aperture(gen), hf.aperture(c.heads), max_lag=SYNC_MAX_LAG)
        if np.isfinite(res.curve).all():
            curves.append(res.curve)
            weights.append(c.n)
    if not curves:
        return 0, float("nan"), float("nan")
    curve = np.average(np.stack(curves), axis=0, weights=np.asarray(weights, np.float64))
    i = int(np.argmax(curve))
    return int(i - SYNC_MAX_LAG), float(curve[SYNC_MAX_LAG]), float(curve[i])


def shift_clip(clip: Any, lag: int) -> Any:
    """`clip` with its mouths moved `lag` frames earlier against its audio (frame i's
    audio paired with frame i + lag's landmarks): the pairs as they would be in sync."""
    from tccp.data.landmarks import LandmarkClip

    n = clip.n - abs(lag)
    h0, a0 = (lag, 0) if lag >= 0 else (0, -lag)
    return LandmarkClip(f"{clip.name}{lag:+d}", clip.heads[h0:h0 + n], clip.pose[h0:h0 + n],
                        {k: v[a0:a0 + n] for k, v in clip.vad.items()},
                        {k: f[2 * a0:2 * (a0 + n)] for k, f in clip.features.items()},
                        clip.rest, clip.silent[a0:a0 + n], None)


def synced(generator: Any, clips: list, name: str) -> tuple[list, int, str]:
    """`clips` as learned from: shifted back into sync (with a note naming `name`) when
    `sync_offset` finds their mouths clearly off their audio, else as they are."""
    kind = "full" if "full" in clips[0].features else next(iter(clips[0].features))
    lag, r0, r_lag = sync_offset(generator, clips, kind)
    if abs(lag) < SYNC_MIN_LAG or r_lag < SYNC_MIN_R or r_lag - r0 < SYNC_MIN_GAIN:
        return clips, 0, ""
    shifted = [shift_clip(x, lag) for x in clips if x.n - abs(lag) >= MIN_CLIP]
    return shifted, lag, (f"{name}: its mouth runs {abs(lag)} frames {'after' if lag > 0 else 'before'} its own "
                          f"sound (r {r0:.2f} in step, {r_lag:.2f} shifted): learned from pairs shifted back into sync")


NOT_TRAINABLE = ("stage 1 is not a trainable mouth-mode network here (an export folder without its pack, "
                 "or head mode): not adapted")


def _trainable(generator: Any) -> bool:
    """Exactly the torch mouth-mode network: an exported backend's stand-in (an
    ONNX/TensorRT session) cannot be trained, head mode is not adapted."""
    from tccp.models.landmarks import LandmarkNet

    return type(getattr(generator, "net", None)) is LandmarkNet and getattr(generator.codec, "mode", "mouth") == "mouth"


def trainable_stage1(pipeline: Any) -> Any:
    """The pipeline's stage-1 generator if it is a plain torch network, else (an
    exported backend, whose stage 1 is an ONNX/TensorRT session) a torch one loaded from
    the pack it was exported from (`pipeline.pack_folder`), with the same sampling
    settings: the adapted copy then runs on torch beside the backend. None: neither."""
    from tccp.pipelines.landmarks import LandmarkGenerator

    gen = getattr(pipeline, "stage1", None)
    if gen is None or _trainable(gen):
        return gen
    folder = getattr(pipeline, "pack_folder", None)
    if folder is None:
        return gen  # adapt_from_videos notes that it cannot train it
    from tccp.pack import load_stage1

    net, codec = load_stage1(folder)
    return LandmarkGenerator(net, codec, gen.schedule, steps=gen.steps, sampler=gen.sampler)


def adapt_from_videos(videos: Sequence[str | Path], generator: Any, whisper: Any, cfg: AdaptConfig | None = None,
                      start_s: float = 0.0, fps: float = 25.0,
                      audio_paths: Sequence[str | Path | None] | None = None) -> AdaptResult:
    """`cfg.seconds` of each video from `start_s`, paired with its own audio, and a copy
    of `generator.net` (mouth mode) fine-tuned on all of them. Returns an `AdaptResult`
    whose `generator` is None (with a note) when there is nothing to learn from: no
    audio track, too little speech, too few frames with a face."""
    from tccp.pipelines.landmarks import LandmarkGenerator

    cfg = cfg or AdaptConfig()
    t0 = time.monotonic()
    res = AdaptResult()
    if cfg.steps <= 0:
        res.note = "adaptation off"
        return res
    if not _trainable(generator):
        res.note = NOT_TRAINABLE
        return res
    net = generator.net
    clips, notes = [], []
    keep = cfg.keep_track and len(videos) == 1  # _track keeps only a start from frame 0
    for v, a in zip(videos, audio_paths or [None] * len(videos)):
        c, speech, note, res.track = clips_from_video(v, generator.codec, whisper, cfg.seconds, start_s, fps,
                                                      cfg.min_speech_s, a, keep_track=keep, progress=cfg.progress)
        if c and cfg.sync_check:
            c, lag, sync_note = synced(generator, c, Path(v).name)
            res.sync_lags.append(lag)
            note = note or sync_note  # a video with clips has no note of its own
        clips += c
        res.speech_s += speech
        if note:
            notes.append(note)
    res.frames = int(sum(c.n for c in clips))
    res.seconds = time.monotonic() - t0
    if not clips:
        res.note = "; ".join(notes) + ": not adapted"
        return res
    try:
        adapted, res.losses = adapt_net(net, generator.codec, clips, cfg)
    except BaseException:
        if res.track is not None:
            res.track.close()
        raise
    res.generator = LandmarkGenerator(adapted, generator.codec, generator.schedule, steps=generator.steps,
                                      sampler=generator.sampler)
    res.seconds = time.monotonic() - t0
    res.note = (f"stage 1 adapted to the person: {cfg.steps} steps on {res.frames / fps:.1f} s of the source "
                f"({res.speech_s:.1f} s of speech) in {res.seconds:.1f} s" + "".join(f"; {n}" for n in notes))
    return res


def adapt_from_video(video: str | Path, generator: Any, whisper: Any, cfg: AdaptConfig | None = None,
                     start_s: float = 0.0, fps: float = 25.0, audio_path: str | Path | None = None) -> AdaptResult:
    """`adapt_from_videos` on one video (what a file run does with its source)."""
    return adapt_from_videos([video], generator, whisper, cfg, start_s, fps, [audio_path])


_TRAINING = threading.Semaphore(1)


def _one_core() -> None:
    """The training thread runs torch on one core (a per-thread setting: the call's
    threads keep theirs), so that the call's tracking, audio features and compositing
    keep the other. (A lower CPU priority for it was measured too: the call generated
    as many frames, and the adaptation took 40 s instead of 26; docs/lipsync.md.)"""
    torch.set_num_threads(1)


class LiveAdapter:
    """Stage 1 adapted to the caller during a live call (opt-in: `EngineConfig.live_adapt`).

    Why: a camera call brings no speech before it starts, but after `cfg.seconds` of it
    the session has seen what a file run adapts on: the caller's tracked mouth with
    their own voice. So the session offers every prepared window (its tracked meshes)
    and every audio chunk; once `cfg.seconds` of the call from the first face frame are
    in, a worker thread pairs them (Whisper features in the views of `cfg.mix`: the call
    itself runs on streamed features), fine-tunes a copy of stage 1 and sets
    `generator`, which the session's later windows use. Until then (and if there is too
    little speech or face) the pack's stage 1 runs. The training competes with the call
    for the CPU for a few seconds: docs/lipsync.md has what that costs.

    Memory is bounded: `seconds` of meshes and audio, collected once.
    """

    def __init__(self, generator: Any, whisper: Any, cfg: AdaptConfig, fps: float = 25.0,
                 name: str = "call") -> None:
        from engine.align import AudioBuffer

        self.cfg, self.fps, self.name = cfg, float(fps), name
        self._source, self._whisper = generator, whisper
        self._n = max(1, int(round(cfg.seconds * self.fps)))
        self._meshes = np.zeros((self._n, 478, 2), np.float32)
        self._ok = np.zeros(self._n, bool)
        self._audio = AudioBuffer(16000)
        self._p0: float | None = None  # session time of the first face frame
        self._stop = False
        self.generator: Any = None
        self.result: AdaptResult | None = None
        self.state = "collecting"  # -> "adapting" -> "adapted" | "not adapted"
        self.collected_at: float | None = None  # time.monotonic() when the training thread started
        self.done_at: float | None = None  # ... and when it ended (benchmarks plot the span)

    def summary(self) -> dict:
        out = {"state": self.state}
        if self.result is not None:
            out.update(self.result.summary())
        return out

    def add_audio(self, samples: np.ndarray, pts: float | None) -> None:
        if self.state != "collecting":
            return
        self._audio.push(samples, pts)
        # before the first face, keep only the last second (the segment starts at the face)
        keep = (self._p0 - 1.0) if self._p0 is not None else self._audio.end_time - 1.0
        self._audio.trim_before(keep)

    def add_window(self, pts: np.ndarray, found: np.ndarray, landmarks: np.ndarray | None) -> None:
        """A prepared window's grid times, usable-face flags and (n, 478, 2) meshes."""
        if self.state != "collecting" or landmarks is None:
            return
        for k in np.flatnonzero(found):
            if self._p0 is None:
                self._p0 = float(pts[k])
            i = int(round((float(pts[k]) - self._p0) * self.fps))
            if 0 <= i < self._n:
                self._meshes[i], self._ok[i] = landmarks[k], True
        end = self._p0 + self._n / self.fps if self._p0 is not None else None
        if end is not None and float(pts[-1]) + 1.0 / self.fps >= end and self._audio.end_time >= end - 0.5:
            self.state = "adapting"
            self.collected_at = time.monotonic()
            threading.Thread(target=self._run, name=f"{self.name}-adapt", daemon=True).start()

    def close(self) -> None:
        """The call ended: a training still running stops at its next step."""
        self._stop = True

    def _run(self) -> None:
        _one_core()
        try:
            self.result = self._in_turn()
        except Exception as exc:  # an adaptation failure must never end the call
            self.result = AdaptResult(note=f"adaptation failed ({type(exc).__name__}: {exc}): not adapted")
        self.generator = self.result.generator
        self.done_at = time.monotonic()
        self.state = "adapted" if self.generator is not None else "not adapted"

    def _in_turn(self) -> AdaptResult:
        """`_adapt` once no other call of this process is training (they share the CPU)."""
        while not _TRAINING.acquire(timeout=0.5):
            if self._stop:
                return AdaptResult(note="the call ended before its adaptation's turn")
        try:
            return self._adapt()
        finally:
            _TRAINING.release()

    def _adapt(self) -> AdaptResult:
        from tccp.data.landmarks import view_features
        from tccp.media.vad import frame_voice_activity
        from tccp.pipelines.landmarks import LandmarkGenerator

        t0, cfg, res = time.monotonic(), self.cfg, AdaptResult()
        gen = self._source() if callable(self._source) else self._source
        if gen is None or not _trainable(gen):
            res.note = NOT_TRAINABLE
            return res
        audio = self._audio.read(self._p0, self._p0 + self._n / self.fps)
        vad = frame_voice_activity(audio, self._n, self.fps).astype(np.float32)
        res.speech_s = float((vad > 0.5).sum() / self.fps)
        if res.speech_s < cfg.min_speech_s:
            res.note = (f"{res.speech_s:.1f} s of speech in the first {cfg.seconds:.0f} s of the call "
                        f"(under {cfg.min_speech_s:.0f} s): not adapted")
            return res
        feats = {k: view_features(self._whisper, audio, k) for k in cfg.mix}
        clips = _clips(self.name, self._meshes, self._ok, vad, feats, gen.codec)
        sync_note = ""
        if clips and cfg.sync_check:  # a call's picture and sound can be off too (capture, network)
            clips, lag, sync_note = synced(gen, clips, "the call")
            res.sync_lags.append(lag)
        res.frames = int(sum(c.n for c in clips))
        if res.frames < 2 * self.fps:
            res.note = f"a face in only {res.frames} of the call's first {self._n} frames: not adapted"
            return res
        adapted, res.losses = adapt_net(gen.net, gen.codec, clips, cfg, stop=lambda: self._stop)
        res.seconds = time.monotonic() - t0
        if adapted is None:
            res.note = "the call ended while adapting"
            return res
        res.generator = LandmarkGenerator(adapted, gen.codec, gen.schedule, steps=gen.steps, sampler=gen.sampler)
        res.note = (f"stage 1 adapted to the caller: {cfg.steps} steps on {res.frames / self.fps:.1f} s of the call "
                    f"({res.speech_s:.1f} s of speech) in {res.seconds:.1f} s" + (f"; {sync_note}" if sync_note else ""))
        return res
