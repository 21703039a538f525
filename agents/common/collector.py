"""The asynchronous collector: the next rollouts are sampled while the update runs.

Pipelines such as PipelineRL, AReaL and verl's fully asynchronous mode keep generation busy while the
trainer steps: the samples then come from weights some updates old. Here a sampler runs beside the training
loop, in one of two ways (``async_backend``):

- ``"process"`` (the default on the CPU for small models): a forked process with its own copy of the environment
  and of the sampler, on its own core (torch threads 1). Small models spend most of their time in Python, which
  two threads of one process cannot run at once; two processes can.
- ``"thread"`` (the default on CUDA, where a forked process cannot use the device, and for large models): a
  thread of the training process. Large models spend their time in torch kernels, which release the interpreter.

**Which weights sample which rollout.** Rollout ``r`` is the one the update of iteration ``r`` trains on.
It is sampled with the weights of iteration ``v(r) = max(r - max_lag, start, boundary(r))``, exactly, never
newer even when newer ones are ready, so a run is reproducible whatever the timing:

- ``start``: the iteration ``learn`` started (or resumed) at, whose weights are published first;
- ``boundary(r)``: the last checkpoint iteration ``<= r`` (``checkpoint_every``). A checkpoint's rollout is
  sampled with the checkpoint's own weights, so nothing is in flight when a checkpoint is written and a
  resumed run continues exactly as the uninterrupted one.

So ``max_lag=0`` is the synchronous loop itself (sampling waits for each update; same generator, same results),
and ``max_lag=k`` trains on samples exactly ``k`` updates old once the pipeline is full.

**Weight publication.** After each update the training loop publishes its weights (a copy in the sampler's
dtype, :mod:`lmgym.models.precision`) and the environment's ``kl_coef`` (an adaptive controller moves it);
the sampler takes the version each rollout needs and drops older ones, so at most ``max_lag + 1`` are held.

**Nothing lost or counted twice.** Before each rollout the sampler records the state it starts from (the
environment's prompts and RNG, the sampling generator). When the collector stops (the end of ``learn``, an
evaluation, a checkpoint), rollouts sampled but not yet trained on are dropped and the training process's
environment and generator are set to that state, so they are sampled again, by the same rule, when
collection resumes.
"""

from __future__ import annotations

import collections
import copyreg
import io
import multiprocessing
import os
import pickle
import queue
import threading
import traceback

import torch

from lmgym.agents.common.config import ConfigError
from lmgym.utils.processes import die_with_parent

__all__ = ["AsyncCollector", "make_collector"]


PROCESS_MAX_PARAMETERS = 20_000_000
"""``async_backend="auto"`` on the CPU: a process below this many policy parameters, a thread from it on. Small
models are Python-bound (TargetToken, 2.7k parameters: process 0.78 of the synchronous time, thread 1.42); large
ones are kernel-bound and the process would pickle all their weights every iteration (SmolLM2, 135M: thread 0.84,
process 1.08; docs/off_policy.md)."""


def collector_backend(agent) -> str:
    """``"process"`` or ``"thread"``: ``agent.config.async_backend``, with ``"auto"`` resolved (on the CPU a process
    for small models and a thread for large ones, :data:`PROCESS_MAX_PARAMETERS`; a thread on other devices)."""
    backend = agent.config.async_backend
    if backend == "auto":
        small = sum(p.numel() for p in agent.policy.parameters()) < PROCESS_MAX_PARAMETERS
        backend = "process" if agent.device.type == "cpu" and small else "thread"
    if backend == "process" and agent.device.type != "cpu":
        raise ConfigError(f"async_backend='process' forks the training process, which cannot use {agent.device} in "
                          "the child; use async_backend='thread'")
    return backend


def make_collector(agent) -> "AsyncCollector":
    """The collector of :func:`collector_backend`, for an agent built with ``async_collect=True``."""
    cfg = agent.config
    if agent.sampler_policy is agent.policy or (cfg.max_lag > 0 and agent.sampling_generator is agent.generator):
        raise ConfigError("async_collect and max_lag were changed after the agent was built; its sampler and "
                          "generators are set up when it is built: build it with these settings")
    if "sample" in vars(agent):
        raise ConfigError("the agent's sample() was replaced on the instance (an engine sampler?): it would read the "
                          "policy while the update changes it; set async_collect=False")
    agent.sampler_version = None  # the first published weights are loaded whatever the sampler holds now
    return ProcessCollector(agent) if collector_backend(agent) == "process" else ThreadCollector(agent)


