"""PPO for language models, as in InstructGPT / lm-human-preferences (Ziegler et al. 2019; Ouyang et al. 2022).

Per iteration:

1. Roll out: the policy samples one continuation per prompt; the environment returns
   per-token rewards ``r_t = -beta * KL_t`` plus the score on the last token.
   Where the KL goes is ``kl_placement`` (see :mod:`lmgym.agents.common.kl` for the bias of each choice):
   - ``"reward"`` (default): the advantages below are computed from ``-beta * k_t`` plus the
     score on the last token, ``k_t`` the ``kl_estimator`` of the sampled token's log ratio
     ``log pi_old - log pi_ref``. With k1 (default) these are the environment's own rewards,
     and the update is the unbiased policy gradient of the KL-regularised objective; k2 / k3
     give a biased one (k3: plus beta times the per-state gradient of KL(pi_ref || pi)).
   - ``"loss"``: the advantages see the score alone and ``beta * mean_t k_t(theta)`` (a mean over
     the minibatch's tokens, like the surrogate) is added to the loss of step 4. Its gradient is
     0 in expectation for k1, the per-state reverse KL's for k2, and the per-state *forward*
     KL(pi_ref || pi)'s for k3, with the state distribution held fixed (biased). The KL then
     weighs against whitened advantages, not against the raw score as in the objective.
2. Estimate values V(s_t) with the critic (a value head on the policy's last hidden
   state, or on a separate copy of the reference model).
3. Generalised advantage estimation (Schulman et al. 2016), gamma = 1 and lambda = 0.95
   by default; returns ``G_t = A_t + V(s_t)``; advantages whitened over the batch.
4. For ``update_epochs`` passes over ``num_minibatches`` minibatches, minimise
   ``L = L_clip + vf_coef * L_value - ent_coef * entropy (+ beta * L_kl)`` with the clipped surrogate
   ``L_clip = E[max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))]`` (rho = pi / pi_old) and
   the clipped value loss ``L_value = 0.5 * E[max((V - G)^2, (clip(V, V_old +- eps_v) - G)^2)]``.
5. Optionally adapt beta towards a target KL (Ziegler et al. 2019, section 2.2):
   ``beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)``, with KL the
   batch's mean KL per episode and ``n_steps`` the number of episodes in the batch, as in
   lm-human-preferences and TRL (both horizon and n_steps count episodes, not tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch

from lmgym.agents.common.base import Agent, AgentConfig, Rollout, ValueHead, masked_mean, masked_whiten, policy_forward
from lmgym.agents.common.config import OneOf, Range
from lmgym.agents.common.kl import KL_ESTIMATORS, KL_PLACEMENTS, kl_penalty_loss, penalised_rewards
from lmgym.agents.common.policy import trainable_copy
from lmgym.agents.common.rollout import policy_steps
from lmgym.agents.common.turns import at_turn_starts, per_token, turn_gae

__all__ = ["PPOConfig", "PPO", "gae", "ppo_losses", "AdaptiveKLController"]


@dataclass
class PPOConfig(AgentConfig):
    """PPO hyper-parameters (defaults follow lm-human-preferences / TRL where they apply)."""

    learning_rate: float = 1e-4
    """AdamW learning rate"""
    update_epochs: int = 4
    """PPO epochs over each rollout"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    gamma: Annotated[float, Range(ge=0, le=1)] = 1.0
    """discount factor"""
    gae_lambda: Annotated[float, Range(ge=0, le=1)] = 0.95
    """GAE lambda"""
    clip_coef: Annotated[float, Range(gt=0)] = 0.2
    """surrogate clipping epsilon"""
    clip_value: Annotated[float, Range(ge=0)] = 0.2
    """value clipping epsilon (0 disables value clipping)"""
    vf_coef: Annotated[float, Range(ge=0)] = 0.5
    """value loss weight"""
    ent_coef: Annotated[float, Range(ge=0)] = 0.0
    """entropy bonus weight"""
    norm_adv: bool = True
    """whiten advantages over the batch"""
    turn_level: bool = False
    """multi-turn credit per turn: GAE over turns (a turn's reward summed, the value at its first token, gamma and
    gae_lambda per turn), every token of a turn gets its turn's advantage, and the critic learns the value at each
    turn's first token"""
    separate_value_model: bool = False
    """critic on its own copy of the reference model instead of sharing the policy's trunk"""
    adaptive_kl: bool = False
    """adapt the environment's KL coefficient towards target_kl"""
    target_kl: Annotated[float, Range(gt=0)] = 6.0
    """target KL per episode for the adaptive controller"""
    kl_horizon: Annotated[int, Range(ge=1)] = 10000
    """horizon of the adaptive controller, in episodes (lm-human-preferences and TRL: 10000)"""
    kl_estimator: Annotated[str, OneOf(*KL_ESTIMATORS)] = "k1"
    """per-token KL estimator: k1 = log(pi/pi_ref), k2 = log(pi/pi_ref)^2 / 2, k3 = pi_ref/pi - 1 - log(pi_ref/pi)"""
    kl_placement: Annotated[str, OneOf(*KL_PLACEMENTS)] = "reward"
    """reward (a per-token penalty in the rewards, as the environment's) or loss (a KL term in the loss)"""


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimates ``(N, T)`` for episodes that end at their last masked token.

    ``A_t = delta_t + gamma * lam * A_{t+1}``, ``delta_t = r_t + gamma * V_{t+1} - V_t``, with
    ``V = 0`` after the last token (episodes end by a stop token or the horizon). Steps are the masked tokens:
    unmasked ones between them (a multi-turn episode's replies) are skipped, not ends.
    """
    # A multi-turn episode has the environment's tokens between the policy's: they are no steps (a reply is part
    # of the transition from one policy token to the next), so the recursion runs over the policy's tokens only.
    pack, unpack = policy_steps(mask)
    rewards, values, mask = pack(rewards), pack(values), pack(mask)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        alive = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * alive
        advantages[:, t] = next_adv
        next_value = values[:, t] * alive
    return unpack(advantages)


def ppo_losses(new_logprobs, old_logprobs, advantages, new_values, old_values, returns, mask, clip_coef,
               clip_value, value_mask=None, is_weights=None):
    """Clipped surrogate and value losses (masked means over tokens; the value loss over ``value_mask`` when
    given), with the clip fraction and approx KL. ``is_weights`` (``(n, T)``, no gradient) weigh each token's
    surrogate: an off-policy correction (:mod:`lmgym.agents.common.off_policy`)."""
    log_ratio = new_logprobs - old_logprobs
    ratio = log_ratio.exp()
    pg_losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef))
    if is_weights is not None:
        pg_losses = pg_losses * is_weights
    policy_loss = masked_mean(pg_losses, mask)
    if clip_value > 0:
        clipped = old_values + (new_values - old_values).clamp(-clip_value, clip_value)
        value_losses = torch.max((new_values - returns) ** 2, (clipped - returns) ** 2)
    else:
        value_losses = (new_values - returns) ** 2
    value_loss = 0.5 * masked_mean(value_losses, mask if value_mask is None else value_mask)
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1).abs() > clip_coef).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return policy_loss, value_loss, clipfrac, approx_kl


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019), section 2.2: move beta so the KL per episode tracks ``target``.

    ``beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)``. As in
    lm-human-preferences and TRL, ``n_steps`` is the number of episodes the update saw (the
    batch size) and ``horizon`` is counted in episodes, so beta moves by at most 20% per
    ``horizon`` episodes whatever the episode length. Beta itself lives in the environment
    (``env.kl_coef``), which checkpoints record.
    """

    target: float
    horizon: int

    def update(self, beta: float, kl: float, n_episodes: int) -> float:
        """The next beta after a batch of ``n_episodes`` episodes whose mean KL per episode is ``kl``."""
        if not math.isfinite(kl):
            raise ValueError(f"the KL of the batch is not finite ({kl}); beta cannot adapt")
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        return beta * (1.0 + error * n_episodes / self.horizon)


class PPO(Agent):
    """Proximal Policy Optimization with a value head, GAE and an optional adaptive KL coefficient.

    See :class:`PPOConfig` for the hyper-parameters and the module docstring for the algorithm.
    """

    config_class = PPOConfig
    name = "ppo"
    corrects_off_policy = True

    def setup(self) -> None:
        hidden = self.policy.config.hidden_size
        self.value_head = ValueHead(hidden).to(self.device)
        self.value_model = None
        if self.config.separate_value_model and hasattr(self.policy, "active"):
            raise ValueError("separate_value_model copies the whole reference model, which LoRA avoids: with "
                             "peft_config, keep the value head on the policy (separate_value_model=False)")
        if self.config.separate_value_model:
            self.value_model = trainable_copy(self.env.reference_model, self.device,
                                              no_dropout=self.config.disable_dropout)
        self.kl_ctl = AdaptiveKLController(self.config.target_kl, self.config.kl_horizon)

    def parameters(self):
        params = list(self.policy.parameters()) + list(self.value_head.parameters())
        if self.value_model is not None:
            params += list(self.value_model.parameters())
        return params

    def trainable_modules(self):
        modules = {"policy": self.policy, "value_head": self.value_head}
        if self.value_model is not None:
            modules["value_model"] = self.value_model
        return modules

    def forward(self, batch: Rollout):
        """Log-probs, entropy and values of the current policy and critic on a batch."""
        with self.autocast():
            logprobs, entropy, hidden = policy_forward(self.policy, batch, sampling=self.sampling,
                                                       chunk_size=self.config.logprob_chunk_size,
                                                       hidden=self.value_model is None,
                                                       entropy_grad=self.config.ent_coef != 0)
            if self.value_model is not None:
                _, _, hidden = policy_forward(self.value_model, batch, hidden=True)
        return logprobs, entropy, self.value_head(hidden)

    def update(self, rollout: Rollout) -> dict[str, float]:
        cfg, mask = self.config, rollout.mask

        # 0. Off-policy correction: pi_prox recomputed and the behaviour weights, when configured.
        off_policy = self.correct_off_policy(rollout)

        # 1. Values of the states visited, under the current critic.
        with torch.no_grad():  # each process values its share of the rows (lmgym.agents.scale.distributed)
            old_values = self.in_parts(lambda rows: self.forward(rows)[2], rollout) * mask
        self.check_finite(rewards=rollout.rewards, values=old_values)

        # 2. GAE advantages and returns, from the per-token rewards: the environment's with k1 in the
        #    reward, else the score with the chosen estimator's penalty (reward) or no penalty (loss).
        beta = self.env.kl_coef
        rewards = penalised_rewards(rollout, cfg.kl_estimator, cfg.kl_placement, beta)
        value_mask = mask
        if cfg.turn_level:  # GAE over turns; the critic is fitted at each turn's first token
            turn_adv, first, present = turn_gae(rollout, rewards, old_values, cfg.gamma, cfg.gae_lambda)
            advantages = per_token(turn_adv, rollout)
            steps = mask.shape[1]
            value_mask = at_turn_starts(present.to(mask.dtype), first, present, steps)
            returns = at_turn_starts(turn_adv + old_values.gather(1, first), first, present, steps)
        else:
            advantages = gae(rewards, old_values, mask, cfg.gamma, cfg.gae_lambda)
            returns = advantages + old_values
        if cfg.norm_adv:
            advantages = masked_whiten(advantages, mask) * mask
        self.check_finite(advantages=advantages)

        # 3. Several epochs of clipped-surrogate minibatch updates.
        stats = {"loss/policy": [], "loss/value": [], "policy/clipfrac": [], "policy/approxkl": [],
                 "objective/entropy": [], "loss/grad_norm": []}
        kl_in_loss = cfg.kl_placement == "loss"
        if kl_in_loss:
            stats[f"objective/{cfg.kl_estimator}_kl"] = []
        for idx in self.minibatches(len(rollout)):
            for micro in self.micro_batches(idx):
                batch = rollout.select(micro)
                logprobs, entropy, values = self.forward(batch)
                policy_loss, value_loss, clipfrac, approx_kl = ppo_losses(
                    logprobs, batch.old_logprobs, advantages[micro], values, old_values[micro], returns[micro],
                    batch.mask, cfg.clip_coef, cfg.clip_value, value_mask=value_mask[micro],
                    is_weights=batch.is_weights)
                entropy_mean = masked_mean(entropy, batch.mask)
                loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy_mean
                if kl_in_loss:
                    kl_loss = kl_penalty_loss(logprobs, batch.ref_logprobs, batch.mask, cfg.kl_estimator, per="token")
                    loss = loss + beta * kl_loss
                    self.check_finite(**{"loss/kl": kl_loss})
                    stats[f"objective/{cfg.kl_estimator}_kl"].append(kl_loss.detach())
                self.check_finite(**{"loss/policy": policy_loss, "loss/value": value_loss})
                # every term is a mean over the micro-batch's tokens: weigh this process's part by its tokens
                (loss * self.token_share(rollout.mask, micro) / cfg.gradient_accumulation_steps).backward()
                for key, value in (("loss/policy", policy_loss), ("loss/value", value_loss),
                                   ("policy/clipfrac", clipfrac), ("policy/approxkl", approx_kl),
                                   ("objective/entropy", entropy_mean)):
                    stats[key].append(value.detach())
            stats["loss/grad_norm"].append(torch.tensor(self.optimizer_step()))
        metrics = {k: float(torch.stack(v).mean()) for k, v in stats.items()} | off_policy

        # 4. Explained variance of the critic, and the adaptive KL coefficient.
        flat_ret, flat_val = returns[value_mask.bool()], old_values[value_mask.bool()]
        var = flat_ret.var()
        metrics["val/explained_variance"] = float(1 - (flat_ret - flat_val).var() / var) if var > 0 else 0.0
        if cfg.adaptive_kl:
            episode_kl = float(rollout.kl.sum(1).mean())
            self.env.kl_coef = self.kl_ctl.update(self.env.kl_coef, episode_kl, n_episodes=len(rollout))
        return metrics
