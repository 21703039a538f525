"""Writing a folder of files atomically: readers see the old folder or the complete new one, never a mix.

Checkpoints, exported models and reward models are folders of several files that only make
sense together. :func:`written_atomically` has the caller write them into a fresh temporary
folder beside the destination and renames that into place only once every file is written, so
a crash (or an error half-way) never leaves a half-written folder, nor old files from an
earlier save mixed with new ones (``overwrite=True`` replaces the folder, it does not write
into it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["written_atomically", "exchange", "swap_in"]


@contextlib.contextmanager
def written_atomically(path: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder; when the block ends without an error it becomes ``path``.

    ``path`` may not exist yet or be an empty folder; anything else there is replaced only with
    ``overwrite=True`` (the old folder stays in place until the new one is complete), else
    :class:`FileExistsError`. On an error the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _move_into_place(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    try:
        os.rename(tmp, path)  # atomic; fails when ``path`` is a file or a non-empty folder
        return
    except OSError:
        if not overwrite:
            raise FileExistsError(f"{path} already exists (or was created by another writer meanwhile); pass "
                                  "overwrite=True or choose another path") from None
    old = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    os.replace(path, old)
    os.replace(tmp, path)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing folders (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def swap_in(new: Path, final: Path) -> None:
    """Make the complete folder ``new`` the entry ``final`` without ``final`` ever being absent (on Linux)."""
    if not final.exists():
        os.replace(new, final)
        return
    if exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)  # now the old entry; open files stay readable until closed
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, old)  # elsewhere: a moment without the entry, during which loaders wait on the lock
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)
