"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), no critic.

Per iteration:

1. Roll out G completions per prompt (the environment's groups, ``group_size=G``).
2. Advantage of completion i of a group, shared by all its tokens:
   ``A_i = (R_i - mean_group(R)) / (std_group(R) + eps)``; with ``scale_rewards=False``
   only the mean is subtracted (Dr. GRPO, Liu et al. 2025).
3. Per token, the clipped surrogate with separate low / high epsilon (DAPO, Yu et al. 2025)
   plus the KL to the reference in the loss (k3 estimator, Schulman 2020), weight beta::

       l_t = -min(rho_t * A, clip(rho_t, 1 - eps_low, 1 + eps_high) * A) + beta * k3_t
       k3_t = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1

4. Aggregate the token losses (``loss_type``):
   - ``"grpo"``: mean over each sequence's tokens, then over sequences (the original);
   - ``"bnpo"``: mean over all tokens of the batch (token-level, as DAPO);
   - ``"dr_grpo"``: sum over all tokens divided by a constant ``N * max_new_tokens`` (Dr. GRPO).

The score R is the task score alone: the KL lives in the loss, so the environment's
per-token KL reward is not used for the advantage (``beta`` defaults to the
environment's ``kl_coef``, so the objective is the same one the other agents maximise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from lmgym.agents.base import Agent, AgentConfig, Rollout, masked_mean, policy_forward
from lmgym.agents.config import OneOf, Range

__all__ = ["GRPOConfig", "GRPO", "group_advantages", "k3_kl", "aggregate_loss"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


@dataclass
class GRPOConfig(AgentConfig):
    """GRPO hyper-parameters."""

    learning_rate: float = 1e-4
    """AdamW learning rate"""
    beta: Annotated[float | None, Range(ge=0)] = None
    """weight of the k3 KL to the reference in the loss (None: the environment's kl_coef, followed as it changes)"""
    epsilon_low: Annotated[float, Range(ge=0, lt=1)] = 0.2
    """lower clipping epsilon of the ratio"""
    epsilon_high: Annotated[float, Range(ge=0)] = 0.28
    """upper clipping epsilon of the ratio (DAPO's clip-higher)"""
    scale_rewards: bool = True
    """divide advantages by the group's standard deviation"""
    loss_type: Annotated[str, OneOf(*LOSS_TYPES)] = "grpo"
    """token-loss aggregation: grpo (per-sequence mean), bnpo (per-token mean), dr_grpo (constant normaliser)"""
    advantage_eps: Annotated[float, Range(ge=0)] = 1e-4
    """added to the group std"""


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4):
    """``(R - mean_group) / (std_group + eps)`` per completion (unbiased std, as the paper's reference code)."""
    groups = scores.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(pi || pi_ref) per token: ``exp(d) - d - 1`` with ``d = log pi_ref - log pi``."""
    d = ref_logprobs - logprobs
    return d.exp() - d - 1


def aggregate_loss(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int):
    if loss_type == "grpo":
        return masked_mean(token_loss, mask, dim=1).mean()
    if loss_type == "bnpo":
        return masked_mean(token_loss, mask)
    if loss_type == "dr_grpo":
        return (token_loss * mask).sum() / (token_loss.shape[0] * max_new_tokens)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


class GRPO(Agent):
    """Group Relative Policy Optimization. The environment must have ``group_size >= 2``."""

    config_class = GRPOConfig
    name = "grpo"

    def setup(self) -> None:
        if self.env.group_size < 2:
            raise ValueError("GRPO compares completions within a group: make the environment with group_size >= 2, "
                             "e.g. gym.make_vec(id, num_envs=64, group_size=8)")

    @property
    def beta(self) -> float:
        """The KL weight in the loss: the config's, or the environment's kl_coef (also after a resume that
        changed it), so the loss optimises the objective the environment defines."""
        return self.env.kl_coef if self.config.beta is None else self.config.beta

    def update(self, rollout: Rollout) -> dict[str, float]:
        cfg = self.config

        # 1. Group-normalised advantages from the task scores.
        advantages = group_advantages(rollout.scores, rollout.group_size, cfg.scale_rewards, cfg.advantage_eps)
        self.check_finite(scores=rollout.scores, advantages=advantages)

        # 2. Clipped surrogate + beta * k3 KL per token, aggregated as configured.
        stats = {"loss/policy": [], "policy/clipfrac": [], "policy/approxkl": [], "objective/entropy": [],
                 "objective/k3_kl": [], "loss/grad_norm": []}
        for idx in self.minibatches(len(rollout)):
            for micro in self.micro_batches(idx):
                batch = rollout.select(micro)
                with self.autocast():
                    logprobs, entropy, _ = policy_forward(self.policy, batch, sampling=self.sampling,
                                                          chunk_size=cfg.logprob_chunk_size)
                adv = advantages[micro][:, None]
                log_ratio = logprobs - batch.logprobs
                ratio = log_ratio.exp()
                surrogate = torch.min(ratio * adv, ratio.clamp(1 - cfg.epsilon_low, 1 + cfg.epsilon_high) * adv)
                kl = k3_kl(logprobs, batch.ref_logprobs)
                loss = aggregate_loss(-surrogate + self.beta * kl, batch.mask, cfg.loss_type,
                                      self.env.max_new_tokens)
                self.check_finite(**{"loss/policy": loss})
                (loss / cfg.gradient_accumulation_steps).backward()
                with torch.no_grad():
                    low, high = ratio < 1 - cfg.epsilon_low, ratio > 1 + cfg.epsilon_high
                    clipped = ((low & (adv < 0)) | (high & (adv > 0))).float()
                    for key, value in (("loss/policy", loss), ("policy/clipfrac", masked_mean(clipped, batch.mask)),
                                       ("policy/approxkl", masked_mean((ratio - 1) - log_ratio, batch.mask)),
                                       ("objective/entropy", masked_mean(entropy, batch.mask)),
                                       ("objective/k3_kl", masked_mean(kl, batch.mask))):
                        stats[key].append(value.detach())
            stats["loss/grad_norm"].append(torch.tensor(self.optimizer_step()))
        return {k: float(torch.stack(v).mean()) for k, v in stats.items()}
