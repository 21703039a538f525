"""Environment rollout speed vs. a bare `model.generate` + reference forward, measured in one run.

    python benchmarks/env_throughput.py                      # CPU: ~4M model, batch 64, 32 new tokens
    python benchmarks/env_throughput.py --size 100M --batch 256 --device cuda
"""

import argparse
import json

import torch

from lmgym.bench.throughput import environment_rollout

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="4M", choices=["4M", "100M"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    r = environment_rollout(args.size, args.batch, args.new_tokens, device=args.device, repeats=args.repeats)
    print(json.dumps(r, indent=2))
    print(f"(a) generate + ref forward : {r['a_generate_plus_ref_s'] * 1e3:8.1f} ms")
    print(f"(b) lmgym submission path  : {r['b_submission_s'] * 1e3:8.1f} ms   b/a = {r['ratio_b_over_a']:.2f}")
    print(f"(c) lmgym per-token step   : {r['c_per_token_step_s'] * 1e3:8.1f} ms   c/a = {r['ratio_c_over_a']:.2f}")
