"""TCCP two-stage pipeline (paper 4.2, Fig. 2) on latents.

Stage 1 (landmarks): c_v = head-masked context latents, c_l = audio (+ identity) ->
latents of the drawn landmark sketch. Stage 2 (faces): c_v = sketch latents (stage 1's
output, or sketches drawn from tracked landmarks), c_l = audio + identity -> face
latents. Stage 1's output latent feeds stage 2 directly, never decoded: both stages
live in the same TAEF2 latent space, so decoding and re-encoding would only add error
and time.

Temporal steps: `first_frame` runs both stages on a one-frame window (flag 0, pure
noise); `window` runs them on an N-frame window whose slot 0 is the previous window's
last frame (clean, flag 1) and returns the N-1 new frames. The batch dimension is
concurrent streams. All latents in and out are raw TAEF2 latents; the pipeline
applies the pack's latent normalisation on the way in and undoes it on the way out.

`sketch_edit` (optional, both steps) transforms stage 1's sketch latents (raw TAEF2
latents, (B, C, N, h, w)) before they drive stage 2, e.g. `tccp.face.mouth`'s mouth-opening
factor; the returned sketch stays stage 1's own output, so the next window's stage 1
continues from what it generated, not from the edit.

Classifier-free guidance (cfg_scale != 1) guides on c_l only (audio + identity vs the
learned null tokens, as trained with condition dropout); c_v and the clean slot are
the same in both halves, which run as one doubled batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from einops import rearrange

from tccp.diffusion.samplers import cfg_model_fn, sample
from tccp.diffusion.schedule import Schedule
from tccp.models.mvcontrolnet import MVControlNet

__all__ = ["SamplerConfig", "LatentNorm", "TCCPPipeline"]


@dataclass
class SamplerConfig:
    name: str = "ddim"  # "ddpm" | "ddim" | "dpmpp_2m"
    steps: int = 10
    cfg_scale: float = 1.0
    eta: float = 0.0  # DDIM only
    clip_x0: float | None = 3.0  # clamp x0 estimates to TAEF2's latent range (model space)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplerConfig":
        return cls(**{k: d[k] for k in ("name", "steps", "cfg_scale", "eta", "clip_x0") if k in d})


@dataclass
class LatentNorm:
    """Model-space latent = (TAEF2 latent - shift) * scale (unit variance for diffusion)."""

    scale: float = 1.0
    shift: float = 0.0

    def to_model(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift) * self.scale

    def from_model(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale + self.shift


def _frames(z: torch.Tensor) -> torch.Tensor:
    """Accept (B, C, h, w) or (B, C, N, h, w); return 5D."""
    return z[:, :, None] if z.ndim == 4 else z


class TCCPPipeline:
    def __init__(
        self,
        stage1: MVControlNet,
        stage2: MVControlNet,
        autoencoder: Any = None,
        sampler: SamplerConfig | None = None,
        schedule: Schedule | None = None,
        latent_norm: LatentNorm | None = None,
    ) -> None:
        self.stage1 = stage1.eval()
        self.stage2 = stage2.eval()
        self.autoencoder = autoencoder  # TAEF2 (tccp.models.autoencoder.TinyAutoencoder) or None
        self.sampler = sampler or SamplerConfig()
        self.schedule = schedule or Schedule()
        self.norm = latent_norm or LatentNorm()
        self.pack_config: dict[str, Any] = {}  # config.json of the pack it came from, if any

    @property
    def device(self) -> torch.device:
        return next(self.stage1.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.stage1.parameters()).dtype

    def to(self, device: str | torch.device) -> "TCCPPipeline":
        self.stage1.to(device)
        self.stage2.to(device)
        if self.autoencoder is not None and hasattr(self.autoencoder, "to"):
            self.autoencoder.to(device)
        return self

    # ------------------------------------------------------------------ internals
    def _in(self, z: torch.Tensor | None) -> torch.Tensor | None:
        if z is None:
            return None
        return self.norm.to_model(z.to(self.device, self.dtype))

    def _run(
        self,
        model: MVControlNet,
        c_v: torch.Tensor,
        mel: torch.Tensor,
        ref: torch.Tensor | None,
        prev: torch.Tensor | None,
        steps: int | None,
        sampler: str | None,
        cfg_scale: float | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Sample one stage on a window (model space). `prev` (B, C, 1, h, w) pins slot 0."""
        b, c, n, hh, ww = c_v.shape
        steps = self.sampler.steps if steps is None else steps
        name = self.sampler.name if sampler is None else sampler
        scale = self.sampler.cfg_scale if cfg_scale is None else cfg_scale
        flags = torch.zeros(b, n, device=c_v.device, dtype=c_v.dtype)
        fixed = None
        if prev is not None:
            flags[:, 0] = 1.0
            mask = torch.zeros(1, 1, n, 1, 1, dtype=torch.bool, device=c_v.device)
            mask[:, :, 0] = True
            value = torch.zeros_like(c_v)
            value[:, :, :1] = prev
            fixed = (mask.expand_as(c_v), value)
        mel = mel.to(self.device, self.dtype)
        tokens = model.encode_conditions(mel, ref)
        fn = cfg_model_fn(model, (tokens, c_v, flags), (model.null_conditions(b, n).to(tokens.dtype), c_v, flags), scale)
        dev = generator.device if generator is not None else c_v.device
        x_T = torch.randn(c_v.shape, generator=generator, device=dev).to(c_v.device, c_v.dtype)
        kwargs: dict[str, Any] = {"eta": self.sampler.eta} if name == "ddim" else {}
        kwargs["clip_x0"] = self.sampler.clip_x0
        return sample(name, fn, x_T, self.schedule, steps, generator=generator, fixed=fixed, **kwargs)

    def _edited(self, sketch: torch.Tensor, edit: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        """Model-space sketch -> model-space sketch after `edit` (which sees raw latents)."""
        if edit is None:
            return sketch
        return self._in(edit(self.norm.from_model(sketch)))

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def first_frame(
        self,
        context_lat: torch.Tensor,
        mel: torch.Tensor,
        ref_lat: torch.Tensor | None,
        *,
        steps: int | None = None,
        sampler: str | None = None,
        cfg_scale: float | None = None,
        tracked_sketch_lat: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        sketch_edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first frame of each stream.

        context_lat (B, C, 1, h, w) head-masked context, mel (B, 1, 16, 80), ref_lat
        (B, C, h, w) reference face (None: no identity), tracked_sketch_lat (B, C, 1, h, w)
        skips stage 1. Returns (sketch_lat, face_lat), each (B, C, 1, h, w)."""
        ctx = self._in(_frames(context_lat))
        ref = self._in(ref_lat)
        if tracked_sketch_lat is None:
            sketch = self._run(self.stage1, ctx, mel, ref, None, steps, sampler, cfg_scale, generator)
        else:
            sketch = self._in(_frames(tracked_sketch_lat))
        drive = self._edited(sketch, sketch_edit) if tracked_sketch_lat is None else sketch
        face = self._run(self.stage2, drive, mel, ref, None, steps, sampler, cfg_scale, generator)
        return self.norm.from_model(sketch), self.norm.from_model(face)

    @torch.inference_mode()
    def window(
        self,
        context_lat: torch.Tensor,
        mel: torch.Tensor,
        ref_lat: torch.Tensor | None,
        prev_sketch_lat: torch.Tensor,
        prev_face_lat: torch.Tensor,
        steps: int | None = None,
        sampler: str | None = None,
        cfg_scale: float | None = None,
        tracked_sketch_lat: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        sketch_edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next N-1 frames of each stream.

        Slot 0 of the window is the previous window's last frame: context_lat
        (B, C, N, h, w) and mel (B, N, 16, 80) cover slots 0..N-1 (slot 0 = the frame
        of prev_*), prev_sketch_lat / prev_face_lat are (B, C, h, w) or (B, C, 1, h, w).
        tracked_sketch_lat (B, C, N, h, w) replaces stage 1 (sketches drawn from
        tracked landmarks; its slot 0 should be prev_sketch_lat's frame). Returns
        (sketch_lat, face_lat) for slots 1..N-1, each (B, C, N-1, h, w)."""
        ctx = self._in(_frames(context_lat))
        ref = self._in(ref_lat)
        prev_sketch = self._in(_frames(prev_sketch_lat))
        prev_face = self._in(_frames(prev_face_lat))
        if tracked_sketch_lat is None:
            sketch = self._run(self.stage1, ctx, mel, ref, prev_sketch, steps, sampler, cfg_scale, generator)
        else:
            sketch = self._in(_frames(tracked_sketch_lat))
        drive = self._edited(sketch, sketch_edit) if tracked_sketch_lat is None else sketch
        face = self._run(self.stage2, drive, mel, ref, prev_face, steps, sampler, cfg_scale, generator)
        return self.norm.from_model(sketch[:, :, 1:]), self.norm.from_model(face[:, :, 1:])

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def decode(self, lat: torch.Tensor) -> torch.Tensor:
        """(B, C, N, h, w) latents -> (B, N, H, W, 3) uint8 images via the autoencoder."""
        if self.autoencoder is None:
            raise RuntimeError("pipeline has no autoencoder")
        b = lat.shape[0]
        img = self.autoencoder.decode(rearrange(_frames(lat), "b c n h w -> (b n) c h w"))
        img = (img.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return rearrange(img, "(b n) c h w -> b n h w c", b=b)
