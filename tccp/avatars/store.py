"""Avatars on disk: a model pack plus the person's reference bank.

An avatar is a folder that is at the same time a model pack (`tccp.pack`: config.json,
stage1.safetensors, and stage2.safetensors unless the pack is warp-only) and holds

    refs/ref_00.png ...   reference face crops at the pack's crop size (the frames
                          stage 2 warps onto the target landmarks), chosen to cover
                          the person's mouth shapes
    refs/hires_00.png ... the same boxes at the source resolution (square, up to
                          512 px): the high frequencies pasted back into the frame
    refs/meshes.npy       (K, 478, 2) float32 landmarks of the references, crop px
    avatar.json           format "tccp-avatar" version 2: name, created, crop size,
                          base pack, fine-tuned or not, sources, references,
                          training summary, validation numbers
    AVATAR_CARD.md        the same for people

The pack is either a copy of the base pack (a "bank-only" avatar: the person's
references with the base pack's weights) or the base pack's stage 1 with a stage 2
fine-tuned on the person's footage. `tccp avatar create` (tccp.avatars.create) writes
one; `tccp run/serve/demo --avatar NAME_OR_DIR` loads it: NAME resolves to
./avatars/NAME, then ~/.tccp/avatars/NAME. Anything wrong with an avatar is a one-line
`TCCPError` naming the file. Version-1 avatars (a fine-tuned whole-head model with
head-pose references) are refused with one line naming the version.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tccp.errors import TCCPError
from tccp.io_utils import read_descriptor

__all__ = [
    "AVATAR_FORMAT",
    "AVATAR_VERSION",
    "AVATAR_FILE",
    "CARD_FILE",
    "MESHES_FILE",
    "Avatar",
    "avatar_roots",
    "valid_name",
    "resolve_avatar",
    "load_avatar",
    "list_avatars",
]

AVATAR_FORMAT = "tccp-avatar"
AVATAR_VERSION = 2
AVATAR_FILE = "avatar.json"
CARD_FILE = "AVATAR_CARD.md"
MESHES_FILE = "refs/meshes.npy"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def avatar_roots() -> list[Path]:
    """Where avatar names are looked up, in order: ./avatars, ~/.tccp/avatars."""
    return [Path.cwd() / "avatars", Path.home() / ".tccp" / "avatars"]


def valid_name(name: str) -> bool:
    """Names are plain folder names (letters, digits, . _ -), never paths."""
    return bool(_NAME.match(name)) and name not in (".", "..")


def resolve_avatar(name_or_dir: str | os.PathLike, roots: Sequence[Path] | None = None,
                   allow_path: bool = True) -> Path:
    """The folder of an avatar given by name (looked up under `roots`) or, with
    `allow_path`, by folder path. Raises TCCPError when there is none."""
    text = str(name_or_dir)
    p = Path(text).expanduser()
    looks_like_path = os.sep in text or "/" in text or text.startswith(".") or p.is_dir()
    if allow_path and looks_like_path:
        if not p.is_dir():
            raise TCCPError(f"{p}: avatar not found (no such folder)")
        return p
    if not valid_name(text):
        raise TCCPError(f"avatar {text!r}: not a valid avatar name (letters, digits, '.', '_', '-')")
    search = list(roots) if roots is not None else avatar_roots()
    for root in search:
        cand = Path(root) / text
        if cand.is_dir():
            return cand
    where = ", ".join(str(Path(r) / text) for r in search) or "no avatar folders"
    raise TCCPError(f"avatar {text!r}: not found (looked in {where}); create it with `tccp avatar create`")


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / AVATAR_FILE
    meta = read_descriptor(path, AVATAR_FORMAT, AVATAR_VERSION, missing=f"{folder} is not an avatar",
                           unreadable="avatar description", not_a="TCCP avatar description", noun="avatar")
    version = meta.get("version")
    if version == 1:
        raise TCCPError(f"{path}: a version 1 avatar (fine-tuned whole-head model with head-pose references) from "
                        f"before the mouth editor; this tccp reads version {AVATAR_VERSION} avatars: recreate it "
                        "with `tccp avatar create`")
    if version != AVATAR_VERSION:
        raise TCCPError(f"{path}: avatar version {version!r} is not one this tccp reads (version {AVATAR_VERSION})")
    refs = meta.get("refs")
    if not isinstance(refs, list) or not refs or not all(isinstance(r, dict) and "file" in r and "hires" in r
                                                         for r in refs):
        raise TCCPError(f"{path}: lists no reference images")
    return meta


def _read_image(path: Path, what: str) -> np.ndarray:
    import cv2

    if not path.is_file():
        raise TCCPError(f"{path}: {what} missing from the avatar")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise TCCPError(f"{path}: {what} is unreadable (corrupt or not an image)")
    return np.ascontiguousarray(img[:, :, ::-1])


def _read_meshes(path: Path, k: int, size: int) -> np.ndarray:
    if not path.is_file():
        raise TCCPError(f"{path}: reference landmarks missing from the avatar")
    try:
        meshes = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TCCPError(f"{path}: reference landmarks are unreadable ({first})") from None
    if meshes.shape != (k, 478, 2) or not np.issubdtype(meshes.dtype, np.floating):
        raise TCCPError(f"{path}: reference landmarks have shape {meshes.shape}, expected ({k}, 478, 2) floats")
    if not np.isfinite(meshes).all() or np.abs(meshes).max() > 4 * size:
        raise TCCPError(f"{path}: reference landmarks are not crop coordinates (NaN or far outside the crop)")
    return meshes.astype(np.float32)


@dataclass
class Avatar:
    path: Path
    name: str
    meta: dict[str, Any]
    crops: np.ndarray
    """(K, S, S, 3) uint8 RGB reference face crops at the pack's crop size."""
    meshes: np.ndarray
    """(K, 478, 2) float32 their landmarks in crop px."""
    hires: list[np.ndarray]
    """Per reference the same box at the source resolution, (H, H, 3) uint8."""
    pack_config: dict[str, Any] = field(default_factory=dict)

    @property
    def crop_size(self) -> int:
        return int(self.crops.shape[1])

    @property
    def fine_tuned(self) -> bool:
        return bool(self.meta.get("fine_tuned"))

    def __len__(self) -> int:
        return int(len(self.crops))

    def bank(self, template: np.ndarray) -> Any:
        """The references as the engine uses them: a `tccp.pipelines.faces.ReferenceBank`
        whose lip shapes are measured in the head frame of `template` (the pack's)."""
        from tccp.pipelines.faces import ReferenceBank

        return ReferenceBank.build(self.crops, self.meshes, template, self.hires)

    def summary(self) -> dict[str, Any]:
        """What listings show: name, folder, references, creation, base, validation."""
        return {
            "name": self.name,
            "path": str(self.path),
            "refs": len(self),
            "created": self.meta.get("created"),
            "fine_tuned": self.fine_tuned,
            "base_pack": (self.meta.get("base_pack") or {}).get("name"),
            "validation": (self.meta.get("validation") or {}).get("summary"),
        }


