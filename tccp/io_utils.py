"""Atomic outputs, and the one guard every writer goes through.

Every file or folder the project writes goes through here so that an interrupted run
(exception, Ctrl-C, SIGTERM, full disk) never leaves a half-written output under the
final name: readers either see the old file, nothing, or the complete new one.

And so that no command destroys what it did not write (`guard_output`, also applied
by `atomic_dir` itself):

- an output path that is one of the run's inputs (after resolving relative paths,
  `~` and symlinks, or a hard link to it) is refused;
- a folder output never replaces a folder that tccp did not write. A folder written by
  `atomic_dir` carries a small marker, `.tccp-output` (JSON: the command and the
  entries it wrote); a later run of the same command may replace those entries and
  nothing else. An existing non-empty folder without a marker of that command is
  refused with one line, unless it is an earlier tccp output from before markers (it
  holds a tccp descriptor, or only names the command writes), or `force` is given: then
  the new entries are added beside the folder's own, which stay untouched (a name
  clash is still an error);
- a folder output may not contain an input.

Commands call `guard_output` (or `claim_dir` for folders they write into file by file)
before any work, so a refusal costs a second, not an hour; the policy they approve
(kind, force) is remembered for that path, and `atomic_dir` enforces it again when it
installs the result.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from tccp.errors import TCCPError

__all__ = [
    "atomic_path",
    "save_png",
    "atomic_dir",
    "ensure_writable_dir",
    "guard_output",
    "claim_dir",
    "command_scope",
    "read_marker",
    "MARKER",
]

MARKER = ".tccp-output"
MARKER_FORMAT = "tccp-output"
GENERIC = "tccp"  # the kind of outputs written by library calls outside any command
# descriptors of outputs written before markers existed: (file, "format" value prefix)
_LEGACY_DESCRIPTORS = ("meta.json", "manifest.json", "config.json", "avatar.json", "state.json")


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


# --------------------------------------------------------------------------- the guard


@dataclass(frozen=True)
class _Policy:
    kind: str
    force: bool
    inputs: tuple[Path, ...]
    known: frozenset[str]


_COMMAND: list[str] = []  # stack of the running command's names (tccp.cli)
_APPROVED: dict[Path, _Policy] = {}  # resolved output path -> what its command allowed


@contextlib.contextmanager
def command_scope(name: str) -> Iterator[None]:
    """Outputs written meanwhile belong to command `name` (their marker says so)."""
    _COMMAND.append(name)
    try:
        yield
    finally:
        _COMMAND.pop()
        if not _COMMAND:
            _APPROVED.clear()


def _kind(kind: str | None) -> str:
    return kind or (_COMMAND[-1] if _COMMAND else GENERIC)


def _resolve(path: str | os.PathLike) -> Path:
    """Absolute, `~` expanded, symlinks (of the parts that exist) followed."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path)))).resolve()


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def read_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The `.tccp-output` marker of a folder tccp wrote, or None."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT or not isinstance(data.get("command"), str):
        return None
    return data


def _write_marker(folder: Path, kind: str, entries: Iterable[str] | None) -> None:
    data: dict[str, Any] = {"format": MARKER_FORMAT, "version": 1, "command": kind,
                            "entries": None if entries is None else sorted(entries)}
    (folder / MARKER).write_text(json.dumps(data) + "\n")
    os.chmod(folder / MARKER, 0o666 & ~_UMASK)


def _legacy_output(folder: Path) -> bool:
    """A folder tccp wrote before markers existed: it holds a tccp descriptor."""
    for name in _LEGACY_DESCRIPTORS:
        p = folder / name
        if not p.is_file():
            continue
        if name == "state.json":
            if (folder / "ema.safetensors").is_file():  # a training checkpoint
                return True
            continue
        try:
            fmt = json.loads(p.read_text()).get("format")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
        if isinstance(fmt, str) and fmt.startswith("tccp"):
            return True
    return False


def _compatible(a: str, b: str) -> bool:
    return a == b or GENERIC in (a, b)


def _is_temp(name: str) -> bool:
    """A temp entry of these writers (`.NAME.tmp-XXXX`, `.NAME.old-XXXX`) left by a killed run."""
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


