"""The stage-2 mouth-patch latent cache: per frame of every prepared clip, the real
patch, the masked source, the warped reference and the sketch (`tccp.data.faces`
describes them), encoded once with TAEF2 and read by `tccp.data.faces.MouthWindowDataset`.

It lives with training, not data, because its pairs are the engine's: the warped
reference is the one `tccp.pipelines.faces` would choose at run time, and the pipeline
itself imports `tccp.data.faces.mouth_inputs` (the inputs both share).
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

from tccp.data.datasets import PreparedClip
from tccp.data.faces import BANK_SIZE, MASK_BELOW_NOSE, MASK_DILATE, MASK_FEATHER, MASK_INSIDE, MIN_GAP, mouth_inputs
from tccp.face import headframe as hf
from tccp.face.regions import patch_box
from tccp.face.sketch import SKETCH_INDICES
from tccp.pipelines import faces as pf

__all__ = ["training_references", "encode_mouth_cache"]


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
