"""torch's thread count never exceeds the physical cores the process may use; an explicit setting wins."""

import torch

from lmgym.utils import cpu


def test_threads_are_capped_by_the_usable_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LMGYM_NUM_THREADS", raising=False)
    try:
        monkeypatch.setattr(cpu, "available_cores", lambda: 1)
        torch.set_num_threads(2)
        assert cpu.limit_torch_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(cpu, "available_cores", lambda: 8)
        assert cpu.limit_torch_threads() == 1  # never raised above what torch already uses
        monkeypatch.setenv("LMGYM_NUM_THREADS", "2")
        assert cpu.limit_torch_threads() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_available_cores_follow_affinity_topology_and_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "_allowed_cpus", lambda: {0, 1, 2, 3})
    # two physical cores with two hyper-threads each
    monkeypatch.setattr(cpu, "_physical_cores", lambda cpus: len({c // 2 for c in cpus}))
    monkeypatch.setattr(cpu, "_cgroup_quota", lambda: float("inf"))
    assert cpu.available_cores() == 2
    monkeypatch.setattr(cpu, "_cgroup_quota", lambda: 1.5)  # a container allowed 1.5 CPUs
    assert cpu.available_cores() == 2
    monkeypatch.setattr(cpu, "_cgroup_quota", lambda: 1.0)
    assert cpu.available_cores() == 1


def test_real_machine_values_are_sane():
    import os

    n = cpu.available_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))
