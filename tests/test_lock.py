"""Folder locks between real processes: a clear refusal naming the holder, waiting, stale locks taken over."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lmgym.utils.lock import LOCK_NAME, FolderLock, LockedError, is_locked

HOLDER = """
import sys, time
from lmgym.utils.lock import FolderLock
lock = FolderLock(sys.argv[1], "test holder").acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


def _hold(folder, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_is_refused_with_the_holders_pid_and_a_dead_holder_is_taken_over(tmp_path):
    proc = _hold(tmp_path, 60)
    try:
        assert is_locked(tmp_path / LOCK_NAME)
        with pytest.raises(LockedError, match=f"in use by process {proc.pid} on .*test holder"):
            FolderLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)  # dies without releasing: its lock file stays behind, stale
        proc.wait(timeout=30)
    assert (tmp_path / LOCK_NAME).exists() and not is_locked(tmp_path / LOCK_NAME)
    with FolderLock(tmp_path, "me") as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert lock.held
    assert not (tmp_path / LOCK_NAME).exists()  # released: removed


def test_waiting_for_the_holder_to_finish(tmp_path):
    proc = _hold(tmp_path, 0.5)
    told = []
    start = time.monotonic()
    try:
        with FolderLock(tmp_path).acquire(wait=30, on_wait=told.append):
            assert time.monotonic() - start < 30
    finally:
        proc.wait(timeout=30)
    assert told and str(proc.pid) in told[0]


def test_many_processes_never_hold_it_together(tmp_path):
    """Each process appends 'in'/'out' around its critical section; the log must alternate strictly."""
    script = """
import sys, time, math
from lmgym.utils.lock import FolderLock
for _ in range(5):
    with FolderLock(sys.argv[1]).acquire(wait=math.inf):
        with open(sys.argv[2], "a") as f: f.write("in\\n")
        time.sleep(0.01)
        with open(sys.argv[2], "a") as f: f.write("out\\n")
"""
    log = tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "locked"), str(log)]) for _ in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert log.read_text().split() == ["in", "out"] * 15


def test_the_lock_is_reentrant_within_one_process_and_released_with_the_last_holder(tmp_path):
    outer = FolderLock(tmp_path).acquire()
    inner = FolderLock(tmp_path).acquire()  # e.g. the CLI holds the run folder and the agent locks it again
    inner.release()
    assert is_locked_by_other_process(tmp_path)
    outer.release()
    assert not (tmp_path / LOCK_NAME).exists()
    assert not is_locked_by_other_process(tmp_path)


def is_locked_by_other_process(folder) -> bool:
    code = "import sys; from lmgym.utils.lock import is_locked; print(is_locked(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, str(folder / LOCK_NAME)], capture_output=True, text=True,
                         timeout=60)
    return out.stdout.strip() == "True"
