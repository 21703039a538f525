"""The KL to the reference at iteration 0, when the policy is still the reference, for each reference precision.

`OMP_NUM_THREADS=2 python benchmarks/iteration0_kl.py`

One GRPO rollout (64 episodes) on TargetToken and on the multi-turn Guess-v0, with the environment's reference
loaded in float32, bfloat16 and float16, and a float32 reference under CPU bfloat16 autocast
(``rollout_autocast="bfloat16"``). The agent's policy keeps float32 master weights, so before training any KL it
reports is the gap between computing the same weights twice. Before the rollout precision
(:mod:`lmgym.models.precision`; measured at e0e07af on this project's CPU) the agent sampled in float32 whatever
the reference's dtype: mean |KL| per policy token 3.97e-08 (float32), 2.16e-03 (bfloat16), 2.89e-04 (float16).
"""

import gymnasium as gym
import torch

import lmgym  # noqa: F401  registers the environments
from lmgym.agents import GRPO

CASES = [("float32", "off"), ("bfloat16", "auto"), ("float16", "auto"), ("float32", "bfloat16")]

for task in ("lmgym/TargetToken-v0", "lmgym/Guess-v0"):
    for dtype, autocast in CASES:
        venv = gym.make_vec(task, num_envs=64, group_size=8, device="cpu", dtype=dtype)
        agent = GRPO(venv, seed=0, rollout_autocast=autocast)
        rollout = agent.collect()
        kl = rollout.kl[rollout.mask > 0].abs()
        print(f"{task:22s} reference {dtype:8s} rollout autocast {autocast:8s}: mean |KL| per token "
              f"{float(kl.mean()):.2e}, max {float(kl.max()):.2e}, mean |KL| per episode "
              f"{float(rollout.kl.sum(1).abs().mean()):.2e}")
