"""Action masks over the vocabulary: the top-p nucleus of a masking model (NLPO's mask), usable by any agent.

NLPO (Ramamurthy et al. 2023, "Is Reinforcement Learning (Not) for Natural Language
Processing?") lets the policy choose only among the tokens of the top-p *nucleus*
(Holtzman et al. 2020) of a *masking policy*: the smallest set of most probable
tokens whose total probability reaches ``top_p``, widened to at least
``min_tokens_to_keep`` tokens, plus tokens that are never masked (the stop and
special tokens, so an episode can always end).

- :func:`nucleus_mask` turns next-token logits into that boolean mask.
- :class:`NucleusMask` builds a mask function ``fn(observation) -> (N, vocab) bool`` from a
  masking model, for :meth:`lmgym.TextGenVectorEnv.set_action_mask_fn` (and from there
  ``LMGymVecEnv.action_masks()``, which sb3-contrib's ``MaskablePPO`` reads).
"""

from __future__ import annotations

import torch

from lmgym.models import to_left_padded
from lmgym.models.sampling import Sampling

__all__ = ["check_top_p", "nucleus_mask", "NucleusMask"]


def check_top_p(top_p) -> float:
    """``top_p`` as a float in (0, 1], or a ``ValueError`` saying what is allowed."""
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1] (the probability mass of the nucleus kept; 1 masks "
                         f"nothing), got {top_p!r}")
    return float(top_p)


def nucleus_mask(logits: torch.Tensor, top_p: float, *, min_tokens_to_keep: int = 1,
                 never_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask ``(..., vocab)``, True for tokens inside the top-p nucleus of ``softmax(logits)``.

    Tokens are taken in order of decreasing probability until their total reaches ``top_p``
    (a token is kept when the mass of the more probable tokens before it is still below
    ``top_p``), and at least ``min_tokens_to_keep`` are kept. ``never_mask`` (token ids) are
    always True. ``top_p = 1`` keeps every token. The nucleus is :meth:`lmgym.models.sampling.Sampling.kept`'s,
    the one the samplers' own ``top_p`` keeps.
    """
    top_p = check_top_p(top_p)
    logits = logits.float()
    # the nucleus as the samplers truncate (lmgym.models.sampling), its minimum taken in the same sort order
    mask = Sampling(top_p=top_p).kept(logits, min_tokens_to_keep)
    if never_mask is not None and len(never_mask):
        mask[..., never_mask.to(mask.device)] = True
    return mask


class NucleusMask:
    """``fn(observation) -> (N, vocab) bool``: the top-p nucleus of ``model`` at each state of an lmgym observation.

    Bind it with ``venv.set_action_mask_fn(NucleusMask(model, top_p=0.9, never_mask=venv.stop_token_ids))``;
    ``venv.action_masks()`` (and ``LMGymVecEnv.action_masks()``) then return the nucleus at the current states.
    Each call is one forward of ``model`` over the observed tokens (no cache), under ``torch.no_grad``.

    Args:
        model: the masking model, a causal LM (e.g. a frozen copy of the policy, refreshed by the caller).
        top_p: probability mass of the nucleus, in (0, 1].
        min_tokens_to_keep: keep at least this many tokens.
        never_mask: token ids always allowed (stop and special tokens).
    """

    def __init__(self, model, top_p: float = 0.9, *, min_tokens_to_keep: int = 1, never_mask=()):
        self.model = model
        self.top_p = check_top_p(top_p)
        if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be an integer >= 1, got {min_tokens_to_keep!r}")
        self.min_tokens_to_keep = min_tokens_to_keep
        self.never_mask = torch.as_tensor(sorted(set(int(t) for t in never_mask)), dtype=torch.long)

    @torch.no_grad()
    def __call__(self, observation: dict) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids = torch.as_tensor(observation["input_ids"], device=device).long()
        attention = torch.as_tensor(observation["attention_mask"], device=device).long()
        ids, attention = to_left_padded(ids, attention, int(attention.sum(1).max()))
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=attention, position_ids=positions).logits[:, -1]
        return nucleus_mask(logits, self.top_p, min_tokens_to_keep=self.min_tokens_to_keep,
                            never_mask=self.never_mask)
