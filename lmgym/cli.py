"""The ``lmgym`` command."""

from __future__ import annotations

import argparse
import sys


def _list(args) -> int:
    import gymnasium as gym

    import lmgym  # noqa: F401
    from lmgym.tasks import describe

    for env_id in sorted(k for k in gym.registry if k.startswith("lmgym/")):
        print(f"{env_id:28s} {describe(env_id).strip().splitlines()[0]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmgym", description="Language-model generation as a Gymnasium RL problem.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="the registered tasks, one line each")
    p.set_defaults(func=_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
