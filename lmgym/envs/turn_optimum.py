"""The exact optimum of a multi-turn task: soft dynamic programming over the tree of histories.

The environment's replies depend on a hidden state the interaction draws at the start of an episode (Guess's
target, the words a random speaker will say). The policy sees only the history, so its value at a history is
an expectation over the hidden states consistent with it (the posterior, by Bayes: the prior restricted to
the states that would have given every reply so far). With beta = ``kl_coef``, at a history h::

    V(h)    = beta * log sum_a pi_ref(a|h) exp(Q(h, a) / beta)
    Q(h, a) = V(h + a)                                                    a does not end the turn
            = sum_z P(z | h) [ r_turn(z) + (score(z) if the episode ends, else V(h + a + reply(z))) ]   it does

(beta = 0: a max over the tokens pi_ref allows). States z that give the same reply lead to the same child
history, whose posterior is theirs, renormalised; the rules that end an episode (the interaction's ``done``,
``max_turns``, the context) are those of :class:`lmgym.envs.multi_turn.MultiTurnCore`. The interaction must
list its hidden states: ``hidden_states(prompt) -> [(probability, state), ...]`` and ``start_with(prompt,
state)``. Feasible for tiny vocabularies and few turns only.
"""

from __future__ import annotations

import numpy as np
import torch

from lmgym.envs.interaction import InteractionError
from lmgym.envs.multi_turn import conversation_of

__all__ = ["multi_turn_optimal_return", "MAX_HISTORIES"]

MAX_HISTORIES = 500_000
"""The most histories (policy decision points) the exact optimum will visit."""


def multi_turn_optimal_return(core) -> float:
    """The exact optimal expected return of ``core`` (a :class:`MultiTurnCore`) over its prompt list."""
    if not core.prompts.finite:
        raise ValueError("the exact optimum needs a known list of prompts, not a stream")
    factory = getattr(core.interaction, "factory", None)
    probe = factory() if factory is not None else None
    if probe is None or not callable(getattr(probe, "hidden_states", None)) \
            or not callable(getattr(probe, "start_with", None)):
        raise ValueError(f"the exact optimum needs an interaction that lists its hidden states "
                         f"(hidden_states(prompt) and start_with(prompt, state)); "
                         f"{core.interaction.name} does not")
    total = 0.0
    for prompt in core.prompts.items:
        total += _Tree(core, factory, prompt).value()
    return total / len(core.prompts.items)


class _Tree:
    """The soft values of one prompt's history tree."""

    def __init__(self, core, factory, prompt):
        self.core, self.prompt = core, prompt
        self.beta = core.kl_coef
        self.stops = set(core.stop_token_ids)
        states = factory().hidden_states(prompt.given)
        probs = np.array([float(p) for p, _ in states], dtype=np.float64)
        if not len(states) or (probs < 0).any() or not np.isclose(probs.sum(), 1.0):
            raise ValueError(f"{core.interaction.name}.hidden_states must list (probability, state) pairs whose "
                             f"probabilities sum to 1, got {probs.tolist()}")
        self.prior = probs
        self.speakers = []
        for _, state in states:
            speaker = factory()
            speaker.start_with(prompt.given, state)
            self.speakers.append(speaker)
        self.visited = 0
        self.model = core.model
        self.device = next(self.model.parameters()).device

    @torch.no_grad()
    def _ref_logprobs(self, ids: list[int]) -> np.ndarray:
        logits = self.model(input_ids=torch.as_tensor([ids], device=self.device)).logits[0, -1].double()
        return torch.log_softmax(logits, dim=-1).cpu().numpy()

    def value(self) -> float:
        ids = list(self.prompt.ids)
        return self._v(ids, [0] * len(ids), [], np.flatnonzero(self.prior > 0), turns=0, turn_start=len(ids))

    def _v(self, ids, mask, segments, alive, turns: int, turn_start: int) -> float:
        self.visited += 1
        if self.visited > MAX_HISTORIES:
            raise ValueError(f"the exact optimum needs more than {MAX_HISTORIES:,} histories; it is meant for tiny "
                             "diagnostic tasks")
        lp = self._ref_logprobs(ids)
        allowed = np.flatnonzero(np.isfinite(lp))
        q = np.array([self._q(ids, mask, segments, alive, turns, turn_start, int(a)) for a in allowed])
        if self.beta > 0:
            z = lp[allowed] + q / self.beta
            top = z.max()
            return float(self.beta * (top + np.log(np.exp(z - top).sum())))
        return float(q.max())

    def _q(self, ids, mask, segments, alive, turns, turn_start, action) -> float:
        core = self.core
        ids, mask = ids + [action], mask + [1]
        stopped = action in self.stops
        budget = len(self.prompt.ids) + core.max_new_tokens
        if not (stopped or len(ids) - turn_start >= core.max_turn_tokens or len(ids) >= budget):
            return self._v(ids, mask, segments, alive, turns, turn_start)
        segments = segments + [("assistant", turn_start, len(ids))]
        conversation = conversation_of(core.tokenizer, self.prompt, 0, ids, mask, segments, turns + 1,
                                       ids[turn_start:], stopped)
        weights = self.prior[alive] / self.prior[alive].sum()
        outcomes: dict[tuple, list[int]] = {}  # the reply each hidden state gives, grouped
        value = 0.0
        for w, z in zip(weights, alive):
            reply = self.speakers[z].respond(conversation)
            if reply.done or turns + 1 >= core.max_turns:
                value += w * (float(reply.reward) + self._score(z, conversation))
                continue
            try:
                reply_ids = core.replies.ids(reply.content, reply.role, conversation.turn_ids, stopped)
            except ValueError as err:
                raise InteractionError(f"{core.interaction.name}: {err}") from None
            if len(ids) + len(reply_ids) + 1 > budget:
                value += w * (float(reply.reward) + self._score(z, conversation))
                continue
            role = reply.content.get("role", reply.role) if isinstance(reply.content, dict) else reply.role
            key = (tuple(reply_ids), role)
            outcomes.setdefault(key, []).append(z)
            value += w * float(reply.reward)
        for (reply_ids, role), states in outcomes.items():
            w = self.prior[states].sum() / self.prior[alive].sum()
            child_ids = ids + list(reply_ids)
            child_segments = segments + [(role, len(ids), len(child_ids))]
            value += w * self._v(child_ids, mask + [0] * len(reply_ids), child_segments, np.array(states),
                                 turns + 1, len(child_ids))
        return value

    def _score(self, z: int, conversation) -> float:
        core = self.core
        if core.reward_fn is None:
            return float(self.speakers[z].score(conversation))
        completion = conversation.ids[len(self.prompt.ids):]
        text = core.tokenizer.decode(completion, skip_special_tokens=True)
        return float(core.reward_fn([self.prompt.given], [text], [list(self.prompt.ids)], [completion])[0])
