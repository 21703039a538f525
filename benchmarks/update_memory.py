"""Peak memory of one GRPO iteration: plain update vs the chunked log-prob path, gradient checkpointing and LoRA.

Each setting runs in a fresh process (peak RSS only grows), on a random model with a
32k-token vocabulary, 32 completions of 64 tokens::

    OMP_NUM_THREADS=1 python benchmarks/update_memory.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

SETTINGS = {
    "full fine-tuning, plain log-probs": {},
    "full fine-tuning, logprob_chunk_size=256": {"logprob_chunk_size": 256},
    "full fine-tuning, chunked + gradient_checkpointing": {"logprob_chunk_size": 256, "gradient_checkpointing": True},
    "LoRA r=8, plain log-probs": {"lora": True},
    "LoRA r=8, chunked + gradient_checkpointing": {"lora": True, "logprob_chunk_size": 256,
                                                    "gradient_checkpointing": True},
}


def one(name: str) -> dict:
    import gymnasium as gym
    import torch

    import lmgym  # noqa: F401
    from lmgym.agents import GRPO
    from lmgym.models import tiny_model

    torch.set_num_threads(1)
    options = dict(SETTINGS[name])
    lora = options.pop("lora", False)
    model, tok = tiny_model(32_000, hidden_size=256, num_layers=4, num_heads=4, max_positions=128, seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 32_000, (16,), generator=g).tolist() for _ in range(8)]
    venv = gym.make_vec("lmgym/TextGen-v0", num_envs=32, group_size=4, model=model, tokenizer=tok,
                        reward_fn=lambda p, c: [float(len(x)) for x in c], prompts=prompts, max_new_tokens=64,
                        stop_token_ids=[0], device="cpu")
    peft = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"} if lora else None
    agent = GRPO(venv, seed=0, learning_rate=1e-5, peft_config=peft, **options)
    del model
    rollout = agent.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    with agent.policy_active():
        agent.update(rollout)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"setting": name, "peak_rss_mib": peak, "rss_before_update_mib": before, "update_s": seconds}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2])))
        return
    print("| setting | peak RSS (MiB) | RSS before the update | update (s) |\n|-|-|-|-|")
    for name in SETTINGS:
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['peak_rss_mib']:.0f} | {r['rss_before_update_mib']:.0f} | {r['update_s']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
