"""Stage 2 at inference, mouth mode: edit the mouth patch of each face crop.

Per frame: the target landmarks (stage 1's, or the tracked ones), the source crop and
the session's reference bank go in; out comes the regenerated mouth patch. Inputs are
made exactly as `tccp.data.faces` made the training data: the lower face greyed out
(union of the source's and the target's regions, so the old mouth disappears and the
new one has room), the best-matching reference warped onto the target landmarks, the
target sketch, the region mask. Only the 80 px patch (of a 128 px crop) goes through
the autoencoder and the denoiser, slot 0 of each window being the previous window's
last patch latent (first-frame conditioning).

`steps=0` skips the denoiser: the patch is the warped reference itself (the cheap rung
of the degradation ladder, and the no-learning baseline the model is measured against).
With `residual_scale` (packs trained that way) the denoiser generates only the
correction to the warped reference's latent: a network that outputs zero is the warp.
Reference latents (identity tokens) are encoded once per bank, not per window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from einops import rearrange

from tccp.diffusion.samplers import cfg_model_fn, sample
from tccp.diffusion.schedule import Schedule
from tccp.face import headframe as hf
from tccp.face.regions import patch_box

__all__ = ["ReferenceBank", "MouthEditor", "SamplerConfig", "LatentNorm", "stream_noise"]


def stream_noise(shape, seed: int | list[int]) -> torch.Tensor:
    """Starting noise for a batch of streams, each from its own seed, so a stream's
    output does not depend on which other streams share its batch."""
    seeds = [int(seed)] * shape[0] if isinstance(seed, int) else [int(s) for s in seed]
    return torch.stack([torch.randn(tuple(shape[1:]), generator=torch.Generator().manual_seed(s)) for s in seeds])


@dataclass
class SamplerConfig:
    name: str = "ddim"  # "ddpm" | "ddim" | "dpmpp_2m"
    steps: int = 4
    cfg_scale: float = 1.0
    eta: float = 0.0  # DDIM only
    clip_x0: float | None = 3.0

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplerConfig":
        return cls(**{k: d[k] for k in ("name", "steps", "cfg_scale", "eta", "clip_x0") if k in d})


@dataclass
class LatentNorm:
    """Model-space latent = (TAEF2 latent - shift) * scale."""

    scale: float = 1.0
    shift: float = 0.0

    def to_model(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift) * self.scale

    def from_model(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale + self.shift


@dataclass
class ReferenceBank:
    """A person's reference frames (from the context video or an avatar).

    crops (K, S, S, 3) face crops at the model's size, meshes (K, 478, 2) their landmarks
    in crop px, shapes (K, 80) head-frame lip shapes used to pick the best reference,
    hires: per reference a (H, W, 3) sharper crop of the same box (source resolution,
    for detail transfer) or None; latents (K, C, h, w) the encoded patches (lazily)."""

    crops: np.ndarray
    meshes: np.ndarray
    shapes: np.ndarray
    hires: list = field(default_factory=list)
    latents: Any = None
    version: int = 0  # bumped when references are added (re-encode)
    ids: list | None = None  # a stable id per reference (a live bank re-chosen from a pool: the pool index)
    own: bool = False
    """The references are frames of the video being edited (the same person, lit and
    filmed as in the frames edited): the skin around the mouth can then stay the source
    frame's own (`engine.composite.SOURCE_SKIN`). False for an identity image or an
    avatar, whose person replaces the source's."""

    def ref_id(self, index: int) -> int:
        """The stable id of reference `index` (the index itself for a fixed bank)."""
        return int(self.ids[index]) if self.ids is not None and 0 <= index < len(self.ids) else int(index)

    def index_of(self, ref_id: int) -> int:
        """The index of the reference with id `ref_id` in this bank, -1 if it left it."""
        if self.ids is None:
            return int(ref_id) if 0 <= ref_id < len(self.crops) else -1
        return self.ids.index(ref_id) if ref_id in self.ids else -1

    def __len__(self) -> int:
        return len(self.crops)

    @classmethod
    def build(cls, crops: np.ndarray, meshes: np.ndarray, template: np.ndarray, hires: list | None = None) -> "ReferenceBank":
        heads, _ = hf.to_head(np.asarray(meshes, np.float32), template)
        shapes = heads[:, list(hf.LIPS)].reshape(len(heads), -1)
        return cls(np.asarray(crops, np.uint8), np.asarray(meshes, np.float32), shapes,
                   list(hires) if hires is not None else [None] * len(crops))

    def choose(self, target_heads: np.ndarray, prev: int = -1, stick: float | None = None,
               allowed: np.ndarray | None = None, centre: bool = False, gap_weight: float = 0.0,
               target_yaw: np.ndarray | None = None, yaw_weight: float = 0.0, yaw_tolerance: float = 0.0,
               max_deficit: float | None = None, max_excess: float | None = None) -> np.ndarray:
        """Per target (N, 478, 2) head-frame mesh, the index of the closest lip shape.

        With `stick` (a fraction) the reference in use (`prev` for the first frame, then
        the previous frame's) is kept while it is within (1 + stick) x the closest one's
        distance: the mouth's texture comes from one picture for a run of frames instead
        of flickering between near ties. `allowed` (K,) bool (at least one True) limits
        the choice to those references (the head region skips mid-blink ones).
        `centre` compares the lip shapes without their position in the head frame and
        `gap_weight` adds that many times the inner-lip gap difference: measured
        alternatives, off by default (`REF_CENTRE`, `REF_GAP_WEIGHT`; docs/faces.md
        "Which reference draws a small opening"). `yaw_weight` adds that many times the
        difference between each target's head turn (`target_yaw`, (N,); `yaw`) and each
        reference's beyond `yaw_tolerance`: a flat warp cannot turn a frontal nose and
        cheek into a turned one (`REF_YAW_WEIGHT`, `REF_YAW_TOLERANCE`). `max_deficit`
        (a share of the target's mouth width) rules out, per target, the references whose
        inner-lip gap is smaller than the target's by more than that, unless none is
        left (then the most open ones stay): opening a closed reference far wider
        stretches the few pixels between its lips into a block (`REF_MAX_DEFICIT`);
        `max_excess` the same for references that open wider than the target by more
        than that (then the least open stay; `REF_MAX_EXCESS`)."""
        k = len(self.shapes)
        extra = None
        if yaw_weight and target_yaw is not None:
            turn = np.abs(np.asarray(target_yaw)[:, None] - yaw(self.meshes)[None])
            extra = yaw_weight * np.maximum(turn - yaw_tolerance, 0.0)
        d = reference_distances(np.asarray(target_heads)[:, list(hf.LIPS)], np.asarray(self.shapes).reshape(k, -1, 2),
                                allowed, centre, gap_weight, extra, max_deficit, max_excess)
        best = d.argmin(1)
        if not stick:
            return best
        out = np.empty_like(best)
        j = int(prev)
        for i, row in enumerate(d):
            if not 0 <= j < len(row) or row[j] > (1.0 + stick) * row[best[i]]:
                j = int(best[i])
            out[i] = j
        return out


