"""Sampling a batch of conversations one turn at a time, with the policy's KV cache kept across turns.

:func:`lmgym.models.sample_continuations` samples a whole continuation of a prompt. A multi-turn episode
needs the policy's turn, then the environment's reply fed in, then the next turn: :class:`TurnSampler` keeps
one :class:`~lmgym.models.CachedLM` per model for the whole episode, so a turn pays one decode step per token
and a reply one forward over the cache, never a re-encoding of the history.
"""

from __future__ import annotations

import torch

from lmgym.models.cached_lm import CachedLM
from lmgym.models.sampling import Sampling

__all__ = ["TurnSampler"]


class TurnSampler:
    """Turns sampled from ``model`` for a batch of conversations that start at ``prompts`` (lists of ids).

    Args:
        model: the policy LM.
        prompts: each row's prompt ids.
        max_sequence_length: the longest conversation a row can hold.
        sampling: the sampling transformation; log-probs returned are its distribution's.
        stop_token_ids: tokens that end a turn.
        pad_token_id: written after a row's turn has ended.
        generator: for reproducible sampling.
        mask_model, mask_fn: a second LM stepped alongside and ``mask_fn(its next-token logits) -> (B, V) bool``
            restricting each draw (NLPO's nucleus), as in :func:`lmgym.models.sample_continuations`.
        check_every: look at whether every row's turn has ended only every this many tokens.
    """

    def __init__(self, model, prompts: list[list[int]], *, max_sequence_length: int, sampling: Sampling,
                 stop_token_ids, pad_token_id: int, generator: torch.Generator | None = None, mask_model=None,
                 mask_fn=None, check_every: int = 8):
        self.sampling, self.generator = sampling, generator
        self.mask_fn = mask_fn
        self.pad_token_id, self.check_every = pad_token_id, check_every
        self.models = [CachedLM(model, max_sequence_length=max_sequence_length)]
        if mask_model is not None:
            self.models.append(CachedLM(mask_model, max_sequence_length=max_sequence_length))
        for lm in self.models:
            lm.start(prompts)
        self.stop = torch.as_tensor(list(stop_token_ids), device=self.models[0].device)

    @torch.no_grad()
    def sample_turn(self, running: torch.Tensor, max_tokens: int, room: torch.Tensor):
        """The next turn of every ``running`` row: at most ``max_tokens`` tokens, and at most ``room[r]`` for row r,
        ending after a stop token. Returns ``(tokens, logprobs, lengths)``, ``(B, T)``, ``(B, T)`` and ``(B,)``;
        padding and log-prob 0 after a row's turn, and on rows not running."""
        in_turn = running & (room > 0)
        lengths = torch.zeros_like(room)
        tokens, logprobs = [], []
        for t in range(max_tokens):
            allowed = self.mask_fn(self.models[1].next_logprobs) if self.mask_fn is not None else None
            tok, lp = self.sampling.sample(self.models[0].next_logprobs, self.generator, allowed=allowed)
            tok = torch.where(in_turn, tok, self.pad_token_id)
            tokens.append(tok)
            logprobs.append(torch.where(in_turn, lp, 0.0))
            for lm in self.models:
                lm.append(tok, live=in_turn, hold=True)  # rows whose turn ended wait, and go on next turn
            lengths = lengths + in_turn
            in_turn = in_turn & ~torch.isin(tok, self.stop) & (lengths < room)
            if t + 1 < max_tokens and (t + 1) % self.check_every == 0 and not bool(in_turn.any()):
                break
        return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1), lengths

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor, counts: torch.Tensor) -> None:
        """Feed each row its first ``counts[r]`` tokens of ``tokens`` (the environment's reply) in one forward."""
        for lm in self.models:
            lm.extend(tokens, counts)
