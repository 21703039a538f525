"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), no critic.

Per iteration:

1. Roll out G completions per prompt (the environment's groups, ``group_size=G``).
2. Advantage of completion i of a group, shared by all its tokens:
   ``A_i = (R_i - mean_group(R)) / (std_group(R) + eps)``; with ``scale_rewards=False``
   only the mean is subtracted (Dr. GRPO, Liu et al. 2025). R_i is the task score
   (KL in the loss, the default) or ``score_i - beta * sum_t k_t`` (KL in the reward).
3. Per token, the clipped surrogate with separate low / high epsilon (DAPO, Yu et al. 2025)
   plus, by default, the KL to the reference in the loss (k3 estimator, Schulman 2020), weight beta::

       l_t = -min(rho_t * A, clip(rho_t, 1 - eps_low, 1 + eps_high) * A) + beta * k3_t
       k3_t = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1

   The importance ratio (``importance_sampling_level``):
   - ``"token"``: ``rho_t = pi(y_t) / pi_old(y_t)`` per token (GRPO, PPO);
   - ``"sequence"``: GSPO (Zheng et al. 2025), one length-normalised ratio per completion shared by
     its tokens, ``s_i = exp(mean_t log(pi(y_t) / pi_old(y_t)))``, clipped as above (the GSPO paper
     clips it far tighter than a token ratio, eps_low = 3e-4, eps_high = 4e-4). With
     ``loss_type="grpo"`` the loss is exactly GSPO's ``-mean_i min(s_i A_i, clip(s_i) A_i)``
     (plus the KL term); the token-summing loss types weigh each completion by its length.

4. Aggregate the token losses (``loss_type``; as TRL's GRPOTrainer defines them):
   - ``"grpo"``: mean over each sequence's tokens, then over sequences (the original);
   - ``"bnpo"``: mean over all tokens of each micro-batch (token-level), micro-batches averaged;
   - ``"dr_grpo"``: sum over all tokens divided by a constant ``N * max_new_tokens`` (Dr. GRPO);
   - ``"dapo"``: sum over all tokens of the whole minibatch (every micro-batch of one optimizer
     step) divided by that minibatch's token count (DAPO's token-level loss; equals ``"bnpo"``
     without gradient accumulation).

Where the KL goes (``kl_placement``, ``kl_estimator``; the bias of each choice is derived in
:mod:`lmgym.agents.common.kl`):

- ``"loss"`` (default, with k3, as the paper): R is the task score alone and ``beta * k_t(theta)``
  is added to each token's loss. With k3 its gradient is not that of the KL-regularised
  objective: on-policy, it is the gradient of the *forward* KL ``sum_t E_{s_t}[KL(pi_ref || pi)(s_t)]``
  with the states held fixed (k2: the reverse KL's, states held fixed; k1: zero in expectation).
  The score enters through advantages divided by the group's std and the KL does not, so measured
  against the objective the KL weighs ``beta * std_group(R)`` rather than beta. ``scale_rewards=False``
  removes that factor but not another: each completion's own score is in its group's mean, so the
  expected score gradient is ``(G-1)/G`` of the objective's and the KL weighs ``G/(G-1) * beta``
  against it (2 beta at G = 2; up to the token averaging of ``loss_type``). ``leave_one_out=True``
  rescales the centred advantages by ``G/(G-1)``, which is the leave-one-out (RLOO) baseline
  ``R_i - mean_{j != i} R_j``, and with ``scale_rewards=False`` keeps the KL at weight beta.
- ``"reward"``: ``R_i = score_i - beta * sum_t k_t`` from the rollout's log-probs, normalised within
  the group like the score; k1 gives the unbiased gradient of ``E[R] - beta * KL(pi || pi_ref)``
  (up to the group normalisation, as for the score), k2 / k3 a biased one.

``beta`` defaults to the environment's ``kl_coef``, so the objective is the same one the other
agents maximise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from lmgym.agents.common.base import Agent, AgentConfig, Rollout, masked_mean, policy_forward
from lmgym.agents.common.config import OneOf, Range
from lmgym.agents.common.kl import KL_ESTIMATORS, KL_PLACEMENTS, kl_estimate, penalised_returns, penalised_rewards
from lmgym.agents.common.turns import group_normalised, per_token, turn_returns

__all__ = ["GRPOConfig", "GRPO", "group_advantages", "turn_advantages", "k3_kl", "aggregate_loss", "grpo_token_loss"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
TURN_BASELINE_LEVELS = ("turn", "episode")
IMPORTANCE_LEVELS = ("token", "sequence")


@dataclass
class GRPOConfig(AgentConfig):
    """GRPO hyper-parameters."""

    learning_rate: float = 1e-4
    """AdamW learning rate"""
    beta: Annotated[float | None, Range(ge=0)] = None
    """weight of the KL to the reference (None: the environment's kl_coef, followed as it changes)"""
    kl_estimator: Annotated[str, OneOf(*KL_ESTIMATORS)] = "k3"
    """per-token KL estimator: k1 = log(pi/pi_ref), k2 = log(pi/pi_ref)^2 / 2, k3 = pi_ref/pi - 1 - log(pi_ref/pi)"""
    kl_placement: Annotated[str, OneOf(*KL_PLACEMENTS)] = "loss"
    """loss (beta * k_t added to each token's loss) or reward (beta * sum_t k_t subtracted from the score)"""
    importance_sampling_level: Annotated[str, OneOf(*IMPORTANCE_LEVELS)] = "token"
    """token: one ratio per token (GRPO); sequence: exp(mean_t log ratio) per completion (GSPO)"""
    epsilon_low: Annotated[float, Range(ge=0, lt=1)] = 0.2
    """lower clipping epsilon of the ratio"""
    epsilon_high: Annotated[float, Range(ge=0)] = 0.28
    """upper clipping epsilon of the ratio (DAPO's clip-higher)"""
    scale_rewards: bool = True
    """divide advantages by the group's standard deviation"""
    loss_type: Annotated[str, OneOf(*LOSS_TYPES)] = "grpo"
    """token-loss aggregation: grpo (per-sequence mean), bnpo (per-token mean), dr_grpo (constant normaliser),
    dapo (sum over the minibatch's tokens / their count)"""
    advantage_eps: Annotated[float, Range(ge=0)] = 1e-4
    """added to the group std"""
    leave_one_out: bool = False
    """rescale centred advantages by G/(G-1): each completion's baseline is the mean of the *other* scores (RLOO)"""
    turn_level: bool = False
    """multi-turn credit per turn: each turn's return from that turn on, normalised over the group's episodes
    that have the turn, is the advantage of that turn's tokens"""
    turn_baseline_level: Annotated[str, OneOf(*TURN_BASELINE_LEVELS)] = "turn"
    """under turn_level, what a turn's return is normalised by: turn (the group's episodes that have the turn) or
    episode (the group's episode returns, as without turn_level)"""


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4,
                     leave_one_out: bool = False):
    """``(R - mean_group) / (std_group + eps)`` per completion (unbiased std, as the paper's reference code);
    with ``leave_one_out`` the centred scores are ``R_i - mean_{j != i} R_j`` (= ``G/(G-1)`` times the above)."""
    groups = scores.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if leave_one_out:
        centred = centred * (group_size / (group_size - 1))
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def turn_advantages(returns: torch.Tensor, present: torch.Tensor, group_size: int, scale: bool = True,
                    eps: float = 1e-4, leave_one_out: bool = False, level: str = "turn") -> torch.Tensor:
    """Advantages ``(N, K)`` of each (episode, turn) return ``G_k`` under ``turn_level`` (0 where a turn is absent).

    - ``"turn"``: ``(G_k - mean) / (std + eps)`` over the group's episodes that have turn k; with ``leave_one_out``,
      rescaled by ``n_k / (n_k - 1)``: the baseline is the mean of the *other* episodes that have the turn.
    - ``"episode"``: ``(G_k - b) / (std + eps)`` with ``b`` the mean (``leave_one_out``: the others' mean) and std of
      the group's episode returns ``G_0``, the statistics of the episode-level advantage.
    """
    n, turns = returns.shape
    if level == "turn":
        advantages = group_normalised(returns, present, group_size, scale, eps)
        if leave_one_out:
            count = present.view(-1, group_size, turns).sum(1, keepdim=True).float()
            factor = (count / (count - 1).clamp(min=1)).expand(-1, group_size, -1)
            advantages = advantages * factor.reshape(n, turns)
        return advantages
    if level != "episode":
        raise ValueError(f"level must be one of {TURN_BASELINE_LEVELS}, got {level!r}")
    episode = returns[:, 0].view(-1, group_size)  # G_0: every episode has its first turn
    total = episode.sum(1, keepdim=True)
    baseline = (total - episode) / (group_size - 1) if leave_one_out else total.expand_as(episode) / group_size
    centred = returns.view(-1, group_size, turns) - baseline[..., None]
    if scale:
        centred = centred / (episode.std(dim=1, keepdim=True)[..., None] + eps)
    return centred.reshape(n, turns) * present


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(pi || pi_ref) per token: ``exp(d) - d - 1`` with ``d = log pi_ref - log pi``."""
    return kl_estimate(logprobs, ref_logprobs, "k3")


def aggregate_loss(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int,
                   num_tokens: torch.Tensor | float | None = None):
    """One micro-batch's loss from its per-token losses ``(n, T)``.

    ``num_tokens`` (``"dapo"`` only) is the token count of the whole minibatch the micro-batch belongs
    to: its loss is then this micro-batch's share of the minibatch's token mean, so the shares are
    summed, not averaged, over micro-batches (default: this micro-batch's own count).
    """
    if loss_type == "grpo":
        return masked_mean(token_loss, mask, dim=1).mean()
    if loss_type == "bnpo":
        return masked_mean(token_loss, mask)
    if loss_type == "dr_grpo":
        return (token_loss * mask).sum() / (token_loss.shape[0] * max_new_tokens)
    if loss_type == "dapo":
        count = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens)
        return (token_loss * mask).sum() / count.clamp(min=1)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def grpo_token_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, *, epsilon_low: float,
                    epsilon_high: float, beta: float, kl_estimator: str = "k3", kl_in_loss: bool = True,
                    importance_sampling_level: str = "token", is_weights: torch.Tensor | None = None):
    """Per-token losses ``(n, T)``: the clipped surrogate (token or GSPO sequence ratio), plus ``beta * k_t``
    when the KL is in the loss; ``is_weights`` ``(n, T)`` weigh each token's surrogate (an off-policy correction).
    Returns ``(token_loss, ratio, kl)``; ``ratio`` is ``(n, T)`` for token-level
    ratios and ``(n, 1)`` for sequence-level ones; ``kl`` is None when the KL is not in the loss.
    ``advantages`` is ``(n,)``, one per completion, or ``(n, T)``, one per token (turn-level credit)."""
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    log_ratio = logprobs - old_logprobs
    if importance_sampling_level == "sequence":
        log_ratio = masked_mean(log_ratio, mask, dim=1)[:, None]  # length-normalised sequence log-ratio
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    ratio = log_ratio.exp()
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv)
    if is_weights is not None:  # an off-policy correction weighs each token's surrogate (agents.common.off_policy)
        surrogate = surrogate * is_weights
    if not kl_in_loss:
        return -surrogate.expand_as(logprobs), ratio, None
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator)
    return -surrogate + beta * kl, ratio, kl


class GRPO(Agent):
    """Group Relative Policy Optimization. The environment must have ``group_size >= 2``."""

    config_class = GRPOConfig
    name = "grpo"
    corrects_off_policy = True

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

        # 0. Off-policy correction: pi_prox recomputed and the behaviour weights, when configured.
        off_policy = self.correct_off_policy(rollout)

        # 1. Group-normalised advantages from the task scores (minus the KL penalty if it is in the reward).
        kl_in_loss = cfg.kl_placement == "loss"
        if cfg.turn_level:  # per turn: the return from the turn on, normalised per turn or per episode
            rewards = penalised_rewards(rollout, cfg.kl_estimator, cfg.kl_placement, self.beta)
            returns, present = turn_returns(rollout, rewards)
            turn_adv = turn_advantages(returns, present, rollout.group_size, cfg.scale_rewards, cfg.advantage_eps,
                                       cfg.leave_one_out, cfg.turn_baseline_level)
            advantages = per_token(turn_adv, rollout)
        else:
            returns = penalised_returns(rollout, cfg.kl_estimator, cfg.kl_placement, self.beta)
            advantages = group_advantages(returns, rollout.group_size, cfg.scale_rewards, cfg.advantage_eps,
                                          cfg.leave_one_out)
        self.check_finite(scores=returns, advantages=advantages)

        # 2. Clipped surrogate (+ beta * KL per token when it is in the loss), aggregated as configured.
        kl_key = f"objective/{cfg.kl_estimator}_kl"
        stats = {"loss/policy": [], "policy/clipfrac": [], "policy/approxkl": [], "objective/entropy": [],
                 "loss/grad_norm": []}
        if kl_in_loss:
            stats[kl_key] = []
        # dapo divides by the minibatch's token count and sums its micro-batches' shares; the others average them.
        micro_divisor = 1 if cfg.loss_type == "dapo" else cfg.gradient_accumulation_steps
        for idx in self.minibatches(len(rollout)):
            minibatch_tokens = rollout.mask[idx].sum()
            for micro in self.micro_batches(idx):
                batch = rollout.select(micro)
                with self.autocast():
                    logprobs, entropy, _ = policy_forward(self.policy, batch, sampling=self.sampling,
                                                          chunk_size=cfg.logprob_chunk_size)
                adv = advantages[micro]
                token_loss, ratio, kl = grpo_token_loss(
                    logprobs, batch.old_logprobs, batch.ref_logprobs, adv, batch.mask, epsilon_low=cfg.epsilon_low,
                    epsilon_high=cfg.epsilon_high, beta=self.beta, kl_estimator=cfg.kl_estimator,
                    kl_in_loss=kl_in_loss, importance_sampling_level=cfg.importance_sampling_level,
                    is_weights=batch.is_weights)
                if batch.sampling_weights is not None:  # engine-drawn tokens: truncated IS (lmgym.agents.scale.vllm)
                    token_loss = token_loss * batch.sampling_weights
                loss = aggregate_loss(token_loss, batch.mask, cfg.loss_type, self.env.max_new_tokens,
                                      num_tokens=minibatch_tokens)
                self.check_finite(**{"loss/policy": loss})
                # Data parallelism: this process holds a 1/world part of the micro-batch and gradients are
                # averaged; grpo and dr_grpo divide by the part's rows (an equal share), bnpo's token mean is
                # reweighted to the micro-batch's tokens, and dapo's part sum counts world times.
                share = {"bnpo": self.token_share(rollout.mask, micro),
                         "dapo": self.distributed.world_size}.get(cfg.loss_type, 1)
                (loss * share / micro_divisor).backward()
                with torch.no_grad():
                    adv = adv if adv.dim() == 2 else adv[:, None]
                    low, high = ratio < 1 - cfg.epsilon_low, ratio > 1 + cfg.epsilon_high
                    clipped = ((low & (adv < 0)) | (high & (adv > 0))).float().expand_as(batch.mask)
                    log_ratio = logprobs - batch.old_logprobs
                    minibatch_loss = loss * cfg.gradient_accumulation_steps if micro_divisor == 1 else loss
                    logged = [("loss/policy", minibatch_loss),  # averaged over micro-batches below
                              ("policy/clipfrac", masked_mean(clipped, batch.mask)),
                              ("policy/approxkl", masked_mean((log_ratio.exp() - 1) - log_ratio, batch.mask)),
                              ("objective/entropy", masked_mean(entropy, batch.mask))]
                    if kl_in_loss:
                        logged.append((kl_key, masked_mean(kl, batch.mask)))
                    for key, value in logged:
                        stats[key].append(value.detach())
            stats["loss/grad_norm"].append(torch.tensor(self.optimizer_step()))
        return {k: float(torch.stack(v).mean()) for k, v in stats.items()} | off_policy
