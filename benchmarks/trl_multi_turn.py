"""Where TRL's multi-turn episode differs from lmgym's, measured on the batches TRL's GRPOTrainer trains on.

    OMP_NUM_THREADS=1 TRL_EXPERIMENTAL_SILENCE=1 python benchmarks/trl_multi_turn.py  # measure, write the JSON
    python benchmarks/trl_multi_turn.py --page docs/trl.md                         # render the table only

(the results go to docs/bench/trl_multi_turn.json).

Needs the trl extra (``pip install -e ".[trl]"``). For Guess-v0 and Echo-v0, ``GRPOTrainer`` trains through
:class:`lmgym.integrations.trl.TRLTask` (its ``rollout_func`` plays the environment's episodes) with the settings
of the bench's ``trl-grpo`` cell, 64 episodes per step in groups of 8, for ``--steps`` optimizer steps. At every
step the script reads the batch TRL computes its loss on (``GRPOTrainer._compute_loss``'s inputs) and measures:

- the episodes whose prompt ids, completion ids or mask in TRL's batch differ from the ones the environment played
  (compared as multisets: TRL shuffles the batch);
- the share of TRL's completion tokens that are the environment's: the tokens that would carry loss and KL without
  the environment mask;
- the share of episodes TRL calls truncated (the last token is no stop token: an episode the environment ended);
  ``mask_truncated_completions=True`` would drop them from the loss;
- the episodes whose decoded text re-tokenises to other ids (what a trainer working on text would train on);
- the share of TRL's ``beta * k3`` KL term (summed over the batch, at the weights of the last step) that the
  environment's tokens would add without the mask (at the first step the policy is the reference and every k3 is 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from lmgym.bench.page import add_page_arguments, markers, render_only

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "bench" / "trl_multi_turn.json"
BEGIN, END = markers("trl_multi_turn", "docs/bench/trl_multi_turn.json",
                     "python benchmarks/trl_multi_turn.py --page docs/trl.md")
TASKS = ["lmgym/Guess-v0", "lmgym/Echo-v0"]


def _episodes(prompt_ids, completion_ids, masks) -> Counter:
    return Counter((tuple(p), tuple(c), tuple(m)) for p, c, m in zip(prompt_ids, completion_ids, masks))


def measure(task_id: str, steps: int, seed: int) -> dict:
    from trl import GRPOConfig, GRPOTrainer

    from lmgym.bench.grid import RECOMMENDED
    from lmgym.integrations.trl import TRLTask
    from lmgym.integrations.trl_bench import _COMMON, _LIKE_LMGYM

    with tempfile.TemporaryDirectory(prefix="lmgym-trl-mt-") as scratch:
        task = TRLTask(task_id, scratch, num_envs=64, group_size=8)
        settings = {**_COMMON, **_LIKE_LMGYM["trl-grpo"], **RECOMMENDED.get(task_id, {}), **task.config_kwargs()}
        args = GRPOConfig(str(Path(scratch) / "out"), seed=seed, max_steps=steps, report_to="none",
                          save_strategy="no", logging_strategy="no", disable_tqdm=True, **settings)
        trainer = GRPOTrainer(args=args, **task.trainer_kwargs())
        tok = task.tokenizer
        stops = set(task.core.stop_token_ids) | {task.core.pad_token_id}  # TRL's eos_and_pad
        counts = Counter()
        kl_share = [float("nan")]
        original = trainer._compute_loss

        def compute_loss(model, inputs):
            played = task.rollout.last
            cm, tm = inputs["completion_mask"], inputs["tool_mask"]
            rows = []
            for p, pm, c, m, t in zip(inputs["prompt_ids"].tolist(), inputs["prompt_mask"].tolist(),
                                      inputs["completion_ids"].tolist(), cm.tolist(), tm.tolist()):
                n = sum(m)
                rows.append(([x for x, keep in zip(p, pm) if keep], c[:n], [int(v) for v in t[:n]]))
            trained = _episodes(*zip(*rows))
            reference = _episodes(played.prompt_ids, played.completion_ids, played.env_mask)
            counts["episodes"] += len(rows)
            counts["differ"] += sum((reference - trained).values())
            counts["completion_tokens"] += int(cm.sum())
            counts["environment_tokens"] += int((cm * (1 - tm)).sum())
            counts["truncated"] += sum(c[-1] not in stops for _, c, _ in rows)
            counts["retokenised_differ"] += sum(
                tok(tok.decode(p + c), add_special_tokens=False)["input_ids"] != p + c for p, c, _ in rows)
            with torch.no_grad():  # TRL's KL term at the weights this step starts from (the last step's is kept)
                ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
                attention = torch.cat([inputs["prompt_mask"], cm], 1)
                logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attention, cm.shape[1])
                d = inputs["ref_per_token_logps"] - logps
                k3 = (torch.exp(d) - d - 1) * cm
                kl_share[0] = float((k3 * (1 - tm)).sum() / k3.sum().clamp(min=1e-30))
            return original(model, inputs)

        trainer._compute_loss = compute_loss
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
        end = task.evaluate(trainer.model)
    return {"task": task_id, "steps": steps, "seed": seed, **counts, "kl_share_last": kl_share[0],
            "train_seconds": wall,
            "fraction_of_optimum": end["fraction_of_optimum"]}


def render(results: dict) -> str:
    lines = ["| task | episodes TRL trained on | ids or mask differ from the environment's | environment tokens "
             "among TRL's completion tokens | episodes TRL calls truncated | episodes whose text re-tokenises "
             "to other ids | share of the KL term the environment tokens would add if unmasked (last step) |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['task']} | {r['episodes']} | {r['differ']} | "
                     f"{r['environment_tokens'] / r['completion_tokens']:.1%} | "
                     f"{r['truncated'] / r['episodes']:.1%} | {r['retokenised_differ'] / r['episodes']:.1%} | "
                     f"{r['kl_share_last']:.1%} |")
    return "\n".join(lines) + (f"\n\n{results['rows'][0]['steps']} steps of 64 episodes per task, seed "
                               f"{results['rows'][0]['seed']}, TRL {results['trl']}; measured by "
                               f"`{results['command']}`.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per task (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    add_page_arguments(parser, RESULTS)
    args = parser.parse_args(argv)
    if render_only(args, BEGIN, END, render):
        return 0
    import trl

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = [measure(t, args.steps, args.seed) for t in TASKS]
    command = "OMP_NUM_THREADS=1 TRL_EXPERIMENTAL_SILENCE=1 python benchmarks/trl_multi_turn.py" + (
        f" --steps {args.steps}" if args.steps != 40 else "") + (f" --seed {args.seed}" if args.seed else "")
    results = {"command": command, "trl": trl.__version__, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
