"""The rankings file: an append-only JSONL that ``lmgym reward-model train`` reads, safe against crashes and races.

A record is the line ``lmgym.reward_model.read_preferences`` understands, plus who ranked it and when::

    {"id": "...", "prompt": "...", "completions": [...], "ranking": [2, 0, 3, 1],
     "labeller": "ada", "labelled_at": "2026-01-01T12:00:00.000+00:00"}

``ranking`` lists completion indices best first. When the labeller marked ties the
record carries ``tiers`` (groups of equally good indices, best first) and ``scores``
instead (higher is better, equal within a tier), so training makes no pair out of a tie.

Why the file stays whole: each record is encoded first and written with one
``write`` of the complete line, then ``fsync``-ed before the client is told it
was saved. A killed process therefore leaves either the whole line or none of it;
only a power cut in the middle of the write could leave a torn last line, and
opening the store drops such a line (it was never acknowledged) with a warning.
Why there are no duplicates: appends hold a thread lock and an exclusive
``flock`` on the file, and before writing they read whatever other processes
appended since, so an item ranked anywhere is refused everywhere.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from datetime import datetime, timezone
from pathlib import Path

from lmgym.label.items import LabelItem, item_id

try:
    import fcntl
except ImportError:  # Windows: one server process per file is then the user's responsibility
    fcntl = None

__all__ = ["RankingStore", "ranking_record", "check_tiers"]


def check_tiers(tiers, k: int) -> list[list[int]]:
    """``tiers`` as a list of lists of ints if they split ``0..k-1`` into ordered groups; ValueError otherwise."""
    if not isinstance(tiers, list) or not tiers:
        raise ValueError("'tiers' must be a non-empty list of lists of completion indices, best first")
    flat = []
    for tier in tiers:
        if not isinstance(tier, list) or not tier:
            raise ValueError("each entry of 'tiers' must be a non-empty list of completion indices")
        for index in tier:
            if type(index) is not int:  # bool is an int subclass; true is not an index
                raise ValueError(f"completion index {index!r} is not an integer")
            flat.append(index)
    if sorted(flat) != list(range(k)):
        raise ValueError(f"'tiers' must hold each of the {k} completion indices 0..{k - 1} exactly once "
                         f"(a ranking is a permutation); got {flat}")
    return [list(t) for t in tiers]


def ranking_record(item: LabelItem, tiers, labeller: str, when: datetime | None = None) -> dict:
    """The JSONL record of ``item`` ranked as ``tiers`` (checked) by ``labeller``."""
    tiers = check_tiers(tiers, len(item.completions))
    record = {"id": item.id, "prompt": item.prompt, "completions": list(item.completions)}
    if all(len(t) == 1 for t in tiers):
        record["ranking"] = [t[0] for t in tiers]
    else:
        scores = [0] * len(item.completions)
        for rank, tier in enumerate(tiers):
            for index in tier:
                scores[index] = len(tiers) - rank
        record["tiers"], record["scores"] = tiers, scores
    when = when or datetime.now(timezone.utc)
    record["labeller"] = labeller
    record["labelled_at"] = when.isoformat(timespec="milliseconds")
    return record


def _record_id(record) -> str | None:
    """The item id a record ranks: its ``id``, or the hash of its prompt and completions (hand-made files)."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("id"), str):
        return record["id"]
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completions"), list):
        return item_id(record["prompt"], record["completions"])
    return None


class RankingStore:
    """Appends ranking records to a JSONL file, at most one per item id, across threads and processes.

    Args:
        path: the rankings file; created if missing, resumed if present.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._ids: set[str] = set()
        self._offset = 0
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        with self._lock, self._file_lock():
            self._repair_tail()
            self._catch_up()

    # ------------------------------------------------------------------ reading
    def _repair_tail(self) -> None:
        """Drop a torn last line (no newline, not JSON); end a complete last line with a newline."""
        size = os.fstat(self._fd).st_size
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return
        data = os.pread(self._fd, size, 0)
        start = data.rfind(b"\n") + 1
        tail = data[start:]
        try:
            json.loads(tail)
        except ValueError:
            warnings.warn(f"{self.path}: dropping an incomplete last line of {len(tail)} bytes (a write cut off by "
                          "a crash; it was never confirmed to the labeller)", stacklevel=3)
            os.ftruncate(self._fd, start)
        else:
            os.write(self._fd, b"\n")
        os.fsync(self._fd)

    def _catch_up(self) -> None:
        """Read the complete lines appended since the last read (by this or another process)."""
        size = os.fstat(self._fd).st_size
        if size <= self._offset:
            return
        data = os.pread(self._fd, size - self._offset, self._offset)
        end = data.rfind(b"\n") + 1  # a line still being written elsewhere is read next time
        for line in data[:end].split(b"\n")[:-1]:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f"{self.path}: a line near byte {self._offset} is not valid JSON; the rankings "
                                 "file was edited by hand or by another program; fix or move that line") from None
            rid = _record_id(record)
            if rid is not None:
                self._ids.add(rid)
        self._offset += end

    # ------------------------------------------------------------------ locking
    def _file_lock(self):
        store = self

        class _FileLock:
            def __enter__(self):
                if fcntl is not None:
                    fcntl.flock(store._fd, fcntl.LOCK_EX)

            def __exit__(self, *exc):
                if fcntl is not None:
                    fcntl.flock(store._fd, fcntl.LOCK_UN)

        return _FileLock()

    # ------------------------------------------------------------------ public
    def ranked_ids(self) -> set[str]:
        """Ids of every item ranked so far, including those another process appended."""
        with self._lock, self._file_lock():
            self._catch_up()
            return set(self._ids)

    def __contains__(self, rid: str) -> bool:
        return rid in self.ranked_ids()

    def append(self, record: dict) -> bool:
        """Write ``record`` as one line and fsync it; False (nothing written) if its item is already ranked."""
        rid = _record_id(record)
        if rid is None:
            raise ValueError("a ranking record needs an 'id' (or a 'prompt' and 'completions')")
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock, self._file_lock():
            self._catch_up()
            if rid in self._ids:
                return False
            written = os.write(self._fd, line)  # O_APPEND: one write of the whole line at the end of the file
            if written != len(line):  # a full disk; take the torn bytes back so no half line remains
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
                raise OSError(f"could only write {written} of {len(line)} bytes to {self.path} (disk full?)")
            os.fsync(self._fd)
            self._ids.add(rid)
            self._offset += len(line)
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
