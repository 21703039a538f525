"""Reading the JSONL files users hand lmgym (preferences, label candidates, prompts): one JSON value per line.

Every reader of such a file wants the same things: a missing file named, blank lines skipped,
and each error pointing at the line it is on (counted in the file, blank lines included).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["read_records", "read_lines"]


def _lines(path: Path, what: str):
    """``(line number, text)`` of each line of the UTF-8 file ``path``; errors name the file (and the line)."""
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; give the file itself")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}, line {n}: not UTF-8 text (byte {raw[err.start]:#04x} at column "
                                 f"{err.start + 1}); save the file as UTF-8") from None


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """The non-blank lines of the UTF-8 text file ``path`` (one prompt per line, say), without their line ends."""
    return [line.rstrip("\r\n") for _, line in _lines(Path(path), what) if line.strip()]


def read_records(path: str | os.PathLike, what: str) -> list[tuple[object, str]]:
    """``(value, where)`` for each non-blank line of the JSONL file ``path``; ``where`` is ``"<path>, line <n>"``.

    Raises ``FileNotFoundError`` naming ``what`` (e.g. ``"preference data"``) when there is no such file, and
    ``ValueError`` naming the line when a line is not valid JSON.
    """
    path = Path(path)
    records = []
    for n, line in _lines(path, what):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            records.append((json.loads(line), where))
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
    return records
