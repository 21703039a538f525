"""Where the KL to the reference enters an update, and which estimator of it is used.

The objective every lmgym agent maximises is the KL-regularised return (DESIGN.md)::

    J(pi) = E_{y ~ pi}[R(x, y)] - beta * KL(pi(.|x) || pi_ref(.|x))

An agent only sees sampled tokens, so it estimates the KL per token from the log ratio
``d_t = log pi(y_t|s_t) - log pi_ref(y_t|s_t)`` of the token it sampled (Schulman 2020,
"Approximating KL divergence")::

    k1 = d                          unbiased for KL(pi || pi_ref); can be negative
    k2 = d**2 / 2                   biased (second order in d), never negative
    k3 = exp(-d) - 1 + d            = pi_ref/pi - 1 - log(pi_ref/pi): unbiased and never negative

and puts it in one of two places (``kl_placement``):

- ``"reward"``: a per-token penalty ``-beta * k_t`` in the reward, computed from the log-probs
  the rollout was sampled with (``Rollout.logprobs``, ``Rollout.ref_logprobs``; no gradient),
  plus the score on the last token. With k1 this is exactly the environment's reward.
  The policy gradient then treats ``-beta * k_t`` as a fixed reward (a semi-gradient), so
  its expected update is ``grad E[R] - beta * grad_theta E_{pi_theta}[sum_t k_t]`` with the
  values ``k_t`` frozen at the sampling policy. For k1 the frozen part costs nothing
  (``E[grad log pi] = 0``): **k1 in the reward is the unbiased gradient of J**. For k3 it
  misses ``E[sum_t grad k3_t] = sum_t E_{s_t}[grad KL(pi_ref || pi)(s_t)]``: the update is
  J's gradient plus ``beta`` times the per-state gradient of the forward KL, so it
  under-penalises. For k2 the penalty's expectation is not even the KL (it is
  ``E[sum_t d_t^2 / 2]``), so the update ascends another objective. In practice both punish a
  token the policy under-samples (``pi << pi_ref``, ``d < 0``) as they punish an over-sampled one,
  which pushes it further down, where k1's negative penalty (a bonus) would restore it: the
  policy can collapse onto the best-scoring tokens (docs/kl_placement.md measures it).
- ``"loss"``: the reward is the score alone and ``beta * k_t(theta)`` is added to the loss,
  differentiated through the current policy's log-prob on tokens sampled from pi_old.
  On-policy (pi_old = pi) its expected gradient, per visited state s with the state
  distribution held fixed, is:

  - k1: ``E_pi[grad log pi] = 0``, no pull towards the reference at all in expectation;
  - k2: ``E_pi[d grad log pi] = grad KL(pi || pi_ref)(s)``, the reverse KL of each state;
  - k3: ``E_pi[(1 - pi_ref/pi) grad log pi] = grad KL(pi_ref || pi)(s)``, the *forward* KL
    of each state: **k3 in the loss (GRPO's choice) is the gradient of the forward KL
    ``sum_t E_{s_t}[KL(pi_ref || pi)(s_t)]``, not of J's reverse KL, so biased**.

  Even k2 misses how a token changes the states (and KL) after it: the sequence KL's gradient
  is ``E[sum_t grad log pi_t * sum_{t' >= t} d_t']``, the loss term keeps ``t' = t`` only,
  so it is unbiased only for one-token episodes.

With ``beta = 0`` every placement and estimator gives the same update.
"""

from __future__ import annotations

import torch

__all__ = ["KL_ESTIMATORS", "KL_PLACEMENTS", "kl_estimate", "score_rewards", "penalised_rewards",
           "penalised_returns", "kl_penalty_loss"]

KL_ESTIMATORS = ("k1", "k2", "k3")
KL_PLACEMENTS = ("reward", "loss")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """The per-token estimate of KL(pi || pi_ref) from ``log pi`` and ``log pi_ref`` of the sampled tokens.

    Differentiable in ``logprobs``; see the module docstring for the three estimators.
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if estimator == "k3":
        d = ref_logprobs - logprobs  # log(pi_ref / pi)
        return d.exp() - d - 1
    raise ValueError(f"kl_estimator must be one of {list(KL_ESTIMATORS)}, got {estimator!r}")


def score_rewards(rollout) -> torch.Tensor:
    """Per-token rewards ``(N, T)`` without the KL part: the task score on each episode's last token (multi-turn:
    each turn reward on its turn's last token too, :attr:`Rollout.task_rewards`)."""
    if getattr(rollout, "task_rewards", None) is not None:
        return rollout.task_rewards
    positions = torch.arange(rollout.tokens.shape[1], device=rollout.tokens.device)
    last = positions == (rollout.lengths - 1)[:, None]
    return torch.where(last, rollout.scores[:, None].to(rollout.rewards.dtype), torch.zeros_like(rollout.rewards))


def penalised_rewards(rollout, estimator: str, placement: str, beta: float) -> torch.Tensor:
    """The per-token rewards an agent's advantages are computed from.

    - KL in the loss: the score alone (:func:`score_rewards`).
    - k1 in the reward: the environment's own rewards ``-beta * (log pi_old - log pi_ref) + score``,
      returned untouched (``beta`` must then be the environment's ``kl_coef``, which made them).
    - k2 / k3 in the reward: ``score_rewards - beta * k(log pi_old, log pi_ref)`` per token, from the
      rollout's sampling and reference log-probs.
    """
    if placement == "loss":
        return score_rewards(rollout)
    if placement != "reward":
        raise ValueError(f"kl_placement must be one of {list(KL_PLACEMENTS)}, got {placement!r}")
    if estimator == "k1":
        return rollout.rewards
    penalty = kl_estimate(rollout.logprobs, rollout.ref_logprobs, estimator) * rollout.mask
    return score_rewards(rollout) - beta * penalty


def penalised_returns(rollout, estimator: str, placement: str, beta: float) -> torch.Tensor:
    """Each episode's return ``(N,)`` for a sequence-level agent: the score, minus ``beta * sum_t k_t`` when the
    KL is in the reward (any ``beta``: computed from the rollout's log-probs, not the environment's rewards)."""
    if placement == "loss":
        return rollout.scores
    if placement != "reward":
        raise ValueError(f"kl_placement must be one of {list(KL_PLACEMENTS)}, got {placement!r}")
    penalty = kl_estimate(rollout.logprobs, rollout.ref_logprobs, estimator) * rollout.mask
    return rollout.scores - beta * penalty.sum(1)


def kl_penalty_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str,
                    per: str) -> torch.Tensor:
    """The KL term of a loss, differentiable in ``logprobs`` (the current policy's, on tokens from pi_old).

    ``per="token"``: the mean of ``k_t`` over every token of the batch (the scale of a token-averaged
    surrogate, as PPO's); ``per="sequence"``: the mean over episodes of ``sum_t k_t`` (the scale of a
    whole-sequence log-likelihood loss, as REINFORCE's, matching the sum over tokens in J's KL).
    """
    k = kl_estimate(logprobs, ref_logprobs, estimator) * mask
    if per == "token":
        return k.sum() / mask.sum().clamp(min=1)
    if per == "sequence":
        return k.sum(1).mean()
    raise ValueError(f"per must be 'token' or 'sequence', got {per!r}")