def _ownership(folder: Path, kind: str, known: frozenset[str]) -> tuple[str, set[str]]:
    """How an existing folder relates to command `kind`: ("empty" | "ours" | "foreign",
    the entries a new output of `kind` may replace)."""
    entries = {e for e in os.listdir(folder) if not _is_temp(e)}
    if not entries:
        return "empty", set()
    marker = read_marker(folder)
    if marker is not None:
        if not _compatible(marker["command"], kind):
            return "foreign", set()
        listed = marker.get("entries")
        ours = entries if listed is None else (set(listed) & entries) | {MARKER}
        return "ours", ours
    if _legacy_output(folder) or (known and entries <= known):
        return "ours", entries
    return "foreign", set()


def _describe(entries: set[str]) -> str:
    names = sorted(entries)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return shown


def _who(kind: str) -> str:
    return "tccp" if kind == GENERIC else f"`tccp {kind}`"


def _check_folder(final: Path, shown: str, policy: _Policy, flag: str | None) -> None:
    if final.exists() and not final.is_dir():
        raise TCCPError(f"{shown}: exists and is not a folder")
    if not final.is_dir():
        return
    state, ours = _ownership(final, policy.kind, policy.known)
    if state == "foreign" and not policy.force:
        marker = read_marker(final)
        what = (f"holds the output of {_who(marker['command'])}" if marker is not None else
                f"is not empty ({_describe(set(os.listdir(final)))}) and was not written by {_who(policy.kind)}")
        hint = "; choose a new or empty folder" + (
            f", or pass {flag} to add to it (tccp replaces only what it wrote)" if flag else "")
        raise TCCPError(f"{shown}: {what}{hint}")


def _check_inputs(final: Path, shown: str, inputs: Iterable[Path], folder: bool) -> None:
    """The output is no input; a folder output (replaced as a whole) holds no input."""
    for inp in inputs:
        if _same(final, inp):
            same = "" if os.fspath(inp) == os.fspath(final) else f" ({inp})"
            raise TCCPError(f"{shown}: is also an input{same}; choose another output")
        if folder and final in inp.parents:
            raise TCCPError(f"{shown}: holds the input {inp}; choose another output folder")


def guard_output(
    path: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    kind: str | None = None,
    force: bool = False,
    folder: bool = False,
    known: Iterable[str] = (),
    flag: str | None = "--force",
    _claiming: bool = False,
) -> Path:
    """Check, before any work, that writing `path` destroys nothing; returns it resolved.

    `inputs`: files and folders the run reads (None entries are skipped): the output
    may not be one of them (nor, for a folder, contain one). `folder`: the output is a
    folder; an existing non-empty one must be an earlier output of command `kind`
    (default: the running command), or `force` must be given (see the module
    docstring). `known`: the names the command writes into the folder (a marker-less
    folder holding only those is an earlier output). `flag`: the option the error
    suggests for `force` (None: the command has none). The approved policy is
    remembered for `atomic_dir(path)`.
    """
    shown = os.fspath(path)
    final = _resolve(path)
    ins = tuple(_resolve(p) for p in inputs if p is not None and os.fspath(p) != "")
    _check_inputs(final, shown, ins, folder and not _claiming)
    policy = _Policy(_kind(kind), bool(force), ins, frozenset(known))
    if folder:
        _check_folder(final, shown, policy, flag)
    elif final.is_dir():
        raise TCCPError(f"{shown}: is a folder, expected a file path")
    _APPROVED[final] = policy
    return final


def claim_dir(path: str | os.PathLike, **kwargs: Any) -> Path:
    """`guard_output(path, folder=True, ...)`, then create the folder and mark it as an
    output of this command. For folders a command writes into file by file (a training
    run, an eval report, the demo's folder): such a folder is never replaced as a whole,
    so it may hold an input; it must not be one. Returns the path as given."""
    final = guard_output(path, folder=True, _claiming=True, **kwargs)
    policy = _APPROVED[final]
    ensure_writable_dir(path)
    marker = read_marker(final)
    if marker is None or marker.get("command") != policy.kind:
        _write_marker(final, policy.kind, None)
    return Path(path)


# --------------------------------------------------------------------------- atomic writers


def _split_suffix(name: str) -> tuple[str, str]:
    # keep the whole extension (".tar.gz" stays readable to tools that sniff the suffix)
    p = Path(name)
    suffix = "".join(p.suffixes) if p.suffixes else ""
    stem = name[: len(name) - len(suffix)] if suffix else name
    return stem, suffix


