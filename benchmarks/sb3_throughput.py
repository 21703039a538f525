"""SB3 PPO throughput over lmgym's VecEnv bridge vs. a DummyVecEnv of single envs, measured in one run.

    python benchmarks/sb3_throughput.py
"""

import json

from lmgym.bench.throughput import sb3_bridge

if __name__ == "__main__":
    r = sb3_bridge()
    print(json.dumps(r, indent=2))
    print(f"DummyVecEnv {r['dummy_vec_env_steps_per_s']:.0f} steps/s, bridge {r['bridge_steps_per_s']:.0f} "
          f"steps/s: {r['ratio_bridge_over_dummy']:.2f}x")
