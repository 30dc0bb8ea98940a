"""Stage-2 training data for mouth mode: the mouth patch of each frame, as latents.

Per frame of a prepared clip (128 px face crops + landmarks), with the mouth patch
(`tccp.face.regions.patch_box`) cut from each image:
- `faces`: the real crop (the target);
- `masked`: the crop with the lower face greyed (`region_mask`, generous dilation):
  what the source shows around the region, never the mouth itself;
- `warped`: the reference frame of the clip's bank that the engine would choose, warped
  onto this frame's landmarks (`tccp.face.warp`); bank and choice are the engine's
  (`tccp.training.mouth_cache.training_references`: typical lip shapes, the same distance
  and gap rules), except that no frame within `MIN_GAP` frames of the target is used, so
  the network cannot learn to copy the answer;
- `sketches`: the landmark sketch (the control branch's c_v);
- `mask`: the region at latent resolution (an input channel).
All four images are encoded once with TAEF2 (fp16 latents, `<cache>.safetensors`,
resumable per clip; built by `tccp.training.mouth_cache.encode_mouth_cache`, which may
use the engine's reference choice without this module importing the pipeline);
`MouthWindowDataset` serves windows of them with mel windows and
an identity latent (another bank frame's patch).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from einops import rearrange

from tccp.data.datasets import PreparedClip
from tccp.face.geometry import MASK_GREY
from tccp.face.regions import patch_box, region_mask
from tccp.face.sketch import draw_sketch

__all__ = ["MASK_DILATE", "MASK_FEATHER", "MASK_BELOW_NOSE", "MASK_INSIDE", "BANK_SIZE", "mouth_inputs",
           "MouthWindowDataset", "patch_mask"]

MASK_DILATE = 0.06  # fraction of the face height: room for the source's own mouth edge
MASK_FEATHER = 0.02
MASK_BELOW_NOSE: float | None = 0.0
"""... and below the nose's lower edge raised by this (`regions.region_mask`; None: the
dilation reaches up over the nostrils and the nose tip, which speech does not move).
A/B on 14 clips (6 outside the validation set + the 8 validation clips, 3 s, one
sitting; docs/faces.md "The nose stays the source's"): mouth-box PSNR +0.36 dB with
generated landmarks, +0.72 dB with tracked ones, every clip up; r and sharpness
unchanged."""
MASK_INSIDE = 0.01  # ... kept within the face oval grown by this (regions.region_mask says why)
BANK_SIZE = 8
MIN_GAP = 12
_KINDS = ("faces", "masked", "warped", "sketches")


def patch_mask(meshes, size: int) -> np.ndarray:
    """Region mask (union over `meshes`) cut to the patch, (ph, pw) float32."""
    x0, y0, x1, y1 = patch_box(size)
    m = region_mask(meshes, (size, size), "mouth", dilate=MASK_DILATE, feather=MASK_FEATHER, inside_face=MASK_INSIDE,
                    below_nose=MASK_BELOW_NOSE)
    return m[y0:y1, x0:x1]


def mouth_inputs(face: np.ndarray, mesh: np.ndarray, ref_face: np.ndarray, ref_mesh: np.ndarray, tri,
                 masks_from=None) -> dict[str, np.ndarray]:
    """The stage-2 input images of one frame at crop scale, cut to the patch.

    face (S, S, 3) source crop, mesh (478, 2) target landmarks in crop px, ref_face /
    ref_mesh the reference, `masks_from` the meshes whose union is masked (default the
    target's). Returns masked, warped, sketches (ph, pw, 3) uint8 and mask (ph, pw)."""
    from tccp.face.warp import warp_image

    size = face.shape[0]
    x0, y0, x1, y1 = patch_box(size)
    cut = lambda a: a[y0:y1, x0:x1]  # noqa: E731
    m = patch_mask(masks_from if masks_from is not None else mesh, size)
    masked = cut(face).astype(np.float32) * (1 - m[..., None]) + MASK_GREY * m[..., None]
    warped = warp_image(ref_face, tri, ref_mesh, mesh)
    sk = draw_sketch(mesh, size)
    return {"masked": np.clip(np.round(masked), 0, 255).astype(np.uint8), "warped": cut(warped),
            "sketches": cut(sk), "mask": m}


class MouthWindowDataset(torch.utils.data.Dataset):
    """Windows of mouth-patch latents: items with `faces`, `masked`, `warped`,
    `sketches` (C, W, h, w), `mask` (1, W, h, w), `ref` (C, h, w) and `mel` (W, 16, 80)."""

    def __init__(self, cache_file: str | os.PathLike, folders: Sequence[str | os.PathLike], window: int = 8,
                 seed: int = 0, deterministic: bool = False) -> None:
        from safetensors import safe_open

        self.window = window
        self.clips, self.lat, self.entries = [], [], []
        with safe_open(str(cache_file), "pt") as f:
            keys = set(f.keys())
            for folder in folders:
                clip = PreparedClip(folder)
                if f"{clip.name}/faces" not in keys:
                    continue
                d = {k: f.get_tensor(f"{clip.name}/{k}") for k in (*_KINDS, "mask", "bank")}
                n = d["faces"].shape[0]
                ci = len(self.clips)
                self.clips.append(clip)
                self.lat.append(d)
                self.entries += [(ci, s) for s in range(0, n - window + 1)]
        self.seed = seed
        self.deterministic = deterministic

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        ci, s = self.entries[i]
        clip, d = self.clips[ci], self.lat[ci]
        sl = slice(s, s + self.window)
        rng = np.random.default_rng(self.seed * 1000003 + i) if self.deterministic else np.random.default_rng(
            int(torch.randint(0, 2**31 - 1, (1,)).item()))
        bank = d["bank"].numpy()
        far = bank[(bank < s - MIN_GAP) | (bank >= s + self.window + MIN_GAP)]
        ref = int(rng.choice(far if len(far) else bank))

        def video(k: str) -> torch.Tensor:
            return rearrange(d[k][sl].float(), "n c h w -> c n h w")

        return {
            "faces": video("faces"), "masked": video("masked"), "warped": video("warped"),
            "sketches": video("sketches"), "mask": d["mask"][sl].float()[None],
            "ref": d["faces"][ref].float(), "mel": torch.from_numpy(clip.mel_windows[sl].copy()),
            "clip": clip.name, "start": s,
        }
