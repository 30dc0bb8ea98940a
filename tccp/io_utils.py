"""Atomic output paths.

Every file or folder the project writes goes through here so that an interrupted run
(exception, Ctrl-C, full disk) never leaves a half-written output under the final name:
readers either see the old file, nothing, or the complete new one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
import json
from typing import Any, Iterator

from tccp.errors import TCCPError

__all__ = ["atomic_path", "atomic_dir", "ensure_writable_dir"]


def _umask() -> int:
    # mkstemp/mkdtemp create private (0600/0700) entries; outputs should get the
    # permissions a plain open() would have given them
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def ensure_writable_dir(path: str | os.PathLike, *, name: str | os.PathLike | None = None) -> Path:
    """Create `path` (a folder) if needed and check we can write into it.

    Checked up front so that a long job fails in the first second instead of after
    hours of work. `name` is what the error message mentions (the output file).
    """
    folder = Path(path)
    shown = name if name is not None else folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        raise TCCPError(f"{shown}: output folder is not writable") from None
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise TCCPError(f"{shown}: output folder is not writable")
    return folder


def _split_suffix(name: str) -> tuple[str, str]:
    # keep the whole extension (".tar.gz" stays readable to tools that sniff the suffix)
    p = Path(name)
    suffix = "".join(p.suffixes) if p.suffixes else ""
    stem = name[: len(name) - len(suffix)] if suffix else name
    return stem, suffix


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` on success.

    The temp file lives in the same folder (same filesystem, so the rename is atomic)
    and keeps the suffix, because writers such as ffmpeg pick the format from it:
    `out.mp4` -> `.out.tmp-XXXX.mp4`. On an exception the temp file is removed and
    `path` is left untouched.
    """
    final = Path(path)
    if final.is_dir():
        raise TCCPError(f"{final}: is a folder, expected a file path")
    folder = ensure_writable_dir(final.parent if str(final.parent) else Path("."), name=final)
    stem, suffix = _split_suffix(final.name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: writer produced no file")
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; it replaces `path` on success.

    Used for multi-file outputs (prepared clips, model packs) whose consumers treat
    the folder's existence as "complete". An existing `path` is replaced only after
    the new one is fully built.
    """
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise TCCPError(f"{final}: exists and is not a folder")
    parent = ensure_writable_dir(final.parent if str(final.parent) else Path("."), name=final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if final.exists():
            # move the old one aside first so the swap window is as small as possible
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=parent))
            os.replace(final, old / "x")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_descriptor(
    path: Path, fmt: str, version: int, *, missing: str, unreadable: str, not_a: str, noun: str
) -> dict[str, Any]:
    """A versioned JSON descriptor (pack config, avatar, export manifest), checked.

    Every problem is one TCCPError line naming the file: "<path>: missing, <missing>",
    "<path>: unreadable <unreadable> (...)", "<path>: not a <not_a>", or the
    <noun> version being newer than this tccp supports.
    """
    if not path.is_file():
        raise TCCPError(f"{path}: missing, {missing}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TCCPError(f"{path}: unreadable {unreadable} ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise TCCPError(f"{path}: not a {not_a}")
    if int(data.get("version", 0)) > version:
        raise TCCPError(f"{path}: {noun} version {data.get('version')} is newer than this tccp supports")
    return data
