"""How many CPU threads torch may use without oversubscribing the machine.

torch's default intra-op thread count is the machine's core count, which ignores the
process's CPU affinity (``taskset``, Slurm) and a container's CPU quota (cgroups). On a
2-core machine shared with other work, two threads per process made a zoo build ~20x
slower than one thread. :func:`limit_torch_threads` lowers torch's thread count to the
physical cores this process may actually run on, and never raises it; an explicit
``OMP_NUM_THREADS`` (or ``LMGYM_NUM_THREADS``) always wins.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["available_cores", "limit_torch_threads"]


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no affinity API
        return set(range(os.cpu_count() or 1))


def _physical_cores(cpus: set[int]) -> int:
    """Distinct (package, core) pairs among ``cpus``: hyper-threads of one core count once."""
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            return len(cpus)  # no topology information: count logical CPUs
    return len(cores) or len(cpus)


def _cgroup_quota() -> float:
    """The container's CPU quota in cores (cgroup v2 ``cpu.max``), or inf when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return math.inf
    return math.inf if quota == "max" else max(1.0, int(quota) / int(period))


def available_cores() -> int:
    """Physical cores this process may use: its CPU affinity, hyper-threads counted once, capped by a cgroup
    quota. At least 1."""
    cores = _physical_cores(_allowed_cpus())
    quota = _cgroup_quota()
    return max(1, cores if math.isinf(quota) else min(cores, math.ceil(quota)))


def limit_torch_threads() -> int:
    """Set torch's intra-op threads to at most :func:`available_cores` (never more than torch already uses).

    ``LMGYM_NUM_THREADS`` or ``OMP_NUM_THREADS`` in the environment, when set, is used as given.
    Returns the thread count in force.
    """
    import torch

    for var in ("LMGYM_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdecimal() and int(value) > 0:
            if torch.get_num_threads() != int(value):
                torch.set_num_threads(int(value))
            return int(value)
    target = min(torch.get_num_threads(), available_cores())
    if torch.get_num_threads() != target:
        torch.set_num_threads(target)
    return target
