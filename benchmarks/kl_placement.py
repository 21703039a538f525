"""Where should the KL go? Each KL estimator (k1, k2, k3) in the reward or in the loss, against the exact optimum.

    OMP_NUM_THREADS=1 python benchmarks/kl_placement.py                      # the full grid, ~10 CPU-minutes
    OMP_NUM_THREADS=1 python benchmarks/kl_placement.py --out docs/kl_placement.md
    OMP_NUM_THREADS=1 python benchmarks/kl_placement.py --agents grpo --seeds 0 1 2 --kl-coefs 0.2

For every task, KL coefficient beta, agent, estimator and placement, trains ``--seeds`` runs
(one thread, seeded) under the budgets the agent tests use, then evaluates the policy on fresh
episodes (``--eval-batches`` x 64). It prints one markdown table per task and beta:

- *fraction of optimum*: the evaluated return ``score - beta * KL`` (the KL-regularised
  objective, whatever the agent optimised) over the task's exact optimum V*;
- *KL*: the evaluated KL(pi || pi_ref) per episode (the mean of ``sum_t log pi/pi_ref``);
- the KL of the optimal policy for comparison, ``KL* = -dV*/dbeta`` (envelope theorem:
  V*(beta) = max_pi E[R] - beta * KL), by a central difference of the exact optimum.

Each cell is the mean +- standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import gymnasium as gym
import numpy as np
import torch

from lmgym.bench.grid import run

BUDGETS = {"ppo": 15_000, "grpo": 30_000, "reinforce": 30_000, "rloo": 30_000}
"""Environment steps per run: the budgets of tests/test_agents.py's optimum test."""
DEFAULTS = {"ppo": ("k1", "reward"), "grpo": ("k3", "loss"), "reinforce": ("k1", "reward"), "rloo": ("k1", "reward")}
COMBOS = [(e, p) for p in ("reward", "loss") for e in ("k1", "k2", "k3")]


def optimal_kl(task: str, beta: float, h: float = 1e-4) -> float:
    """KL of the optimal policy, ``-dV*/dbeta``, from the exact optimum at beta +- h."""
    def value(b):
        return gym.make_vec(task, num_envs=1, device="cpu", kl_coef=b).optimal_return

    return -(value(beta + h) - value(max(beta - h, 0.0))) / (beta + h - max(beta - h, 0.0))


def cell(values: list[float], digits: int) -> str:
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["lmgym/TargetToken-v0"])
    parser.add_argument("--agents", nargs="+", default=["ppo", "grpo", "reinforce"], choices=sorted(BUDGETS))
    parser.add_argument("--kl-coefs", nargs="+", type=float, default=[0.05, 0.2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)

    started = time.perf_counter()
    lines = ["# Where should the KL go? Estimator x placement against the exact optimum", "",
             f"`{' '.join(['python', 'benchmarks/kl_placement.py'] + sys.argv[1:])}` "
             f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch threads 1, CPU). "
             f"Seeds {args.seeds}; budgets (environment steps) "
             + ", ".join(f"{a} {BUDGETS[a]:,}" for a in args.agents)
             + "; learning rate 3e-3; GRPO and RLOO with groups of 8, PPO and REINFORCE 64 episodes per batch. "
             f"Evaluated on {args.eval_batches * 64} fresh episodes. Fraction of optimum = evaluated "
             "`score - beta * KL` / exact V*; KL = evaluated KL(pi || pi_ref) per episode (k1, sampled). "
             "Mean ± std over seeds. `*` marks each agent's default.", ""]
    for task in args.tasks:
        for beta in args.kl_coefs:
            optimum = gym.make_vec(task, num_envs=1, device="cpu", kl_coef=beta).optimal_return
            kl_star = optimal_kl(task, beta)
            lines += [f"## {task}, kl_coef = {beta}", "",
                      f"Exact optimum V* = {optimum:.4f}; KL of the optimal policy KL* = {kl_star:.3f}.", "",
                      "| agent | estimator | placement | fraction of optimum | final KL | final score |",
                      "|---|---|---|---|---|---|"]
            for agent in args.agents:
                for estimator, placement in COMBOS:
                    fractions, kls, scores = [], [], []
                    for seed in args.seeds:
                        result = run(task, agent, steps=BUDGETS[agent], seed=seed, device="cpu", progress=False,
                                     eval_batches=args.eval_batches,
                                     overrides={"kl_coef": beta, "kl_estimator": estimator,
                                                "kl_placement": placement})
                        fractions.append(result["fraction_of_optimum"])
                        kls.append(result["end"]["kl"])
                        scores.append(result["end"]["score"])
                    mark = "*" if DEFAULTS[agent] == (estimator, placement) else ""
                    row = (f"| {agent} | {estimator}{mark} | {placement} | {cell(fractions, 3)} | {cell(kls, 2)} | "
                           f"{cell(scores, 3)} |")
                    lines.append(row)
                    print(row, file=sys.stderr, flush=True)
            lines.append("")
    lines.append(f"Total time {time.perf_counter() - started:.0f} s.")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
