"""Every file difflab writes goes through here: one atomic write, and one rule for what may be replaced.

* :func:`atomic_write` writes under a hidden temporary name beside the target (unique per writer, cut
  to fit the file system's name limit), syncs it, renames it over the target and syncs the folder, so
  a reader never sees half a file and two writers never touch each other's temporary files.
* :func:`check_output` is the rule for a path the user names: never replace a file difflab did not
  create for this purpose (an existing file needs ``--force``), never a folder, and never the files of
  a run folder (only new pictures under its ``samples/``), checked before any work is done.
* :func:`check_run_folder` is the rule for ``difflab train --out``: a new run goes into an empty
  folder or one holding only a difflab run's own entries.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from difflab.errors import UsageError

# what a run folder holds (``difflab train`` writes these and nothing else)
RUN_ENTRIES = frozenset({"config.json", "loss.csv", "loss.png", "samples", "checkpoints", "prompts.safetensors",
                         ".lock", "ema-snapshots", "ema", "tensorboard", "accuracy.json",  # (a classifier's)
                         "grid-bottom.json",  # (difflab.runs.grid_bottom)
                         "distill.json"})  # (difflab.distill: the run a consistency-tuned run started from)
_TRAINING_PICTURES = ("step-", "final.png")  # the grids the trainer writes into samples/


class OutputError(UsageError):
    """An output that cannot or must not be written (exists, is a folder, read-only, disk full...)."""


def name_max(folder: Path) -> int:
    """The longest file name ``folder``'s file system takes (255 where it cannot be asked)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def temp_path(path: Path) -> Path:
    """A hidden temporary name beside ``path``, unique to this writer, that fits the name limit:
    ``.NAME.<random>.tmp`` with NAME shortened when needed."""
    tail = f".{secrets.token_hex(4)}.tmp"
    room = max(1, name_max(path.parent) - len(tail) - 1)
    return path.with_name("." + path.name.encode()[:room].decode(errors="ignore") + tail)


def _sync_folder(folder: Path) -> None:
    try:  # make the rename itself durable (not every file system can open a folder)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _why(e: Exception) -> str:
    """The reason of a failed write in a few words: the OS's, also from inside a safetensors error (which
    wraps the OS error in its own type and text)."""
    if isinstance(e, OSError):
        return e.strerror or e.__class__.__name__
    found = re.search(r'message: "([^"]+)"', str(e))
    return found[1] if found else (str(e).splitlines() or [e.__class__.__name__])[0][:200]


def _write_errors() -> tuple[type[Exception], ...]:
    """What a write that fails (full disk, quota, I/O error) raises: OSError, and safetensors' own error type."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return (OSError,)
    return (OSError, SafetensorError)


def atomic_write(path: str | Path, write: Callable[[Path], object], *, mkdir: bool = True,
                 durable: bool = True) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then rename it to ``path``. The temporary file is
    removed on any failure (also on KeyboardInterrupt); an OSError becomes one-line :class:`OutputError`.
    ``durable=False`` skips the fsyncs (a reader still never sees half a file, but a power cut may lose
    it): for many small files that can be made again, where the syncs would cost more than the writes."""
    path = Path(path)
    tmp = None
    try:
        if mkdir:
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        if durable:
            _sync_folder(path.parent)
    except _write_errors() as e:
        raise OutputError(f"cannot write {path}: {_why(e)}") from e
    finally:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
    return path


