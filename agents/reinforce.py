"""REINFORCE with a baseline (Williams 1992), and RLOO, its leave-one-out form (Kool et al. 2019;
Ahmadian et al. 2024).

Each completion is one action of a bandit: its return is the sum of the environment's
per-token rewards, ``R_i = score_i - beta * sum_t KL_t``. The policy gradient is::

    grad J = E[(R_i - b_i) * grad sum_t log pi(y_i,t | x_i, y_i,<t)]

with the baseline b_i:

- ``"moving_average"``: an exponential moving average of past batch-mean returns
  (REINFORCE with baseline); the first batch uses its own mean;
- ``"rloo"``: the mean return of the other k - 1 completions of the same prompt,
  ``b_i = (sum_j R_j - R_i) / (k - 1)`` (the environment's groups, ``group_size=k``);
- ``"none"``: plain REINFORCE.

The loss ``-mean_i[(R_i - b_i) * sum_t log pi]`` is minimised with one optimizer step per
minibatch.

Where the KL goes (``kl_placement``, ``kl_estimator``; the bias of each choice is derived in
:mod:`lmgym.agents.common.kl`):

- ``"reward"`` (default): ``R_i = score_i - beta * sum_t k_t`` with ``k_t`` the estimator of the
  sampled token's log ratio ``d_t = log pi_old - log pi_ref`` (the rollout's log-probs, no
  gradient). With k1 (default) that is the environment's return, and the update above is the
  unbiased gradient of the KL-regularised objective ``E[score] - beta * KL(pi || pi_ref)``.
  k2 (``d_t^2 / 2``) penalises another quantity than the KL; k3 (``exp(-d_t) - 1 + d_t``) has the
  KL as its expectation, but as a fixed reward its gradient misses
  ``beta * sum_t E[grad KL(pi_ref || pi)(s_t)]``: both are biased.
- ``"loss"``: ``R_i = score_i`` and ``beta * mean_i sum_t k_t(theta)`` is added to the loss (the
  sum over tokens, as the KL of J). Its expected gradient is 0 for k1, the per-state reverse
  KL's for k2 and the per-state forward KL(pi_ref || pi)'s for k3, each with the state
  distribution held fixed: biased, except k2 on one-token episodes.

``beta`` is the environment's ``kl_coef``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch

from lmgym.agents.common.base import Agent, AgentConfig, Rollout, masked_mean, policy_forward
from lmgym.agents.common.config import OneOf, Range
from lmgym.agents.common.kl import KL_ESTIMATORS, KL_PLACEMENTS, kl_penalty_loss, penalised_rewards
from lmgym.agents.common.turns import leave_one_out, per_token, turn_returns

__all__ = ["ReinforceConfig", "Reinforce", "RLOOConfig", "RLOO", "leave_one_out_baseline", "policy_gradient_loss"]

BASELINES = ("moving_average", "rloo", "none")
TURN_BASELINE_LEVELS = ("turn", "episode")


@dataclass
class ReinforceConfig(AgentConfig):
    """REINFORCE hyper-parameters."""

    learning_rate: float = 1e-4
    """AdamW learning rate"""
    baseline: Annotated[str, OneOf(*BASELINES)] = "moving_average"
    """moving_average, rloo (leave-one-out over the group) or none"""
    baseline_decay: Annotated[float, Range(ge=0, le=1)] = 0.9
    """decay of the moving-average baseline"""
    normalize_advantages: bool = False
    """divide R - b by the batch standard deviation"""
    kl_estimator: Annotated[str, OneOf(*KL_ESTIMATORS)] = "k1"
    """per-token KL estimator: k1 = log(pi/pi_ref), k2 = log(pi/pi_ref)^2 / 2, k3 = pi_ref/pi - 1 - log(pi_ref/pi)"""
    kl_placement: Annotated[str, OneOf(*KL_PLACEMENTS)] = "reward"
    """reward (beta * sum_t k_t subtracted from each return) or loss (a KL term in the loss)"""
    turn_level: bool = False
    """multi-turn credit per turn: each token weighs by its turn's return from that turn on, minus a baseline of
    that turn (rloo: the group's other episodes with the turn; moving_average: the batch's mean of the turn)"""
    turn_baseline_level: Annotated[str, OneOf(*TURN_BASELINE_LEVELS)] = "turn"
    """under turn_level, what a turn's return is compared with: turn (the baseline of that turn, above) or episode
    (the baseline of the episode returns, as without turn_level)"""


@dataclass
class RLOOConfig(ReinforceConfig):
    """RLOO hyper-parameters: REINFORCE with the leave-one-out baseline."""

    baseline: str = "rloo"
    """leave-one-out baseline over the k completions of a prompt"""


def leave_one_out_baseline(returns: torch.Tensor, k: int) -> torch.Tensor:
    """``b_i = (sum of the group's returns - R_i) / (k - 1)`` for consecutive groups of k."""
    groups = returns.view(-1, k)
    return ((groups.sum(dim=1, keepdim=True) - groups) / (k - 1)).reshape(-1)


def policy_gradient_loss(logprobs: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``-mean_i sum_t w_t * A * log pi(y_t)``: ``advantages`` ``(n,)`` one per sequence, or ``(n, T)`` one per token;
    ``weights`` ``(n, T)`` are the mask, or an off-policy correction's weights (0 outside the policy's tokens)."""
    if advantages.dim() == 2:
        return -(advantages * logprobs * weights).sum(1).mean()
    return -(advantages * (logprobs * weights).sum(1)).mean()


class Reinforce(Agent):
    """REINFORCE with a baseline; see the module docstring."""

    config_class = ReinforceConfig
    name = "reinforce"
    corrects_off_policy = True

    def setup(self) -> None:
        if self.config.baseline == "rloo" and self.env.group_size < 2:
            raise ValueError("the leave-one-out baseline needs k >= 2 completions per prompt: make the environment "
                             "with group_size >= 2, e.g. gym.make_vec(id, num_envs=64, group_size=4)")
        self.running_return: float | None = None

    def extra_state(self) -> dict:
        return {"running_return": self.running_return}

    def check_extra_state(self, state: dict) -> None:
        if set(state) != {"running_return"}:
            raise ValueError(f"expected the key running_return, found {sorted(state)}")
        value = state["running_return"]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ValueError(f"running_return must be a finite number or null, got {value!r}")

    def load_extra_state(self, state: dict) -> None:
        self.running_return = None if state["running_return"] is None else float(state["running_return"])

    def turn_baseline(self, returns: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """The baseline of each (episode, turn) return ``(N, K)`` under ``turn_level``."""
        kind = self.config.baseline
        if kind == "rloo":
            return leave_one_out(returns, present, self.env.group_size)
        if kind == "none":
            return torch.zeros_like(returns)
        count = present.sum(0).clamp(min=1)
        return ((returns * present).sum(0) / count).expand_as(returns)

    def baseline(self, returns: torch.Tensor) -> torch.Tensor:
        kind = self.config.baseline
        if kind == "rloo":
            return leave_one_out_baseline(returns, self.env.group_size)
        if kind == "none":
            return torch.zeros_like(returns)
        mean = float(returns.mean())
        b = mean if self.running_return is None else self.running_return
        decay = self.config.baseline_decay
        self.running_return = mean if self.running_return is None else decay * self.running_return + (1 - decay) * mean
        return torch.full_like(returns, b)

    def update(self, rollout: Rollout) -> dict[str, float]:
        cfg = self.config

        # 0. Off-policy correction: pi_prox recomputed and the behaviour weights, when configured.
        off_policy = self.correct_off_policy(rollout)
        weights = rollout.mask if rollout.is_weights is None else rollout.is_weights  # w_t on each policy token

        # 1. Sequence returns (the environment's with k1 in the reward; else the score, minus the chosen
        #    estimator's penalty when it is in the reward) and their baseline.
        beta = self.env.kl_coef
        rewards = penalised_rewards(rollout, cfg.kl_estimator, cfg.kl_placement, beta)
        if cfg.turn_level:  # each token weighs by its own turn's return from that turn on
            returns, present = turn_returns(rollout, rewards)
            if cfg.turn_baseline_level == "episode":  # G_k against the baseline of the episode returns G_0
                baseline = self.baseline(returns[:, 0])[:, None]
            else:
                baseline = self.turn_baseline(returns, present)
            advantages = (returns - baseline) * present
            if cfg.normalize_advantages:
                advantages = advantages / (advantages[present].std() + 1e-8)
            token_advantages = per_token(advantages, rollout)
        else:
            token_advantages = None
            returns = rewards.sum(1)
            advantages = returns - self.baseline(returns)
            if cfg.normalize_advantages:
                advantages = advantages / (advantages.std() + 1e-8)
        self.check_finite(returns=returns, advantages=advantages)

        # 2. Policy gradient on the log-likelihood of each whole completion.
        stats = {"loss/policy": [], "objective/entropy": [], "loss/grad_norm": []}
        kl_in_loss = cfg.kl_placement == "loss"
        if kl_in_loss:
            stats[f"objective/{cfg.kl_estimator}_kl"] = []
        for idx in self.minibatches(len(rollout)):
            for micro in self.micro_batches(idx):
                batch = rollout.select(micro)
                with self.autocast():
                    logprobs, entropy, _ = policy_forward(self.policy, batch, sampling=self.sampling,
                                                          chunk_size=cfg.logprob_chunk_size)
                # turn-level: sum_t A_turn(t) log pi(y_t), each token weighed by its turn's advantage
                policy_loss = policy_gradient_loss(logprobs, token_advantages[micro] if cfg.turn_level
                                                   else advantages[micro], weights[micro])
                self.check_finite(**{"loss/policy": policy_loss})
                loss = policy_loss
                if kl_in_loss:
                    kl_loss = kl_penalty_loss(logprobs, batch.ref_logprobs, batch.mask, cfg.kl_estimator,
                                              per="sequence")
                    self.check_finite(**{"loss/kl": kl_loss})
                    stats[f"objective/{cfg.kl_estimator}_kl"].append(kl_loss.detach())
                    loss = loss + beta * kl_loss
                (loss / cfg.gradient_accumulation_steps).backward()
                stats["loss/policy"].append(policy_loss.detach())
                stats["objective/entropy"].append(masked_mean(entropy, batch.mask).detach())
            stats["loss/grad_norm"].append(torch.tensor(self.optimizer_step()))
        metrics = {k: float(torch.stack(v).mean()) for k, v in stats.items()} | off_policy
        metrics["objective/advantage_std"] = float(advantages.std())
        return metrics


class RLOO(Reinforce):
    """REINFORCE Leave-One-Out: the baseline of each completion is the mean return of its k - 1 siblings."""

    config_class = RLOOConfig
    name = "rloo"
