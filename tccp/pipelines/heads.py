"""Stage 2 at inference, head mode (`--region head`): the whole head from the references.

TCCP's setting: the head is regenerated inside the context, expression and pose
following stage 1's head mode. No head-mode stage-2 network is trained (the CPU went to
mouth mode, where the measured gain is), so this is the warp path alone: per frame the
bank reference whose lips best match the target, moved onto the target head by a
similarity fitted on the skull points and then a piecewise-affine warp over the sketch
mesh (`tccp.face.warp.warp_map(align=True)`), pasted into the source crop under the
head region (union of the source's and the target's, so the source head disappears
where the generated one moved away from it). The mouth interior comes from the chosen
reference: teeth that no reference shows cannot appear. So do the eyes: the target's
eye and iris points are replaced by the reference's own (in the head frame) before the
warp, because a reference with open eyes warped onto closing lids is squashed into a
ghosted double lid (seen on the bundled sample), which is worse than a missed blink;
and references caught mid-blink (`open_eyes`) are not used for the head while the bank
has others: their closed eyes would be pasted over whole stretches of speech.
The region also takes in the reference's own hair (`tccp.face.segment`: the person
mask near its head, warped with it): without it another person's fuller hair was cut
at the face oval and the source's hair showed around it.
"""

from __future__ import annotations

import cv2
import numpy as np

from tccp.face import headframe as hf
from tccp.face.regions import region_mask

__all__ = ["HeadWarper", "HEAD_DILATE", "HEAD_FEATHER", "EYES", "eye_openness", "open_eyes"]

HEAD_DILATE = 0.03  # fraction of the face height: the head region's margin
HEAD_FEATHER = 0.03


def _eyes() -> tuple[int, ...]:
    from tccp.face.sketch import SKETCH_PARTS

    parts = ("left_eye", "right_eye", "left_iris", "right_iris")
    return tuple(sorted({i for p in parts for e in SKETCH_PARTS[p] for i in e}))


EYES = _eyes()
_LIDS = ((159, 145, 33, 133), (386, 374, 362, 263))  # upper lid, lower lid, corners


def eye_openness(meshes: np.ndarray) -> np.ndarray:
    """(K, 478, 2) -> (K,) mean lid gap over eye width of both eyes."""
    m = np.asarray(meshes, np.float64)
    out = [np.linalg.norm(m[:, u] - m[:, d], axis=-1) / np.maximum(np.linalg.norm(m[:, a] - m[:, b], axis=-1), 1e-9)
           for u, d, a, b in _LIDS]
    return np.mean(out, axis=0)


def open_eyes(meshes: np.ndarray, ratio: float = 0.7) -> np.ndarray:
    """(K,) bool: references whose eyes are open (at least `ratio` x the bank's median
    openness); all True if that would leave none."""
    o = eye_openness(meshes)
    ok = o >= ratio * np.median(o)
    return ok if ok.any() else np.ones(len(o), bool)


def _inner_feather(mask: np.ndarray, sigma: float) -> np.ndarray:
    """A soft version of `mask` whose edge lies inside it (eroded by 2 sigma, then
    blurred): a feather that spreads outwards would paste the reference's background
    around its hair as a halo."""
    r = max(1, int(round(2 * sigma)))
    core = cv2.erode((mask > 0.5).astype(np.float32), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2))
    return cv2.GaussianBlur(core, (0, 0), sigma)


class HeadWarper:
    """Per frame: the best reference warped onto the target head, pasted into the crop."""

    def __init__(self, template: np.ndarray, size: int) -> None:
        from tccp.face.sketch import SKETCH_INDICES
        from tccp.face.warp import triangulate

        self.template = np.asarray(template, np.float32)
        self.size = int(size)
        self.tri = triangulate(self.template, SKETCH_INDICES)
        from tccp.face.segment import PersonSegmenter

        self.segmenter = PersonSegmenter()
        # the hair fades out over the crop's outer 8 %: a reference's hair cut by its own
        # crop would otherwise end in a straight line
        ramp = np.clip(np.minimum(np.arange(self.size) + 0.5, self.size - np.arange(self.size) - 0.5)
                       / (0.08 * self.size), 0.0, 1.0).astype(np.float32)
        self.border = np.minimum(ramp[:, None], ramp[None, :])

    def hair_mask(self, bank, j: int) -> np.ndarray:
        """Reference `j`'s head with its hair (crop px, float), once per reference."""
        from tccp.face.segment import head_with_hair

        cache = bank.__dict__.setdefault("_head_hair", {})
        if j not in cache:
            cache[j] = head_with_hair(self.segmenter(bank.crops[j]), bank.meshes[j])
        return cache[j]

    def inputs(self, crops: np.ndarray, targets: np.ndarray, sources: np.ndarray, bank, prev_ref: int = -1
               ) -> dict[str, np.ndarray]:
        """crops (n, S, S, 3) source crops, targets / sources (n, 478, 2) crop px ->
        `faces` (n, S, S, 3) the crops with the warped head pasted, `mask` (n, S, S) the
        head region, `ref` (n,) the reference used, `sketches` (n, S, S, 3), `targets`
        (n, 478, 2) the landmarks warped to (the eyes the reference's)."""
        from tccp.face.sketch import draw_sketch
        from tccp.face.warp import warp_images
        from tccp.pipelines.faces import REF_MAX_DEFICIT, REF_MAX_EXCESS, REF_STICK

        heads, pose = hf.to_head(np.asarray(targets, np.float32), self.template)
        # the mouth's gap rules as in mouth mode: a closed reference stretched open (or an
        # open one squeezed shut) shows the same slab (or pale band) on a whole head
        ref = bank.choose(heads, prev_ref, REF_STICK, allowed=open_eyes(bank.meshes), max_deficit=REF_MAX_DEFICIT,
                          max_excess=REF_MAX_EXCESS)
        ref_heads, _ = hf.to_head(np.asarray(bank.meshes, np.float32), self.template)
        eyes = list(EYES)
        heads[:, eyes] = ref_heads[np.asarray(ref, int)][:, eyes]
        targets = np.array(targets, np.float32, copy=True)
        targets[:, eyes] = hf.to_image(heads, pose)[:, eyes]
        s = self.size
        faces, masks, sketches = [], [], []
        for k in range(len(crops)):
            j = int(ref[k])
            warped, hair = warp_images([bank.crops[j], self.hair_mask(bank, j)], self.tri, bank.meshes[j], targets[k],
                                       align=True, pictures=(True, False))  # one map for the head and its hair mask
            m = region_mask([sources[k], targets[k]], (s, s), "head", dilate=HEAD_DILATE, feather=HEAD_FEATHER)
            m = np.maximum(m, _inner_feather(hair, HEAD_FEATHER * s) * self.border)
            out = crops[k].astype(np.float32) * (1 - m[..., None]) + warped.astype(np.float32) * m[..., None]
            faces.append(np.clip(out + 0.5, 0, 255).astype(np.uint8))
            masks.append(m)
            sketches.append(draw_sketch(targets[k], s))
        return {"faces": np.stack(faces), "mask": np.stack(masks), "ref": np.asarray(ref), "sketches": np.stack(sketches),
                "targets": targets}
