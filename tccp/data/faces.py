"""Stage-2 training data for mouth mode: the mouth patch of each frame, as latents.

Per frame of a prepared clip (128 px face crops + landmarks), with the mouth patch
(`tccp.face.regions.patch_box`) cut from each image:
- `faces`: the real crop (the target);
- `masked`: the crop with the lower face greyed (`region_mask`, generous dilation):
  what the source shows around the region, never the mouth itself;
- `warped`: the reference frame of the clip's bank that the engine would choose, warped
  onto this frame's landmarks (`tccp.face.warp`); bank and choice are the engine's
  (`training_references`: typical lip shapes, the same distance and gap rules), except
  that no frame within `min_gap` frames of the target is used, so the network cannot
  learn to copy the answer;
- `sketches`: the landmark sketch (the control branch's c_v);
- `mask`: the region at latent resolution (an input channel).
All four images are encoded once with TAEF2 (fp16 latents, `<cache>.safetensors`,
resumable per clip); `MouthWindowDataset` serves windows of them with mel windows and
an identity latent (another bank frame's patch).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from einops import rearrange

from tccp.data.datasets import PreparedClip
from tccp.face import headframe as hf
from tccp.face.geometry import MASK_GREY
from tccp.face.regions import patch_box, region_mask
from tccp.face.sketch import SKETCH_INDICES, draw_sketch

__all__ = ["MASK_DILATE", "MASK_FEATHER", "MASK_BELOW_NOSE", "MASK_INSIDE", "BANK_SIZE", "mouth_inputs", "training_references", "encode_mouth_cache",
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


def training_references(heads: np.ndarray, faces: np.ndarray, size: int = BANK_SIZE,
                        min_gap: int = MIN_GAP) -> tuple[np.ndarray, np.ndarray]:
    """(bank, refs) for a clip's (N, 478, 2) head-frame meshes and (N, S, S, 3) crops: the
    bank's frame indices, chosen as a session chooses its bank
    (`tccp.pipelines.faces.select_references`, with the crops' sharpness), and per frame
    the bank frame whose crop is warped onto it, chosen as the engine chooses
    (`reference_distances` with the engine's rules: head turn, no closed reference
    stretched open nor open one squeezed shut), so that stage 2 trains on the pairs it
    is given at run time; per frame without the run-time hysteresis. A bank frame within
    `min_gap` frames of the target is never used (the network must not learn to copy
    the answer); when every one is that near (a short clip), the frame farthest in time."""
    from tccp.pipelines import faces as pf

    n = len(heads)
    head_yaw = pf.yaw(heads)  # the head turn of every frame
    bank = np.asarray(pf.select_references(heads, size, sharpness=np.array([pf.crop_sharpness(f) for f in faces])))
    allowed = np.abs(bank[None, :] - np.arange(n)[:, None]) > min_gap
    allowed[~allowed.any(1)] = True  # none far enough: choose among all, then fall back below
    lips = heads[:, list(hf.LIPS)]
    turn = np.abs(head_yaw[:, None] - head_yaw[bank][None])
    d = pf.reference_distances(lips, lips[bank], allowed, pf.REF_CENTRE, pf.REF_GAP_WEIGHT,
                               pf.REF_YAW_WEIGHT * np.maximum(turn - pf.REF_YAW_TOLERANCE, 0.0),
                               pf.REF_MAX_DEFICIT, pf.REF_MAX_EXCESS)
    refs = bank[d.argmin(1)]
    near = np.abs(refs - np.arange(n)) <= min_gap
    refs[near] = [int(np.argmax(np.abs(np.arange(n) - t))) for t in np.flatnonzero(near)]
    return bank, refs


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


def _clip_arrays(clip: PreparedClip, template: np.ndarray, tri, max_frames: int | None):
    n = clip.n_frames if max_frames is None else min(clip.n_frames, max_frames)
    faces = clip.faces[:n]
    mesh = hf.to_mesh(clip.landmarks[:n], clip.landmark_index)
    heads, _ = hf.to_head(mesh, template)
    bank, refs = training_references(heads, faces)
    imgs = {k: [] for k in ("faces", "masked", "warped", "sketches")}
    masks = []
    x0, y0, x1, y1 = patch_box(clip.size)
    lat = (x1 - x0) // 8
    for t in range(n):
        j = int(refs[t])
        d = mouth_inputs(faces[t], mesh[t], faces[j], mesh[j], tri)
        imgs["faces"].append(faces[t][y0:y1, x0:x1])
        for k in ("masked", "warped", "sketches"):
            imgs[k].append(d[k])
        masks.append(cv2.resize(d["mask"], (lat, lat), interpolation=cv2.INTER_AREA))
    return {k: np.stack(v) for k, v in imgs.items()}, np.stack(masks), refs, bank


def encode_mouth_cache(folders: Sequence[str | os.PathLike], autoencoder, template: np.ndarray, out_file: str | os.PathLike,
                       max_frames: int | None = 500, batch_size: int = 32, progress=None) -> Path:
    """Build (or extend) the stage-2 mouth-patch latent cache; resumable per clip
    (`<out_file>.parts/`), final file written atomically."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tccp.face.warp import CAVITY_TONE, MOUTH_CAVITY, RIGID_SHARE, RIGID_TEETH, triangulate
    from tccp.pipelines import faces as pf

    tri = triangulate(template, SKETCH_INDICES)
    out = Path(out_file)
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    merged: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {"format": "tccp-mouth-latents", "version": "1"}
    clips = [PreparedClip(f) for f in folders]
    for i, clip in enumerate(clips):
        key = [clip.meta.get("source"), clip.meta.get("created"), max_frames, MASK_DILATE, BANK_SIZE]
        key += [MASK_FEATHER, MASK_INSIDE] if MASK_INSIDE else []  # the mask the inputs were made with
        key += [MASK_BELOW_NOSE] if MASK_BELOW_NOSE is not None else []
        key += [f"rigid teeth {RIGID_SHARE}"] if RIGID_TEETH else []  # ... and the warp
        key += [f"mouth cavity {MOUTH_CAVITY} {CAVITY_TONE}"] if RIGID_TEETH and MOUTH_CAVITY > 0 else []
        key += [f"refs {pf.SELECTION} {pf.REF_MAX_DEFICIT} {pf.REF_MAX_EXCESS} {pf.REF_YAW_WEIGHT} "
                f"{pf.REF_YAW_TOLERANCE} {pf.REF_CENTRE} {pf.REF_GAP_WEIGHT}"]  # ... and the pairs
        fp = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]
        part = parts / f"{clip.name}.safetensors"
        tensors = None
        if part.is_file():
            with safe_open(str(part), "pt") as f:
                if (f.metadata() or {}).get("fp") == fp:
                    tensors = {k: f.get_tensor(k) for k in f.keys()}
        if tensors is None:
            imgs, masks, refs, bank = _clip_arrays(clip, template, tri, max_frames)
            tensors = {f"{clip.name}/{k}": autoencoder.encode_images(v, batch_size=batch_size).half().cpu()
                       for k, v in imgs.items()}
            tensors[f"{clip.name}/mask"] = torch.from_numpy(masks).half()
            tensors[f"{clip.name}/ref_index"] = torch.from_numpy(refs.astype(np.int32))
            tensors[f"{clip.name}/bank"] = torch.from_numpy(bank.astype(np.int32))
            tmp = part.with_name(part.name + ".tmp")
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"fp": fp})
            os.replace(tmp, part)
            clip.__dict__.pop("faces", None)
        merged.update(tensors)
        meta[f"fp/{clip.name}"] = fp
        if progress is not None:
            progress(i + 1, len(clips), clip.name)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp), metadata=meta)
    os.replace(tmp, out)
    return out


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
