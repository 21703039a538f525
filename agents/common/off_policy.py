"""Off-policy corrections: training on tokens that another distribution sampled.

Three policies meet in an update (the notation of Hilton et al. 2021 and of verl's rollout correction):

- the **behaviour** policy ``mu``, which sampled the tokens: a policy some updates old (an asynchronous
  collector with ``max_lag >= 1``), the same weights in another precision (a bfloat16 sampler against a float32
  trainer, :mod:`lmgym.models.precision`), or another engine (vLLM). ``Rollout.logprobs`` holds ``log mu``, and
  the environment's KL is always computed with it: the KL of what was actually sampled.
- the **proximal** policy ``pi_prox``: the trainer's weights when the update starts, in the trainer's precision.
  A correction other than ``"none"`` recomputes ``log pi_prox`` with one forward without gradients
  (``Rollout.proximal_logprobs``).
- the current policy ``pi_theta``, being updated.

Per token, ``rho_t = pi_prox(y_t) / mu(y_t)`` measures the gap between sampler and trainer, and the clipped
surrogate's ratio is ``r_t = pi_theta(y_t) / pi_prox(y_t)``. A correction multiplies each token's surrogate
by a weight ``w_t`` (no gradient flows through it)::

    l_t = -w_t * min(r_t * A_t, clip(r_t, 1 - eps_low, 1 + eps_high) * A_t)

===================  ==================================================  ===========================================
correction           weight ``w_t``                                       source
===================  ==================================================  ===========================================
``none``             1, and the ratio taken against ``mu`` itself          PPO as written: pi_old is whatever sampled
                     (``r_t = pi_theta / mu``, no recomputation)
``tis_token``        ``min(rho_t, C)``                                    truncated IS (Ionides 2008); Yao et al. 2025
                                                                          ("Your efficient RL framework secretly brings
                                                                          you off-policy RL training"); TRL's
                                                                          ``vllm_importance_sampling_correction``
``tis_sequence``     ``min(prod_t rho_t, C)``, one per sequence            verl's rollout correction, sequence level
``mis_token``        ``rho_t`` if ``low <= rho_t <= high``, else 0         masked IS / IcePop (Ling team 2025); verl's
                                                                          token rejection sampling
``mis_sequence``     ``prod_t rho_t`` if it lies in ``[low, high]``,       verl's sequence rejection sampling
                     else 0, for every token of the sequence
``decoupled``        ``rho_t``, untruncated                               decoupled PPO (Hilton et al. 2021,
                                                                          "Batch size-invariance for policy
                                                                          optimization"); AReaL (Fu et al. 2025)
===================  ==================================================  ===========================================

``C`` is ``is_cap``, ``[low, high]`` is ``is_band``. A masked token still counts in the loss's denominator (its
weight is 0), so dropping tokens shrinks the step rather than renormalising it. Policy-gradient agents without a
ratio (REINFORCE, RLOO) use the same weights on ``-log pi_theta(y_t) * A_t``.
"""

from __future__ import annotations

import torch

__all__ = ["CORRECTIONS", "correction_weights"]

CORRECTIONS = ("none", "tis_token", "tis_sequence", "mis_token", "mis_sequence", "decoupled")

MAX_LOG_RATIO = 20.0
"""log-ratios are clamped here before exp (a weight of at most e^20 = 4.9e8), so a sequence product over thousands of
tokens, or an untruncated decoupled weight, times an advantage stays a finite float32"""


@torch.no_grad()
def correction_weights(proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                       correction: str, *, cap: float = 2.0, band: tuple[float, float] = (0.5, 2.0)) -> torch.Tensor:
    """The weights ``w_t`` ``(N, T)`` of ``correction`` (see the module docstring); 0 outside ``mask``.

    Args:
        proximal_logprobs: ``log pi_prox`` of each token ``(N, T)``.
        behaviour_logprobs: ``log mu`` of each token, from the sampler ``(N, T)``.
        mask: 1 on the policy's tokens inside the episode.
        correction: one of :data:`CORRECTIONS`.
        cap: ``C``, the truncation of ``tis_*``.
        band: ``[low, high]``, the accepted ratios of ``mis_*``.
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {list(CORRECTIONS)}, got {correction!r}")
    inside = mask > 0
    if correction == "none":
        return inside.to(proximal_logprobs.dtype)
    log_rho = torch.where(inside, proximal_logprobs - behaviour_logprobs, 0.0)
    if correction.endswith("_sequence"):
        log_rho = log_rho.sum(1, keepdim=True).expand_as(log_rho)  # log prod_t rho_t, shared by the tokens
    rho = log_rho.clamp(max=MAX_LOG_RATIO).exp()
    if correction.startswith("tis_"):
        weights = rho.clamp(max=cap)
    elif correction.startswith("mis_"):
        low, high = band
        weights = torch.where((rho >= low) & (rho <= high), rho, 0.0)
    else:  # decoupled
        weights = rho
    return torch.where(inside, weights, 0.0)
