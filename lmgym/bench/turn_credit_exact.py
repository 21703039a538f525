"""The bias of each per-turn credit assignment's expected gradient, by exact enumeration of every history (float64).

On a multi-turn diagnostic task with few turns (``lmgym/Guess-v0``, ``lmgym/Echo-v0`` at ``max_turns=2``) every
history can be listed: each hidden state the interaction draws x each sequence of policy tokens, with the replies
the environment gives (:class:`Histories`). The KL-regularised objective is then a finite sum over histories h,

    J(theta) = sum_h P(h) [ R(h) - beta * sum_t log(pi_theta / pi_ref)(y_t | h_<t) ],
    P(h) = p(z) * prod_t pi_theta(y_t | h_<t)   (z the hidden state, t over the policy's tokens),

and so is the expected first gradient step of an update (ratio 1: no clipping) that credits each policy token t
of turn k(t) with an advantage ``A_t``, per episode:

    g = E[ sum_t A_t * grad log pi_theta(y_t | h_<t) ].

The advantages come from the agents' own code (:mod:`lmgym.agents.common.turns`, :func:`lmgym.agents.grpo.
group_advantages` and :func:`~lmgym.agents.grpo.turn_advantages`, :func:`lmgym.agents.reinforce.
leave_one_out_baseline`, :func:`lmgym.agents.ppo.turn_gae`) on the environment's rewards with k1 in the reward,
``r_t = task reward - beta * (log pi_theta - log pi_ref)(y_t)``, so ``G_k``, the return from turn k on, is what the
agents compute. Three schemes (``SCHEMES``):

- ``"broadcast"``: every token of an episode gets the episode's advantage (``turn_level=False``);
- ``"per-turn"``: a token of turn k gets ``G_k`` against the episode returns' baseline (``turn_level=True,
  turn_baseline_level="episode"``);
- ``"per-turn group"``: ``G_k`` against the statistics of turn k over the group's episodes that have it
  (``turn_level=True``, the default level ``"turn"``).

A group of n episodes of one prompt gives member i an advantage that depends on the others. By symmetry and
linearity the expected gradient is ``sum_h P(h) sum_t grad log pi(y_t) * E_others[A_t(h, others)]``, and the
expectation over the other n - 1 members is a sum over every tuple of their histories (``n = None``: the infinite
group, where the group's statistics are the population's). PPO has no group: its advantages are GAE over turns
with the exact value of the policy at each turn's first token, so its ``g`` is ``grad J`` whatever lambda (the
policy-gradient theorem with an exact critic); what a learned critic gets wrong is not measured here.

``tests/test_turn_credit_exact.py`` checks the enumeration against the environment's own rollouts, and that the
unbiased forms equal ``grad J`` computed by autograd of the enumerated ``J``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmgym.agents.common.turns import leave_one_out, per_token, turn_returns
from lmgym.agents.grpo import group_advantages, turn_advantages
from lmgym.agents.ppo import turn_gae
from lmgym.agents.reinforce import leave_one_out_baseline
from lmgym.bench.off_policy_exact import relative_bias, trainable_parameters
from lmgym.envs.multi_turn import conversation_of

__all__ = ["SCHEMES", "FORMS", "Histories", "true_gradient", "expected_gradient", "relative_bias"]

SCHEMES = ("broadcast", "per-turn", "per-turn group")
FORMS = ("ppo", "rloo", "grpo", "dr_grpo")
"""ppo: exact critic, GAE over turns; rloo: leave-one-out baselines; grpo: mean and std (scale_rewards=True);
dr_grpo: GRPO's mean only (scale_rewards=False)."""
ADVANTAGE_EPS = 1e-4
"""GRPO's default advantage_eps, added to the group's std."""


@dataclass
class TurnView:
    """What the turn helpers read of a rollout: the policy mask and each token's turn (-1 off the policy)."""

    mask: torch.Tensor
    turn_index: torch.Tensor


