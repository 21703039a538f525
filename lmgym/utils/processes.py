"""Helper processes that must not outlive the process that started them."""

from __future__ import annotations

import ctypes
import os
import signal

__all__ = ["die_with_parent"]


def die_with_parent() -> None:
    """Linux: end this process when its parent dies, so it never outlives the run (nor holds its folder's lock).
    A no-op where ``prctl`` is missing; a process whose parent is already gone exits at once."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() == 1:
        os._exit(0)
