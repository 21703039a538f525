"""NLPO, Natural Language Policy Optimization (Ramamurthy et al. 2023, "Is Reinforcement Learning (Not) for
Natural Language Processing?", RL4LMs).

PPO whose policy may only choose tokens inside the top-p nucleus of a *masking policy*:

1. The masking policy pi_mask starts as a copy of the policy and is refreshed with the policy's
   weights every ``mask_update_every`` iterations (RL4LMs' IMDB setting: 5); between refreshes it
   is frozen, so the nucleus lags the policy and keeps it near what it recently knew.
2. Roll out: at every state s_t the allowed tokens are ``M(s_t)``, the smallest set of pi_mask's most
   probable tokens whose probability reaches ``mask_top_p`` (at least ``min_tokens_to_keep``
   tokens), plus the stop and special tokens, which are never masked. The policy samples from its
   own distribution restricted to ``M(s_t)`` and renormalised,
   ``pi_M(a|s) = pi(a|s) / sum_{b in M(s)} pi(b|s)`` for ``a in M(s)``; these masked log-probs are the
   ones the environment's KL term ``log pi_M - log pi_ref`` sees. (The agent's own sampling
   settings, ``temperature`` / ``top_k`` / ``top_p``, apply as for every agent: the nucleus then
   further restricts the transformed distribution, and the masking policy's nucleus is taken at
   the same temperature.)
3. Update exactly as PPO (GAE, clipped surrogate, clipped value loss), with the ratio
   ``rho = pi_M / pi_M,old`` of the masked distributions under the same masks. The masks are recomputed
   from the (unchanged) masking policy in the update rather than stored, which would cost
   ``N x T x vocab`` booleans; the token actually sampled is always kept, so rounding differences at
   the nucleus boundary between the cached sampling pass and the full forward cannot exclude it.

With ``mask_top_p = 1`` nothing is masked and NLPO is PPO. Where RL4LMs copies the policy into the
masking policy just before the update of every ``mask_update_every``-th iteration, here the copy is
taken just after it (the nucleus is then one update fresher); both refresh on the same schedule.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated

import torch

from lmgym.agents.common.base import Rollout, policy_forward
from lmgym.agents.common.config import ConfigError, Range
from lmgym.agents.ppo import PPO, PPOConfig
from lmgym.envs.masking import nucleus_mask
from lmgym.models import sample_continuations
from lmgym.models.sampling import Sampling

__all__ = ["NLPOConfig", "NLPO", "sample_in_nucleus"]


@dataclass
class NLPOConfig(PPOConfig):
    """PPO's hyper-parameters plus the masking policy's (defaults: RL4LMs' IMDB configuration, except
    ``min_tokens_to_keep``, which RL4LMs sets to 100 for GPT-2's 50k-token vocabulary).

    ``mask_top_p`` is RL4LMs' ``top_mask``; it is not ``top_p``, the agent's own nucleus sampling,
    which every agent has and which NLPO applies too.
    """

    mask_top_p: Annotated[float, Range(gt=0, le=1)] = 0.9
    """probability mass of the masking policy's nucleus the policy samples from, in (0, 1] (1: no mask, PPO)"""
    mask_update_every: Annotated[int, Range(ge=1)] = 5
    """copy the policy into the masking policy every this many iterations"""
    min_tokens_to_keep: Annotated[int, Range(ge=1)] = 1
    """the masking policy's nucleus holds at least this many tokens"""


@torch.no_grad()
def sample_in_nucleus(policy, masking_policy, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      max_new_tokens: int, *, sampling: Sampling, mask_top_p: float, min_tokens_to_keep: int,
                      never_mask: torch.Tensor, stop_token_ids, pad_token_id: int,
                      generator: torch.Generator | None = None, **share):
    """Sample continuations of left-padded prompts from ``policy`` restricted to ``masking_policy``'s nucleus.

    :func:`lmgym.models.sample_continuations` steps both models in lock-step, each with its own
    KV cache; at each step the policy's distribution under ``sampling`` is restricted to the
    top-``mask_top_p`` nucleus of the masking policy (at the same temperature; ``never_mask`` ids
    always allowed) and renormalised. ``logprobs`` are the masked distribution's. With
    ``mask_top_p = 1`` the masking policy does not run and the result (and random stream) is
    exactly PPO's sampling. ``share``: a data-parallel process's sampling share
    (:meth:`lmgym.agents.Agent.sampling_share`).
    """
    def nucleus(mask_logits: torch.Tensor) -> torch.Tensor:
        return nucleus_mask(mask_logits.float() / sampling.temperature, mask_top_p,
                            min_tokens_to_keep=min_tokens_to_keep, never_mask=never_mask)

    masked = mask_top_p < 1  # a nucleus of mass 1 masks nothing
    return sample_continuations(policy, input_ids, attention_mask, max_new_tokens, stop_token_ids=stop_token_ids,
                                pad_token_id=pad_token_id, temperature=sampling.temperature, top_k=sampling.top_k,
                                top_p=sampling.top_p, generator=generator,
                                mask_model=masking_policy if masked else None, mask_fn=nucleus if masked else None,
                                **share)


class NLPO(PPO):
    """PPO sampling inside the top-p nucleus of a periodically refreshed masking policy.

    See :class:`NLPOConfig` for the hyper-parameters and the module docstring for the algorithm.
    ``agent.masking_policy`` is the masking policy (saved in checkpoints beside the policy).
    """

    config_class = NLPOConfig
    name = "nlpo"

    def setup(self) -> None:
        super().setup()
        if self.config.logprob_chunk_size and self.config.mask_top_p < 1:
            raise ConfigError("NLPO's mask needs the full logits in the update: set logprob_chunk_size=0 "
                              "(or mask_top_p=1)")
        self.masking_policy = copy.deepcopy(self.policy).eval().requires_grad_(False)
        # the asynchronous collector samples with a copy of its own: updates refresh the masking policy
        self.sampler_masking_policy = (copy.deepcopy(self.masking_policy) if self.config.async_collect
                                       else self.masking_policy)
        tokenizer = self.env.tokenizer
        special = [i for i in getattr(tokenizer, "all_special_ids", []) if 0 <= i < self.env.core.vocab_size]
        self.never_mask = torch.as_tensor(sorted(set(self.env.stop_token_ids) | set(special)), dtype=torch.long,
                                          device=self.device)
        """token ids the mask never removes: the stop tokens and the tokenizer's special tokens"""

    def sampler_modules(self):
        return {**super().sampler_modules(), "masking_policy": (self.masking_policy, self.sampler_masking_policy)}

    def trainable_modules(self):
        # Not trained, but part of the run's state: a resumed run must mask with the same weights.
        return {**super().trainable_modules(), "masking_policy": self.masking_policy}

    # ------------------------------------------------------------------ the mask
    @torch.no_grad()
    def action_mask(self, batch: Rollout) -> torch.Tensor | None:
        """The nucleus ``(N, T, V)`` at each state of ``batch`` (None when ``mask_top_p = 1``: nothing masked)."""
        cfg = self.config
        if cfg.mask_top_p >= 1.0:
            return None
        ids = torch.cat([batch.query_ids, batch.tokens], dim=1)
        attention = torch.cat([batch.query_mask, torch.ones_like(batch.tokens)], dim=1)
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        with self.autocast():
            out = self.masking_policy(input_ids=ids, attention_mask=attention, position_ids=positions,
                                      use_cache=False)
        logits = out.logits[:, batch.query_ids.shape[1] - 1:-1].float() / self.sampling.temperature
        allowed = nucleus_mask(logits, cfg.mask_top_p, min_tokens_to_keep=cfg.min_tokens_to_keep,
                               never_mask=self.never_mask)
        return allowed.scatter_(-1, batch.tokens[..., None], True)  # the sampled token was in the nucleus

    def refresh_masking_policy(self) -> None:
        """Copy the policy's current weights into the masking policy (whole on every process: with FSDP the
        policy's shards are gathered first, so the mask's forwards stay local)."""
        if self.sharded:
            from lmgym.agents.scale.sharding import full_weights_everywhere

            self.masking_policy.load_state_dict(full_weights_everywhere(self.policy))
        else:
            self.masking_policy.load_state_dict(self.policy.state_dict())

    # ------------------------------------------------------------------ PPO with the masked distribution
    def sample(self, query_ids, query_mask):
        cfg = self.config
        return sample_in_nucleus(self.sampler_policy, self.sampler_masking_policy, query_ids, query_mask,
                                 self.env.max_new_tokens,
                                 sampling=self.sampling, mask_top_p=cfg.mask_top_p,
                                 min_tokens_to_keep=cfg.min_tokens_to_keep, never_mask=self.never_mask,
                                 stop_token_ids=self.env.stop_token_ids,
                                 pad_token_id=self.env.tokenizer.pad_token_id, generator=self.sampling_generator,
                                 **self.sampling_share())

    def turn_mask(self):
        """Multi-turn rollouts sample inside the same nucleus, the masking policy stepped beside the policy."""
        cfg = self.config
        if cfg.mask_top_p >= 1:
            return None, None

        def nucleus(mask_logits: torch.Tensor) -> torch.Tensor:
            return nucleus_mask(mask_logits.float() / self.sampling.temperature, cfg.mask_top_p,
                                min_tokens_to_keep=cfg.min_tokens_to_keep, never_mask=self.never_mask)

        return self.sampler_masking_policy, nucleus

    def forward(self, batch: Rollout):
        """Masked log-probs and entropy of the current policy, and the critic's values, on a batch."""
        allowed = self.action_mask(batch)
        with self.autocast():
            logprobs, entropy, hidden = policy_forward(self.policy, batch, sampling=self.sampling,
                                                       chunk_size=self.config.logprob_chunk_size,
                                                       hidden=self.value_model is None,
                                                       entropy_grad=self.config.ent_coef != 0, action_mask=allowed)
            if self.value_model is not None:
                _, _, hidden = policy_forward(self.value_model, batch, hidden=True)
        return logprobs, entropy, self.value_head(hidden)

    def update(self, rollout: Rollout) -> dict[str, float]:
        metrics = super().update(rollout)
        iteration = self.iteration + 1  # this update completes iteration self.iteration + 1 (learn counts after)
        refreshed = iteration % self.config.mask_update_every == 0
        if refreshed:
            self.refresh_masking_policy()
        metrics["nlpo/mask_refreshed"] = float(refreshed)
        return metrics
