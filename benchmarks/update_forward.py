"""The update forward's savings on SmolLM2-135M-Instruct: prompt sharing and length buckets, time and peak RSS.

GRPO's workload of ``benchmarks/grpo_vs_trl.py`` (8 prompts x 4 completions of up to 24
tokens, float32, one thread), one iteration collected, then the update timed, each setting in
a fresh process (peak RSS only grows), full fine-tuning and LoRA r=16:

- ``plain``: every completion re-encodes its prompt, all positions up to ``max_new_tokens``;
- ``shared prompts``: each distinct prompt encoded once (one bucket cut to the longest row);
- ``shared prompts + 4 length buckets``: also no positions after an episode's end.

lmgym's default is the last for LoRA (few trainable weights) and the second for full
fine-tuning (see ``lmgym/agents/forward.py`` for why). Needs the model folder that
``python benchmarks/grpo_vs_trl.py --workload smollm2 --setup`` makes::

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/update_forward.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

SETTINGS = ["plain", "shared prompts", "shared prompts + 4 length buckets"]


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def one(setting: str, lora: bool, updates: int = 3) -> dict:
    import gymnasium as gym
    import torch

    import lmgym  # noqa: F401
    from lmgym.agents import GRPO
    from lmgym.agents.common import forward
    from lmgym.utils.heap import returning_large_frees

    sys.path.insert(0, str(Path(__file__).parent))
    import grpo_vs_trl as workloads

    torch.set_num_threads(1)
    if setting == "plain":
        forward.shares_prompts = lambda model, rollout: False
        forward.LENGTH_BUCKETS = 1
    elif setting == "shared prompts":
        forward.LENGTH_BUCKETS = 1
    else:
        forward.FEW_TRAINABLE = 1.0  # buckets whatever the share of trainable weights
    env = gym.make_vec("lmgym/TextGen-v0", num_envs=32, group_size=4, model=str(workloads.CACHE / "smollm2"),
                       reward_fn=lambda p, c: workloads.reward(c), prompts=workloads.prompts_for("smollm2"),
                       max_new_tokens=24, device="cpu", dtype="float32")
    peft = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"} if lora else None
    agent = GRPO(env, seed=0, beta=workloads.BETA, loss_type="grpo", learning_rate=1e-6, peft_config=peft)
    peak = [0.0]

    def watch():  # the peak during the updates: ru_maxrss would also count the collection before them
        while True:
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.005)

    rollout = agent.collect()
    threading.Thread(target=watch, daemon=True).start()
    seconds = []
    for _ in range(updates):
        start = time.perf_counter()
        with agent.policy_active(), returning_large_frees(agent.config.cpu_mmap_threshold_mib):  # as learn() does
            agent.update(rollout)
        seconds.append(time.perf_counter() - start)
    return {"update_s": statistics.median(seconds), "peak_rss_mib": peak[0],
            "filled": float(rollout.mask.mean())}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], sys.argv[3] == "lora")))
        return
    print("| policy | setting | update s (median of 3) | peak RSS MiB during the updates |\n|-|-|-|-|")
    for policy in ("full", "lora"):
        for setting in SETTINGS:
            out = subprocess.run([sys.executable, __file__, "--one", setting, policy], capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {policy} | {setting} | {r['update_s']:.2f} | {r['peak_rss_mib']:.0f} |", flush=True)
    print(f"\npositions inside episodes: {r['filled']:.0%}")


if __name__ == "__main__":
    main()
