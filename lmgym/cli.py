"""The ``lmgym`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _list(args) -> int:
    import gymnasium as gym

    import lmgym  # noqa: F401
    from lmgym.tasks import describe

    for env_id in sorted(k for k in gym.registry if k.startswith("lmgym/")):
        print(f"{env_id:28s} {describe(env_id).strip().splitlines()[0]}")
    return 0


def _reward_model_train(args) -> int:
    import json

    from lmgym.reward_model import RewardModel, read_preferences, train_reward_model

    groups = read_preferences(args.data)
    held = read_preferences(args.eval_data) if args.eval_data else None
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"lmgym: {out} already exists and is not empty; pass --overwrite or choose another --out",
              file=sys.stderr)
        return 2
    model = RewardModel.from_pretrained_lm(args.backbone, trust_remote_code=args.trust_remote_code)
    metrics = train_reward_model(model, groups, eval_groups=held, epochs=args.epochs,
                                 learning_rate=args.learning_rate, batch_pairs=args.batch_pairs, margin=args.margin,
                                 seed=args.seed)
    model.save(out, overwrite=args.overwrite)
    (out / "training_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmgym", description="Language-model generation as a Gymnasium RL problem.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="the registered tasks, one line each")
    p.set_defaults(func=_list)

    rm = sub.add_parser("reward-model", help="train reward models").add_subparsers(dest="action", required=True)
    p = rm.add_parser("train", help="train a Bradley-Terry reward model on preference pairs (JSONL)")
    p.add_argument("--data", required=True, help="JSONL: {prompt, chosen, rejected} or {prompt, completions, "
                                                 "ranking|scores} per line")
    p.add_argument("--backbone", required=True, help="a causal LM: local path or hub name")
    p.add_argument("--out", required=True, help="folder to write the reward model to")
    p.add_argument("--eval-data", help="held-out JSONL for pairwise accuracy")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--batch-pairs", type=int, default=64, help="pairs per batch (a prompt's pairs stay together)")
    p.add_argument("--margin", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=_reward_model_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