def save_png(fig: Any, path: str | os.PathLike, dpi: float | None = None) -> Path:
    """A matplotlib figure written as PNG through `atomic_path` (no half-written plot);
    `dpi` None: the figure's own."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(out) as tmp:
        fig.savefig(str(tmp), format="png", dpi=dpi or fig.dpi)
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` on success.

    The temp file lives in the same folder (same filesystem, so the rename is atomic)
    and keeps the suffix, because writers such as ffmpeg pick the format from it:
    `out.mp4` -> `.out.tmp-XXXX.mp4`. On an exception (KeyboardInterrupt and the CLI's
    SIGTERM included) the temp file is removed and `path` is left untouched. A symlink
    at `path` is written through (its target gets the new content; the link stays).
    """
    final = Path(path)
    if final.is_symlink():
        final = _resolve(final)
    if final.is_dir():
        raise TCCPError(f"{path}: is a folder, expected a file path")
    folder = ensure_writable_dir(final.parent if str(final.parent) else Path("."), name=path)
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


def _holds_cwd(folder: Path) -> bool:
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return False
    return cwd == folder or folder in cwd.parents


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike,
    *,
    kind: str | None = None,
    force: bool | None = None,
    inputs: Iterable[str | os.PathLike | None] = (),
    known: Iterable[str] = (),
) -> Iterator[Path]:
    """Yield a temporary sibling folder; install it as `path` on success.

    Used for multi-file outputs (prepared clips, model packs, exports, checkpoints,
    avatars) whose consumers treat the folder's existence as "complete". The folder
    gets a `.tccp-output` marker listing what was written. An existing `path` must pass
    the guard (see `guard_output`; the policy a command approved for `path` applies,
    else `kind` defaults to the running command and `force` to False), checked before
    the caller's work and again at the end. Installing: a new path or an earlier output
    of the same command is swapped in whole (the old one is moved aside only once the
    new one is complete); a folder that also holds entries tccp did not write (with
    `force`), or the current working folder, is updated in place: only the entries the
    earlier output listed are replaced, nothing else is moved or deleted.
    """
    shown = os.fspath(path)
    final = _resolve(path)
    approved = _APPROVED.get(final)
    policy = _Policy(
        _kind(kind) if kind is not None or approved is None else approved.kind,
        bool(force) if force is not None else (approved.force if approved else False),
        tuple(_resolve(p) for p in inputs if p is not None) + (approved.inputs if approved else ()),
        frozenset(known) | (approved.known if approved else frozenset()),
    )
    _check_inputs(final, shown, policy.inputs, folder=True)
    _check_folder(final, shown, policy, "--force")
    parent = ensure_writable_dir(final.parent, name=shown)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        new = set(os.listdir(tmp)) - {MARKER}
        _write_marker(tmp, policy.kind, new)
        _install(tmp, final, shown, policy, new)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _install(tmp: Path, final: Path, shown: str, policy: _Policy, new: set[str]) -> None:
    if not final.exists() and not final.is_symlink():
        os.replace(tmp, final)
        return
    _check_folder(final, shown, policy, "--force")  # the folder may have changed meanwhile
    state, ours = _ownership(final, policy.kind, policy.known)
    foreign = set(os.listdir(final)) - ours
    clash = sorted(foreign & (new | {MARKER}))
    if clash and not (clash == [MARKER] and state == "foreign"):
        raise TCCPError(f"{shown}: already holds {_describe(set(clash))}, not written by {_who(policy.kind)}; "
                        "nothing was replaced")
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    try:
        if state == "empty" and not _holds_cwd(final):
            os.rmdir(final)
            os.replace(tmp, final)
        elif not foreign and not _holds_cwd(final):
            os.replace(final, old / "x")  # moved aside only now: the swap window is tiny
            os.replace(tmp, final)
        else:
            # in place: move our earlier entries out, the new ones in, the marker last
            for name in sorted(ours | ({MARKER} if state == "foreign" else set())):
                if (final / name).exists() or (final / name).is_symlink():
                    os.replace(final / name, old / name)
            for name in sorted(new):
                os.replace(tmp / name, final / name)
            os.replace(tmp / MARKER, final / MARKER)
            os.rmdir(tmp)
    finally:
        shutil.rmtree(old, ignore_errors=True)


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
