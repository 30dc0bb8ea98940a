"""Diffusion process: noise schedule, training loss and samplers."""

from tccp.diffusion.loss import diffusion_loss
from tccp.diffusion.samplers import SAMPLERS, cfg_model_fn, ddim, ddpm, dpmpp_2m, sample
from tccp.diffusion.schedule import Schedule

__all__ = ["Schedule", "diffusion_loss", "ddpm", "ddim", "dpmpp_2m", "cfg_model_fn", "sample", "SAMPLERS"]
