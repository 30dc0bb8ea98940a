"""The two-stage editing pipeline: what a model pack loads into.

Stage 1 (`tccp.pipelines.landmarks`): Whisper audio tokens + the source's pose prior
-> lip and jaw landmark motion in coordinates. Stage 2 (`tccp.pipelines.faces`): the
target landmarks + the masked source + a warped reference of the same person -> the
regenerated mouth patch. Both run over 8-frame windows whose slot 0 is the previous
window's last frame. `EditPipeline` only holds the parts and their settings; the
per-window orchestration (batches of streams, carries, timings) is
`engine.runner.PipelineRunner`, which the file runner, the microphone and WebRTC share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tccp.diffusion.schedule import Schedule
from tccp.models.landmarks import LandmarkCodec, LandmarkNet
from tccp.pipelines.faces import LatentNorm, MouthEditor, ReferenceBank, SamplerConfig
from tccp.pipelines.landmarks import LandmarkGenerator

__all__ = ["EditPipeline", "SamplerConfig", "LatentNorm", "ReferenceBank"]


@dataclass
class EditPipeline:
    stage1: LandmarkGenerator
    stage2: MouthEditor
    whisper: Any  # tccp.media.whisper.WhisperEncoder
    crop_size: int = 128
    region: str = "mouth"
    pack_config: dict = field(default_factory=dict)
    stage1_head: LandmarkGenerator | None = None
    """Head mode's stage 1 (every sketch point + the head pose; `--region head`), when
    the pack has one."""

    @property
    def template(self) -> np.ndarray:
        return self.stage1.codec.template

    @property
    def device(self) -> torch.device:
        return self.stage2.device

    @classmethod
    def build(cls, net: LandmarkNet, codec: LandmarkCodec, stage2_model, autoencoder, whisper,
              crop_size: int = 128, schedule: Schedule | None = None, sampler: SamplerConfig | None = None,
              latent_norm: LatentNorm | None = None, stage1_steps: int = 4,
              residual_scale: float | None = None) -> "EditPipeline":
        gen = LandmarkGenerator(net, codec, Schedule(prediction="v"), steps=stage1_steps)
        editor = MouthEditor(stage2_model, autoencoder, codec.template, crop_size, schedule=schedule,
                             sampler=sampler, latent_norm=latent_norm, residual_scale=residual_scale)
        return cls(gen, editor, whisper, crop_size)

    def to(self, device: str | torch.device) -> "EditPipeline":
        self.stage1.net.to(device)
        if self.stage1_head is not None:
            self.stage1_head.net.to(device)
        if self.stage2.model is not None:
            self.stage2.model.to(device)
        if self.stage2.autoencoder is not None:
            self.stage2.autoencoder.to(device)
        if self.whisper is not None:
            self.whisper.to(device)
        return self
