"""sha256 of a file, read in 1 MiB chunks: the one checksum the zoo, checkpoints and the GGUF check share."""

from __future__ import annotations

import hashlib
import os

__all__ = ["file_sha256"]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of the file at ``path`` (chunked, so a large weights file is never read whole;
    ``hashlib.file_digest`` would do this but needs Python 3.11, and lmgym supports 3.10)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
