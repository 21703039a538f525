"""How should credit be spread over turns? Three schemes x PPO, RLOO, GRPO, Dr. GRPO: exact bias and learning runs.

    OMP_NUM_THREADS=1 python benchmarks/turn_credit_verdict.py        # measure, writes docs/bench/turn_credit.json
    python benchmarks/turn_credit_verdict.py --page docs/turn_credit.md   # render the tables into the page only

On ``lmgym/Guess-v0`` and ``lmgym/Echo-v0`` at ``--max-turns`` (2), each agent's credit assignment
(:data:`lmgym.bench.turn_credit_exact.SCHEMES`: the episode's return broadcast to every token, per-turn returns
against the episode returns' baseline, per-turn returns normalised per turn over the group) is measured twice:

- **bias**: the expected first gradient step against ``grad J`` by exact enumeration of every history
  (:mod:`lmgym.bench.turn_credit_exact`), for groups of ``--group-sizes`` episodes where the sum over every group
  stays under ``--max-groups``, and for the infinite group; at two policies: the start (the reference) and the
  policy of an RLOO run (broadcast, seed 0) after ``--bias-iteration`` iterations;
- **learning**: ``--seeds`` runs of ``--steps`` policy tokens each (64 episodes per iteration, groups of 8 for the
  group agents, learning rate 3e-3), evaluated on fresh episodes: the evaluated return over the exact optimum V*.

Every agent puts the KL in the reward with k1 (the environment's rewards), so that all optimise the same ``J`` and
the cells differ only by their credit; GRPO aggregates with ``loss_type="dr_grpo"`` (a constant normaliser), so
that no length weighting enters either.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lmgym.bench.page import add_page_arguments, markers, render_only

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "bench" / "turn_credit.json"
BEGIN, END = markers("turn_credit_verdict", "docs/bench/turn_credit.json",
                     "python benchmarks/turn_credit_verdict.py --page docs/turn_credit.md")
SCHEMES = ("broadcast", "per-turn", "per-turn group")
SCHEME_OPTIONS = {"broadcast": {"turn_level": False},
                  "per-turn": {"turn_level": True, "turn_baseline_level": "episode"},
                  "per-turn group": {"turn_level": True, "turn_baseline_level": "turn"}}
"""Each scheme as the group agents' options."""
AGENTS = {  # label: (agent, group size, options common to every scheme)
    "ppo": ("ppo", 1, {}),
    "rloo": ("rloo", 8, {}),
    "grpo": ("grpo", 8, {"kl_placement": "reward", "kl_estimator": "k1", "loss_type": "dr_grpo"}),
    "dr_grpo": ("grpo", 8, {"kl_placement": "reward", "kl_estimator": "k1", "loss_type": "dr_grpo",
                            "scale_rewards": False}),
}
LABELS = {"ppo": "PPO (GAE over turns; exact critic in the bias)", "rloo": "RLOO (leave-one-out baselines)",
          "grpo": "GRPO (mean and std)", "dr_grpo": "Dr. GRPO (mean only)"}


def schemes_of(label: str) -> tuple[str, ...]:
    """PPO's critic is its baseline and its advantage is per state: only per-turn credit (GAE over turns) applies."""
    return ("per-turn",) if label == "ppo" else SCHEMES


def options(label: str, scheme: str) -> dict:
    agent, _, common = AGENTS[label]
    return {**common, **({"turn_level": True} if agent == "ppo" else SCHEME_OPTIONS[scheme])}


def make_env(args, task: str, num_envs: int, group_size: int):
    import gymnasium as gym

    return gym.make_vec(task, num_envs=num_envs, group_size=group_size, device="cpu", max_turns=args.max_turns,
                        kl_coef=args.kl_coef)


def train(args, task: str, label: str, scheme: str, seed: int, steps: int, stop_after: int | None = None):
    """One learning run; returns the agent (trained for ``steps`` tokens, or ``stop_after`` iterations)."""
    from lmgym.agents import AGENTS as CLASSES

    name, group, _ = AGENTS[label]
    agent = CLASSES[name](make_env(args, task, 64, group), seed=seed, learning_rate=args.learning_rate,
                          **options(label, scheme))
    callbacks = [] if stop_after is None else [lambda a, m: a.iteration < stop_after]
    return agent.learn(steps, progress=False, callbacks=callbacks)


def learning(args) -> list[dict]:
    rows = []
    for task in args.tasks:
        for label in AGENTS:
            for scheme in schemes_of(label):
                fractions = []
                for seed in args.seeds:
                    agent = train(args, task, label, scheme, seed, args.steps)
                    fractions.append(agent.evaluate(args.eval_batches)["return"] / agent.env.optimal_return)
                rows.append({"task": task, "agent": label, "scheme": scheme, "fractions": fractions})
                print(f"{task} {label} {scheme}: {np.mean(fractions):.3f} ± {np.std(fractions):.3f}",
                      file=sys.stderr, flush=True)
    return rows


