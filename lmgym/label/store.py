"""The rankings file: one JSONL line per ranking, as ``lmgym reward-model train`` reads it; crash- and race-safe.

A record is the line ``lmgym.rewards.reward_model.read_preferences`` understands, plus who ranked it and when::

    {"id": "...", "prompt": "...", "completions": [...], "ranking": [2, 0, 3, 1],
     "labeller": "ada", "labelled_at": "2026-01-01T12:00:00.000+00:00"}

``ranking`` lists completion indices best first. When the labeller marked ties the
record carries ``tiers`` (groups of equally good indices, best first) and ``scores``
instead (higher is better, equal within a tier), so training makes no pair out of a tie.

Why the file is never half-written: a record is added by writing the whole file
anew (the old lines, then the new one) to a temporary file beside it, ``fsync``-ing
it and renaming it over the old one, before the client is told it was saved. A
reader (``lmgym reward-model train``, a restarted server) sees the old file or the
new one, whatever kills the process or the machine, never half a line. A plain
``O_APPEND`` write is not enough: Linux cuts a write short at a page boundary when
the process is killed (SIGKILL) in the middle of it, which
``tests/test_label.py::test_a_killed_writer_never_leaves_half_a_line`` caught. The
price is a copy of the file per ranking, a few milliseconds per megabyte.
Why there are no duplicates: every write holds a thread lock and an exclusive
``flock`` on ``<file>.lock``, and first re-reads the file if another process
changed it, so an item ranked anywhere is refused everywhere.
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
    """Adds ranking records to a JSONL file, at most one per item id, across threads and processes.

    Args:
        path: the rankings file; created if missing, resumed if present.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._lock_fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        self._ids: set[str] = set()
        self._seen = None  # (inode, size, mtime) of the file when last read
        with self._lock, self._file_lock():
            # A writer killed before its rename leaves its temporary file; none is being written (we hold the lock).
            for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
            if not self.path.exists():
                self._replace(b"")  # the file exists from the start, so users and tools can look at it
            self._repair_tail()
            self._catch_up()

    # ------------------------------------------------------------------ reading
    def _repair_tail(self) -> None:
        """Drop a torn last line (no newline, not JSON) left by some other writer; end a complete one."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
        except ValueError:
            warnings.warn(f"{self.path}: dropping an incomplete last line of {len(data) - start} bytes (a write "
                          "cut off by a crash; it was never confirmed)", stacklevel=3)
            self._replace(data[:start])
        else:
            self._replace(data + b"\n")

    def _catch_up(self) -> None:
        """Re-read the file if it changed since the last read (another process saved a ranking)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._ids, self._seen = set(), None
            return
        if self._seen == (stat.st_ino, stat.st_size, stat.st_mtime_ns):
            return
        data = self.path.read_bytes()
        ids = set()
        for n, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f"{self.path}, line {n}: not valid JSON; the rankings file was edited by hand or "
                                 "by another program; fix or move that line") from None
            rid = _record_id(record)
            if rid is not None:
                ids.add(rid)
        self._ids, self._seen = ids, (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    # ------------------------------------------------------------------ writing
    def _file_lock(self):
        store = self

        class _FileLock:
            def __enter__(self):
                if fcntl is not None:
                    fcntl.flock(store._lock_fd, fcntl.LOCK_EX)

            def __exit__(self, *exc):
                if fcntl is not None:
                    fcntl.flock(store._lock_fd, fcntl.LOCK_UN)

        return _FileLock()

    def _replace(self, data: bytes) -> None:
        """Make ``data`` the file's content atomically: temporary file, fsync, rename, fsync the folder."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
            folder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    # ------------------------------------------------------------------ public
    def ranked_ids(self) -> set[str]:
        """Ids of every item ranked so far, including those another process saved."""
        with self._lock, self._file_lock():
            self._catch_up()
            return set(self._ids)

    def __contains__(self, rid: str) -> bool:
        return rid in self.ranked_ids()

    def append(self, record: dict) -> bool:
        """Add ``record`` as the file's last line, durably; False (nothing written) if its item is already ranked."""
        rid = _record_id(record)
        if rid is None:
            raise ValueError("a ranking record needs an 'id' (or a 'prompt' and 'completions')")
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock, self._file_lock():
            self._catch_up()
            if rid in self._ids:
                return False
            old = self.path.read_bytes() if self.path.exists() else b""
            self._replace(old + line)
            stat = os.stat(self.path)
            self._ids.add(rid)
            self._seen = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        return True

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
