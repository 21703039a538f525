"""Small utilities that know nothing of the MDP: argument checks, checksums, CPU threads, the heap, file and
folder locks, atomic folder writes, JSONL reading, and the fast-path notices."""

from lmgym.utils.checks import flag, integer, real
from lmgym.utils.checksums import file_sha256
from lmgym.utils.cpu import available_cores, limit_torch_threads
from lmgym.utils.fast_paths import FastPathWarning, fall_back, fallbacks
from lmgym.utils.folders import written_atomically
from lmgym.utils.heap import returning_large_frees
from lmgym.utils.jsonl import read_records
from lmgym.utils.lock import FileLock, FolderLock, LockedError, is_locked

__all__ = ["flag", "integer", "real", "file_sha256", "available_cores", "limit_torch_threads", "FastPathWarning",
           "fall_back", "fallbacks", "written_atomically", "returning_large_frees", "read_records", "FileLock",
           "FolderLock", "LockedError", "is_locked"]