class AsyncCollector:
    """Rollouts of ``agent`` sampled beside the training loop, exactly ``agent.config.max_lag`` updates behind.

    The training loop calls :meth:`next` for each iteration's rollout and :meth:`publish` after each update;
    :meth:`stop` ends the sampler and rewinds what was sampled but not trained on.
    """

    def __init__(self, agent):
        self.agent = agent
        self.max_lag = agent.config.max_lag
        self.start_iteration = agent.iteration
        self.every = agent.config.checkpoint_every

    def weights_version(self, rollout: int) -> int:
        """``v(r)``: the iteration whose weights sample rollout ``r`` (see the module docstring)."""
        boundary = rollout - rollout % self.every if self.every else self.start_iteration
        return max(rollout - self.max_lag, self.start_iteration, boundary)

    def published_weights(self) -> tuple[int, dict[str, dict[str, torch.Tensor]], float]:
        """``(iteration, {module: weights in its sampler's dtype}, kl_coef)``: what :meth:`publish` hands over."""
        weights = {}
        with torch.no_grad():
            for name, (trained, sampler) in self.agent.sampler_modules().items():
                dtype = next((p.dtype for p in sampler.parameters() if p.is_floating_point()), torch.float32)
                weights[name] = {key: v.detach().to(dtype if v.is_floating_point() else v.dtype, copy=True)
                                 for key, v in trained.state_dict().items()}
        return self.agent.iteration, weights, float(self.agent.env.kl_coef)


def load_weights(agent, version: int, weights: dict, kl_coef: float | None) -> None:
    """Put a published version into the agent's sampler modules (the sampling side), and its ``kl_coef`` into the
    environment when the sampler has an environment of its own (the process backend)."""
    if agent.sampler_version != version:
        modules = agent.sampler_modules()
        with torch.no_grad():
            for name, state in weights.items():
                modules[name][1].load_state_dict(state, strict=True)
        agent.sampler_version = version
    if kl_coef is not None:
        agent.env.kl_coef = kl_coef


def start_state(agent) -> dict:
    """What the next rollout starts from: the environment's prompts and RNG, the sampling generator (plain data)."""
    return {"env": agent._env_snapshot() if agent._env_started else None,
            "generator": agent.sampling_generator.get_state().tolist(), "started": agent._env_started}


def restore_state(agent, state: dict) -> None:
    if state["env"] is not None:
        agent._env_restore(state["env"])
    agent._env_started = state["started"]
    if state["generator"] is not None:
        agent.sampling_generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


class ThreadCollector(AsyncCollector):
    """The sampler in a thread of the training process."""

    def __init__(self, agent):
        super().__init__(agent)
        self.next_rollout = agent.iteration
        self.condition = threading.Condition()
        self.published: dict[int, dict] = {}  # iteration -> {module: weights}
        self.ready: collections.deque = collections.deque()  # (rollout, state before it was sampled)
        self.in_flight_state = None
        self.error: BaseException | None = None
        self.stopping = False
        self.publish()
        self.thread = threading.Thread(target=self._run, name="lmgym-collector", daemon=True)
        self.thread.start()

    def publish(self) -> None:
        version, weights, _ = self.published_weights()  # kl_coef: this environment is the trainer's own
        with self.condition:
            self.published[version] = weights
            self.condition.notify_all()

    def next(self):
        with self.condition:
            while not self.ready and self.error is None:
                self.condition.wait()
            if self.error is not None:
                raise self.error
            rollout, _ = self.ready.popleft()
            self.condition.notify_all()
        return rollout

    def stop(self) -> None:
        with self.condition:
            self.stopping = True
            self.condition.notify_all()
        self.thread.join()
        rewind = self.ready[0][1] if self.ready else self.in_flight_state
        if rewind is not None:
            restore_state(self.agent, rewind)
        self.ready.clear()
        self.published.clear()

    def _run(self) -> None:
        agent = self.agent
        try:
            while True:
                with self.condition:
                    version = self.weights_version(self.next_rollout)
                    while not self.stopping and version not in self.published:
                        self.condition.wait()
                    if self.stopping:
                        return
                    weights = self.published[version]
                    for old in [v for v in self.published if v < version]:
                        del self.published[old]
                    # the environment is the trainer's own here: its kl_coef is not the sampler's to set
                    load_weights(agent, version, weights, None)
                    self.in_flight_state = start_state(agent)
                rollout = agent._collect_rollout()
                with self.condition:
                    self.ready.append((rollout, self.in_flight_state))
                    self.in_flight_state = None
                    self.next_rollout += 1
                    self.condition.notify_all()
        except BaseException as err:  # the training loop re-raises it from next()
            with self.condition:
                self.error = err
                self.condition.notify_all()


class CollectorError(RuntimeError):
    """The sampling process failed; its traceback is in the message."""


