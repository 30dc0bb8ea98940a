"""MVControlNet: video diffusion branch + control branch + latent-condition encoders."""

from tccp.models.config import CONFIG_NAMES, MVConfig, get_config
from tccp.models.mvcontrolnet import MVControlNet, count_flops, count_params

__all__ = ["MVConfig", "get_config", "CONFIG_NAMES", "MVControlNet", "count_flops", "count_params"]
