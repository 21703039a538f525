"""Reading the JSONL files users hand lmgym (preferences, label candidates, prompts): one JSON value per line.

Every reader of such a file wants the same things: a missing file named, blank lines skipped,
and each error pointing at the line it is on (counted in the file, blank lines included).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["read_records"]


def read_records(path: str | os.PathLike, what: str) -> list[tuple[object, str]]:
    """``(value, where)`` for each non-blank line of the JSONL file ``path``; ``where`` is ``"<path>, line <n>"``.

    Raises ``FileNotFoundError`` naming ``what`` (e.g. ``"preference data"``) when there is no such file, and
    ``ValueError`` naming the line when a line is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                records.append((json.loads(line), where))
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
    return records