def yaw(meshes: np.ndarray) -> np.ndarray:
    """(..., 478, 2) meshes -> (...,) head turn: where the nose tip (1) sits between the
    cheeks' edges (234, 454), minus 0.5 (0 frontal, about +-0.3 at a three-quarter view).
    A ratio along the face, so any crop, scale or in-plane rotation gives the same."""
    m = np.asarray(meshes, np.float64)
    span = m[..., 454, :] - m[..., 234, :]
    along = ((m[..., 1, :] - m[..., 234, :]) * span).sum(-1) / np.maximum((span * span).sum(-1), 1e-9)
    return along - 0.5


SELECTION = "typical"  # how a bank is chosen from many frames (select_references)


def crop_sharpness(crop: np.ndarray) -> float:
    """Variance of the Laplacian of a face crop's lower half (grey): motion-blurred
    frames make blurred mouths, whatever their shape."""
    g = crop[crop.shape[0] // 2 :].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    lap = g[1:-1, 1:-1] * 4 - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(lap.var())


def select_references(heads: np.ndarray, size: int, selection: str | None = None,
                      sharpness: np.ndarray | None = None) -> list[int]:
    """Indices of up to `size` reference frames among (N, 478, 2) head-frame meshes (a
    session's bank, `engine.refs`; the training pairs' bank, `tccp.training.mouth_cache`).

    "typical" (the default): the most closed 5 % of the frames (the rest shape) and
    the others sorted by mouth aperture and cut into `size - 1` equal bins, each group
    represented by its medoid (the frame nearest its mean lip shape), most closed first. Why: a frame is matched to the reference with the
    nearest lip shape, and the targets stage 1 generates are average shapes; the
    farthest-point alternative ("extremes") fills the bank with outliers (pressed,
    twisted or mistracked lips) that then stand in for a neutral closed mouth (the
    twisted lower lip of the earlier demo preview). With `sharpness` (per frame), each
    bin takes the sharpest of its frames nearer than the median to its mean shape
    (a medoid can be a motion-blurred frame).
    "extremes": farthest-point sampling from the most closed mouth."""
    selection = selection or SELECTION
    n = len(heads)
    if n == 0:
        return []
    shapes = heads[:, list(hf.LIPS)].reshape(n, -1)
    if selection == "typical":
        order = np.argsort(hf.aperture(heads), kind="stable")
        closed = order[: max(1, int(np.ceil(0.05 * n)))]  # the rest shape: the most closed few
        others = order[len(closed) :]
        k = min(size, n) - 1
        bins = [closed] + (list(np.array_split(others, k)) if k > 0 and len(others) else [])
        picks: list[int] = []
        for part in bins:
            if len(part) == 0:
                continue
            dist = np.linalg.norm(shapes[part] - shapes[part].mean(0), axis=1)
            if sharpness is None:
                j = int(part[np.argmin(dist)])
            else:
                near = part[dist <= np.median(dist)]
                j = int(near[np.argmax(sharpness[near])])
            if not picks or min(np.linalg.norm(shapes[picks] - shapes[j], axis=1)) > 1e-9:
                picks.append(j)
        return picks
    if selection != "extremes":
        raise ValueError(f"reference selection {selection!r} (choose typical or extremes)")
    picks = [int(np.argmin(hf.aperture(heads)))]
    d = np.linalg.norm(shapes - shapes[picks[0]], axis=1)
    while len(picks) < min(size, n):
        j = int(np.argmax(d))
        if d[j] <= 1e-9:
            break
        picks.append(j)
        d = np.minimum(d, np.linalg.norm(shapes - shapes[j], axis=1))
    return picks


def reference_distances(target_lips: np.ndarray, ref_lips: np.ndarray, allowed: np.ndarray | None = None,
                        centre: bool = False, gap_weight: float = 0.0, extra: np.ndarray | None = None,
                        max_deficit: float | None = None, max_excess: float | None = None) -> np.ndarray:
    """(N, K) distances from each target's head-frame lip points (N, len(LIPS), 2) to each
    reference's (K, len(LIPS), 2), inf where a reference may not be used: the rules of
    `ReferenceBank.choose` (which documents them) as one pure function, so that the
    training pairs of `tccp.training.mouth_cache` are chosen exactly as the engine chooses.
    `allowed` (K,) or (N, K) bool; `extra` (N, K) is added (the head-turn term)."""
    t, s = np.asarray(target_lips), np.asarray(ref_lips)
    n, k = len(t), len(s)
    if centre:
        t = t - t.mean(1, keepdims=True)
        s = s - s.mean(1, keepdims=True)
    d = np.linalg.norm(t.reshape(n, 1, -1) - s.reshape(1, k, -1), axis=-1)
    gt, gs = _lip_gap(t), _lip_gap(s)  # (N,), (K,) inner-lip gaps
    if gap_weight:
        d = d + gap_weight * np.abs(gt[:, None] - gs[None])
    if extra is not None:
        d = d + extra
    if allowed is not None:
        d = np.where(np.broadcast_to(np.asarray(allowed, bool), d.shape), d, np.inf)
    if max_deficit is not None or max_excess is not None:
        lips = list(hf.LIPS)
        width = np.linalg.norm(t[:, lips.index(61)] - t[:, lips.index(291)], axis=-1)
        if max_deficit is not None:  # the floor never passes the most open usable reference
            most = np.where(np.isfinite(d), gs[None], -np.inf).max(1)
            d = np.where(gs[None] >= np.minimum(gt - max_deficit * width, most)[:, None], d, np.inf)
        if max_excess is not None:  # nor the cap the least open one
            least = np.where(np.isfinite(d), gs[None], np.inf).min(1)
            d = np.where(gs[None] <= np.maximum(gt + max_excess * width, least)[:, None], d, np.inf)
    return d


def _lip_gap(lips: np.ndarray) -> np.ndarray:
    """(..., len(LIPS), 2) lip points -> (...,) inner-lip gap (points 13-14)."""
    lips_index = list(hf.LIPS)
    return np.linalg.norm(lips[..., lips_index.index(13), :] - lips[..., lips_index.index(14), :], axis=-1)


REF_STICK = 0.5
"""Hysteresis of the reference choice (`ReferenceBank.choose`). Measured on 6 clips
outside the validation set (generated landmarks, 3 s each): reference switches 92 ->
59 (0.2) -> 49 (0.5); mouth-box PSNR 24.23 -> 24.21 -> 24.16 dB, sharpness 0.698 ->
0.703 -> 0.732, output mouth r 0.541 -> 0.545 -> 0.567 (docs/faces.md)."""
REF_YAW_WEIGHT = 2.0
"""Weight of the head-turn difference in the reference choice (`ReferenceBank.choose`;
0: lip shape alone). Measured on 14 clips (docs/faces.md, "Turned heads"): 10 unchanged,
the means within +-0.005 r and +-0.04 dB; a turned face no longer gets a frontal
reference's nose and cheek bent onto it."""
REF_YAW_TOLERANCE = 0.1
"""Head-turn differences (`yaw` units) the choice ignores: a talking head's turns stay
within about +-0.1, a turned face against a frontal bank is 0.3-0.5 away."""
REF_MAX_DEFICIT: float | None = 0.15
"""Per frame, the references whose inner-lip gap falls short of the target's by more than
this share of the mouth's width are not used (`ReferenceBank.choose(max_deficit=)`;
None: off). The nearest lip shape can be a closed mouth sitting where the target's lips
sit; opened wide by the warp, its few pixels between the lips became a red or black slab
with a streak where the real mouth shows teeth. Measured on 14 clips (3 s, docs/faces.md
"A closed reference is not stretched open"): generated landmarks r 0.542 -> 0.547,
mouth-box PSNR 24.18 -> 24.21 dB, sharpness 0.721 -> 0.731; tracked 27.24 -> 27.35 dB
(0.08: 24.30 dB but r 0.525; 0.25: 24.14 dB, r 0.536)."""
REF_MAX_EXCESS: float | None = 0.15
"""The same for references that open wider than the target by more than this share of
the mouth's width (`ReferenceBank.choose(max_excess=)`; None: off): an open reference
squeezed shut shows its teeth as a pale band between the lips. With the deficit rule on,
14 clips (3 s): generated landmarks r 0.547 -> 0.552, 24.21 -> 24.29 dB; tracked r 0.847
-> 0.849, 27.35 -> 27.42 dB (0.25: r 0.549, 24.21 dB)."""
REF_CENTRE = False
REF_GAP_WEIGHT = 0.0
"""Off: on 6 clips outside the validation set (3 s, generated landmarks) neither moved
the output's mouth r beyond +-0.02 (centred 0.636, gap weight 6 0.650, both 0.643 vs
0.653); they gain 0.1-0.26 dB mouth-box PSNR and some sharpness (docs/faces.md)."""


class MouthEditor:
    def __init__(self, model, autoencoder, template: np.ndarray, size: int = 128, schedule: Schedule | None = None,
                 sampler: SamplerConfig | None = None, latent_norm: LatentNorm | None = None,
                 residual_scale: float | None = None) -> None:
        from tccp.face.sketch import SKETCH_INDICES
        from tccp.face.warp import triangulate

        self.model = model.eval() if model is not None else None
        self.autoencoder = autoencoder
        self.template = np.asarray(template, np.float32)
        self.size = int(size)
        self.patch = patch_box(self.size)
        self.schedule = schedule or Schedule(prediction="v")
        self.sampler = sampler or SamplerConfig()
        self.norm = latent_norm or LatentNorm()
        # None: the network generates the patch latent; a number: it generates the
        # correction to the warped reference's latent, times this scale
        self.residual_scale = residual_scale
        self.tri = triangulate(self.template, SKETCH_INDICES)

    @property
    def device(self) -> torch.device:
        p = self.model if self.model is not None else self.autoencoder.encoder
        return next(p.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        p = self.model if self.model is not None else self.autoencoder.encoder
        return next(p.parameters()).dtype

    # ------------------------------------------------------------------ inputs
    def inputs(self, crops: np.ndarray, targets: np.ndarray, sources: np.ndarray, bank: ReferenceBank,
               ref_index: np.ndarray | None = None, prev_ref: int = -1) -> dict[str, np.ndarray]:
        """Per frame (n of them): source crops (n, S, S, 3), target and source meshes
        (n, 478, 2) in crop px -> patch images `masked`, `warped`, `sketches` (n, ph, pw, 3),
        `mask` (n, ph, pw), `ref` (n,) reference used."""
        from tccp.data.faces import mouth_inputs

        if ref_index is None:
            heads, _ = hf.to_head(np.asarray(targets, np.float32), self.template)
            ref_index = bank.choose(heads, prev_ref, REF_STICK, centre=REF_CENTRE, gap_weight=REF_GAP_WEIGHT,
                                    target_yaw=yaw(targets), yaw_weight=REF_YAW_WEIGHT,
                                    yaw_tolerance=REF_YAW_TOLERANCE, max_deficit=REF_MAX_DEFICIT,
                                    max_excess=REF_MAX_EXCESS)
        out: dict[str, list] = {"masked": [], "warped": [], "sketches": [], "mask": []}
        for k in range(len(crops)):
            j = int(ref_index[k])
            d = mouth_inputs(crops[k], targets[k], bank.crops[j], bank.meshes[j], self.tri,
                             masks_from=[sources[k], targets[k]])
            for key in out:
                out[key].append(d[key])
        res = {k: np.stack(v) for k, v in out.items()}
        res["ref"] = np.asarray(ref_index)
        return res

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """(..., h, w, 3) uint8 -> (..., C, h/8, w/8) raw latents."""
        lead = images.shape[:-3]
        z = self.autoencoder.encode_images(images.reshape((-1,) + images.shape[-3:]))
        z = z.to(self.device, self.dtype)
        return z.reshape(tuple(lead) + tuple(z.shape[1:]))

    def bank_latents(self, bank: ReferenceBank) -> torch.Tensor:
        """The bank's patch latents (identity tokens), encoded once per bank version."""
        if bank.latents is None or getattr(bank, "_enc_version", -1) != bank.version:
            x0, y0, x1, y1 = self.patch
            bank.latents = self.encode(np.ascontiguousarray(bank.crops[:, y0:y1, x0:x1]))
            bank._enc_version = bank.version  # type: ignore[attr-defined]
        return bank.latents

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def window(self, inputs: list[dict[str, np.ndarray]], banks: list[ReferenceBank], mel: np.ndarray,
               prev: torch.Tensor | None, steps: int | None = None, seed: int | list[int] = 0,
               sampler: str | None = None, cfg_scale: float | None = None,
               warped: torch.Tensor | None = None) -> torch.Tensor:
        """Generate patch latents for B streams with n frames each (slot 0 = the
        previous frame when `prev` (B, C, h, w) is given, and then inputs[b] covers slots
        0..n-1 too). mel (B, n, 16, 80). Returns raw latents (B, C, n, h, w); with `steps`
        0 (or no model) the warped references' latents. `warped`: those latents
        (`encode_warped(inputs)`) when the caller already has them (the pixel residual
        needs them too: one encode per window, not two)."""
        steps = self.sampler.steps if steps is None else steps
        five = lambda z: rearrange(z, "b n c h w -> b c n h w")  # noqa: E731
        warped = self.encode_warped(inputs) if warped is None else warped.clone()
        if steps <= 0 or self.model is None:
            if prev is not None:
                warped[:, :, 0] = prev.to(warped.dtype)
            return warped
        masked = five(self.encode(np.stack([d["masked"] for d in inputs])))
        sketch = five(self.encode(np.stack([d["sketches"] for d in inputs])))
        b, c, n, h, w = warped.shape
        mask = rearrange(torch.nn.functional.adaptive_avg_pool2d(
            rearrange(torch.from_numpy(np.stack([d["mask"] for d in inputs])).to(self.device, self.dtype), "b n h w -> (b n) 1 h w"),
            (h, w)), "(b n) 1 h w -> b 1 n h w", b=b)
        norm = self.norm.to_model
        extra = torch.cat([norm(masked), norm(warped), mask], dim=1)
        ref = torch.stack([self.bank_latents(bk)[int(d["ref"][0])] for bk, d in zip(banks, inputs)])
        tokens = self.model.encode_conditions(torch.from_numpy(np.asarray(mel, np.float32)).to(self.device, self.dtype),
                                              norm(ref))
        flags = torch.zeros(b, n, device=self.device, dtype=self.dtype)
        fixed = None
        c_v = norm(sketch)
        rs = self.residual_scale
        to_x = (lambda z, k: (z - warped[:, :, k]) * rs) if rs else (lambda z, k: norm(z))  # noqa: E731
        if prev is not None:
            flags[:, 0] = 1
            m = torch.zeros(1, 1, n, 1, 1, dtype=torch.bool, device=self.device)
            m[:, :, 0] = True
            value = torch.zeros_like(warped)
            value[:, :, 0] = to_x(prev.to(self.dtype), 0)
            fixed = (m.expand_as(warped), value)
        sc = self.sampler
        name = sampler or sc.name
        scale = sc.cfg_scale if cfg_scale is None else cfg_scale
        null = self.model.null_conditions(b, n).to(tokens.dtype)
        fn = cfg_model_fn(lambda x, t, tok, cv, fl, ex: self.model(x, t, tok, cv, fl, ex),
                          (tokens, c_v, flags, extra), (null, c_v, flags, extra), scale)
        x_T = stream_noise(warped.shape, seed).to(self.device, self.dtype)
        kwargs: dict[str, Any] = {"eta": sc.eta} if name == "ddim" else {}
        out = sample(name, fn, x_T, self.schedule, steps, fixed=fixed, clip_x0=sc.clip_x0, **kwargs)
        if rs:
            out = warped + out / rs
            if prev is not None:
                out[:, :, 0] = prev.to(out.dtype)  # exactly, not via the round trip
            return out
        return self.norm.from_model(out)

    @torch.inference_mode()
    def encode_warped(self, inputs: list[dict[str, np.ndarray]]) -> torch.Tensor:
        """The warped reference patches of `inputs` (B streams of n frames) -> their raw
        latents (B, C, n, h, w): the denoiser's starting point and the pixel residual's base."""
        return rearrange(self.encode(np.stack([d["warped"] for d in inputs])), "b n c h w -> b c n h w")

    @torch.inference_mode()
    def pixel_residual(self, patches: np.ndarray, warped: np.ndarray,
                       latents: torch.Tensor | None = None, gain: float = 1.0) -> np.ndarray:
        """`patches` (B, n, ph, pw, 3) decoded from corrected latents, `warped` the warped
        reference patches they were corrected from -> the warp plus `gain` x the decoded
        change (`warped + gain x (patches - decode(encode(warped)))`), uint8. `latents`
        (B, C, n, h, w): `encode(warped)` when the caller has it (`encode_warped`)."""
        if latents is None:
            latents = rearrange(self.encode(warped), "b n c h w -> b c n h w")
        base = self.decode(latents)
        change = patches.astype(np.float32) - base.astype(np.float32)
        out = warped.astype(np.float32) + float(gain) * change
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    @torch.inference_mode()
    def decode(self, lat: torch.Tensor) -> np.ndarray:
        """(B, C, n, h, w) raw latents -> (B, n, ph, pw, 3) uint8 patches."""
        b = lat.shape[0]
        img = self.autoencoder.decode(rearrange(lat, "b c n h w -> (b n) c h w"))
        img = (img.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return rearrange(img, "(b n) c h w -> b n h w c", b=b).cpu().numpy()
