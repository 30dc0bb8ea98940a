"""Stage 1 at inference: windows of landmark coordinates from audio tokens.

`LandmarkGenerator.window` generates the new frames of one 8-frame window for a batch
of streams, slot 0 pinned to each stream's previous generated frame (TCCP's
first-frame conditioning; `prev=None` is the one-frame restart). The objective stored
with the weights decides how: "regress" is one network call; "v" samples with any
`tccp.diffusion.samplers` sampler (DDIM, 4 steps by default). Post-processing that
users control lives here too: the mouth-opening factor (ControlTalk's alpha, on
coordinates) and the voice-activity gate that rests the mouth in silence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tccp.diffusion.samplers import sample
from tccp.diffusion.schedule import Schedule
from tccp.face import headframe as hf
from tccp.face.mouth import scale_opening
from tccp.models.landmarks import LandmarkCodec, LandmarkNet

__all__ = ["References", "LandmarkGenerator", "generate_clip", "scale_opening"]


@dataclass
class References:
    """A stream's reference landmarks, computed once per session."""

    tokens: torch.Tensor  # (K, ref_dim)
    anchor: np.ndarray  # (G, 2) head-frame anchor of the generated points
    rest: np.ndarray  # (478, 2) head-frame mesh with the mouth at rest
    pose: np.ndarray | None = None  # (4,) mean reference pose (head mode)


class LandmarkGenerator:
    def __init__(self, net: LandmarkNet, codec: LandmarkCodec, schedule: Schedule | None = None,
                 steps: int = 4, sampler: str = "ddim") -> None:
        self.net = net.eval()
        self.codec = codec
        self.schedule = schedule or Schedule(prediction="v")
        self.steps = steps
        self.sampler = sampler

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def references(self, ref_heads: np.ndarray, ref_pose: np.ndarray | None = None) -> References:
        """(K, 478, 2) reference head-frame meshes (e.g. `tccp.data.landmarks.reference_frames`
        of the context video) -> `References`."""
        from tccp.data.landmarks import rest_shape

        return References(
            tokens=torch.from_numpy(self.codec.refs(ref_heads)),
            anchor=self.codec.anchor(ref_heads),
            rest=rest_shape(ref_heads, k=1),
            pose=None if ref_pose is None else np.asarray(ref_pose, np.float32).mean(0),
        )

    @torch.inference_mode()
    def window(self, audio: np.ndarray, vad: np.ndarray, cv: np.ndarray, refs: list[References],
               prev: np.ndarray | None, seed: int | list[int] = 0, steps: int | None = None) -> np.ndarray:
        """audio (B, n, La, F) tokens, vad (B, n), cv (B, n, cv_dim) for the window's
        frames (slot 0 = the previous frame's when `prev` is given), prev (B, gen_dim)
        or None -> (B, n, gen_dim) with slot 0 = prev exactly."""
        dev, dt = self.device, next(self.net.parameters()).dtype
        b, n = audio.shape[:2]
        a = torch.from_numpy(np.ascontiguousarray(audio)).to(dev, dt)
        v = torch.from_numpy(np.ascontiguousarray(vad)).to(dev, dt)
        c = torch.from_numpy(np.ascontiguousarray(cv)).to(dev, dt)
        r = torch.stack([x.tokens for x in refs]).to(dev, dt)
        flags = torch.zeros(b, n, device=dev, dtype=dt)
        x = torch.zeros(b, n, self.codec.gen_dim, device=dev, dtype=dt)
        fixed = None
        if prev is not None:
            flags[:, 0] = 1
            x[:, 0] = torch.from_numpy(np.asarray(prev)).to(dev, dt)
            mask = torch.zeros_like(x, dtype=torch.bool)
            mask[:, 0] = True
            fixed = (mask, x.clone())
        ctx = self.net.condition_tokens(a, v, r)
        if self.net.cfg.objective == "regress":
            t = torch.full((b,), self.schedule.num_steps - 1, device=dev, dtype=torch.long)
            out = self.net(x, t, ctx, c, flags)
            if prev is not None:
                out[:, 0] = x[:, 0]
        else:
            from tccp.pipelines.faces import stream_noise

            x_t = stream_noise(x.shape, seed).to(dev, dt)
            fn = lambda xt, tt: self.net(xt, tt, ctx, c, flags)  # noqa: E731
            out = sample(self.sampler, fn, x_t, self.schedule, steps or self.steps, fixed=fixed)
        return out.float().cpu().numpy()


