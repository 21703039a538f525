"""CPU bfloat16 autocast for the rollout's forwards (sampling and the reference's scoring) against float32.

    OMP_NUM_THREADS=2 python benchmarks/bf16_rollout.py                 # SmolLM2-135M-Instruct (smollm extra)
    python benchmarks/bf16_rollout.py --page docs/off_policy.md         # render the table only

A GRPO agent on ``lmgym/ChatArithmetic-v0`` collects ``--rollouts`` rollouts (after one untimed) with
``rollout_autocast="off"`` and ``"bfloat16"``, same seed, same work; the update is not timed (it runs in
float32 either way). Besides the seconds per rollout and their ratio, it records for the bf16 sampler:

- the environment's KL at iteration 0 (policy == reference, both under the same autocast: 0 up to the rounding of
  the compute dtype between kernels of different shapes, one token at a time against a whole continuation), per
  token and, signed, per episode;
- the gap between the sampler and the float32 trainer, ``log rho = log pi_prox - log mu`` per token
  (mean and largest |log rho|), which the off-policy corrections weigh (:mod:`lmgym.agents.common.off_policy`).
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

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "bench" / "bf16_rollout.json"
BEGIN, END = markers("bf16_rollout", "docs/bench/bf16_rollout.json",
                     "python benchmarks/bf16_rollout.py --page docs/off_policy.md")


def measure(args, autocast: str) -> dict:
    venv = gym.make_vec(args.task, num_envs=args.num_envs, group_size=args.group_size, device="cpu",
                        max_new_tokens=args.max_new_tokens)
    agent = GRPO(venv, seed=0, rollout_autocast=autocast, off_policy_correction="tis_token")
    first = agent.collect()  # untimed: warms the kernels
    inside = first.mask > 0
    out = {"autocast": autocast, "iteration0_kl_mean": float(first.kl[inside].abs().mean()),
           "iteration0_kl_max": float(first.kl[inside].abs().max()),
           "iteration0_kl_signed_episode": float(first.kl.sum(1).mean())}
    # the same weights, one forward over prompt + continuation, against the sampler's one token at a time: the
    # rounding between kernels of different shapes in this precision (the floor of the iteration-0 KL)
    ids = torch.cat([first.query_ids, first.tokens], 1)
    attention = torch.cat([first.query_mask, torch.ones_like(first.tokens)], 1)
    with torch.no_grad(), agent.rollout_context():
        logits = venv.reference_model(input_ids=ids, attention_mask=attention,
                                      position_ids=(attention.cumsum(1) - 1).clamp(min=0)).logits
    whole = torch.log_softmax(logits[:, first.query_ids.shape[1] - 1:-1].float(), -1)
    whole = whole.gather(-1, first.tokens[..., None]).squeeze(-1)
    out["shape_gap"] = float((whole - first.logprobs)[inside].abs().mean())
    agent.correct_off_policy(first)
    log_rho = (first.proximal_logprobs - first.logprobs)[inside].abs()
    out.update(log_rho_mean=float(log_rho.mean()), log_rho_max=float(log_rho.max()))
    start = time.perf_counter()
    tokens = 0
    for _ in range(args.rollouts):
        tokens += agent.collect().steps
    out["seconds_per_rollout"] = (time.perf_counter() - start) / args.rollouts
    out["tokens_per_rollout"] = tokens / args.rollouts
    return out


def render(results: dict) -> str:
    rows = results["rows"]
    base = rows[0]["seconds_per_rollout"]
    lines = ["| rollout forwards | s / rollout | ratio to float32 | iteration-0 KL: mean / max abs per token, mean "
             "per episode | one forward vs token by token, same weights: mean abs per token | sampler vs float32 "
             "trainer: mean / max abs log rho |", "|---|---|---|---|---|---|"]
    for row in rows:
        name = "float32" if row["autocast"] == "off" else f"{row['autocast']} autocast"
        lines.append(f"| {name} | {row['seconds_per_rollout']:.2f} | {row['seconds_per_rollout'] / base:.3f} | "
                     f"{row['iteration0_kl_mean']:.1e} / {row['iteration0_kl_max']:.1e}, "
                     f"{row['iteration0_kl_signed_episode']:+.1e} | {row['shape_gap']:.1e} | "
                     f"{row['log_rho_mean']:.1e} / {row['log_rho_max']:.1e} |")
    return ("\n".join(lines) + f"\n\n`{results['command']}` (OMP_NUM_THREADS={results['omp_num_threads']}, torch "
            f"{results['torch_threads']} threads) on {results['cpu']}: {results['task']}, {results['num_envs']} "
            f"episodes of up to {results['max_new_tokens']} tokens per rollout, {results['rollouts']} timed rollouts.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="lmgym/ChatArithmetic-v0")
    p.add_argument("--num-envs", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--rollouts", type=int, default=5)
    add_page_arguments(p, RESULTS)
    args = p.parse_args()
    if render_only(args, BEGIN, END, render):
        return
    from lmgym.bench.grid import machine

    rows = [measure(args, "off"), measure(args, "bfloat16")]
    results = {"command": " ".join(["python", "benchmarks/bf16_rollout.py"] + sys.argv[1:]),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"), "torch_threads": torch.get_num_threads(),
               "cpu": machine(torch.device("cpu"))["cpu"], "task": args.task, "num_envs": args.num_envs,
               "max_new_tokens": args.max_new_tokens, "rollouts": args.rollouts, "rows": rows}
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(render(results))


if __name__ == "__main__":
    main()
