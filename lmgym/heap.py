"""Give freed tensor memory back to the operating system on Linux, so a CPU run's peak RSS follows its live tensors.

torch allocates CPU tensors with glibc's ``malloc``. glibc serves an allocation above its
*mmap threshold* with a fresh mapping that ``free`` unmaps at once; below it, from a heap
that keeps freed memory resident for reuse. The threshold is dynamic: each time a mapped
chunk is freed it rises to that chunk's size (up to 32 MiB). After one training iteration
the activations of a forward / backward (a few MiB to tens of MiB each) therefore all come
from the heap, where they are freed in an order that leaves holes the next iteration's
tensors do not fit, and the heap grows. Measured with GRPO on SmolLM2-135M (32 completions
x 24 tokens, float32, one thread): a peak RSS of 4.6 GB for 2.3 GB of live tensors, against
3.1 GB with the threshold pinned (``benchmarks/grpo_vs_trl.py``; ``tests/test_heap.py``
shows the effect on a synthetic allocation pattern).

:func:`pin_mmap_threshold` pins the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also
turns the dynamic adjustment off). It is process-wide, so the agents call it only when
they train on the CPU, only on glibc, and never when the user has set
``MALLOC_MMAP_THRESHOLD_`` (their choice wins); ``mmap_threshold_mib=0`` in an agent's
config leaves the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["pin_mmap_threshold"]

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_pinned: int | None = None


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def pin_mmap_threshold(mib: float) -> bool:
    """Serve every allocation of at least ``mib`` MiB from its own mapping, returned to the OS when freed.

    Returns whether the threshold is now pinned (False off glibc, when ``MALLOC_MMAP_THRESHOLD_``
    is set in the environment, or for ``mib <= 0``). Calling it again with the same value is free.
    """
    global _pinned
    if mib <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    size = int(mib * 2**20)
    if _pinned == size:
        return True
    libc = _glibc()
    if libc is None or not libc.mallopt(M_MMAP_THRESHOLD, size):
        return False
    _pinned = size
    return True
