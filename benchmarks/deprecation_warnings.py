"""Counts the deprecation warnings (Python warnings and transformers' log records) in one GRPO iteration on
TargetToken: `OMP_NUM_THREADS=2 python benchmarks/deprecation_warnings.py` (9 at 33faf7b with transformers
5.25, 0 since)."""

import logging
import warnings

import gymnasium as gym

import lmgym  # noqa: F401  registers the environments
from lmgym.agents import GRPO

records = []
h = logging.Handler(); h.emit = records.append
logging.getLogger("transformers").addHandler(h)
if hasattr(logging.Logger, "warning_once"):
    logging.Logger.warning_once.cache_clear()
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    venv = gym.make_vec("lmgym/TargetToken-v0", num_envs=64, group_size=8, device="cpu")
    agent = GRPO(venv, seed=0)
    agent.learn(1, progress=False)  # one iteration: 64 episodes
msgs = [str(x.message) for x in w] + [r.getMessage() for r in records]
dep = [m for m in msgs if "deprecat" in m.lower()]
print(f"iterations {agent.iteration}; deprecation messages {len(dep)}")
for m in sorted(set(dep)): print("  ", m[:150])
