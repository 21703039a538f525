"""The KL to the reference at iteration 0, when the policy is still the reference, for each reference precision.

    OMP_NUM_THREADS=2 python benchmarks/iteration0_kl.py           # measure, write docs/bench/iteration0_kl.json
    python benchmarks/iteration0_kl.py --page docs/off_policy.md             # render the table only

One GRPO rollout (64 episodes) on TargetToken and on the multi-turn Guess-v0, with the environment's reference
loaded in float32, bfloat16 and float16, and a float32 reference under CPU bfloat16 autocast
(``rollout_autocast="bfloat16"``). The agent's policy keeps float32 master weights, so before training any KL it
reports is the gap between computing the same weights twice. Two samplers each time:

- *float32 sampler*: the policy's float32 weights, no autocast: what lmgym did before the rollout precision;
- *rollout precision*: the compute copy in the reference's dtype under the same autocast
  (:mod:`lmgym.models.precision`), what agents do now.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gymnasium as gym
import torch

import lmgym  # noqa: F401  registers the environments
from lmgym.agents import GRPO
from lmgym.bench.page import add_page_arguments, markers, render_only
from lmgym.models.precision import RolloutPrecision

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "bench" / "iteration0_kl.json"
BEGIN, END = markers("iteration0_kl", "docs/bench/iteration0_kl.json",
                     "python benchmarks/iteration0_kl.py --page docs/off_policy.md")
CASES = [("float32", "off"), ("bfloat16", "auto"), ("float16", "auto"), ("float32", "bfloat16")]


def measure(task: str, dtype: str, autocast: str, float32_sampler: bool) -> dict:
    venv = gym.make_vec(task, num_envs=64, group_size=8, device="cpu", dtype=dtype)
    agent = GRPO(venv, seed=0, rollout_autocast=autocast)
    if float32_sampler:  # the sampler before the rollout precision: float32 weights, no autocast
        agent.sampler_policy = agent.policy
        agent.rollout_precision = RolloutPrecision()
    rollout = agent.collect()
    kl = rollout.kl[rollout.mask > 0].abs()
    return {"task": task, "reference": dtype, "autocast": autocast, "float32_sampler": float32_sampler,
            "mean": float(kl.mean()), "max": float(kl.max()), "per_episode": float(rollout.kl.sum(1).abs().mean())}


def render(results: dict) -> str:
    lines = ["| task | reference | rollout autocast | mean abs KL per token, float32 sampler (before) | "
             "mean abs KL per token, rollout precision (now) | max (now) |", "|---|---|---|---|---|---|"]
    rows = results["rows"]
    for now in (r for r in rows if not r["float32_sampler"]):
        before = next(r for r in rows if r["float32_sampler"] and all(r[k] == now[k] for k in
                                                                     ("task", "reference", "autocast")))
        lines.append(f"| {now['task']} | {now['reference']} | {now['autocast']} | {before['mean']:.2e} | "
                     f"{now['mean']:.2e} | {now['max']:.2e} |")
    return "\n".join(lines) + f"\n\nMeasured by `{results['command']}`."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_page_arguments(p, RESULTS)
    args = p.parse_args()
    if render_only(args, BEGIN, END, render):
        return
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = [measure(task, dtype, autocast, before) for task in ("lmgym/TargetToken-v0", "lmgym/Guess-v0")
            for dtype, autocast in CASES for before in (True, False)]
    results = {"command": " ".join(["python", "benchmarks/iteration0_kl.py"] + sys.argv[1:]), "rows": rows}
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(render(results))


if __name__ == "__main__":
    main()
