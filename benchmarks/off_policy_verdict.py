"""Which off-policy correction at which lag? Each correction x lag against the exact optimum, and the bf16 sampler.

    OMP_NUM_THREADS=1 python benchmarks/off_policy_verdict.py        # the grid, writes docs/bench/off_policy.json
    python benchmarks/off_policy_verdict.py --page docs/off_policy.md           # render the table into the page only

For PPO and GRPO on ``lmgym/TargetToken-v0`` (kl_coef 0.05), every correction of
:mod:`lmgym.agents.common.off_policy` is trained with the asynchronous collector at ``max_lag`` 1, 2, 4
and 8 (each rollout exactly that many updates old), under the budgets of ``benchmarks/kl_placement.py``,
then evaluated on fresh episodes: the fraction of the exact optimum is the evaluated ``score - beta * KL``
over V*. Lag 0 is the synchronous loop, where every correction equals ``none`` up to rounding
(``tests/test_off_policy.py``), so it is run once. The bf16-sampler rows sample (and score the reference)
under CPU bfloat16 autocast while the trainer computes in float32 (``rollout_autocast="bfloat16"``, lag 0).
Each cell is the mean ± std over ``--seeds``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lmgym.bench.page import add_page_arguments, markers, render_only

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "bench" / "off_policy.json"
BEGIN, END = markers("off_policy_verdict", "docs/bench/off_policy.json",
                     "python benchmarks/off_policy_verdict.py --page docs/off_policy.md")
BUDGETS = {"ppo": 15_000, "grpo": 30_000}
LAGS = [1, 2, 4, 8]


def cells(args) -> list[dict]:
    from lmgym.agents.common.off_policy import CORRECTIONS

    out = []
    for agent in args.agents:
        out.append({"agent": agent, "setting": "lag 0", "max_lag": 0, "correction": "none", "autocast": "off"})
        for lag in args.lags:
            for correction in CORRECTIONS:
                out.append({"agent": agent, "setting": f"lag {lag}", "max_lag": lag, "correction": correction,
                            "autocast": "off"})
        for correction in CORRECTIONS:
            out.append({"agent": agent, "setting": "bf16 sampler", "max_lag": 0, "correction": correction,
                        "autocast": "bfloat16"})
    return out


def exact_bias(args) -> list[dict]:
    """Relative bias and cosine of each correction's expected first gradient step against grad J, by enumeration
    (:mod:`lmgym.bench.off_policy_exact`), along each agent's own synchronous training run: the policy after
    ``--bias-iteration`` iterations, sampled by itself ``lag`` iterations earlier, or by itself under bf16 autocast."""
    import copy

    import gymnasium as gym

    from lmgym.agents import GRPO, PPO
    from lmgym.agents.common.off_policy import CORRECTIONS
    from lmgym.bench.off_policy_exact import Enumeration, expected_gradient, relative_bias, true_gradient

    rows = []
    for name in args.agents:
        venv = gym.make_vec(args.task, num_envs=64, group_size=8 if name == "grpo" else 1, device="cpu",
                            kl_coef=args.kl_coef)
        agent = (GRPO if name == "grpo" else PPO)(venv, seed=0, learning_rate=3e-3)
        history = [copy.deepcopy(agent.policy.state_dict())]
        agent.learn(10**9, progress=False, callbacks=[
            lambda a, m: history.append(copy.deepcopy(a.policy.state_dict())) or a.iteration < args.bias_iteration])
        reference = copy.deepcopy(venv.reference_model).double().eval()

        def model(state, dtype=torch.float64):
            m = copy.deepcopy(agent.policy).to(dtype)
            m.load_state_dict(state)
            return m.eval()

        enum = Enumeration(venv)
        policy = model(history[-1]).requires_grad_(True)
        truth = true_gradient(enum, policy, reference)
        eps_high = 0.28 if name == "grpo" else 0.2
        behaviours = [(f"lag {k}", model(history[-1 - k]), None) for k in [0] + list(args.lags)]
        behaviours.append(("bf16 sampler", model(history[-1], torch.float32), torch.bfloat16))
        for setting, behaviour, autocast in behaviours:
            for correction in CORRECTIONS:
                g = expected_gradient(enum, policy, behaviour, reference, form=name, correction=correction,
                                      eps_high=eps_high, behaviour_autocast=autocast)
                bias, cosine = relative_bias(g, truth)
                rows.append({"agent": name, "setting": setting, "correction": correction, "bias": bias,
                             "cosine": cosine})
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def measure(args) -> dict:
    from lmgym.bench.grid import run

    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = []
    for cell in cells(args):
        fractions = []
        for seed in args.seeds:
            overrides = {"kl_coef": args.kl_coef, "off_policy_correction": cell["correction"],
                         "rollout_autocast": cell["autocast"]}
            if cell["max_lag"]:
                overrides.update(async_collect=True, max_lag=cell["max_lag"])
            result = run(args.task, cell["agent"], steps=BUDGETS[cell["agent"]], seed=seed, device="cpu",
                         progress=False, eval_batches=args.eval_batches, overrides=overrides)
            fractions.append(result["fraction_of_optimum"])
        rows.append({**cell, "fractions": fractions})
        print(f"{cell} {np.mean(fractions):.3f} ± {np.std(fractions):.3f}", file=sys.stderr, flush=True)
    bias = exact_bias(args)
    return {"command": " ".join(["python", "benchmarks/off_policy_verdict.py"] + sys.argv[1:]),
            "bias_iteration": args.bias_iteration, "bias": bias,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"), "task": args.task,
            "kl_coef": args.kl_coef, "seeds": args.seeds, "budgets": {a: BUDGETS[a] for a in args.agents},
            "eval_episodes": args.eval_batches * 64, "seconds": round(time.perf_counter() - started), "rows": rows}


def render(results: dict) -> str:
    """The markdown tables of a results file (what ``--page`` writes between the markers)."""
    from lmgym.agents.common.off_policy import CORRECTIONS

    lines = [f"`{results['command']}` (OMP_NUM_THREADS={results['omp_num_threads']}, torch threads 1, CPU), "
             f"{results['seconds']} s. {results['task']}, kl_coef {results['kl_coef']}; seeds {results['seeds']}; "
             "budgets (environment steps) " + ", ".join(f"{a} {b:,}" for a, b in results["budgets"].items())
             + f"; evaluated on {results['eval_episodes']} fresh episodes. Cells: fraction of the exact optimum, "
             "mean ± std over seeds.", ""]
    for agent in results["budgets"]:
        rows = [r for r in results["rows"] if r["agent"] == agent]
        settings = list(dict.fromkeys(r["setting"] for r in rows))
        lines += [f"**{agent}**", "", "| setting | " + " | ".join(CORRECTIONS) + " |",
                  "|---|" + "---|" * len(CORRECTIONS)]
        for setting in settings:
            by = {r["correction"]: r["fractions"] for r in rows if r["setting"] == setting}
            row = [f"{np.mean(by[c]):.3f} ± {np.std(by[c]):.3f}" if c in by else "= none" for c in CORRECTIONS]
            lines.append(f"| {setting} | " + " | ".join(row) + " |")
        lines.append("")
    lines += [f"**Bias of the expected first gradient step** (exact enumeration, float64; policy after "
              f"{results['bias_iteration']} iterations of each agent's synchronous run): relative error "
              "||g - grad J|| / ||grad J|| (cosine to grad J in brackets).", ""]
    for agent in results["budgets"]:
        rows = [r for r in results["bias"] if r["agent"] == agent]
        settings = list(dict.fromkeys(r["setting"] for r in rows))
        lines += [f"**{agent}** ({'sequence advantage, infinite group' if agent == 'grpo' else 'exact critic of mu'})",
                  "", "| sampled by | " + " | ".join(CORRECTIONS) + " |", "|---|" + "---|" * len(CORRECTIONS)]
        for setting in settings:
            by = {r["correction"]: r for r in rows if r["setting"] == setting}
            lines.append(f"| {setting} | " + " | ".join(f"{by[c]['bias']:.3f} ({by[c]['cosine']:.3f})"
                                                        for c in CORRECTIONS) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="lmgym/TargetToken-v0")
    parser.add_argument("--agents", nargs="+", default=["ppo", "grpo"], choices=sorted(BUDGETS))
    parser.add_argument("--lags", nargs="+", type=int, default=LAGS)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--bias-iteration", type=int, default=16, help="iterations before the gradients are taken")
    add_page_arguments(parser, RESULTS)
    args = parser.parse_args()
    if render_only(args, BEGIN, END, render):
        return
    results = measure(args)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(render(results))


if __name__ == "__main__":
    main()
