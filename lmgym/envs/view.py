"""What the single and the vector environment both expose of their :class:`~lmgym.envs.core.TextGenCore`: the
reference model, tokenizer, KL coefficient, sampling transform, limits, the exact optimum, and the policy and
action-mask bindings."""

from __future__ import annotations

import torch

from lmgym.envs.core import TextGenCore

__all__ = ["CoreView"]


class CoreView:
    """What the single and the vector environment both expose of their :class:`TextGenCore` (``self.core``)."""

    core: TextGenCore

    def close(self, **kwargs) -> None:
        """Close the environment: a multi-turn one also ends what its interaction holds (a tool worker process)."""
        close = getattr(getattr(self, "core", None), "close", None)  # None when construction failed
        if callable(close):
            close()
        super().close(**kwargs)

    @property
    def device(self) -> torch.device:
        return self.core.device

    @property
    def reference_model(self):
        """The frozen reference model pi_ref (agents start their policy as a copy of it)."""
        return self.core.model

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def kl_coef(self) -> float:
        """beta, the KL coefficient in the reward; agents with an adaptive KL controller set it."""
        return self.core.kl_coef

    @kl_coef.setter
    def kl_coef(self, value: float) -> None:
        self.core.set_kl_coef(value)

    @property
    def max_new_tokens(self) -> int:
        """The most tokens after the prompt: one episode's (multi-turn: the policy's and the environment's)."""
        return self.core.max_new_tokens

    @property
    def multi_turn(self) -> bool:
        """Whether an interaction answers between policy turns (docs/multi_turn.md)."""
        return getattr(self.core, "interaction", None) is not None

    @property
    def max_turns(self) -> int:
        """The most policy turns of an episode (1 for single-turn environments)."""
        return getattr(self.core, "max_turns", 1)

    @property
    def max_turn_tokens(self) -> int:
        """The most tokens of one policy turn (single-turn: ``max_new_tokens``)."""
        return getattr(self.core, "max_turn_tokens", self.core.max_new_tokens)

    @property
    def max_length(self) -> int:
        """The observation length: the longest prompt + ``max_new_tokens``."""
        return self.core.max_len

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt; observations right after a reset hold at most this many tokens."""
        return self.core.prompts.max_prompt_tokens

    @property
    def stop_token_ids(self) -> list[int]:
        return self.core.stop_token_ids

    @property
    def optimal_return(self) -> float:
        """The exact optimal expected return of the KL-regularised objective (tiny vocabularies only)."""
        return self.core.optimal_return()

    @property
    def sampling(self):
        """The sampling transformation (temperature, top-k, top-p) the reference's log-probs are taken under.

        An agent that samples from a transformed policy q_pi sets this to the same
        :class:`lmgym.models.sampling.Sampling`, so the KL term is ``log q_pi(a) - log q_ref(a)``
        and vanishes when policy and reference coincide. Default: no transformation.
        """
        return self.core.sampling

    @sampling.setter
    def sampling(self, value) -> None:
        self.core.set_sampling(value)

    @property
    def precision(self):
        """The :class:`lmgym.models.precision.RolloutPrecision` of the reference's forwards (weights dtype, autocast).

        A policy whose log-probs reach the KL term should compute them in the same precision (lmgym's agents
        sample with a compute copy in :attr:`precision`'s weights dtype, under its autocast), so that the KL is 0
        up to rounding while the policy equals the reference, whatever dtype the reference was loaded in.
        """
        return self.core.precision

    def set_autocast(self, dtype) -> None:
        """Run the reference's forwards under ``torch.autocast`` to ``"bfloat16"`` / ``"float16"``, or not (None)."""
        self.core.set_autocast(dtype)

    def bind_policy(self, fn) -> None:
        """Bind ``fn(observation, actions) -> log pi`` (batched torch tensors) so the KL term is exact
        when no log-probs are handed over with the actions; ``None`` unbinds."""
        self.core.bind_policy(fn)

    def set_action_mask_fn(self, fn) -> None:
        """Bind ``fn(observation) -> mask`` so :meth:`action_masks` reports which tokens may be chosen now.

        ``observation`` is the batched dict of ``(N, L)`` torch tensors (as for :meth:`bind_policy`);
        ``mask`` is ``(N, vocab)`` boolean, True where a token is allowed. :class:`lmgym.envs.masking.NucleusMask`
        builds one from a masking model's top-p nucleus (NLPO's mask). The environment reports the mask but
        does not enforce it: it is for the agent (sb3-contrib's ``MaskablePPO`` reads it through
        ``LMGymVecEnv.action_masks()``). ``None`` unbinds: every token is allowed again.
        """
        self.core.set_action_mask_fn(fn)
