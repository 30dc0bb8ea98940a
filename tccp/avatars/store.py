"""Avatar packs: a person's fine-tuned model plus their reference images.

An avatar is a folder that is at the same time a model pack (`tccp.pack`: config.json,
stage1/stage2.safetensors, both stages fine-tuned on the person) and holds

    refs/ref_00.png ...   reference face crops at the pack's crop size (what the
                          identity encoder sees), covering poses and mouth shapes
    avatar.json           format/version, name, sources, references (file, source
                          frame, pose/mouth features, sketch pose), training summary,
                          validation numbers
    AVATAR_CARD.md        the same for people: data used, steps, validation vs the
                          base pack

`tccp avatar create` (tccp.avatars.create) writes one; `tccp run/serve/demo --avatar
NAME_OR_DIR` loads it: NAME resolves to ./avatars/NAME, then ~/.tccp/avatars/NAME.
Anything wrong with an avatar is a one-line `TCCPError` naming the file.
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
    "Avatar",
    "avatar_roots",
    "valid_name",
    "resolve_avatar",
    "load_avatar",
    "list_avatars",
]

AVATAR_FORMAT = "tccp-avatar"
AVATAR_VERSION = 1
AVATAR_FILE = "avatar.json"
CARD_FILE = "AVATAR_CARD.md"
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
    meta = read_descriptor(path, AVATAR_FORMAT, AVATAR_VERSION, missing=f"{folder} is not an avatar pack",
                           unreadable="avatar description", not_a="TCCP avatar description", noun="avatar")
    refs = meta.get("refs")
    if not isinstance(refs, list) or not refs or not all(isinstance(r, dict) and "file" in r for r in refs):
        raise TCCPError(f"{path}: lists no reference images")
    return meta


def _read_ref(path: Path, size: int) -> np.ndarray:
    import cv2

    if not path.is_file():
        raise TCCPError(f"{path}: reference image missing from the avatar")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise TCCPError(f"{path}: reference image is unreadable (corrupt or not an image)")
    if img.shape[:2] != (size, size):
        raise TCCPError(f"{path}: reference image is {img.shape[1]}x{img.shape[0]}, the avatar's model works at {size}x{size}")
    return np.ascontiguousarray(img[:, :, ::-1])


@dataclass
class Avatar:
    path: Path
    name: str
    meta: dict[str, Any]
    refs: np.ndarray
    """(K, S, S, 3) uint8 RGB reference face crops, the most typical first."""
    poses: np.ndarray
    """(K, 2) sketch-pose proxies of the references (NaN where unknown)."""
    pack_config: dict[str, Any] = field(default_factory=dict)

    @property
    def crop_size(self) -> int:
        return int(self.refs.shape[1])

    def bank(self) -> Any:
        """The references as the engine uses them (`tccp.avatars.refs.ReferenceBank`)."""
        from tccp.avatars.refs import ReferenceBank

        return ReferenceBank(self.refs, self.poses)

    def summary(self) -> dict[str, Any]:
        """What listings show: name, folder, references, creation, base, validation."""
        return {
            "name": self.name,
            "path": str(self.path),
            "refs": int(len(self.refs)),
            "created": self.meta.get("created"),
            "base_pack": (self.meta.get("base_pack") or {}).get("name"),
            "validation": self.meta.get("validation", {}).get("summary"),
        }


def load_avatar(name_or_dir: str | os.PathLike, roots: Sequence[Path] | None = None,
                allow_path: bool = True) -> Avatar:
    """Resolve and check an avatar (description, references, pack config and weight
    files); weights themselves are read by `tccp.pack.load_pack(avatar.path)`."""
    from tccp.pack import read_pack_config

    folder = resolve_avatar(name_or_dir, roots, allow_path)
    meta = _read_meta(folder)
    config = read_pack_config(folder)
    for stage in ("stage1", "stage2"):
        if not (folder / f"{stage}.safetensors").is_file():
            raise TCCPError(f"{folder / f'{stage}.safetensors'}: missing from the avatar's model pack")
    size = int(config.get("crop_size") or 128)
    refs = np.stack([_read_ref(folder / str(r["file"]), size) for r in meta["refs"]])
    poses = np.full((len(refs), 2), np.nan)
    for i, r in enumerate(meta["refs"]):
        sp = r.get("sketch_pose")
        if isinstance(sp, (list, tuple)) and len(sp) == 2 and all(isinstance(v, (int, float)) for v in sp):
            poses[i] = sp
    name = str(meta.get("name") or folder.name)
    return Avatar(folder, name, meta, refs, poses, config)


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
