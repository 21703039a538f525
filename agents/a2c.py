"""A2C: synchronous advantage actor-critic (Mnih et al. 2016, the synchronous form of A3C).

Per iteration:

1. Roll out: the policy samples one continuation per prompt; the environment returns
   per-token rewards ``r_t = -beta * KL_t`` plus the score on the last token.
2. Estimate values V(s_t) with the critic, a value head on the policy's last hidden state.
3. Advantages, one of:
   - ``"gae"``: generalised advantage estimation (Schulman et al. 2016),
     ``A_t = sum_k (gamma * lam)^k delta_{t+k}``, ``delta_t = r_t + gamma * V_{t+1} - V_t``
     (``gae_lambda=1`` is the Monte-Carlo return minus V);
   - ``"n_step"``: the n-step return of A3C,
     ``G_t = sum_{k<n} gamma^k r_{t+k} + gamma^n V(s_{t+n})`` (bootstrapped only inside the
     episode: after the last token V = 0), and ``A_t = G_t - V(s_t)``.
   The value target is ``G_t = A_t + V(s_t)`` either way.
4. One gradient step on the whole rollout (no ratios, no clipping: the data is on-policy)::

       L = -E[A_t * log pi(a_t|s_t)] + vf_coef * 0.5 * E[(V(s_t) - G_t)^2] - ent_coef * E[H(pi(.|s_t))]

   with token means over the rollout. The optimizer is the agents' AdamW (A3C used RMSProp).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from lmgym.agents.common.base import Agent, AgentConfig, Rollout, ValueHead, masked_mean, masked_whiten, policy_forward
from lmgym.agents.common.config import OneOf, Range
from lmgym.agents.common.rollout import policy_steps
from lmgym.agents.ppo import gae

__all__ = ["A2CConfig", "A2C", "n_step_returns", "a2c_losses"]

ADVANTAGES = ("gae", "n_step")


@dataclass
class A2CConfig(AgentConfig):
    """A2C hyper-parameters (one gradient step per rollout: update_epochs and num_minibatches stay 1)."""

    learning_rate: float = 1e-4
    """AdamW learning rate"""
    gamma: Annotated[float, Range(ge=0, le=1)] = 1.0
    """discount factor"""
    advantage: Annotated[str, OneOf(*ADVANTAGES)] = "gae"
    """advantage estimator: gae or n_step"""
    gae_lambda: Annotated[float, Range(ge=0, le=1)] = 1.0
    """GAE lambda (1: Monte-Carlo return minus the value)"""
    n_steps: Annotated[int, Range(ge=1)] = 5
    """bootstrap horizon of the n-step return (advantage='n_step')"""
    vf_coef: Annotated[float, Range(ge=0)] = 0.5
    """value loss weight"""
    ent_coef: Annotated[float, Range(ge=0)] = 0.0
    """entropy bonus weight"""
    norm_adv: bool = False
    """whiten advantages over the rollout"""


def n_step_returns(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, n: int):
    """``G_t = sum_{k<n} gamma^k r_{t+k} + gamma^n V_{t+n}`` per token ``(N, T)``, truncated at each episode's end.

    Rewards and values must be 0 outside the episode (``mask == 0``), so sums and the
    bootstrap stop there by themselves.
    """
    # steps are the masked tokens: a multi-turn episode's replies between them are skipped (see ppo.gae)
    pack, unpack = policy_steps(mask)
    rewards, values, mask = pack(rewards), pack(values), pack(mask)
    steps = rewards.shape[1]
    returns = torch.zeros_like(rewards)
    for k in range(min(n, steps)):
        # r_{t+k} for every t (0 beyond the horizon)
        returns[:, :steps - k] += gamma ** k * rewards[:, k:]
    bootstrap = torch.zeros_like(values)  # V(s_{t+n}), 0 where t + n lies beyond the rollout
    if n < steps:
        bootstrap[:, :steps - n] = values[:, n:]
    return unpack((returns + gamma ** n * bootstrap) * mask)


def a2c_losses(logprobs, values, entropy, advantages, returns, mask):
    """Policy-gradient, value and entropy terms of the A2C loss (token means over ``mask``)."""
    policy_loss = -masked_mean(advantages * logprobs, mask)
    value_loss = 0.5 * masked_mean((values - returns) ** 2, mask)
    entropy_mean = masked_mean(entropy, mask)
    return policy_loss, value_loss, entropy_mean


class A2C(Agent):
    """Advantage actor-critic with a value head on the policy's trunk; see the module docstring."""

    config_class = A2CConfig
    name = "a2c"

    def setup(self) -> None:
        cfg = self.config
        if cfg.update_epochs != 1 or cfg.num_minibatches != 1:
            raise ValueError("A2C takes one gradient step per rollout: keep update_epochs=1 and num_minibatches=1 "
                             "(several passes over a rollout are what PPO's clipping is for)")
        self.value_head = ValueHead(self.policy.config.hidden_size).to(self.device)

    def parameters(self):
        return list(self.policy.parameters()) + list(self.value_head.parameters())

    def trainable_modules(self):
        return {"policy": self.policy, "value_head": self.value_head}

    def forward(self, batch: Rollout):
        """Log-probs, entropy and values of the current actor and critic on a batch."""
        with self.autocast():
            logprobs, entropy, hidden = policy_forward(self.policy, batch, sampling=self.sampling,
                                                       chunk_size=self.config.logprob_chunk_size, hidden=True,
                                                       entropy_grad=self.config.ent_coef != 0)
        return logprobs, entropy, self.value_head(hidden)

    def advantages(self, rollout: Rollout, values: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.advantage == "gae":
            return gae(rollout.rewards, values, rollout.mask, cfg.gamma, cfg.gae_lambda)
        return n_step_returns(rollout.rewards, values, rollout.mask, cfg.gamma, cfg.n_steps) - values

    def update(self, rollout: Rollout) -> dict[str, float]:
        cfg, mask = self.config, rollout.mask

        # 1. Values of the states visited, under the critic (the targets are computed without gradient).
        with torch.no_grad():
            values = torch.cat([self.forward(rollout.select(micro))[2] for micro in self.micro_batches(
                torch.arange(len(rollout), device=self.device))]) * mask
        self.check_finite(rewards=rollout.rewards, values=values)

        # 2. Advantages (GAE or n-step) and the value targets.
        advantages = self.advantages(rollout, values)
        returns = advantages + values
        if cfg.norm_adv:
            advantages = masked_whiten(advantages, mask) * mask
        self.check_finite(advantages=advantages)

        # 3. One gradient step: policy gradient + value regression - entropy bonus, token means over the rollout.
        tokens = mask.sum()
        stats = {"loss/policy": 0.0, "loss/value": 0.0, "objective/entropy": 0.0}
        for micro in self.micro_batches(torch.arange(len(rollout), device=self.device)):
            batch = rollout.select(micro)
            logprobs, entropy, new_values = self.forward(batch)
            policy_loss, value_loss, entropy_mean = a2c_losses(logprobs, new_values, entropy, advantages[micro],
                                                               returns[micro], batch.mask)
            self.check_finite(**{"loss/policy": policy_loss, "loss/value": value_loss})
            share = batch.mask.sum() / tokens  # micro-batch token means, weighted back into the rollout's mean
            ((policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy_mean) * share).backward()
            for key, value in (("loss/policy", policy_loss), ("loss/value", value_loss),
                               ("objective/entropy", entropy_mean)):
                stats[key] += float(value.detach() * share)
        stats["loss/grad_norm"] = self.optimizer_step()

        # 4. Explained variance of the critic.
        flat_ret, flat_val = returns[mask.bool()], values[mask.bool()]
        var = flat_ret.var()
        stats["val/explained_variance"] = float(1 - (flat_ret - flat_val).var() / var) if var > 0 else 0.0
        return stats
