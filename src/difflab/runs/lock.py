"""One writer per run folder: ``RUN/.lock``, created exclusively, naming its holder.

The lock file holds JSON ``{"host", "pid", "started", "token"}``. A second ``difflab train`` on the
same folder is refused with a line naming the holder. A lock whose holder is gone is taken over:

* on the same host, when the process is dead (or its pid now belongs to a process started later);
* from any host, when the holder's heartbeat stopped: a live holder touches the file every
  ``HEARTBEAT`` seconds from a daemon thread, so a lock older than ``STALE_AFTER`` (default 10 min,
  ``$DIFFLAB_LOCK_STALE_SECONDS``) belongs to a node that died. This also works on shared file
  systems, where ``flock`` and pids cannot be trusted.

A takeover renames the stale file to a unique name first (only one of several takers can win that
rename) and checks that the file it moved is the stale one; then it creates the lock exclusively as
any other writer would. Release removes the lock only while it is still this holder's.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
import weakref
from pathlib import Path

from difflab.errors import UsageError

NAME = ".lock"
HEARTBEAT = 30.0


class RunLocked(UsageError):
    """Another live process holds the run folder."""


def stale_after() -> float:
    return float(os.environ.get("DIFFLAB_LOCK_STALE_SECONDS") or 600)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    now = _start_time(pid)
    return started is None or now is None or now == started


_held: set[str] = set()  # tokens of the locks this process holds


def _read(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written: judged by its age alone
    return info if isinstance(info, dict) else {}


def _is_stale(path: Path, info: dict) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        if info["pid"] == os.getpid():
            return info.get("token") not in _held  # a lock this process leaked (never when still held)
        return not _alive(info["pid"], info.get("started"))
    return age > stale_after()


class RunLock:
    """The lock of one run folder, held from :func:`acquire` until :meth:`release` (or process exit)."""

    def __init__(self, folder: Path, token: str, created_folder: bool):
        self.folder, self.path, self.token = folder, folder / NAME, token
        self._created_folder = created_folder
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="difflab-runlock")
        self._beat.start()
        self._finalizer = weakref.finalize(self, _release, self.path, token, self._stop)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock (if still ours); remove the run folder again if this lock created it and
        nothing else was written."""
        self._finalizer()
        if self._created_folder:
            try:
                self.folder.rmdir()
            except OSError:
                pass


def _release(path: Path, token: str, stop: threading.Event) -> None:
    stop.set()
    _held.discard(token)
    info = _read(path)
    if info and info.get("token") == token:
        path.unlink(missing_ok=True)


def _create(path: Path) -> str | None:
    """Create the lock file exclusively; its token, or None when it exists."""
    token = secrets.token_hex(8)
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
            "token": token, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info))
        f.flush()
        os.fsync(f.fileno())
    _held.add(token)
    return token


def _take_over(path: Path, seen: dict) -> None:
    """Move a stale lock aside; if the file moved turned out to be another (new) holder's, put it back."""
    aside = path.with_name(f"{NAME}.stale-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another taker was first
    moved = _read(aside)
    if seen and moved and moved.get("token") != seen.get("token"):
        try:
            os.link(aside, path)  # a live lock taken by mistake: restore it unless a newer one exists
        except OSError:
            pass
    aside.unlink(missing_ok=True)


def acquire(folder: str | Path) -> RunLock:
    """Hold ``folder``'s lock (creating the folder), or raise RunLocked naming the live holder."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the run folder {folder}: {e.strerror}") from e
    path = folder / NAME
    for _ in range(20):
        try:
            token = _create(path)
        except OSError as e:
            raise UsageError(f"cannot lock the run folder {folder}: {e.strerror}") from e
        if token is not None:
            return RunLock(folder, token, created)
        info = _read(path)
        if info is None:
            continue  # released meanwhile
        if not _is_stale(path, info):
            who = f"process {info.get('pid')} on {info.get('host')}" if info else "another process"
            raise RunLocked(f"{folder} is in use by {who} (since {info.get('since', '?')}); wait for it to "
                            f"finish, or if it is gone delete {path}")
        _take_over(path, info)
    raise RunLocked(f"could not lock {folder}: the lock keeps changing hands")
