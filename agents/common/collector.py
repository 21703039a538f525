"""The asynchronous collector: the next rollouts are sampled in a background thread while the update runs.

Pipelines such as PipelineRL, AReaL and verl's fully asynchronous mode keep generation busy while the
trainer steps: the samples then come from weights some updates old. Here one thread samples and the
training loop updates; on a 2-core CPU each can have a core (``torch.set_num_threads(1)``), and on a GPU
the two overlap on the device.

**Which weights sample which rollout.** Rollout ``r`` is the one the update of iteration ``r`` trains on.
It is sampled with the weights of iteration ``v(r) = max(r - max_lag, start, boundary(r))``, exactly, never
newer even when newer ones are ready, so a run is reproducible whatever the threads' timing:

- ``start``: the iteration ``learn`` started (or resumed) at, whose weights are published first;
- ``boundary(r)``: the last checkpoint iteration ``<= r`` (``checkpoint_every``). A checkpoint's rollout is
  sampled with the checkpoint's own weights, so the pipeline holds nothing in flight when a checkpoint is
  written and a resumed run continues exactly as the uninterrupted one.

So ``max_lag=0`` is the synchronous loop itself (sampling waits for each update; same generator, same results),
and ``max_lag=k`` trains on samples exactly ``k`` updates old once the pipeline is full.

**Weight publication.** After each update the training loop publishes its weights: a copy in the
sampler's precision (:mod:`lmgym.models.precision`) kept until the sampler has taken it. At most
``max_lag + 1`` such copies exist at once.

**Nothing lost or counted twice.** Before each rollout the sampler records the state it starts from (the
environment's prompts and RNG, the sampling generator). When the collector stops (the end of ``learn``, an
evaluation, a checkpoint written outside the schedule), rollouts sampled but not yet trained on are dropped and
that state is put back, so they are sampled again, by the same rule, when collection resumes.
"""

from __future__ import annotations

import collections
import threading

import torch

__all__ = ["AsyncCollector"]


class AsyncCollector:
    """Rollouts of ``agent`` sampled in a background thread, at most ``agent.config.max_lag`` updates behind.

    The training loop calls :meth:`next` for each iteration's rollout and :meth:`publish` after each update;
    :meth:`stop` ends the thread and rewinds what was sampled but not trained on.
    """

    def __init__(self, agent):
        self.agent = agent
        self.max_lag = agent.config.max_lag
        self.start_iteration = agent.iteration
        self.next_rollout = agent.iteration  # index of the next rollout the thread samples
        self.condition = threading.Condition()
        self.published: dict[int, dict[str, torch.Tensor]] = {}  # iteration -> weights in the sampler's dtype
        self.ready: collections.deque = collections.deque()  # (rollout, state before it was sampled)
        self.in_flight_state = None  # the state the rollout being sampled started from
        self.error: BaseException | None = None
        self.stopping = False
        self.publish()
        self.thread = threading.Thread(target=self._run, name="lmgym-collector", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ the training loop's side
    def weights_version(self, rollout: int) -> int:
        """``v(r)``: the iteration whose weights sample rollout ``r`` (see the module docstring)."""
        every = self.agent.config.checkpoint_every
        boundary = rollout - rollout % every if every else self.start_iteration
        return max(rollout - self.max_lag, self.start_iteration, boundary)

    def publish(self) -> None:
        """Offer the policy's current weights (of iteration ``agent.iteration``) to the sampler: a copy in the
        sampler's dtype, dropped once a later version has been taken."""
        dtype = _dtype(self.agent.sampler_policy)
        with torch.no_grad():
            weights = {name: v.detach().to(dtype if v.is_floating_point() else v.dtype, copy=True)
                       for name, v in self.agent.policy.state_dict().items()}
        with self.condition:
            self.published[self.agent.iteration] = weights
            self.condition.notify_all()

    def next(self):
        """The rollout of the current iteration (waits for the thread to sample it)."""
        with self.condition:
            while not self.ready and self.error is None:
                self.condition.wait()
            if self.error is not None:
                raise self.error
            rollout, _ = self.ready.popleft()
            self.condition.notify_all()
        return rollout

    def stop(self) -> None:
        """End the thread; put back the state of the oldest rollout sampled but not trained on, so it is redone."""
        with self.condition:
            self.stopping = True
            self.condition.notify_all()
        self.thread.join()
        rewind = self.ready[0][1] if self.ready else self.in_flight_state
        if rewind is not None:
            self._restore(rewind)
        self.ready.clear()
        self.published.clear()

    # ------------------------------------------------------------------ the sampling thread
    def _run(self) -> None:
        agent = self.agent
        try:
            while True:
                with self.condition:
                    version = self.weights_version(self.next_rollout)
                    # wait for the weights this rollout must use, and for room: at most max_lag + 1 rollouts ahead
                    while not self.stopping and (version not in self.published
                                                 or len(self.ready) > self.max_lag):
                        self.condition.wait()
                    if self.stopping:
                        self.in_flight_state = None
                        return
                    weights = self.published[version]
                    for old in [v for v in self.published if v < version]:
                        del self.published[old]
                    self.in_flight_state = self._state()
                self._load(weights, version)
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

    def _load(self, weights: dict[str, torch.Tensor], version: int) -> None:
        sampler = self.agent.sampler_policy
        if self.agent.sampler_version != version:
            with torch.no_grad():
                sampler.load_state_dict(weights, strict=True)
            self.agent.sampler_version = version

    def _state(self) -> dict:
        """What the next rollout starts from: the environment's prompts and RNG, the sampling generator."""
        agent = self.agent
        return {"env": agent._env_snapshot() if agent._env_started else None,
                "generator": agent.sampling_generator.get_state(), "started": agent._env_started}

    def _restore(self, state: dict) -> None:
        agent = self.agent
        if state["env"] is not None:
            agent._env_restore(state["env"])
        agent._env_started = state["started"]
        agent.sampling_generator.set_state(state["generator"])


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
