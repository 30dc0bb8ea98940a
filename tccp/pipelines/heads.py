"""Stage 2 at inference, head mode (`--region head`): the whole head from the references.

TCCP's setting: the head is regenerated inside the context, expression and pose
following stage 1's head mode. No head-mode stage-2 network is trained (the CPU went to
mouth mode, where the measured gain is), so this is the warp path alone: per frame the
bank reference whose lips best match the target, moved onto the target head by a
similarity fitted on the skull points and then a piecewise-affine warp over the sketch
mesh (`tccp.face.warp.warp_map(align=True)`), pasted into the source crop under the
head region (union of the source's and the target's, so the source head disappears
where the generated one moved away from it). Eyes, brows and the mouth interior come
from the chosen reference: a blink or teeth that no reference shows cannot appear.
"""

from __future__ import annotations

import numpy as np

from tccp.face import headframe as hf
from tccp.face.regions import region_mask

__all__ = ["HeadWarper", "HEAD_DILATE", "HEAD_FEATHER"]

HEAD_DILATE = 0.03  # fraction of the face height: the head region's margin
HEAD_FEATHER = 0.03


class HeadWarper:
    """Per frame: the best reference warped onto the target head, pasted into the crop."""

    def __init__(self, template: np.ndarray, size: int) -> None:
        from tccp.face.sketch import SKETCH_INDICES
        from tccp.face.warp import triangulate

        self.template = np.asarray(template, np.float32)
        self.size = int(size)
        self.tri = triangulate(self.template, SKETCH_INDICES)

    def inputs(self, crops: np.ndarray, targets: np.ndarray, sources: np.ndarray, bank, prev_ref: int = -1
               ) -> dict[str, np.ndarray]:
        """crops (n, S, S, 3) source crops, targets / sources (n, 478, 2) crop px ->
        `faces` (n, S, S, 3) the crops with the warped head pasted, `mask` (n, S, S) the
        head region, `ref` (n,) the reference used, `sketches` (n, S, S, 3)."""
        from tccp.face.sketch import draw_sketch
        from tccp.face.warp import warp_image
        from tccp.pipelines.faces import REF_STICK

        heads, _ = hf.to_head(np.asarray(targets, np.float32), self.template)
        ref = bank.choose(heads, prev_ref, REF_STICK)
        s = self.size
        faces, masks, sketches = [], [], []
        for k in range(len(crops)):
            j = int(ref[k])
            warped = warp_image(bank.crops[j], self.tri, bank.meshes[j], targets[k], align=True)
            m = region_mask([sources[k], targets[k]], (s, s), "head", dilate=HEAD_DILATE, feather=HEAD_FEATHER)
            out = crops[k].astype(np.float32) * (1 - m[..., None]) + warped.astype(np.float32) * m[..., None]
            faces.append(np.clip(out + 0.5, 0, 255).astype(np.uint8))
            masks.append(m)
            sketches.append(draw_sketch(targets[k], s))
        return {"faces": np.stack(faces), "mask": np.stack(masks), "ref": np.asarray(ref), "sketches": np.stack(sketches)}
