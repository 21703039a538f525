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
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["written_atomically"]


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
