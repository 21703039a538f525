"""The bias of each off-policy correction's expected gradient, by exact enumeration of every episode (float64).

On a diagnostic task every completion can be listed (TargetToken-v0: 3 prompts x 1,093 completions), so the
expectation of an update's gradient over the behaviour distribution ``mu`` is a finite sum, and so is the true
gradient of the KL-regularised objective ``J(theta) = E_{y ~ pi_theta}[R(y) - beta * sum_t log(pi_theta /
pi_ref)(y_t)]``. :func:`expected_gradient` computes the first gradient step of an update (theta = pi_prox, the
weights the update starts from) on an infinitely large batch sampled by ``mu``::

    g = E_{y ~ mu} [ sum_t c_t(y) * A_t(y) * grad log pi_theta(y_t | s_t) ]

- ``c_t`` is what the loss puts before the score function: ``w_t`` of the correction
  (:mod:`lmgym.agents.common.off_policy`; the ratio to pi_prox is 1 at the first step, so clipping is
  inactive), or, with ``"none"``, the ratio ``r_t = pi_theta / mu`` where the clipped surrogate lets the
  gradient through and 0 where it clips;
- ``A_t`` is the agent's advantage on what was sampled, the rewards being the environment's, whose KL term uses
  the sampler's log-probs (``r_t = -beta * (log mu - log pi_ref)(y_t)``, plus the score on the last token):
  ``"ppo"``: ``G_t - V_mu(s_t)``, the return-to-go minus the exact value of ``mu`` (a critic fitted to ``mu``'s
  rollouts, GAE with gamma = lambda = 1); ``"grpo"``: ``G_0(y) - E_mu[G_0]``, one sequence advantage (an
  infinite group, Dr. GRPO's normalisation: no std scaling, token sums), KL in the reward (k1).

At ``mu = pi_theta`` both equal ``grad J`` exactly (the policy-gradient theorem); ``tests/test_off_policy_exact.py``
checks that against autograd of the enumerated ``J``.
"""

from __future__ import annotations

import itertools

import torch

from lmgym.agents.common.off_policy import correction_weights

__all__ = ["Enumeration", "expected_gradient", "true_gradient", "relative_bias", "trainable_parameters"]


