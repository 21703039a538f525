"""One GRPO / PPO iteration of lmgym vs. a minimal hand-written PyTorch + transformers loop, in one run.

    python benchmarks/agent_throughput.py            # CPU, ~4M model, 64 completions of 32 tokens from 8 prompts
    python benchmarks/agent_throughput.py --size 100M --device cuda
"""

import argparse
import json

from lmgym.bench.throughput import agent_iteration

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="4M", choices=["4M", "100M"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--algo", nargs="+", default=["grpo", "ppo"], choices=["grpo", "ppo"])
    args = parser.parse_args()
    for algo in args.algo:
        r = agent_iteration(algo, args.size, device=args.device, repeats=args.repeats)
        print(json.dumps(r))
        print(f"{algo}: floor {r['floor_s'] * 1e3:.0f} ms, lmgym {r['lmgym_s'] * 1e3:.0f} ms, ratio {r['ratio']:.2f}")
