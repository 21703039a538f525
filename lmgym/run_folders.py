"""Which folder a training run writes, and who may write it: fresh folders chosen and locked in one step,
``--resume`` continuing in the folder of the run it resumes (or branching into another ``--logdir``), and a
folder a failed run left empty removed. Used by ``lmgym train`` (both ``--task`` and ``--model``)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["DEFAULT_LOGDIR", "fresh_dir", "resolve_resume", "run_folder", "let_go", "agent_of"]

DEFAULT_LOGDIR = "runs"
"""where ``lmgym train`` writes its run folders unless ``--logdir`` says otherwise"""


def fresh_dir(path: Path):
    """``(folder, its lock)``: ``path``, or ``path-2``, ``path-3``..., the first that holds nothing and that no
    other process has locked, locked by this one, so neither an earlier run nor one starting at the same
    moment is ever written into."""
    from lmgym.utils.lock import LOCK_NAME, FolderLock, LockedError

    def holds_a_run(folder: Path) -> bool:  # a lock file alone is a run that never wrote
        return folder.exists() and (not folder.is_dir() or any(p.name != LOCK_NAME for p in folder.iterdir()))

    n = 1
    while True:
        candidate = path if n == 1 else path.parent / f"{path.name}-{n}"
        n += 1
        if holds_a_run(candidate):
            continue
        try:
            lock = FolderLock(candidate, "lmgym train").acquire()
        except LockedError:
            continue  # taken by a run starting right now
        if holds_a_run(candidate):  # it wrote before we locked
            lock.release()
            continue
        return candidate, lock


def resolve_resume(path: str) -> tuple[Path, Path | None]:
    """The checkpoint folder that ``--resume PATH`` means, and the run folder to continue writing in.

    PATH is a run folder (its latest checkpoint is taken) or one checkpoint folder (it has
    state.json). The run continues in its own folder when it resumes from that folder's
    latest checkpoint; from an earlier or a loose checkpoint it branches into a fresh
    folder (None), so the original run's latest checkpoint stays its latest.
    """
    from lmgym.agents import CheckpointError
    from lmgym.agents.common.checkpoint import latest_checkpoint

    given = Path(path)
    if not given.exists():
        raise CheckpointError(f"--resume {given}: the folder does not exist")
    if not given.is_dir():
        raise CheckpointError(f"--resume {given}: not a folder; pass a run folder or one of its checkpoints")
    if (given / "state.json").is_file():
        run_dir = given.parent.parent if given.parent.name == "checkpoints" else None
        if run_dir is not None and latest_checkpoint(run_dir).resolve() == given.resolve():
            return given, run_dir
        return given, None
    if not (given / "checkpoints").is_dir():
        raise CheckpointError(f"--resume {given}: neither a checkpoint (no state.json) nor a run folder with "
                              f"checkpoints (no {given / 'checkpoints'})")
    return latest_checkpoint(given), given


def run_folder(args, name: str, parallel):
    """``(checkpoint, folder, lock)``: the checkpoint ``--resume`` names (or None), the folder this run writes
    in, and the lock this process took on a fresh folder (None otherwise: the run locks its folder itself).

    A run resumed from its latest checkpoint continues in its own folder, unless ``--logdir`` names another
    folder than the one that run lives in: then the resumed run branches into a fresh folder under
    ``--logdir``, as any other run there would start. Otherwise ``LOGDIR/NAME/AGENT/seedN``, or a fresh
    ``-2``, ``-3``... beside it, so an earlier run is never written into.
    """
    root = Path(args.logdir if args.logdir is not None else DEFAULT_LOGDIR)
    checkpoint, run_dir = resolve_resume(args.resume) if args.resume else (None, None)
    branched = run_dir is not None and args.logdir is not None and not run_dir.resolve().is_relative_to(
        root.resolve())
    if branched:
        run_dir = None
    # Under torchrun / accelerate launch, process 0 picks the folder and the others follow it. A fresh folder
    # is locked by this process from the moment it is chosen.
    held = []

    def choose() -> Path:
        if run_dir is not None:
            return run_dir
        folder, lock = fresh_dir(root / name / args.agent / f"seed{args.seed}")
        held.append(lock)
        return folder

    logdir = parallel.on_main(choose)
    if checkpoint is not None and parallel.is_main:
        why = f" (--logdir {root} is not where that run lives: a new run starts there from it)" if branched else ""
        print(f"lmgym: resuming from {checkpoint}, writing to {logdir}{why}")
    return checkpoint, logdir, (held[0] if held else None)


def let_go(lock) -> None:
    """Release the lock of a fresh run folder; a folder the run left empty (it failed before writing) goes too."""
    folder = lock.path.parent
    lock.release()
    try:
        folder.rmdir()  # only an empty folder: a run that wrote anything keeps it
    except OSError:
        pass


def agent_of(args) -> str:
    """``--agent``, or with ``--resume`` the agent the checkpoint was trained by (its state.json says)."""
    if args.agent is not None:
        return args.agent
    if not args.resume:
        raise ValueError("train needs --agent (one of the names `lmgym train --help` lists)")
    checkpoint, _ = resolve_resume(args.resume)
    try:
        return str(json.loads((checkpoint / "state.json").read_text())["agent"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--resume {args.resume}: cannot read which agent trained it from "
                         f"{checkpoint / 'state.json'} ({err}); pass --agent") from None
