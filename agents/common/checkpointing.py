"""An agent's checkpoints: what goes into one (weights, optimizer, RNGs, the environment's prompt stream, the
algorithm's extra state) and resuming from one. The on-disk format itself is :mod:`lmgym.agents.common.checkpoint`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from lmgym.agents.common import checkpoint as checkpoints
from lmgym.agents.common.checkpoint import CheckpointError
from lmgym.agents.scale import sharding

if TYPE_CHECKING:
    from lmgym.agents.common.base import Agent

__all__ = ["Checkpointing"]


class Checkpointing:
    """Saving and resuming :class:`~lmgym.agents.common.base.Agent` (a mixin: it works on the agent's state)."""

    def _env_snapshot(self) -> dict:
        core = self.env.core
        snap = {"rng": core.rng.bit_generator.state, "prompts": [list(p.ids) for p in core.row_prompts]}
        if self.env.multi_turn:  # what each episode's interaction drew at its start (lmgym.envs.multi_turn)
            snap["episode_seeds"] = [int(s) for s in core.episode_seeds]
        return snap

    def _checkpoint_payload(self) -> dict:
        """What process 0 needs from all processes to write a checkpoint (collectives: every process calls this):
        the whole batch's environment state, and with FSDP the gathered weights and optimizer moments."""
        payload = {"env": self._env_checkpoint_snapshot() if self._env_started else None}
        if self.sharded:
            weights = {}
            for name, module in self.trainable_modules().items():
                # what the checkpoint stores of the module: gathered only if sharded (a LoRA policy's adapters
                # stay whole on every process; its sharded base is never stored, so never gathered)
                stored = checkpoints.saved_state(module)
                full = any(sharding.is_sharded(v) for v in stored.values())
                weights[name] = checkpoints.untie(sharding.full_weights(module)) if full else \
                    checkpoints.untie({k: v.detach() for k, v in stored.items()})
            payload["weights"] = weights
            payload["optimizer_state"] = sharding.full_optimizer_state(self.optimizer)
        return payload

    def _env_checkpoint_snapshot(self) -> dict:
        """The environment state a checkpoint holds: the prompts in flight of the whole data-parallel batch
        (gathered from every process, a collective) and the prompt RNG, which is the same in every process."""
        snap = self._env_snapshot()
        snap["prompts"] = self.distributed.gather_objects(snap["prompts"])
        if "episode_seeds" in snap:
            snap["episode_seeds"] = self.distributed.gather_objects(snap["episode_seeds"])
        return snap

    def _env_restore(self, snap: dict) -> None:
        prompts, n, world = snap["prompts"], self.env.core.num_envs, self.distributed.world_size
        if world > 1 and len(prompts) == n * world:  # a checkpoint's whole batch: this process's share
            prompts = prompts[self.distributed.rank * n:(self.distributed.rank + 1) * n]
        self.env.reset(options={"prompts": prompts})
        seeds = snap.get("episode_seeds")
        if seeds is not None:
            if world > 1 and len(seeds) == n * world:
                seeds = seeds[self.distributed.rank * n:(self.distributed.rank + 1) * n]
            self.env.core.replay_starts(seeds)
        self.env.core.rng.bit_generator.state = snap["rng"]
        self._env_started = True

    def state(self) -> dict:
        """Everything besides the weights that a resumed run needs to continue identically, and its lineage."""
        return {"format": checkpoints.FORMAT, "agent": self.name, "run_id": self.run_id,
                "config": self.config.to_dict(), "global_step": self.global_step, "iteration": self.iteration,
                "episodes": self.episodes, "kl_coef": {"initial": self.initial_kl_coef, "current": self.env.kl_coef},
                "task": self.task_signature(), "layout": self.batch_layout(),
                "extra": self.extra_state(), "resumes": self.resumes}

    def batch_layout(self) -> dict:
        """The batch a checkpoint's prompts in flight belong to: all processes' episodes, and the group size."""
        core = self.env.core
        return {"num_envs": core.num_envs * self.distributed.world_size, "group_size": core.group_size}

    def extra_state(self) -> dict:
        """Algorithm state to checkpoint (moving averages...), JSON-serialisable."""
        return {}

    def check_extra_state(self, state: dict) -> None:
        """Raise ``ValueError`` naming the field if ``state`` (read from a checkpoint) is not what
        :meth:`extra_state` writes; called before anything is loaded."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no extra state, found {sorted(state)}")

    def load_extra_state(self, state: dict) -> None:
        pass

    def task_signature(self) -> dict:
        """What a checkpoint must share with this agent's environment: task, horizon, vocabulary, reference model."""
        if self._reference_fingerprint is None:  # the reference is frozen: hash it once
            self._reference_fingerprint = checkpoints.reference_fingerprint(self.env.reference_model)
        return checkpoints.task_signature(self.env, self._reference_fingerprint)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write a checkpoint folder atomically: weights (safetensors), optimizer and RNG state, state.json and a
        manifest of sha256 checksums. Non-finite weights are refused.

        An existing folder is never replaced unless ``overwrite=True``.
        See :mod:`lmgym.agents.common.checkpoint`.
        """
        self.stop_collector()  # nothing in flight: the environment and generators are those of the next rollout
        payload = self._checkpoint_payload()
        return self.distributed.on_main(lambda: checkpoints.save(self, path, overwrite=overwrite, **payload))

    def checkpoint(self) -> Path | None:
        """Save to ``logdir/checkpoints/iter-NNNNNN`` and remember it as the last good checkpoint.

        A checkpoint another run wrote at that path (e.g. the one this run resumed from, when it
        resumed into the same logdir) is kept, and this one is written alongside as
        ``iter-NNNNNN-2``, with a warning; the path returned is always the one just written.
        """
        if self.logdir is None:
            return None
        self.hold_logdir()
        self.stop_collector()  # nothing in flight: the environment and generators are those of the next rollout
        payload = self._checkpoint_payload()  # every process takes part

        def write() -> Path:  # on process 0 only
            for _attempt in range(100):
                path, replace = checkpoints.checkpoint_path(self.logdir, self.iteration, self.run_id)
                try:
                    return checkpoints.save(self, path, overwrite=replace, **payload)
                except FileExistsError:  # another process took that name while we wrote: take the next one
                    continue
            raise CheckpointError(f"could not find a free checkpoint folder for iteration {self.iteration} under "
                                  f"{self.logdir / 'checkpoints'}")

        self.last_checkpoint = self.distributed.on_main(write)
        return self.last_checkpoint

    def load(self, path: str | os.PathLike, *, resume: bool = True) -> "Agent":
        """Load a checkpoint written by :meth:`save` into this agent (same algorithm, task and reference model).

        Every file is checked first (checksums, fields, shapes, finiteness); on any problem
        :class:`CheckpointError` names it and the agent is left unchanged. With ``resume=True``
        (default) the optimizer, RNG, step counters and the environment's prompt stream are
        restored too, so :meth:`learn` continues the same run exactly; this agent's
        hyper-parameters (except ``seed``) and its environment's ``kl_coef`` apply from here on
        when they differ from the checkpoint's (a warning lists them, and ``state.json`` of the
        next checkpoint records them). The environment may have another ``num_envs`` or
        ``group_size``: the prompt stream then continues from the checkpoint's RNG with a new
        batch of prompts. With ``resume=False`` only the weights are loaded.
        """
        self.stop_collector()  # the collector samples from the weights and state being replaced
        return checkpoints.load(self, path, resume=resume)