class Enumeration:
    """Every completion of every prompt of a diagnostic vector environment, with scores, padded to the horizon."""

    def __init__(self, venv):
        core = venv.core
        if not core.prompts.finite:
            raise ValueError("exact enumeration needs a known list of prompts")
        self.beta = float(venv.kl_coef)
        stops = list(venv.stop_token_ids)
        alphabet = [a for a in range(core.vocab_size) if a not in stops]
        horizon = venv.max_new_tokens
        completions = []
        for length in range(1, horizon + 1):  # stopped at `length`: length - 1 other tokens, then a stop token
            for prefix in itertools.product(alphabet, repeat=length - 1):
                completions += [list(prefix) + [s] for s in stops]
        completions += [list(y) for y in itertools.product(alphabet, repeat=horizon)]  # truncated at the horizon
        self.prompts = []  # (prompt ids, weight, tokens (n, H), mask (n, H), scores (n,))
        counts: dict = {}
        for p in core.prompts.items:
            counts.setdefault((p.text, tuple(p.ids)), [p, 0])[1] += 1
        total = len(core.prompts.items)
        texts = core.tokenizer.batch_decode(completions, skip_special_tokens=True)
        for (_, ids), (p, count) in counts.items():
            scores = core.reward_fn([p.given] * len(completions), texts, [list(ids)] * len(completions), completions)
            tokens = torch.tensor([y + [stops[0]] * (horizon - len(y)) for y in completions])
            mask = torch.tensor([[1.0] * len(y) + [0.0] * (horizon - len(y)) for y in completions],
                                dtype=torch.float64)
            self.prompts.append((list(ids), count / total, tokens, mask,
                                 torch.as_tensor(scores, dtype=torch.float64)))

    def logprobs(self, model, prompt: int, autocast: torch.dtype | None = None) -> torch.Tensor:
        """``log model(y_t | s_t)`` ``(n, H)`` of every completion of prompt ``prompt`` (0 after its end)."""
        ids, _, tokens, mask, _ = self.prompts[prompt]
        inputs = torch.cat([torch.tensor(ids).expand(len(tokens), -1), tokens], dim=1)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = model(input_ids=inputs).logits[:, len(ids) - 1:-1]
        logq = torch.log_softmax(logits.double(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
        return logq * mask


def trainable_parameters(policy) -> list[torch.Tensor]:
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no parameter that requires grad: call policy.requires_grad_(True)")
    return params


def true_gradient(enum: Enumeration, policy, reference) -> list[torch.Tensor]:
    """``grad J(theta)`` by autograd of the enumerated objective (float64 sums over every completion)."""
    params = trainable_parameters(policy)
    objective = 0.0
    for k, (_, weight, _, mask, scores) in enumerate(enum.prompts):
        logp = enum.logprobs(policy, k)
        with torch.no_grad():
            ref = enum.logprobs(reference, k)
        probability = logp.sum(1).exp()
        objective = objective + weight * (probability * (scores - enum.beta * ((logp - ref) * mask).sum(1))).sum()
    return list(torch.autograd.grad(objective, params))


def expected_gradient(enum: Enumeration, policy, behaviour, reference, *, form: str, correction: str,
                      cap: float = 2.0, band: tuple[float, float] = (0.5, 2.0), eps_low: float = 0.2,
                      eps_high: float = 0.2, behaviour_autocast: torch.dtype | None = None) -> list[torch.Tensor]:
    """``g`` of the module docstring: the expected first gradient step of ``form`` ("ppo" or "grpo") with
    ``correction`` on episodes sampled by ``behaviour`` (computed under ``behaviour_autocast``, if given)."""
    if form not in ("ppo", "grpo"):
        raise ValueError(f"form must be 'ppo' or 'grpo', got {form!r}")
    params = trainable_parameters(policy)
    surrogate = 0.0
    for k, (_, weight, _, mask, scores) in enumerate(enum.prompts):
        logp = enum.logprobs(policy, k)
        with torch.no_grad():
            mu = enum.logprobs(behaviour, k, behaviour_autocast)
            ref = enum.logprobs(reference, k)
            prob_mu = mu.sum(1).exp()  # mu(y): the expectation's weights
            rewards = -enum.beta * (mu - ref) * mask
            last = (mask.sum(1) - 1).long()
            rewards[torch.arange(len(scores)), last] += scores
            returns = rewards.flip(1).cumsum(1).flip(1) * mask  # G_t
            if form == "grpo":
                advantages = (returns[:, 0] - (prob_mu * returns[:, 0]).sum())[:, None] * mask
            else:
                advantages = (returns - state_values(returns, mask, mu.exp(), enum.prompts[k][2])) * mask
            if correction == "none":  # the ratio to mu itself, and where the clipped surrogate passes the gradient
                ratio = (logp.detach() - mu).exp()
                passes = ~(((advantages > 0) & (ratio > 1 + eps_high)) | ((advantages < 0) & (ratio < 1 - eps_low)))
                factor = ratio * passes * mask
            else:
                factor = correction_weights(logp.detach(), mu, mask, correction, cap=cap, band=band)
        surrogate = surrogate + weight * (prob_mu[:, None] * factor * advantages * logp).sum()
    return list(torch.autograd.grad(surrogate, params))


def state_values(returns: torch.Tensor, mask: torch.Tensor, token_probs: torch.Tensor,
                 tokens: torch.Tensor) -> torch.Tensor:
    """``V_mu(s_t)`` ``(n, H)`` at every state of every completion: the mu-weighted mean return-to-go over the
    completions that share the prefix ``y_<t`` (exact: every continuation of a prefix is enumerated)."""
    n, horizon = tokens.shape
    prob_from = torch.ones(n, horizon, dtype=torch.float64)  # mu(y_t..end | y_<t) for each completion
    for t in range(horizon - 1, -1, -1):
        step = torch.where(mask[:, t] > 0, token_probs[:, t], torch.ones_like(token_probs[:, t]))
        prob_from[:, t] = step * (prob_from[:, t + 1] if t + 1 < horizon else 1.0)
    values = torch.zeros(n, horizon, dtype=torch.float64)
    for t in range(horizon):
        live = mask[:, t] > 0
        groups: dict = {}
        for i in torch.nonzero(live).flatten().tolist():
            groups.setdefault(tuple(tokens[i, :t].tolist()), []).append(i)
        for rows in groups.values():
            rows_t = torch.tensor(rows)
            w = prob_from[rows_t, t]
            values[rows_t, t] = (w * returns[rows_t, t]).sum() / w.sum()
    return values


def relative_bias(estimate: list[torch.Tensor], truth: list[torch.Tensor]) -> tuple[float, float]:
    """``(||g - grad J|| / ||grad J||, cosine(g, grad J))`` over all parameters."""
    g = torch.cat([x.flatten() for x in estimate])
    t = torch.cat([x.flatten() for x in truth])
    return float((g - t).norm() / t.norm()), float(g @ t / (g.norm() * t.norm()))
