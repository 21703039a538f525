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

:func:`returning_large_frees` pins the threshold low (``mallopt(M_MMAP_THRESHOLD)``, which
also turns the dynamic adjustment off) for the duration of an update, after handing the
heap's free pages back (``malloc_trim``), and on leaving hands them back again (the
update's smaller tensors were freed into the heap) and sets it to glibc's ceiling, 32 MiB,
where the dynamic threshold ends up anyway: sampling's per-token full-vocabulary tensors
then keep being reused from the heap (mapping fresh pages for each of them made GRPO on a
3.4M-parameter model with a 50k vocabulary 14% slower). It is process-wide, so the agents use it
only when they train on the CPU, only on glibc, and never when the user has set
``MALLOC_MMAP_THRESHOLD_`` (their choice wins); ``cpu_mmap_threshold_mib=0`` in an agent's
config leaves the allocator alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import platform

__all__ = ["returning_large_frees"]

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
CEILING = 32 * 2**20  # glibc's largest dynamic threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)


@functools.lru_cache(maxsize=1)  # find_library runs ldconfig in a subprocess: once per process, not per update
def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def returning_large_frees(mib: float):
    """Inside, every allocation of at least ``mib`` MiB gets its own mapping, returned to the OS when freed.

    Does nothing off glibc, when ``MALLOC_MMAP_THRESHOLD_`` is set in the environment, or for ``mib <= 0``.
    """
    libc = None if mib <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ else _glibc()
    if libc is None:
        yield
        return
    libc.malloc_trim(0)
    libc.mallopt(M_MMAP_THRESHOLD, int(mib * 2**20))
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, CEILING)
        # the update's tensors below the threshold (many, when the forward runs in length buckets) were freed
        # into the heap in an order that leaves holes; give their whole pages back too
        libc.malloc_trim(0)