class ProcessCollector(AsyncCollector):
    """The sampler in a forked process with its own copy of the environment and the sampler (CPU only).

    Messages are pickled by value (no shared-memory handles, which would die with the process): weights
    to the child, rollouts and the states they started from back. Both queues have a feeder thread, so
    neither side waits for the other to read.
    """

    def __init__(self, agent):
        super().__init__(agent)
        context = multiprocessing.get_context("fork")
        self.commands = context.Queue()
        self.results = context.Queue()
        self.states: dict[int, dict] = {}  # rollout index -> the state it started from (sampled, not trained on)
        self.consumed = agent.iteration  # the next rollout index the training loop takes
        self.publish()
        self.process = context.Process(target=self._child, name="lmgym-collector", daemon=True)
        self.process.start()

    def publish(self) -> None:
        self.commands.put(_dumps(("weights", *self.published_weights(), self._shared_generator())))

    def _shared_generator(self) -> list | None:
        """With max_lag 0 sampling and the update draw from one generator, in turn: its state goes with each
        message, so the two processes draw exactly the sequence the synchronous loop draws."""
        agent = self.agent
        return agent.generator.get_state().tolist() if agent.sampling_generator is agent.generator else None

    def next(self):
        while True:
            kind, *payload = self._receive()
            if kind == "start":
                index, state = payload
                self.states[index] = state
            elif kind == "rollout":
                index, rollout, generator = payload
                if generator is not None:
                    self.agent.generator.set_state(torch.tensor(generator, dtype=torch.uint8))
                if index != self.consumed:
                    raise CollectorError(f"the sampling process sent rollout {index}, expected {self.consumed}")
                self.states.pop(index, None)
                self.consumed += 1
                return rollout

    def stop(self) -> None:
        self.commands.put(_dumps(("stop",)))
        while True:  # read what the child still sends until it says it stopped (or died)
            try:
                kind, *payload = self._receive()
            except CollectorError:
                break
            if kind == "start":
                self.states[payload[0]] = payload[1]
            elif kind == "stopped":  # the state the child's next rollout would start from
                index, state = payload
                self.states[index] = state
                break
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()
        self.commands.cancel_join_thread()  # weights the child never read: nothing to wait for
        pending = [i for i in self.states if i >= self.consumed]
        if pending:
            restore_state(self.agent, self.states[min(pending)])
        self.states.clear()

    def _receive(self):
        while True:
            try:
                message = _loads(self.results.get(timeout=0.5))
            except queue.Empty:
                if not self.process.is_alive():
                    raise CollectorError(f"the sampling process exited (code {self.process.exitcode}) without a "
                                         "word") from None
                continue
            if message[0] == "error":
                _, error, text = message
                if isinstance(error, Exception):
                    raise error
                raise CollectorError(f"the sampling process failed:\n{text}")
            return message

    # ------------------------------------------------------------------ the child process
    def _child(self) -> None:
        try:
            die_with_parent()
            torch.set_num_threads(1)  # one core for sampling, the other for the update
            agent, published, index = self.agent, {}, self.consumed
            while True:
                version = self.weights_version(index)
                while version not in published:
                    if self._command(published, block=True, index=index):
                        return
                while not self.commands.empty():  # a stop waiting? (and newer weights)
                    if self._command(published, block=False, index=index):
                        return
                for old in [v for v in published if v < version]:
                    del published[old]
                *message, generator = published[version]
                load_weights(agent, version, *message)
                if generator is not None:
                    agent.generator.set_state(torch.tensor(generator, dtype=torch.uint8))
                self.results.put(_dumps(("start", index, start_state(agent))))
                rollout = agent._collect_rollout()
                self.results.put(_dumps(("rollout", index, rollout, self._shared_generator())))
                index += 1
        except BaseException as err:
            try:  # the exception itself (a TrainingError stays one), else its text
                self.results.put(_dumps(("error", err, traceback.format_exc())))
            except Exception:
                self.results.put(_dumps(("error", None, traceback.format_exc())))
        finally:
            self.results.close()
            self.results.join_thread()  # everything sent reaches the parent before the process ends
            os._exit(0)  # no atexit handlers of the parent's (its locks, writers) run in the child

    def _command(self, published: dict, block: bool, index: int) -> bool:
        """Read one command: store published weights; on a stop, send the state rollout ``index`` would start
        from (the training process takes it up) and return True."""
        try:
            message = _loads(self.commands.get(block=block))
        except queue.Empty:
            return False
        if message[0] == "stop":
            state = start_state(self.agent)
            if self._shared_generator() is not None:
                state["generator"] = None  # the training process's own is ahead: its update drew from it since
            self.results.put(_dumps(("stopped", index, state)))
            return True
        published[message[1]] = message[2:]
        return False


def _dumps(message) -> bytes:
    """Pickle by value: tensors as their raw bytes (never as shared-memory handles, which die with the process;
    and 20 times faster than torch's own by-value pickling, which would cost milliseconds per rollout)."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: _reduce_tensor}
    pickler.dump(message)
    return buffer.getvalue()


def _reduce_tensor(tensor: torch.Tensor):
    flat = tensor.detach().contiguous().reshape(-1)
    return _rebuild_tensor, (flat.view(torch.uint8).numpy().tobytes(), flat.dtype, tuple(tensor.shape))


def _rebuild_tensor(data: bytes, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def _loads(data: bytes):
    return pickle.loads(data)  # messages between the training process and its own child, never a user's file
