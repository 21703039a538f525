"""Learning benchmark: GRPO on lmgym/ChatCalculator-v0 (SmolLM2-135M-Instruct with a calculator tool).

Trains for a wall-clock budget on the CPU, then evaluates held-out problems (none seen in training) with
``agent.evaluate(prompts=...)``: ``--group-size`` conversations of each, sampled like training (temperature 1),
so the accuracy estimates the policy's expected accuracy. Also reports, over the evaluation's episodes, the
share that called the tool at least once and the share of calls that parsed (a well-formed Hermes call of a
known tool with valid arguments). Needs pip install 'lmgym[smollm]'::

    OMP_NUM_THREADS=2 python benchmarks/chat_calculator_grpo.py --minutes 30 --threads 2

writes docs/bench/chat_calculator.json; ``--page README.md`` renders its README block from it, measuring
nothing. ``--minutes 0`` only measures the base model.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from lmgym.bench.page import add_page_arguments, markers, render_only

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "bench" / "chat_calculator.json"
COMMAND = "python benchmarks/chat_calculator_grpo.py --minutes 30 --threads 2"
BEGIN, END = markers("chat-calculator", "docs/bench/chat_calculator.json", COMMAND)
PARSED = ("calls_ok", "calls_arguments", "calls_exception", "calls_timeout", "calls_died")
"""outcomes of a call that parsed: well-formed JSON naming a tool that exists (then run, or refused for its
arguments); malformed and unknown-tool calls did not parse"""


def tool_rates(before: dict, after: dict) -> dict:
    """The calls made between two snapshots of ``ToolInteraction.counts``, and the shares that parsed and succeeded
    (episodes are counted from the evaluation's samples instead: the counts also see the episodes the vector
    environment starts when one ends, which the evaluation never plays)."""
    diff = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
    calls = sum(v for k, v in diff.items() if k.startswith("calls_") and k != "calls_over_limit")
    parsed = sum(diff.get(k, 0) for k in PARSED)
    return {"calls": calls, "calls_parsed": parsed / calls if calls else 0.0,
            "calls_ok": diff.get("calls_ok", 0) / calls if calls else 0.0}


def render(results: dict) -> str:
    """The README block: accuracy and tool use before and after, and one sample conversation of each."""
    b, a = results["before"], results["after"]
    lines = [f"Held-out accuracy on `lmgym/ChatCalculator-v0` ({results['held_out_problems']} held-out problems x "
             f"{results['command_args']['group_size']} samples, temperature 1), GRPO for "
             f"{results['train_seconds'] / 60:.1f} min ({results['iterations']} iterations) on the 2-core CPU:",
             "",
             f"`{COMMAND}`: {results['command_args']['prompts_per_batch']} prompts x "
             f"{results['command_args']['group_size']} conversations per iteration, learning rate "
             f"{results['command_args']['learning_rate']:g}, beta {results['command_args']['beta']:g}, full "
             f"fine-tuning; the evaluations took {results['before']['seconds']:.0f} s and "
             f"{results['after']['seconds']:.0f} s.",
             "",
             "| | held-out accuracy | episodes that call the tool | calls that parse | calls that succeed |",
             "|---|---|---|---|---|"]
    for name, r in (("before", b), ("after", a)):
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['episodes_calling']:.3f} | {r['calls_parsed']:.3f} | "
                     f"{r['calls_ok']:.3f} |")
    for name, r in (("before", b), ("after", a)):
        prompt, conversation, score = r["sample"]
        lines += ["", f"A held-out conversation {name} training (`{prompt}`, score {score:g}):", "", "```text",
                  conversation.strip(), "```"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0, help="training budget (0: evaluate the base model only)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--prompts-per-batch", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8, help="conversations per prompt")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (environment and GRPO loss)")
    p.add_argument("--eval-prompts", type=int, default=40,
                   help="held-out problems to evaluate, evenly spaced over the 200 (fewer: faster, noisier)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logdir", default=None, help="TensorBoard folder")
    add_page_arguments(p, RESULTS)
    args = p.parse_args()
    if render_only(args, BEGIN, END, render):
        return

    import gymnasium as gym
    import torch

    import lmgym  # noqa: F401  (registers the tasks)
    from lmgym.agents import GRPO
    from lmgym.tasks.chat_calculator import chat_calculator_prompts

    torch.set_num_threads(args.threads)
    held_out = chat_calculator_prompts("held_out")
    if not 1 <= args.eval_prompts <= len(held_out) or args.eval_prompts % args.prompts_per_batch:
        raise SystemExit(f"--eval-prompts must be in 1..{len(held_out)} and a multiple of --prompts-per-batch")
    held_out = [held_out[i * len(held_out) // args.eval_prompts] for i in range(args.eval_prompts)]
    env = gym.make_vec("lmgym/ChatCalculator-v0", num_envs=args.prompts_per_batch * args.group_size,
                       group_size=args.group_size, kl_coef=args.beta, device="cpu")
    tools = env.core.interaction.inner  # the task's ToolInteraction, whose counts say how the tool was used
    agent = GRPO(env, learning_rate=args.learning_rate, beta=args.beta, seed=args.seed, logdir=args.logdir)

    def evaluate() -> dict:
        start, counts = time.perf_counter(), dict(tools.counts)
        result = agent.evaluate(prompts=held_out)
        samples = result["samples"]
        out = {"accuracy": result["score"], "episodes": len(samples),
               # an episode called the tool when a call (well-formed or not) is among its turns
               "episodes_calling": sum("<tool_call>" in completion for _, completion, _ in samples) / len(samples),
               **tool_rates(counts, tools.counts), "seconds": round(time.perf_counter() - start, 1)}
        # the first sample that called the tool, as the model saw it after the prompt
        prompt, completion, score = next((s for s in result["samples"] if "<tool_call>" in s[1]),
                                         result["samples"][0])
        out["sample"] = [_question(prompt), completion, score]
        return out

    summary = {"command_args": vars(args), "held_out_problems": len(held_out), "before": evaluate()}
    print(f"before: {json.dumps({k: v for k, v in summary['before'].items() if k != 'sample'})}", flush=True)
    history = []
    if args.minutes > 0:
        budget, start = args.minutes * 60, time.perf_counter()

        def stop_at_budget(agent_, metrics):
            history.append({"t": round(time.perf_counter() - start, 1), "score": metrics.get("objective/scores")})
            print(f"  {history[-1]}", flush=True)
            return time.perf_counter() - start < budget

        agent.learn(10**9, callbacks=[stop_at_budget], progress=False)
        summary["train_seconds"] = round(time.perf_counter() - start, 1)
        summary["after"] = evaluate()
    summary.update(iterations=len(history), history=history)
    summary.setdefault("train_seconds", 0.0)
    summary.setdefault("after", summary["before"])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(render(summary))


def _question(prompt_text: str) -> str:
    """The problem of a rendered ChatCalculator prompt (its last question, after the worked examples): ``a * b``."""
    return re.findall(r"What is (\d+ \* \d+)\?", prompt_text)[-1]


if __name__ == "__main__":
    main()