def load_avatar(name_or_dir: str | os.PathLike, roots: Sequence[Path] | None = None,
                allow_path: bool = True) -> Avatar:
    """Resolve and check an avatar (description, reference bank, pack config and weight
    files); weights themselves are read by `tccp.pack.load_pack(avatar.path)`."""
    from tccp.pack import read_pack_config

    folder = resolve_avatar(name_or_dir, roots, allow_path)
    meta = _read_meta(folder)
    config = read_pack_config(folder)
    stages = ["stage1"] + (["stage2"] if config.get("stage2") is not None else [])
    for stage in stages:
        if not (folder / f"{stage}.safetensors").is_file():
            raise TCCPError(f"{folder / f'{stage}.safetensors'}: missing from the avatar's model pack")
    size = int(config.get("crop_size") or 128)
    crops, hires = [], []
    for r in meta["refs"]:
        crop = _read_image(folder / str(r["file"]), "reference image")
        if crop.shape[:2] != (size, size):
            raise TCCPError(f"{folder / str(r['file'])}: reference image is {crop.shape[1]}x{crop.shape[0]}, "
                            f"the avatar's model works at {size}x{size}")
        big = _read_image(folder / str(r["hires"]), "reference image")
        if big.shape[0] != big.shape[1] or big.shape[0] < size:
            raise TCCPError(f"{folder / str(r['hires'])}: source-resolution reference is {big.shape[1]}x"
                            f"{big.shape[0]}, expected a square of at least {size} px")
        crops.append(crop)
        hires.append(big)
    meshes = _read_meshes(folder / str(meta.get("meshes") or MESHES_FILE), len(crops), size)
    name = str(meta.get("name") or folder.name)
    return Avatar(folder, name, meta, np.stack(crops), meshes, hires, config)


def list_avatars(roots: Sequence[Path] | None = None) -> list[dict[str, Any]]:
    """Installed avatars under `roots` (default `avatar_roots()`), by name; a name in
    an earlier root hides the same name later. Broken folders are listed with an
    `error` (one line) so `tccp avatar list` can say what is wrong."""
    seen: dict[str, dict[str, Any]] = {}
    for root in list(roots) if roots is not None else avatar_roots():
        root = Path(root)
        if not root.is_dir():
            continue
        for folder in sorted(root.iterdir()):
            if not folder.is_dir() or folder.name.startswith(".") or folder.name in seen:
                continue
            if not valid_name(folder.name) or not (folder / AVATAR_FILE).exists():
                continue
            try:
                info = load_avatar(folder).summary()
                info["name"] = folder.name  # the name it is selected by
                info["ok"] = True
            except TCCPError as exc:
                info = {"name": folder.name, "path": str(folder), "ok": False, "error": str(exc)}
            seen[folder.name] = info
    return list(seen.values())