def bias(args) -> list[dict]:
    from lmgym.bench.turn_credit_exact import (Histories, expected_gradient, group_count, relative_bias,
                                               true_gradient)

    rows = []
    for task in args.tasks:
        venv = make_env(args, task, 1, 1)
        hist = Histories(venv)
        reference = copy.deepcopy(venv.reference_model).double().eval()
        trained = train(args, task, "rloo", "broadcast", 0, 10**9, stop_after=args.bias_iteration).policy
        points = {"start": copy.deepcopy(reference), "trained": copy.deepcopy(trained).double()}
        for point, policy in points.items():
            policy.eval().requires_grad_(True)
            truth = true_gradient(hist, policy, reference)
            for label in AGENTS:
                sizes = [None] if label == "ppo" else [*args.group_sizes, None]
                for n in sizes:
                    if n is not None and group_count(hist, n) > args.max_groups:
                        continue  # the sum over every group is too long: left out, and the page says so
                    for scheme in schemes_of(label):
                        g = expected_gradient(hist, policy, reference, form=label, scheme=scheme, group_size=n)
                        error, cosine = relative_bias(g, truth)
                        rows.append({"task": task, "point": point, "agent": label, "group_size": n,
                                     "scheme": scheme, "bias": error, "cosine": cosine})
                        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def measure(args) -> dict:
    import gymnasium as gym

    torch.set_num_threads(1)
    started = time.perf_counter()
    bias_rows = bias(args)
    bias_seconds = time.perf_counter() - started
    learning_rows = learning(args)
    optima = {task: gym.make_vec(task, num_envs=1, device="cpu", max_turns=args.max_turns,
                                 kl_coef=args.kl_coef).optimal_return for task in args.tasks}
    return {"command": " ".join(["python", "benchmarks/turn_credit_verdict.py"] + sys.argv[1:]),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"), "tasks": args.tasks,
            "max_turns": args.max_turns, "kl_coef": args.kl_coef, "optima": optima, "seeds": args.seeds,
            "steps": args.steps, "learning_rate": args.learning_rate, "eval_episodes": args.eval_batches * 64,
            "group_sizes": args.group_sizes, "max_groups": args.max_groups, "bias_iteration": args.bias_iteration,
            "bias_seconds": round(bias_seconds), "seconds": round(time.perf_counter() - started),
            "learning": learning_rows, "bias": bias_rows}


def render(results: dict) -> str:
    """The markdown tables of a results file (what ``--page`` writes between the markers)."""
    lines = [f"`{results['command']}` (OMP_NUM_THREADS={results['omp_num_threads']}, torch threads 1, CPU), "
             f"{results['seconds']} s in all ({results['bias_seconds']} s of it the exact bias). "
             f"max_turns {results['max_turns']}, kl_coef {results['kl_coef']}, KL k1 in the reward for every "
             "agent.", "",
             f"**Learning**: fraction of the exact optimum V* (evaluated return / V*, {results['eval_episodes']} "
             f"fresh episodes), mean ± std over seeds {results['seeds']}; {results['steps']:,} policy tokens per "
             f"run, 64 episodes per iteration (groups of 8), learning rate {results['learning_rate']}.", ""]
    for task in results["tasks"]:
        lines += [f"**{task}** (V* = {results['optima'][task]:.4f})", "", "| agent | " + " | ".join(SCHEMES) + " |",
                  "|---|" + "---|" * len(SCHEMES)]
        for label in AGENTS:
            by = {r["scheme"]: r["fractions"] for r in results["learning"] if r["task"] == task and r["agent"] == label}
            cells = [f"{np.mean(by[s]):.3f} ± {np.std(by[s]):.3f}" if s in by else "n/a" for s in SCHEMES]
            lines.append(f"| {LABELS[label]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["**Bias of the expected first gradient step** (exact enumeration of every history, float64): relative "
              "error ||g - grad J|| / ||grad J|| (cosine to grad J in brackets), g per episode. Group size ∞: the "
              f"group's statistics are the population's. Finite groups whose sum runs over more than "
              f"{results['max_groups']:,} groups are left out (-). Policies: *start*, the reference; *trained*, "
              f"RLOO (broadcast, seed 0) after {results['bias_iteration']} iterations.", ""]
    for task in results["tasks"]:
        for point in ("start", "trained"):
            lines += [f"**{task}, {point}**", "", "| agent | group size | " + " | ".join(SCHEMES) + " |",
                      "|---|---|" + "---|" * len(SCHEMES)]
            for label in AGENTS:
                sizes = [None] if label == "ppo" else [*results["group_sizes"], None]
                for n in sizes:
                    by = {r["scheme"]: r for r in results["bias"] if r["task"] == task and r["point"] == point
                          and r["agent"] == label and r["group_size"] == n}
                    if not by and label != "ppo":
                        cells = ["-"] * len(SCHEMES)
                    else:
                        cells = [f"{by[s]['bias']:.3g} ({by[s]['cosine']:.3f})" if s in by else "n/a"
                                 for s in SCHEMES]
                    size = "∞" if n is None else str(n)
                    lines.append(f"| {LABELS[label]} | {'-' if label == 'ppo' else size} | " + " | ".join(cells)
                                 + " |")
            lines.append("")
    return "\n".join(lines).rstrip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["lmgym/Guess-v0", "lmgym/Echo-v0"])
    parser.add_argument("--max-turns", type=int, default=2)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=4000, help="policy tokens per learning run")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[2, 3, 4])
    parser.add_argument("--max-groups", type=int, default=20_000_000,
                        help="the most groups a finite-group expectation may sum over (all prompts)")
    parser.add_argument("--bias-iteration", type=int, default=10,
                        help="iterations of the RLOO run whose policy is the 'trained' point")
    add_page_arguments(parser, RESULTS)
    args = parser.parse_args()
    if render_only(args, BEGIN, END, render):
        return
    results = measure(args)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(render(results))


if __name__ == "__main__":
    main()
