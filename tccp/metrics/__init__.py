"""Quality metrics of generated talking-head video (used by `tccp eval` and the model card).

Each submodule has one family of measures and works on plain numpy arrays (frames,
landmarks, masks), so the metrics can be reused without the evaluation pipeline:
`lipsync` (LipLMD, mouth-aperture correlation and lag), `fidelity` (masked PSNR/SSIM,
mask border band), `temporal` (landmark jitter, window seams), `identity` (dlib face
embeddings, optional).
"""

from tccp.metrics.fidelity import PSNR_CAP, border_band, masked_psnr, masked_ssim
from tccp.metrics.lipsync import LIP_INDICES, best_lag, landmark_error, lip_lmd, pearson
from tccp.metrics.temporal import WindowLayout, landmark_jitter, seam_stats

__all__ = [
    "PSNR_CAP",
    "LIP_INDICES",
    "WindowLayout",
    "best_lag",
    "border_band",
    "landmark_error",
    "landmark_jitter",
    "lip_lmd",
    "masked_psnr",
    "masked_ssim",
    "pearson",
    "seam_stats",
]
