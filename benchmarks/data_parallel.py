"""Seconds per GRPO iteration of one global batch, in 1 process or K processes (data parallelism).

    python benchmarks/data_parallel.py                                          # 1 process
    torchrun --standalone --nproc_per_node 2 benchmarks/data_parallel.py        # the same batch on 2 processes

The ratio of the two "s_per_iter" figures is the scaling: below 1 means the processes help. Each process
has one thread (OMP_NUM_THREADS=1, torchrun's default); give each its own core (taskset -c 0,1 ...).
"""

import argparse
import json
import time

import gymnasium as gym

import lmgym  # noqa: F401  (registers the environments)
from lmgym.agents import GRPO
from lmgym.agents.scale.distributed import launcher_world

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="lmgym/TargetToken-v0")
    parser.add_argument("--num-envs", type=int, default=64, help="the whole batch, shared by the processes")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=8, help="timed after 2 warm-up iterations")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rank, world = launcher_world()
    env = gym.make_vec(args.task, num_envs=args.num_envs // world, group_size=args.group_size, device=args.device)
    agent = GRPO(env, seed=0)
    stamps = []

    def stamp(agent_, metrics):
        stamps.append(time.perf_counter())
        return agent_.iteration < args.iterations + 2

    agent.learn(10**12, callbacks=[stamp], progress=False)
    laps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    if rank == 0:
        print(json.dumps({"processes": world, "num_envs": args.num_envs, "s_per_iter": sum(laps) / len(laps),
                          "timed_iterations": len(laps)}))
