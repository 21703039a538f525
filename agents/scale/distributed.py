"""Data parallelism: the same agent in every process that ``torchrun`` or ``accelerate launch`` starts.

Nothing here is a distributed system of its own: :func:`torch.distributed` does the communication
(gloo on the CPU, NCCL on GPUs), set up from the variables the launchers export (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :class:`lmgym.agents.Agent`
builds a :class:`DataParallel` for itself, so every agent, a user's own subclass included, runs
data-parallel without a code change. What each process does:

1. **Rollouts, sharded.** Process k of K holds an environment of ``num_envs`` rows that is the k-th
   share of a batch of ``K * num_envs`` rows (:meth:`lmgym.envs.core.TextGenCore.set_shard`): the prompts
   are drawn for the whole batch and the share's rows kept (GRPO groups never straddle two processes),
   the sampling noise is drawn for the whole batch and the share's rows kept, and every process
   samples as many tokens as the longest row of the *whole* batch needs. Each process thus samples
   exactly the rows a one-process run of ``K * num_envs`` rows samples, with the same seed, and all
   processes' random generators stay equal to that run's (the cost: each process draws the noise of
   the whole batch, ``K * num_envs * vocab`` numbers per token; see docs/scaling.md).
2. **One batch everywhere.** The shares are gathered (:meth:`DataParallel.gather_rollout`), so every
   process holds the whole batch: statistics that span it (GRPO's group advantages, PPO's advantage
   whitening, the ``dapo`` token count, the adaptive KL) are those of the whole batch, with no
   algorithm-specific reduction, and the step counters and episode metrics are global.
3. **The update, split.** Minibatches are drawn from the shared generator (the same permutation
   everywhere); each micro-batch is cut into K equal parts and process k forwards and backwards part k
   (:meth:`lmgym.agents.Agent.micro_batches`). Gradients are averaged over the processes before the
   step (:meth:`DataParallel.average_gradients`); a loss that is a mean over the micro-batch's *tokens*
   weighs each part by its share of them (:meth:`lmgym.agents.Agent.token_share`), so the averaged
   gradient is the one-process gradient, not an average of per-part means.
4. **Logging and checkpoints.** Update metrics are averaged over the processes; only process 0 writes
   TensorBoard and checkpoints. Every process's random generators equal process 0's by step 1, and
   the checkpoint holds the prompts in flight of the *whole* batch (gathered), so it is the checkpoint
   a one-process run writes and resumes on any number of processes whose shares tile the same batch.
"""

from __future__ import annotations

import atexit
import datetime
import os
import zlib

import torch
import torch.distributed as dist

__all__ = ["DataParallel", "DistributedError", "launcher_world"]


class DistributedError(RuntimeError):
    """The processes of a launch cannot work together (one did not join, or runs another lmgym)."""