@dataclass
class PromptHistories:
    """Every history of one prompt: ``(m, L)`` tensors over the tokens after the prompt, padded."""

    ids: list[int]
    weight: float
    """the prompt's share of the environment's prompt list"""
    tokens: torch.Tensor
    mask: torch.Tensor
    """1.0 on the policy's tokens"""
    turn_index: torch.Tensor
    task_rewards: torch.Tensor
    """turn rewards on each turn's last token, the score on the episode's last (no KL)"""
    prior: torch.Tensor
    """p(z) of the hidden state each history was played with"""

    @property
    def view(self) -> TurnView:
        return TurnView(self.mask, self.turn_index)


class Histories:
    """Every history of every prompt of a multi-turn diagnostic vector environment (the interaction must list its
    hidden states, as for the exact optimum: ``hidden_states(prompt)``, ``start_with(prompt, state)``)."""

    def __init__(self, venv):
        core = venv.core
        if not core.prompts.finite:
            raise ValueError("exact enumeration needs a known list of prompts")
        self.core, self.beta = core, float(venv.kl_coef)
        self.factory = core.interaction.factory
        counts: dict = {}
        for p in core.prompts.items:
            counts.setdefault((p.text, tuple(p.ids)), [p, 0])[1] += 1
        total = len(core.prompts.items)
        self.prompts: list[PromptHistories] = []
        for prompt, count in counts.values():
            rows = []
            for prior, state in self.factory().hidden_states(prompt.given):
                speaker = self.factory()
                speaker.start_with(prompt.given, state)
                self._walk(prompt, speaker, float(prior), list(prompt.ids), [], [], [], [], [], 0, len(prompt.ids),
                           rows)
            width = max(len(r[1]) for r in rows)
            pad = core.tokenizer.pad_token_id

            def padded(i, value, dtype):
                return torch.tensor([r[i] + [value] * (width - len(r[i])) for r in rows], dtype=dtype)

            self.prompts.append(PromptHistories(
                ids=list(prompt.ids), weight=count / total, tokens=padded(1, pad, torch.long),
                mask=padded(2, 0.0, torch.float64), turn_index=padded(3, -1, torch.long),
                task_rewards=padded(4, 0.0, torch.float64), prior=torch.tensor([r[0] for r in rows],
                                                                                dtype=torch.float64)))

    def _walk(self, prompt, speaker, prior, ids, tokens, mask, turns_of, rewards, segments, turns, turn_start, out):
        """Depth first over the policy's tokens; the environment's rules as in :mod:`lmgym.envs.turn_optimum`."""
        core = self.core
        budget = len(prompt.ids) + core.max_new_tokens
        for action in range(core.vocab_size):
            here = (ids + [action], tokens + [action], mask + [1.0], turns_of + [turns], rewards + [0.0])
            stopped = action in core.stop_token_ids
            if not (stopped or len(here[0]) - turn_start >= core.max_turn_tokens or len(here[0]) >= budget):
                self._walk(prompt, speaker, prior, *here, segments, turns, turn_start, out)
                continue
            full_mask = [0] * len(prompt.ids) + [int(m) for m in here[2]]
            turn_segments = segments + [("assistant", turn_start, len(here[0]))]
            conversation = conversation_of(core.tokenizer, prompt, 0, here[0], full_mask, turn_segments, turns + 1,
                                           here[0][turn_start:], stopped)
            reply = speaker.respond(conversation)
            ends = reply.done or turns + 1 >= core.max_turns
            if not ends:
                reply_ids = list(core.replies.ids(reply.content, reply.role, conversation.turn_ids, stopped))
                ends = len(here[0]) + len(reply_ids) + 1 > budget  # no room for the reply and a next token
            here[4][-1] = float(reply.reward) + (self._score(prompt, speaker, conversation) if ends else 0.0)
            if ends:
                out.append((prior, *here[1:]))
                continue
            n = len(reply_ids)
            role = reply.content.get("role", reply.role) if isinstance(reply.content, dict) else reply.role
            self._walk(prompt, speaker, prior, here[0] + reply_ids, here[1] + reply_ids, here[2] + [0.0] * n,
                       here[3] + [-1] * n, here[4] + [0.0] * n,
                       turn_segments + [(role, len(here[0]), len(here[0]) + n)], turns + 1, len(here[0]) + n, out)

    def _score(self, prompt, speaker, conversation) -> float:
        core = self.core
        if core.reward_fn is None:
            return float(speaker.score(conversation))
        completion = conversation.ids[len(prompt.ids):]
        text = core.tokenizer.decode(completion, skip_special_tokens=True)
        return float(core.reward_fn([prompt.given], [text], [list(prompt.ids)], [completion])[0])

    def logprobs(self, model, k: int) -> torch.Tensor:
        """``log model(y_t | h_<t)`` ``(m, L)`` of prompt ``k``'s histories on the policy's tokens (0 elsewhere)."""
        p = self.prompts[k]
        inputs = torch.cat([torch.tensor(p.ids).expand(len(p.tokens), -1), p.tokens], dim=1)
        logits = model(input_ids=inputs).logits[:, len(p.ids) - 1:-1]
        logq = torch.log_softmax(logits.double(), dim=-1).gather(-1, p.tokens[..., None]).squeeze(-1)
        return logq * p.mask