def generate_clip(gen: LandmarkGenerator, tokens: np.ndarray, vad: np.ndarray, heads: np.ndarray,
                  refs: References, window: int = 8, gate: bool = True, cv: np.ndarray | None = None,
                  return_pose: bool = False):
    """Offline stage 1 over a whole clip, exactly as the engine runs it (first-frame
    step, then windows of `window - 1` new frames carrying slot 0): tokens (N, La, F),
    vad (N,), heads (N, 478, 2) the source's head-frame meshes (mouth mode: their REST
    points are the pose prior) -> generated head-frame meshes (N, 478, 2). Head mode
    takes `cv` (N, CONTEXT_DIM) context tokens and `refs.pose`, and generates the pose
    too (`return_pose`: (meshes, (N, 4) pose params)). `gate` applies the
    voice-activity rest (see `apply_gate`)."""
    codec = gen.codec
    n = len(heads)
    if cv is None:
        cv = codec.control(heads)
    out = np.zeros((n, codec.gen_dim), np.float32)
    out[0] = gen.window(tokens[None, :1], vad[None, :1], cv[None, :1], [refs], None)[0, 0]
    i = 0
    while i + 1 < n:
        m = min(window, n - i)
        y = gen.window(tokens[None, i : i + m], vad[None, i : i + m], cv[None, i : i + m], [refs], out[i][None])
        out[i + 1 : i + m] = y[0, 1:]
        i += m - 1
    meshes, pose = codec.decode(out, refs.anchor, heads, refs.pose)
    meshes = apply_gate(meshes, refs.rest, vad) if gate else meshes
    return (meshes, pose) if return_pose else meshes


GATE_LOW, GATE_HIGH, GATE_HOLD, GATE_RELEASE = 0.2, 0.35, 1, 2
GATE_FLOOR = 0.2
"""Share of the generated mouth motion kept where the gate is closed. Real mouths move
in the quiet before and after a phrase (they open before the sound starts and close
after it ends), and a fully closed gate throws that away: on the 8 held-out clips
stage 1's aperture r is 0.630 ungated, 0.583 fully gated, 0.606 with 0.2 kept, while
the silent stretches' spread stays 0.19 of speech (target <= 0.3; 0.25 on the 39
training clips with silence). Measured in docs/lipsync.md, "Silence"."""


def gate_levels(vad: np.ndarray, level: float = 0.0, quiet: int = 0, low: float = GATE_LOW,
                high: float = GATE_HIGH, hold: int = GATE_HOLD, release: int = GATE_RELEASE) -> tuple[np.ndarray, float, int]:
    """Per-frame mouth gate in [0, 1] from voice activity, causal (live-safe): it opens
    at once when the voice activity rises above `high` and closes over `release` frames
    only after `hold` frames in a row below `low` (a silent stretch, not the short pause
    between words, whose mouth motion is real). Returns (levels, last level, quiet run)."""
    out = np.zeros(len(vad), np.float32)
    for i, v in enumerate(np.asarray(vad, np.float64)):
        quiet = quiet + 1 if v < low else 0
        if v > high:
            level = 1.0
        elif quiet >= hold:
            level = max(0.0, level - 1.0 / max(release, 1))
        out[i] = level
    return out, level, quiet


def rest_mouth(meshes: np.ndarray, rest: np.ndarray, levels: np.ndarray, floor: float | None = None) -> np.ndarray:
    """Mouth points blended toward the rest shape: frame i keeps
    `floor + (1 - floor) * levels[i]` of its motion (`levels` from `gate_levels`;
    `floor` None: `GATE_FLOOR`)."""
    floor = GATE_FLOOR if floor is None else floor
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"gate floor {floor}: must lie in [0, 1]")
    w = floor + (1.0 - floor) * np.asarray(levels, np.float32)
    out = np.array(meshes, np.float32, copy=True)
    idx = list(hf.MOUTH)
    out[:, idx] = rest[idx] + w[:, None, None] * (out[:, idx] - rest[idx])
    return out


def apply_gate(meshes: np.ndarray, rest: np.ndarray, vad: np.ndarray, floor: float | None = None, **kw) -> np.ndarray:
    """Rest the mouth in silent stretches: the gate (`gate_levels`) blends the mouth
    toward the rest shape, keeping `floor` of its motion where it is closed."""
    g, _, _ = gate_levels(vad, **kw)
    return rest_mouth(meshes, rest, g, floor)
