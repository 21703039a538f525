"""Evaluating an agent's policy on fresh episodes or on given (held-out) prompts, without touching the training
run's prompt stream or random state."""

from __future__ import annotations


import torch

from lmgym.agents.common.rollout import Rollout

__all__ = ["Evaluation"]


class Evaluation:
    """Evaluation of :class:`~lmgym.agents.common.base.Agent` (a mixin: it works on the agent's state)."""

    @torch.no_grad()
    def evaluate(self, num_batches: int = 4, seed: int | None = None, prompts=None) -> dict:
        """Mean score, KL and return (score - beta * KL) of the current policy over fresh episodes.

        Prompts and samples come from ``seed`` (default: the config's seed + 10000), so two
        evaluations of one run (before and after training) see the same prompts and differ
        only by the policy. The training run's own prompt stream and RNG are left untouched.

        With ``prompts`` (e.g. held-out prompts: text, chat messages or token ids), each of
        them is evaluated instead, ``group_size`` times, and ``num_batches`` is ignored; the
        result then also holds ``samples``, ``(prompt, completion, score)`` per episode.
        """
        seed = self.config.seed + 10_000 if seed is None else seed
        self.stop_collector()  # the environment is the evaluation's now; the collector's thread resumes after it
        saved_generators, saved_started = (self.generator, self.sampling_generator), self._env_started
        env_state = self._env_snapshot() if self._env_started else None
        self.generator = self.sampling_generator = torch.Generator(device=self.device).manual_seed(seed)
        samples = []
        try:
            if prompts is None:
                self.env.reset(seed=seed)
                self._env_started = True
                batches = [self.distributed.gather_rollout(self.collect()) for _ in range(num_batches)]
            else:
                # every process evaluates all the given prompts alike (no sharding of them or of the noise)
                self._shard_sampling, saved_shard = False, self.env.core.shard
                self.env.core.shard = (0, 1)
                try:
                    batches = self._collect_on(list(prompts), seed, samples)
                finally:
                    self._shard_sampling, self.env.core.shard = True, saved_shard
        finally:
            self.generator, self.sampling_generator = saved_generators
            self._env_started = saved_started
            if env_state is not None:
                self._env_restore(env_state)
        scores = torch.cat([b.scores for b in batches])
        kl = torch.cat([b.kl.sum(1) for b in batches])
        returns = torch.cat([b.returns for b in batches])
        out = {"score": float(scores.mean()), "kl": float(kl.mean()), "return": float(returns.mean()),
               "return_std": float(returns.std()) if returns.numel() > 1 else 0.0, "episodes": int(returns.numel())}
        if prompts is not None:
            out["samples"] = samples
        return out

    def _collect_on(self, prompts: list, seed: int, samples: list) -> list[Rollout]:
        """Rollouts of every prompt in ``prompts``, ``group_size`` episodes each, in batches of the env's size."""
        if not prompts:
            raise ValueError("evaluate(prompts=...) needs at least one prompt")
        per_batch = self.env.num_envs // self.env.group_size
        batches = []
        for start in range(0, len(prompts), per_batch):
            chunk = prompts[start:start + per_batch]
            real = len(chunk) * self.env.group_size
            chunk = chunk + [chunk[0]] * (per_batch - len(chunk))  # fill the batch; the filler is dropped below
            self.env.reset(seed=seed, options={"prompts": chunk})
            self._env_started = True
            rollout = self.collect()
            keep = torch.arange(real, device=self.device)
            samples.extend(zip(rollout.prompts[:real], rollout.completions[:real], rollout.scores[:real].tolist()))
            batches.append(rollout.select(keep))
        return batches