def true_gradient(hist: Histories, policy, reference) -> list[torch.Tensor]:
    """``grad J(theta)`` by autograd of the enumerated objective."""
    params = trainable_parameters(policy)
    objective = 0.0
    for k, p in enumerate(hist.prompts):
        logp = hist.logprobs(policy, k)
        with torch.no_grad():
            ref = hist.logprobs(reference, k)
        probability = p.prior * logp.sum(1).exp()
        value = p.task_rewards.sum(1) - hist.beta * ((logp - ref) * p.mask).sum(1)
        objective = objective + p.weight * (probability * value).sum()
    return list(torch.autograd.grad(objective, params))


# ----------------------------------------------------------------------------- advantages per (episode, turn)
def group_form(form: str, scheme: str):
    """The agent's advantages ``(N, K)`` per (episode, turn) for consecutive groups of n: ``f(G, present, n)``."""
    def broadcast(episode_advantage, present):
        return episode_advantage[:, None] * present

    if form == "rloo":
        return {"broadcast": lambda g, p, n: broadcast(g[:, 0] - leave_one_out_baseline(g[:, 0], n), p),
                "per-turn": lambda g, p, n: (g - leave_one_out_baseline(g[:, 0], n)[:, None]) * p,
                "per-turn group": lambda g, p, n: (g - leave_one_out(g, p, n)) * p}[scheme]
    if form in ("grpo", "dr_grpo"):
        scale = form == "grpo"
        return {"broadcast": lambda g, p, n: broadcast(group_advantages(g[:, 0], n, scale, ADVANTAGE_EPS), p),
                "per-turn": lambda g, p, n: turn_advantages(g, p, n, scale, ADVANTAGE_EPS, level="episode"),
                "per-turn group": lambda g, p, n: turn_advantages(g, p, n, scale, ADVANTAGE_EPS, level="turn")}[scheme]
    raise ValueError(f"no group form {form!r}; known: rloo, grpo, dr_grpo")


def limit_form(form: str, scheme: str, returns: torch.Tensor, present: torch.Tensor,
               probability: torch.Tensor) -> torch.Tensor:
    """The infinite group's advantages ``(m, K)``: the group's mean and std become the population's under
    ``probability`` (the leave-one-out mean too: one member among infinitely many changes nothing)."""
    on = present.double() * probability[:, None]
    if scheme == "per-turn group":  # the statistics of each turn, over the episodes that have it
        mean = (on * returns).sum(0) / on.sum(0)
        std = ((on * (returns - mean) ** 2).sum(0) / on.sum(0)).sqrt()
    else:  # the statistics of the episode returns G_0
        mean = (probability * returns[:, 0]).sum()
        std = ((probability * (returns[:, 0] - mean) ** 2).sum()).sqrt()
    centred = (returns[:, :1] if scheme == "broadcast" else returns) - mean
    if form == "grpo":
        centred = centred / (std + ADVANTAGE_EPS)
    return centred.expand_as(returns) * present


