"""Inter-process locks on folders, so two processes never write the same run, bench or zoo entry at once.

A lock is an ``flock`` on a small lock file that also holds the owner's pid, host and
purpose, so the process that is refused can say who holds it:

    with FolderLock(out, "lmgym bench"):        # raises LockedError naming the other process
        ...

The operating system drops an ``flock`` when its process exits, however it exits
(SIGKILL included), so a lock file left behind by a dead process is *stale*: the next
process simply takes it over. The lock file is removed on release. Because another
process may still hold an open handle to a file that is unlinked, :meth:`FileLock.acquire`
checks after locking that its handle is still the file at the path, and retries if not.

Locks exclude *processes*. Within one process a lock is re-entrant: a second
:class:`FileLock` on a path this process already holds (say the CLI locked a run folder
and the agent locks it again) succeeds, and the file is released with the last holder.

Locks are advisory and POSIX-only (Linux, macOS); on a network file system without
``flock`` support they may not exclude processes on other hosts.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

__all__ = ["LockedError", "FileLock", "FolderLock", "LOCK_NAME", "is_locked"]

LOCK_NAME = ".lmgym.lock"
"""The lock file a :class:`FolderLock` keeps inside the folder it locks."""


_HELD: dict[str, list[int]] = {}
"""Lock files this process holds: real path -> [file descriptor, number of FileLock objects holding it]."""
_HELD_GUARD = threading.Lock()


class LockedError(RuntimeError):
    """Another live process holds the lock."""


def _owner_text(info: dict) -> str:
    if not info:
        return "another process"
    what = f"process {info.get('pid', '?')} on {info.get('host', '?')}"
    if info.get("purpose"):
        what += f" ({info['purpose']})"
    return what


class FileLock:
    """An exclusive lock on ``path`` (a lock file, created if needed), held by this process."""

    def __init__(self, path: str | os.PathLike, purpose: str = ""):
        self.path = Path(path)
        self.purpose = purpose
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def owner(self) -> dict:
        """What the lock file says about its holder (pid, host, purpose), or {} if unreadable."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _try_once(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        try:  # the holder before us may have unlinked the file after we opened it: then ours is a ghost
            same = os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return self._try_once()
        info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd
        return True

    def acquire(self, *, wait: float = 0.0, on_wait=None) -> "FileLock":
        """Take the lock. Waits up to ``wait`` seconds (``math.inf``: for ever) for another holder to finish,
        calling ``on_wait(owner_text)`` once when it starts waiting; then raises :class:`LockedError`."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        with _HELD_GUARD:
            if key in _HELD:  # this process holds it already: nest
                _HELD[key][1] += 1
                self._fd, self._key = _HELD[key][0], key
                return self
        deadline = time.monotonic() + wait
        told = False
        while not self._try_once():
            if time.monotonic() >= deadline:
                raise LockedError(f"{self.path.parent} is in use by {_owner_text(self.owner())}; wait for it to "
                                  f"finish or choose another folder (if that process is gone, remove {self.path})")
            if on_wait is not None and not told:
                on_wait(_owner_text(self.owner()))
                told = True
            time.sleep(0.05)
        with _HELD_GUARD:
            _HELD[key] = [self._fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with _HELD_GUARD:
            entry = _HELD.get(self._key)
            if entry is not None and entry[1] > 1:  # an outer holder in this process keeps it
                entry[1] -= 1
                self._fd = None
                return
            _HELD.pop(self._key, None)
        try:
            os.unlink(self.path)  # while still holding it, so nobody can be locking this inode meanwhile
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()



class FolderLock(FileLock):
    """A :class:`FileLock` on ``folder/.lmgym.lock``; the folder is created if needed."""

    def __init__(self, folder: str | os.PathLike, purpose: str = ""):
        super().__init__(Path(folder) / LOCK_NAME, purpose)


def is_locked(path: str | os.PathLike) -> bool:
    """Whether a live process holds the lock file ``path`` right now (a stale or missing file: False)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
