"""Pinning glibc's mmap threshold returns freed tensor memory to the OS (lmgym.heap)."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the mmap threshold is a glibc setting")

# The pattern of training iterations: each makes many tensors of 1 to 12 MiB (activations), keeps a small one
# (a statistic, an optimizer step's scalar), and frees the rest. Returns the RSS growth in MiB.
SCRIPT = """
import random, sys, torch
if sys.argv[1] in ("agent", "agent-off"):  # an agent training on the CPU pins it unless told not to
    import gymnasium as gym, lmgym
    from lmgym.agents import GRPO
    from lmgym.models import tiny_model
    model, tok = tiny_model(["a", "b"])
    env = gym.make_vec("lmgym/TextGen-v0", num_envs=4, group_size=2, model=model, tokenizer=tok, prompts=["a"],
                       reward_fn=lambda p, c: [0.0] * len(c), max_new_tokens=2, device="cpu")
    GRPO(env, cpu_mmap_threshold_mib=0 if sys.argv[1] == "agent-off" else 1.0)
elif sys.argv[1] == "pin":
    from lmgym.heap import pin_mmap_threshold
    assert pin_mmap_threshold(1)
def rss_mib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024
rng = random.Random(0)
kept = []
start = rss_mib()
for _ in range(6):
    live = [torch.empty(rng.randrange(2**18, 3 * 2**20)).fill_(1.0) for _ in range(60)]
    kept.append(torch.ones(256))
    del live
print(rss_mib() - start)
"""


def _retained_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""})
    return int(out.stdout.split()[-1])


def test_pinned_threshold_returns_freed_tensors_to_the_os():
    assert _retained_mib("default") >= 200  # glibc's dynamic threshold keeps ~400 MiB of freed tensors resident
    assert _retained_mib("pin") <= 20


def test_an_agent_on_the_cpu_pins_the_threshold_unless_configured_not_to():
    assert _retained_mib("agent") <= 20
    assert _retained_mib("agent-off") >= 200


def test_an_explicit_malloc_setting_wins(monkeypatch):
    from lmgym import heap

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert heap.pin_mmap_threshold(4) is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert heap.pin_mmap_threshold(0) is False
