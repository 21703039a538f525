"""The update machinery every algorithm uses: minibatches, micro-batches shared over processes, token-weighted
parts, the NaN guards and the optimizer step (gradient clipping, the weights' check, annealing)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from lmgym.agents.common import checkpoint as checkpoints
from lmgym.agents.common.config import ConfigError
from lmgym.agents.common.forward import policy_forward
from lmgym.agents.common.off_policy import correction_weights
from lmgym.agents.common.rollout import Rollout
from lmgym.agents.scale import sharding

__all__ = ["TrainingError", "UpdateSteps"]


class TrainingError(RuntimeError):
    """An update produced a non-finite quantity, or an optimizer step produced unusable weights."""


class UpdateSteps:
    """The update machinery of :class:`~lmgym.agents.common.base.Agent` (a mixin: it works on the agent's state)."""

    def minibatches(self, n: int):
        """Shuffled index sets for ``update_epochs`` passes of ``num_minibatches`` minibatches, seeded."""
        cfg = self.config
        if n % cfg.num_minibatches:
            raise ValueError(f"num_minibatches={cfg.num_minibatches} must divide the batch of {n} episodes")
        size = n // cfg.num_minibatches
        for _ in range(cfg.update_epochs):
            order = torch.randperm(n, generator=self.generator, device=self.device)
            # Every process draws the same permutation (their generators are equal); process 0's is made
            # authoritative so that an agent whose sampler drew unevenly cannot split the batch inconsistently.
            self.distributed.broadcast(order)
            for start in range(0, n, size):
                yield order[start:start + size]

    def micro_batches(self, idx: torch.Tensor):
        """The micro-batches of a minibatch ``idx`` (``gradient_accumulation_steps`` of them); under data
        parallelism, this process's equal part of each (the parts of all processes tile the micro-batch)."""
        steps = self.config.gradient_accumulation_steps
        if len(idx) % steps:
            raise ValueError(f"gradient_accumulation_steps={steps} must divide the minibatch of {len(idx)}")
        world = self.distributed.world_size
        if world > 1 and (len(idx) // steps) % world:
            raise ConfigError(f"micro-batches of {len(idx) // steps} episodes cannot be split over {world} processes; "
                              "make num_minibatches x gradient_accumulation_steps divide each process's num_envs")
        for micro in idx.chunk(steps):
            self.current_micro_batch = micro  # the whole micro-batch, for token_share
            yield micro if world == 1 else micro.chunk(world)[self.distributed.rank]

    def token_share(self, mask: torch.Tensor, part: torch.Tensor) -> torch.Tensor | float:
        """The factor that turns a token mean over this process's ``part`` of the current micro-batch into its share
        of the token mean over the whole micro-batch, gradients being averaged over the processes:
        ``world_size * tokens(part) / tokens(micro-batch)`` (1 with one process). ``mask`` is the rollout's."""
        if not self.distributed.active:
            return 1.0
        whole = self.current_micro_batch
        return self.distributed.world_size * mask[part].sum() / mask[whole].sum().clamp(min=1)

    def in_parts(self, fn: Callable[["Rollout"], torch.Tensor], rollout: "Rollout") -> torch.Tensor:
        """``fn(rollout)`` (rows first) computed by each process on its contiguous share of the rows and gathered,
        instead of by every process on all of them (e.g. PPO's value pass); just ``fn(rollout)`` with one."""
        if not self.distributed.active:
            return fn(rollout)
        share = torch.arange(len(rollout), device=self.device).chunk(self.distributed.world_size)
        return self.distributed.gather_rows(fn(rollout.select(share[self.distributed.rank])))

    def correct_off_policy(self, rollout: "Rollout") -> dict[str, float]:
        """Fill ``rollout.proximal_logprobs`` and ``rollout.is_weights`` for the configured off-policy correction
        (:mod:`lmgym.agents.common.off_policy`); returns its metrics. With ``"none"``: nothing to do.

        ``log pi_prox`` is one forward of the current weights, without gradients, in the trainer's precision.
        """
        cfg = self.config
        metrics = {"off_policy/lag": float(self.iteration - rollout.policy_version)}
        if cfg.off_policy_correction == "none":
            return metrics
        with torch.no_grad():
            proximal = self.in_parts(self.token_logprobs, rollout)
        rollout.proximal_logprobs = proximal
        rollout.is_weights = correction_weights(proximal, rollout.logprobs, rollout.mask, cfg.off_policy_correction,
                                                cap=cfg.is_cap, band=(cfg.is_band_low, cfg.is_band_high))
        inside = rollout.mask > 0
        log_rho = (proximal - rollout.logprobs)[inside]
        metrics.update({"off_policy/log_rho_mean": float(log_rho.mean()) if log_rho.numel() else 0.0,
                        "off_policy/log_rho_abs_max": float(log_rho.abs().max()) if log_rho.numel() else 0.0,
                        "off_policy/weight_mean": float(rollout.is_weights[inside].mean()) if log_rho.numel() else 1.0,
                        "off_policy/zero_weight_frac": float((rollout.is_weights[inside] == 0).float().mean())
                        if log_rho.numel() else 0.0})
        return metrics

    def token_logprobs(self, batch: "Rollout") -> torch.Tensor:
        """log pi_theta ``(N, T)`` of the batch's tokens under the current weights, as the update computes them (the
        agent's ``forward`` where it has one, e.g. NLPO's masked distribution)."""
        forward = getattr(self, "forward", None)
        if forward is not None:
            return forward(batch)[0]
        with self.autocast():
            return policy_forward(self.policy, batch, sampling=self.sampling,
                                  chunk_size=self.config.logprob_chunk_size)[0]

    def _last_good(self) -> str:
        return (f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "; no checkpoint of this run was written yet")

    def check_finite(self, **values: torch.Tensor) -> None:
        """Stop with a clear error naming the first non-finite quantity, before it reaches the weights."""
        for name, value in values.items():
            if not bool(torch.isfinite(value).all()):
                raise TrainingError(f"{name} is not finite (nan or inf) at iteration {self.iteration}, environment "
                                    f"step {self.global_step}; the update was stopped before changing the weights"
                                    f"{self._last_good()}. Lower the learning rate or check the reward function.")

    def optimizer_step(self) -> float:
        """Clip gradients, check them, take an AdamW step, check the weights; returns the pre-clip gradient norm.

        A non-finite gradient stops before the step. After the step one fused norm over all
        parameters (one host sync) checks that the weights are still finite and usable; if not,
        :class:`TrainingError` says so and the agent refuses to save them.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        self.distributed.average_gradients(params)  # every process then takes the same step
        if self.sharded:
            norm = float(sharding.clip_grad_norm(params, self.config.max_grad_norm))
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)  # the clipped gradients are nan: never accumulate into them
            self.check_finite(grad_norm=torch.tensor(norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not self._weights_usable(params):
            names = {id(p): name for name, p in self.named_trainable_parameters().items()}
            problem = checkpoints.weight_problem({names.get(id(p), f"parameter #{i}"): p
                                                  for i, p in enumerate(params)})
            raise TrainingError(f"the optimizer step at iteration {self.iteration}, environment step "
                                f"{self.global_step} left the weights unusable ({problem}); they will not be saved"
                                f"{self._last_good()}. Lower the learning rate (now "
                                f"{self.optimizer.param_groups[0]['lr']:g}) or max_grad_norm.")
        return norm

    def _weights_usable(self, params) -> bool:
        if not self.sharded:
            return checkpoints.weights_usable(params)
        local = [p.to_local() if sharding.is_sharded(p) else p for p in params]  # each process checks its shards
        flag = torch.tensor([int(checkpoints.weights_usable(local))], device=self.device)
        return bool(self.distributed.all_reduce(flag, torch.distributed.ReduceOp.MIN))

    def named_trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable modules' parameters by ``module.parameter`` name (tied parameters once)."""
        out, seen = {}, set()
        for module_name, module in self.trainable_modules().items():
            for name, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out[f"{module_name}.{name}"] = p
        return out

    def _anneal(self, total_steps: int) -> None:
        if self.config.anneal_lr:
            frac = max(0.0, 1.0 - self.global_step / max(1, total_steps))
            for group in self.optimizer.param_groups:
                group["lr"] = frac * self.config.learning_rate
