"""Logging an agent's metrics to TensorBoard, under the field's usual names (``objective/kl``, ``objective/scores``,
...), from process 0 of a launch only, into a run folder that process holds locked while it writes."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from lmgym.agents.common import checkpoint as checkpoints
from lmgym.agents.common.rollout import Rollout
from lmgym.utils.lock import FolderLock

if TYPE_CHECKING:
    from lmgym.agents.common.base import Agent

__all__ = ["Logging"]


class Logging:
    """TensorBoard logging of :class:`~lmgym.agents.common.base.Agent` (a mixin: it works on the agent's state)."""

    def rollout_metrics(self, rollout: Rollout) -> dict:
        """The field's usual episode statistics."""
        kl = rollout.kl.sum(1)
        return {"objective/scores": float(rollout.scores.mean()), "objective/kl": float(kl.mean()),
                "objective/return": float(rollout.returns.mean()), "objective/kl_coef": float(self.env.kl_coef),
                "charts/episode_length": float(rollout.mask.sum(1).mean()),  # policy tokens (replies are no steps)
                "charts/episodes": float(self.episodes)}

    def hold_logdir(self) -> None:
        """Lock the run folder for this process before writing into it (another process gets a
        :class:`~lmgym.utils.lock.LockedError` naming this one; this process may hold it again), and clear the
        temporary folders of saves a killed process left there. Released by :meth:`close`."""
        if self.logdir is None or not self.distributed.is_main or self._logdir_lock is not None:
            return
        lock = FolderLock(self.logdir, f"lmgym {self.name} run").acquire()
        self._logdir_lock, self._release_logdir = lock, weakref.finalize(self, lock.release)
        checkpoints.remove_interrupted_saves(self.logdir)

    def _open_writer(self) -> None:
        if self.logdir is None or self.writer is not None or not self.distributed.is_main:
            return
        self.hold_logdir()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.logdir))
        # Closes the writer (and ends its thread) when the agent is garbage-collected, if close() was not called.
        self._close_writer = weakref.finalize(self, self.writer.close)
        rows = "\n".join(f"|{k}|{v}|" for k, v in self.config.to_dict().items())
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")

    def log(self, metrics: dict) -> None:
        """Write scalars to TensorBoard at the current environment step (nothing without a logdir)."""
        self._open_writer()
        if self.writer is None:
            return
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, self.global_step)

    def close(self) -> None:
        """Flush and close the TensorBoard writer, ending its thread. :meth:`learn` calls this when it returns."""
        if self._close_writer is not None:
            self._close_writer()  # runs writer.close() once, and detaches the garbage-collection hook
        self.writer, self._close_writer = None, None
        if self._logdir_lock is not None:
            self._release_logdir()  # the run folder's lock, likewise
        self._logdir_lock, self._release_logdir = None, None

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
