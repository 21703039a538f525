"""During updates on the CPU, freed tensor memory goes back to the OS (lmgym.utils.heap)."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the mmap threshold is a glibc setting")

# The allocation pattern of training updates: many tensors of 1 to 12 MiB (activations) made and freed, with a
# small one kept each time (a statistic). Prints how much the process's RSS grew over it, in MiB.
SCRIPT = """
import random, sys, torch
from lmgym.utils.heap import returning_large_frees

def rss_mib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024

def activations():
    rng, kept, start = random.Random(0), [], rss_mib()
    for _ in range(6):
        live = [torch.empty(rng.randrange(2**18, 3 * 2**20)).fill_(1.0) for _ in range(60)]
        kept.append(torch.ones(256))
        del live
    return rss_mib() - start

def small_ones_left_behind():
    # tensors under the threshold, freed leaving one kept in every 16: the heap keeps the holes' pages
    start = rss_mib()
    with returning_large_frees(1):
        live = [torch.empty(2**16).fill_(1.0) for _ in range(3000)]  # 256 KiB each, 750 MiB
        kept = live[::16]
        del live
    return rss_mib() - start, kept

mode = sys.argv[1]
if mode == "small":
    print(small_ones_left_behind()[0])
elif mode == "default":
    print(activations())
elif mode == "inside":
    with returning_large_frees(1):
        print(activations())
else:  # an agent's update on the CPU makes those activations
    import gymnasium as gym, lmgym
    from lmgym.agents import GRPO
    from lmgym.models import tiny_model
    model, tok = tiny_model(["a", "b"])
    env = gym.make_vec("lmgym/TextGen-v0", num_envs=4, group_size=2, model=model, tokenizer=tok, prompts=["a"],
                       reward_fn=lambda p, c: [0.0] * len(c), max_new_tokens=2, device="cpu")
    agent = GRPO(env, cpu_mmap_threshold_mib=0 if mode == "agent-off" else 1.0)
    grown = []
    agent.update = lambda rollout: grown.append(activations()) or {}
    agent.learn(8, progress=False)
    print(grown[0])
"""


def _grown_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""})
    return int(out.stdout.split()[-1])


def test_large_frees_go_back_to_the_os_inside_and_not_outside():
    assert _grown_mib("default") >= 200  # glibc's dynamic threshold keeps ~400 MiB of freed tensors resident
    assert _grown_mib("inside") <= 20


def test_the_holes_small_frees_leave_in_the_heap_go_back_to_the_os_on_leaving():
    assert _grown_mib("small") <= 120  # the kept tensors: 188 x 256 KiB = 47 MiB (and the pages around them)


@pytest.mark.slow  # 13 s
def test_an_agent_on_the_cpu_returns_its_updates_memory_unless_configured_not_to():
    assert _grown_mib("agent") <= 20
    assert _grown_mib("agent-off") >= 200


def test_an_explicit_malloc_setting_wins():
    code = SCRIPT.replace('mode = sys.argv[1]', 'mode = "inside"')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "", "MALLOC_MMAP_THRESHOLD_": str(64 * 2**20)})
    assert int(out.stdout.split()[-1]) >= 200


def test_the_c_library_is_looked_up_once_not_at_every_update(monkeypatch):
    """ctypes.util.find_library runs ldconfig in a subprocess (about 1.3 ms, and a fork of a large training
    process); every update entered returning_large_frees and looked it up again."""
    import ctypes.util

    from lmgym.utils import heap

    heap._glibc.cache_clear()
    calls = []
    real = ctypes.util.find_library
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: calls.append(name) or real(name))
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    for _ in range(3):
        with heap.returning_large_frees(1.0):
            pass
    assert len(calls) <= 1