def expected_advantages(advantage, returns: torch.Tensor, present: torch.Tensor, probability: torch.Tensor,
                        n: int, chunk_groups: int = 200_000) -> torch.Tensor:
    """``E_others[A(h, others)]`` ``(m, K)`` for each history h as member 0 of a group of n, the other n - 1 drawn
    independently from ``probability``: a sum over every tuple of their histories, ``advantage`` being the agent's
    ``f(G, present, n)`` over consecutive groups."""
    m, turns = returns.shape
    others = torch.cartesian_prod(*[torch.arange(m)] * (n - 1)).reshape(-1, n - 1)
    weight = probability[others].prod(1)
    out = torch.zeros(m, turns, dtype=returns.dtype)
    per_chunk = max(1, chunk_groups // len(others))
    for start in range(0, m, per_chunk):
        first = torch.arange(start, min(start + per_chunk, m))
        members = torch.cat([first.repeat_interleave(len(others))[:, None], others.repeat(len(first), 1)], dim=1)
        a = advantage(returns[members].reshape(-1, turns), present[members].reshape(-1, turns), n)
        a = a.view(len(first), len(others), n, turns)[:, :, 0]
        out[first] = (weight[None, :, None] * a).sum(1)
    return out


def exact_values(p: PromptHistories, rewards: torch.Tensor, probability: torch.Tensor) -> torch.Tensor:
    """``V(h_<t)`` ``(m, L)`` at every policy token: the probability-weighted mean return from t on over the
    histories that share the tokens before t (the hidden state's posterior given them included)."""
    to_go = rewards.flip(1).cumsum(1).flip(1)
    values = torch.zeros_like(rewards)
    for t in range(rewards.shape[1]):
        groups: dict = {}
        for i in torch.nonzero(p.mask[:, t] > 0).flatten().tolist():
            groups.setdefault(tuple(p.tokens[i, :t].tolist()), []).append(i)
        for rows in groups.values():
            rows = torch.tensor(rows)
            values[rows, t] = (probability[rows] * to_go[rows, t]).sum() / probability[rows].sum()
    return values


def group_count(hist: Histories, n: int) -> int:
    """How many groups (member 0 x the others' histories) the finite-group expectation sums over, all prompts."""
    return sum(len(p.tokens) ** n for p in hist.prompts)


def expected_gradient(hist: Histories, policy, reference, *, form: str, scheme: str, group_size: int | None = None,
                      gae_lambda: float = 0.95) -> list[torch.Tensor]:
    """The expected first gradient step ``g`` of ``form`` (``FORMS``) under ``scheme`` (``SCHEMES``), per episode;
    ``group_size`` n (the group forms; None: the infinite group). PPO: ``per-turn`` only, with the exact critic."""
    if form == "ppo" and scheme != "per-turn":
        raise ValueError("PPO's advantage is GAE over turns with a critic: only the per-turn scheme applies")
    params = trainable_parameters(policy)
    surrogate = 0.0
    for k, p in enumerate(hist.prompts):
        logp = hist.logprobs(policy, k)
        with torch.no_grad():
            ref = hist.logprobs(reference, k)
            probability = p.prior * logp.sum(1).exp()
            rewards = p.task_rewards - hist.beta * (logp - ref) * p.mask  # k1 in the reward, on-policy
            returns, present = turn_returns(p.view, rewards)
            if form == "ppo":
                values = exact_values(p, rewards, probability)
                turn_adv = turn_gae(p.view, rewards, values, 1.0, gae_lambda)[0]
            elif group_size is None:
                turn_adv = limit_form(form, scheme, returns, present, probability)
            else:
                turn_adv = expected_advantages(group_form(form, scheme), returns, present, probability, group_size)
            advantages = per_token(turn_adv, p.view)
        surrogate = surrogate + p.weight * (probability[:, None] * advantages * logp).sum()
    return list(torch.autograd.grad(surrogate, params))