def launcher_world() -> tuple[int, int]:
    """``(rank, world_size)`` as the launcher exported them (``(0, 1)`` when none did)."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise DistributedError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                               "are not integers; launch with torchrun or accelerate launch") from None


def _join_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("LMGYM_DIST_TIMEOUT", 600)))


def _leave_process_group() -> None:
    """Tear the process group down at exit, before the interpreter does: left to C++ static destruction, its
    worker threads can still be joinable there and abort a run that had finished ("terminate called without an
    active exception", SIGABRT, seen once in CI on the 2-process test after every step had run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class DataParallel:
    """This process's place among the processes of a launch, and the collectives the agents need.

    ``DataParallel.from_environment(device)`` joins the process group the launcher describes (or the
    one a user already initialised, e.g. through ``accelerate.Accelerator``); with one process every
    method is a cheap no-op, so the single-device path stays the reference.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        """where this process's small host-side tensors go for a collective (NCCL only takes CUDA tensors)"""

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> "DataParallel":
        """Join the launch's process group (gloo on the CPU, NCCL on CUDA) and check every process runs lmgym."""
        if dist.is_available() and dist.is_initialized():
            comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
            me = cls(dist.get_rank(), dist.get_world_size(), comm)
        else:
            rank, world = launcher_world()
            if world <= 1:
                return cls()
            if not dist.is_available():
                raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
            if device.type == "cuda":
                torch.cuda.set_device(device)
            backend = "nccl" if device.type == "cuda" else "gloo"
            try:
                dist.init_process_group(backend, timeout=_join_timeout(), device_id=device
                                        if device.type == "cuda" else None)
            except Exception as err:  # the store's timeout names no cause a user can act on
                raise DistributedError(
                    f"process {rank} of {world} could not join the others within "
                    f"{_join_timeout().total_seconds():g}s ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                    "a process that died before joining usually lacks lmgym: run `python -c 'import lmgym'` "
                    "with the launcher's python on every node (pip install lmgym there), and read the "
                    "launcher's log of the failed rank") from None
            me = cls(rank, world, device if backend == "nccl" else "cpu")
            atexit.register(_leave_process_group)  # the group lmgym joined, lmgym leaves
        me._check_same_lmgym(device)
        return me

    def _check_same_lmgym(self, device: torch.device) -> None:
        """Every process must run the same lmgym version (gathered from all of them)."""
        if not self.active:
            return
        import lmgym

        mine = f"{getattr(lmgym, '__version__', '?')}"
        prints = [None] * self.world_size
        dist.all_gather_object(prints, mine)
        if len(set(prints)) > 1:
            ranks = ", ".join(f"rank {r}: lmgym {v}" for r, v in enumerate(prints))
            raise DistributedError(f"the processes run different lmgym versions ({ranks}); install the same "
                                   "lmgym with every node's python")

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """Reduce ``tensor`` over the processes in place (sum by default); returns it."""
        if self.active:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor

    def all_finished(self, finished: torch.Tensor) -> bool:
        """True when every row of every process's batch has stopped (one tiny collective)."""
        flag = finished.all().to(torch.int32).reshape(1)
        return bool(self.all_reduce(flag, dist.ReduceOp.MIN if self.active else None))

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on any process (so that all take the same decision, e.g. to stop)."""
        if not self.active:
            return bool(flag)
        return bool(self.all_reduce(torch.tensor([int(flag)], device=self.device), dist.ReduceOp.MAX))

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate each process's ``(n, ...)`` tensor along dim 0 in rank order; trailing dims are padded
        with zeros to the largest process's (rollouts of different lengths)."""
        if not self.active:
            return tensor
        # the largest shape, and minus the smallest row count: every process learns whether the rows differ
        # (a process that raised alone would leave the others waiting in the gather)
        bounds = torch.tensor([*tensor.shape, -tensor.shape[0]], device=tensor.device)
        self.all_reduce(bounds, dist.ReduceOp.MAX)
        shape = bounds[:-1].tolist()
        if shape[0] != -int(bounds[-1]):
            raise DistributedError(f"the processes' batches have different numbers of rows ({-int(bounds[-1])} to "
                                   f"{shape[0]}); every process needs an environment with the same num_envs")
        if tuple(shape) != tuple(tensor.shape):
            pad = []
            for have, want in zip(reversed(tensor.shape[1:]), reversed(shape[1:])):
                pad += [0, want - have]
            tensor = torch.nn.functional.pad(tensor, pad)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def gather_objects(self, items: list) -> list:
        """Concatenate each process's list in rank order."""
        if not self.active:
            return list(items)
        parts = [None] * self.world_size
        dist.all_gather_object(parts, list(items))
        return [x for part in parts for x in part]

    def gather_rollout(self, rollout):
        """The whole batch from every process's share of it (tensors and texts, in rank order)."""
        if not self.active:
            return rollout
        import dataclasses

        fields = {}
        for f in dataclasses.fields(rollout):
            value = getattr(rollout, f.name)
            if isinstance(value, torch.Tensor):
                fields[f.name] = self.gather_rows(value)
            elif isinstance(value, list):
                fields[f.name] = self.gather_objects(value)
            else:
                fields[f.name] = value
        return type(rollout)(**fields)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Process 0's ``tensor`` everywhere (in place)."""
        if self.active:
            dist.broadcast(tensor, src=0)
        return tensor

    def average_gradients(self, params, bucket_elements: int = 1 << 24) -> None:
        """Average the gradients of ``params`` over the processes, in flat buckets (few collectives).

        Sharded (FSDP) parameters are skipped: FSDP has averaged their gradients already. Parameters
        without a gradient are left without one: every process computes the same loss
        terms, so the set of parameters with a gradient is the same everywhere.
        """
        if not self.active:
            return
        from lmgym.agents.scale.sharding import is_sharded

        # FSDP reduce-scatters (and averages) the gradients of sharded parameters itself
        grads = [p.grad for p in params if p.grad is not None and not is_sharded(p.grad)]
        bucket: list[torch.Tensor] = []
        size = 0
        for g in grads + [None]:
            if g is not None and (not bucket or (g.dtype == bucket[0].dtype and g.device == bucket[0].device
                                                 and size + g.numel() <= bucket_elements)):
                bucket.append(g)
                size += g.numel()
                continue
            if bucket:
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat)
                flat /= self.world_size
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
            bucket, size = ([g], g.numel()) if g is not None else ([], 0)

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric averaged over the processes (one collective; the keys must be the same everywhere)."""
        if not self.active or not metrics:
            return metrics
        keys = sorted(metrics)
        signature = zlib.crc32("\0".join(keys).encode()) & 0x7FFFFFFF
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        bounds = torch.tensor([signature, -signature], dtype=torch.float64, device=self.device)
        self.all_reduce(bounds, dist.ReduceOp.MAX)  # (max, -min): equal everywhere, so all processes agree
        if bounds[0] != -bounds[1]:
            raise DistributedError(f"the processes logged different metrics (this one: {keys}); an update must "
                                   "return the same keys on every process")
        self.all_reduce(values)
        return {k: float(v) / self.world_size for k, v in zip(keys, values.tolist())}

    def on_main(self, fn):
        """Run ``fn()`` on process 0 only and return its result everywhere; an exception it raised is
        raised on every process (same type and message), so none is left waiting."""
        if not self.active:
            return fn()
        outcome = [None]
        if self.is_main:
            try:
                outcome[0] = ("ok", fn())
            except BaseException as err:  # re-raised below, on every process
                outcome[0] = ("error", err)
        dist.broadcast_object_list(outcome, src=0)
        kind, value = outcome[0]
        if kind == "error":
            if self.is_main:
                raise value
            raise type(value)(*value.args) if _reconstructible(value) else RuntimeError(str(value))
        return value


def _reconstructible(err: BaseException) -> bool:
    try:
        type(err)(*err.args)
        return True
    except Exception:
        return False
