"""Wall time per iteration of the asynchronous collector (max_lag=1) against synchronous collection, at equal work.

    OMP_NUM_THREADS=2 python benchmarks/async_collect.py                       # TargetToken-v0 (GRPO, 64 episodes)
    OMP_NUM_THREADS=2 python benchmarks/async_collect.py --task lmgym/ChatArithmetic-v0 --iterations 5 \\
        --warmup 1 --num-envs 16 --group-size 8 --learning-rate 2e-5          # SmolLM2-135M-Instruct (smollm extra)
    python benchmarks/async_collect.py --page docs/off_policy.md               # render the table only

Each configuration trains a fresh GRPO agent (seed 0) for ``--iterations`` iterations after ``--warmup``
untimed ones, so every row does the same work: the same number of rollouts of the same size and the same
updates. Rows:

- ``sync``: the synchronous loop, torch on ``--threads`` threads (the baseline);
- ``async lag 1, process``: the sampler in a forked process on one core, the update on the other (torch threads 1);
- ``async lag 1, thread, T threads``: the sampler in a thread of the training process, torch's intra-op pool at T
  threads (shared by both Python threads).

It prints the seconds per iteration (the median of ``--repeats`` rounds over all settings in turn, so that a
slow spell of this shared machine hits each alike) and the ratio to ``sync`` measured in the same run; on the
diagnostic tasks also the evaluated return as a fraction of the exact optimum after ``--fraction-steps``
environment steps of training with each setting (0: skip). The results of each task are kept in ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import gymnasium as gym
import torch

import lmgym  # noqa: F401  registers the tasks
from lmgym.agents import GRPO
from lmgym.bench.page import add_page_arguments, markers, render_only

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "bench" / "async_collect.json"
BEGIN, END = markers("async_collect", "docs/bench/async_collect.json",
                     "python benchmarks/async_collect.py --page docs/off_policy.md")


def make_agent(args, **overrides) -> GRPO:
    venv = gym.make_vec(args.task, num_envs=args.num_envs, group_size=args.group_size, device="cpu",
                        **({"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}))
    return GRPO(venv, seed=0, learning_rate=args.learning_rate, **overrides)


def seconds_per_iteration(args, threads: int, **overrides) -> tuple[float, float, float]:
    """Seconds per timed iteration, and of them the mean seconds waiting for the rollout and updating."""
    torch.set_num_threads(threads)
    agent = make_agent(args, **overrides)
    marks, rollout, update = [], [], []

    def clock(a, metrics):
        marks.append(time.perf_counter())
        rollout.append(metrics["time/rollout_s"])
        update.append(metrics["time/update_s"])
        return a.iteration < args.warmup + args.iterations

    agent.learn(10**12, progress=False, callbacks=[clock])
    timed = slice(args.warmup, None)
    return ((marks[-1] - marks[args.warmup - 1]) / args.iterations, sum(rollout[timed]) / args.iterations,
            sum(update[timed]) / args.iterations)


def fraction_of_optimum(args, threads: int, **overrides) -> float:
    torch.set_num_threads(threads)
    agent = make_agent(args, **overrides)
    agent.learn(args.fraction_steps, progress=False)
    return agent.evaluate(num_batches=8)["return"] / agent.env.optimal_return


def render(results: dict) -> str:
    """The markdown table of the results file (every task measured)."""
    lines = ["| task | setting | torch threads | s / iteration | of which waiting for the rollout / updating | "
             "ratio to sync | fraction of optimum |", "|---|---|---|---|---|---|---|"]
    for task, entry in results.items():
        for row in entry["results"]:
            fraction = "-" if row["fraction_of_optimum"] is None else f"{row['fraction_of_optimum']:.3f}"
            lines.append(f"| {task} | {row['setting']} | {row['torch_threads']} | {row['seconds_per_iteration']:.3f} "
                         f"| {row['rollout_wait_s']:.3f} / {row['update_s']:.3f} | {row['ratio']:.3f} | {fraction} |")
    commands = "; ".join(f"`{entry['command']}` ({entry['episodes']} episodes per iteration, {entry['iterations']} "
                         f"timed iterations, median of {entry['repeats']} rounds over the settings)"
                         for entry in results.values())
    return "\n".join(lines) + f"\n\nMeasured by {commands}, on {next(iter(results.values()))['cpu']}."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="lmgym/TargetToken-v0")
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: the task's default")
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the synchronous baseline")
    p.add_argument("--fraction-steps", type=int, default=30_000)
    p.add_argument("--repeats", type=int, default=3, help="rounds over the settings; the median is reported")
    add_page_arguments(p, RESULTS)
    args = p.parse_args()
    if render_only(args, BEGIN, END, render):
        return

    rows = [("sync", args.threads, {}),
            ("async lag 1, process", 1, {"async_collect": True, "max_lag": 1, "async_backend": "process"}),
            ("async lag 1, thread", 1, {"async_collect": True, "max_lag": 1, "async_backend": "thread"}),
            ("async lag 1, thread", 2, {"async_collect": True, "max_lag": 1, "async_backend": "thread"})]
    results = []
    print(f"{args.task}: GRPO, {args.num_envs} episodes per iteration, {args.iterations} timed iterations, "
          f"median of {args.repeats} rounds")
    print("| setting | s / iteration | ratio to sync | fraction of optimum |")
    print("|---|---|---|---|")
    # rounds over all settings in turn, so a slow spell of the machine hits each of them alike; the median round
    rounds = [[seconds_per_iteration(args, threads, **overrides) for _, threads, overrides in rows]
              for _ in range(args.repeats)]
    baseline = sorted(r[0][0] for r in rounds)[len(rounds) // 2]
    for i, (name, threads, overrides) in enumerate(rows):
        seconds, rollout_s, update_s = sorted((r[i] for r in rounds), key=lambda m: m[0])[len(rounds) // 2]
        fraction = None
        if args.fraction_steps and args.task in ("lmgym/TargetToken-v0", "lmgym/Guess-v0"):
            fraction = fraction_of_optimum(args, threads, **overrides)
        results.append({"setting": name, "torch_threads": threads, "seconds_per_iteration": seconds,
                        "rollout_wait_s": rollout_s, "update_s": update_s,
                        "ratio": seconds / baseline, "fraction_of_optimum": fraction})
        frac = "-" if fraction is None else f"{fraction:.3f}"
        print(f"| {name}, {threads} thread(s) | {seconds:.4f} | {seconds / baseline:.3f} | {frac} |", flush=True)
    from lmgym.bench.grid import machine

    path = Path(args.json)
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored[args.task] = {"command": " ".join(["python", "benchmarks/async_collect.py"] + sys.argv[1:]),
                         "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
                         "episodes": args.num_envs, "iterations": args.iterations, "repeats": args.repeats,
                         "cpu": machine(torch.device("cpu"))["cpu"], "results": results}
    path.write_text(json.dumps(stored, indent=1) + "\n")


if __name__ == "__main__":
    main()
