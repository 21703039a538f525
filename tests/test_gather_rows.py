"""DataParallel.gather_rows: processes whose batches differ in rows all stop with the same clear error, none waits."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    from lmgym.agents.scale.distributed import DataParallel, DistributedError

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=8))
    try:
        parallel = DataParallel(rank, 2)
        padded = parallel.gather_rows(torch.full((2, 1 + rank), float(rank)))  # ragged trailing dims are padded
        results[f"padded{rank}"] = padded.tolist()
        try:
            parallel.gather_rows(torch.zeros(2 + rank, 3))  # rank 1 has a row more
            results[rank] = "gathered"
        except DistributedError as err:
            results[rank] = f"DistributedError: {err}"
        except Exception as err:  # a collective that timed out waiting for the other process
            results[rank] = f"{type(err).__name__}"
    finally:
        dist.destroy_process_group()


def test_processes_with_different_row_counts_all_raise_the_same_error():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
        results = dict(results)
    assert results["padded0"] == results["padded1"] == [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    for rank in (0, 1):
        assert results[rank].startswith("DistributedError") and "num_envs" in results[rank], results
