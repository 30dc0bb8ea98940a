"""A session's reference bank: frames of the person to warp the mouth from.

Stage 2 in mouth mode starts from a real picture of the person's mouth in the shape
it has to show. The bank holds up to `size` frames that span the person's mouth
openings with typical shapes (a rest shape, then one representative per aperture
range: `select_references`), each as a model-size crop with its landmarks plus a
sharper crop of the same box at the source resolution (for detail transfer when
pasting).

Files pre-scan the context video (`scan_video`: frames spread over the clip, so the
bank covers the shapes the person makes); live sessions pool candidates from their
first ~10 s and re-choose the bank as the pool grows (`BankBuilder`). An avatar
brings its own bank.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tccp.face import geometry as fg
from tccp.face import headframe as hf
from tccp.pipelines.faces import ReferenceBank, crop_sharpness, select_references

__all__ = ["BankBuilder", "scan_video", "select_references", "HIRES_MAX"]

HIRES_MAX = 512  # side of the source-resolution crops kept for detail transfer
BANK_SIZE = 8
"""References per person (a file's pre-scan, a call's growing bank, the suite's). 12 and
16 were measured (6 clips outside the validation set, generated landmarks): output
mouth r 0.653 (8) / 0.662 (12) / 0.649 (16), mouth-box PSNR 24.32 / 24.14 / 24.33 dB:
within noise, so the bank stays at 8 (docs/faces.md "Which reference draws a small
opening")."""


def hires_size(box) -> int:
    side = float(box[2] - box[0])
    return int(np.clip(round(side / 8) * 8, 128, HIRES_MAX))


class BankBuilder:
    """A bank that grows with a live session: the first `size` offered frames, then
    every `every`-th, join a pool of up to `pool` candidates (with the session offering every other tracked
    frame, 40 x 3 spans ~10 s), and the bank is re-chosen from the pool by
    `select_references` whenever the pool has grown by a quarter (every frame while it
    is smaller than the bank). A call thus edits from its first frame and ends up with
    the same kind of bank as a file's pre-scan, instead of keeping whatever distinct
    shapes its first second showed (outliers included). When the pool is complete the
    builder lets its images go (the bank holds the chosen ones)."""

    def __init__(self, template: np.ndarray, size: int | None = None, crop: int = 128, pool: int = 40, every: int = 3,
                 own: bool = False) -> None:
        self.template = template
        self.own = own  # the frames are the edited video's own (ReferenceBank.own)
        self.size = BANK_SIZE if size is None else size
        self.crop = crop
        self.pool = max(int(pool), 1)
        self.every = max(int(every), 1)
        self.offered = 0
        self.crops: list[np.ndarray] = []
        self.meshes: list[np.ndarray] = []
        self.hires: list[np.ndarray] = []
        self.heads: list[np.ndarray] = []
        self.sharp: list[float] = []
        self.picks: list[int] = []
        self._built = 0
        self.complete = False  # the pool is full and the final bank chosen
        self.bank: ReferenceBank | None = None

    @property
    def full(self) -> bool:
        return self.complete

    def offer(self, frame: np.ndarray, landmarks_px: np.ndarray, box) -> bool:
        """Consider one tracked frame (source px landmarks, face box); True if the bank
        changed."""
        if self.full:
            return False
        if len(self.crops) >= self.size:  # the first `size` offers are all taken (a call's first window
            self.offered += 1             # fixes stage 1's reference shapes from them)
            if self.offered % self.every:
                return False
        mesh = fg.to_crop_coords(landmarks_px, box, self.crop)
        heads, _ = hf.to_head(mesh[None], self.template)
        crop = fg.crop(frame, box, self.crop)
        self.crops.append(crop)
        self.meshes.append(mesh.astype(np.float32))
        self.hires.append(fg.crop(frame, box, hires_size(box)))
        self.heads.append(heads[0])
        self.sharp.append(crop_sharpness(crop))
        n = len(self.crops)
        last = n >= self.pool
        changed = False
        if n <= self.size or n >= 1.25 * self._built or last:
            changed = self._rebuild()
        if last:
            self.complete = True
            self.crops, self.hires = [], []  # the bank keeps its own copies of the chosen images
        return changed

    def _rebuild(self) -> bool:
        """Re-choose the bank from the pool; True if the choice changed."""
        picks = select_references(np.stack(self.heads), self.size, sharpness=np.asarray(self.sharp))
        self._built = len(self.crops)
        if self.bank is not None and picks == self.picks:
            return False
        self.picks = picks
        version = 0 if self.bank is None else self.bank.version + 1
        self.bank = _bank(picks, self.crops, self.meshes, self.heads, self.hires, self.own)
        self.bank.ids = list(picks)
        self.bank.version = version
        return True

    @classmethod
    def from_frames(cls, frames, landmarks_px, boxes, template, size: int | None = None, crop: int = 128,
                    selection: str | None = None, own: bool = False) -> "BankBuilder":
        """A bank from many candidate frames at once (`select_references`; `size` None:
        `BANK_SIZE`; `own`: frames of the video being edited, `ReferenceBank.own`)."""
        b = cls(template, size, crop, own=own)
        meshes = np.stack([fg.to_crop_coords(lm, bx, crop) for lm, bx in zip(landmarks_px, boxes)])
        heads, _ = hf.to_head(meshes, template)
        crops = [fg.crop(f, bx, crop) for f, bx in zip(frames, boxes)]
        picks = select_references(heads, b.size, selection, sharpness=np.array([crop_sharpness(c) for c in crops]))
        hires = {j: fg.crop(frames[j], boxes[j], hires_size(boxes[j])) for j in picks}
        b.bank = _bank(picks, crops, meshes, heads, hires, own)
        b.picks = list(picks)  # the chosen frames' indices among the candidates
        return b


def _bank(picks: list[int], crops, meshes, heads, hires, own: bool = False) -> ReferenceBank:
    """The `ReferenceBank` of the chosen candidates (`picks` index every argument)."""
    return ReferenceBank(np.stack([crops[j] for j in picks]), np.stack([meshes[j] for j in picks]).astype(np.float32),
                         np.stack([heads[j][list(hf.LIPS)].reshape(-1) for j in picks]), [hires[j] for j in picks],
                         own=own)


def scan_video(video: str | Path, template: np.ndarray, size: int | None = None, crop: int = 128, samples: int = 48,
               fps: float = 25.0, max_seconds: float = 120.0, start_s: float = 0.0) -> BankBuilder | None:
    """A bank from `samples` frames spread over `video` from `start_s` to at most
    `max_seconds` later (tracked one by one); None when no sampled frame has a face."""
    from tccp.face.track import FaceTracker, FaceTrackerConfig
    from tccp.media import io as media

    info = media.probe(video)
    first = int(round(start_s * fps))
    n = max(first + 1, int(min(info.duration, start_s + max_seconds) * fps))
    want = set(np.linspace(first, n - 1, min(samples, n - first)).round().astype(int).tolist())
    frames, lms, boxes = [], [], []
    with FaceTracker(FaceTrackerConfig(fps=fps)) as tr:
        # only the sampled frames are converted to RGB (media.iter_video's keep)
        for i, (_, frame) in enumerate(media.iter_video(video, fps=fps, max_frames=n, keep=want)):
            if frame is None:
                continue
            tr.reset() if hasattr(tr, "reset") else None
            obs = tr.update(frame)
            if obs is not None:
                frames.append(frame)
                lms.append(obs.landmarks)
                boxes.append(obs.face_box)
    if not frames:
        return None
    return BankBuilder.from_frames(frames, np.stack(lms), np.stack(boxes), template, size, crop, own=True)


def bank_from_image(image: np.ndarray, template: np.ndarray, crop: int = 128, name: str = "identity image") -> ReferenceBank:
    """A one-frame bank from a still image of the person (`--identity`)."""
    from tccp.errors import TCCPError
    from tccp.face.track import FaceTracker

    img = np.ascontiguousarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise TCCPError(f"{name}: not a colour image")
    if min(img.shape[:2]) < 64:
        raise TCCPError(f"{name}: too small ({img.shape[1]}x{img.shape[0]} px; at least 64 px)")
    with FaceTracker() as tr:
        obs = tr.update(img)
    if obs is None:
        raise TCCPError(f"{name}: no face found")
    b = BankBuilder.from_frames([img], obs.landmarks[None], np.asarray(obs.face_box)[None], template, 1, crop)
    return b.bank