def atomic_folder(path: str | Path, fill: Callable[[Path], object], flag: str = "--out") -> Path:
    """Call ``fill(tmp)`` to fill a new temporary folder beside ``path``, then rename it to ``path`` (which
    must not exist, or be an empty folder): a reader never sees half a folder, a failed or killed writer
    leaves nothing at ``path`` (a killed one leaves a hidden ``.NAME.<random>.tmp`` beside it, which no
    retry uses), and of two writers of one new folder only one succeeds. Write errors are one line."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as handle:
                    os.fsync(handle.fileno())
        os.rename(tmp, path)  # replaces an empty folder only: the second of two writers fails here
        _sync_folder(path.parent)
    except _write_errors() as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise OutputError(f"{flag} {path} was created by someone else meanwhile; choose a new folder") from e
        raise OutputError(f"cannot write {path}: {_why(e)}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def check_output_folder(path: str | Path, flag: str) -> Path:
    """Refuse (one line) a folder to create that would lose data or land in a run, before any work: one that
    exists and is not an empty folder, one inside a run folder (its samples/ included), a parent that is not
    a writable folder, a name too long."""
    given = Path(path)
    target = given.expanduser().resolve()
    try:
        taken = os.path.lexists(target) and (not target.is_dir() or any(target.iterdir()))
    except OSError as e:
        raise OutputError(f"{flag} {given} cannot be read: {_why(e)}") from e
    if taken:
        raise OutputError(f"{flag} {given} already exists and is not an empty folder; choose a new one")
    run = run_folder_of(target)
    if run is not None:
        raise OutputError(f"{flag} {given} is inside the run folder {run}; write it elsewhere")
    if len(target.name.encode()) + 20 > name_max(_existing_parent(target.parent)):  # (room for the temporary name)
        raise OutputError(f"{flag} {given}: the folder name is too long for its file system")
    parent = _existing_parent(target.parent)
    if not parent.is_dir():
        raise OutputError(f"{flag} {given}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{flag} {given}: {parent} is not writable")
    return target


def write_bytes(path: str | Path, data: bytes) -> Path:
    """``data`` into ``path``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) into ``path``, atomically."""
    return write_bytes(path, text.encode())


def run_folder_of(path: Path) -> Path | None:
    """The difflab run folder that ``path`` lies in (or is), if any: a folder with ``config.json`` and
    ``checkpoints/``."""
    for folder in [path, *path.parents]:
        if (folder / "config.json").is_file() and (folder / "checkpoints").is_dir():
            return folder
    return None


def check_output(path: str | Path, flag: str, *, force: bool = False, own: bool = False) -> Path:
    """Refuse (one line) an output path that would lose data, before any work: a folder, a name too
    long, a parent that is a file, a run's own files, or an existing file unless ``force`` (or ``own``:
    difflab's default name for this output, replaced on purpose). Symlinks are judged by their target."""
    given = Path(path)
    target = given.expanduser().resolve()
    if target.is_dir():
        raise OutputError(f"{flag} {given} is a folder; give a file name")
    if len(target.name.encode()) > name_max(_existing_parent(target)):
        raise OutputError(f"{flag} {given}: the file name is too long for its file system")
    parent = _existing_parent(target.parent)
    if not parent.is_dir():
        raise OutputError(f"{flag} {given}: {parent} is not a folder")
    run = run_folder_of(target.parent)
    if run is not None and not own:
        inside = target.relative_to(run)
        if inside.parts[0] != "samples" or len(inside.parts) != 2 or target.name.startswith(_TRAINING_PICTURES):
            raise OutputError(f"{flag} {given} would write into the run folder {run} (its config, checkpoints, "
                              f"log or training grids); write it elsewhere or as a new name under {run / 'samples'}")
    if target.exists() and not (force or own):
        raise OutputError(f"{flag} {given} already exists; pass --force to replace it, or choose another name")
    if os.path.lexists(target) and not target.is_file():
        raise OutputError(f"{flag} {given} is not a regular file")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{flag} {given}: {parent} is not writable")
    return target


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_run_folder(out: Path) -> None:
    """A new run's ``--out`` must be new, empty, or hold only a difflab run's own entries (so that no
    one else's files are overwritten)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder for the run")
    try:
        foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES)
    except OSError as e:
        raise OutputError(f"--out {out} cannot be read: {_why(e)}") from e
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise OutputError(f"--out {out} holds files that are not a difflab run's ({shown}); choose a new or "
                          "empty folder")
    for name in ("samples", "checkpoints"):
        if (out / name).exists() and not (out / name).is_dir():
            raise OutputError(f"--out {out}: {name} is not a folder; choose a new or empty folder")


def is_no_space(e: BaseException) -> bool:
    """Whether ``e`` (or its cause) is a full disk or quota."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__  # type: ignore[assignment]
    return False
