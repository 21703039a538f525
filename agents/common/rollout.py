"""A batch of finished episodes, as the agents' updates read it, and the masked statistics over its tokens."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

__all__ = ["Rollout", "masked_mean", "masked_whiten", "policy_steps"]


@dataclass
class Rollout:
    """One batch of finished episodes: per-token tensors ``(N, T)`` and per-episode ``(N,)``, on one device."""

    query_ids: torch.Tensor
    """left-padded prompts ``(N, P)``"""
    query_mask: torch.Tensor
    """1 for prompt tokens"""
    tokens: torch.Tensor
    """sampled continuations ``(N, T)`` (multi-turn: every token after the prompt, the replies included)"""
    mask: torch.Tensor
    """1.0 for the policy's tokens inside the episode (multi-turn: 0 on the environment's replies)"""
    logprobs: torch.Tensor
    """log mu of each token: the distribution that actually sampled it (the behaviour policy), as the environment's KL
    used it"""
    ref_logprobs: torch.Tensor
    """log pi_ref of each token"""
    rewards: torch.Tensor
    """per-token rewards from the environment (KL penalty + score on the last step)"""
    scores: torch.Tensor
    """task score of each episode (multi-turn: plus its turn rewards, the episode's return without the KL)"""
    kl: torch.Tensor
    """per-token KL estimate log pi_old - log pi_ref"""
    lengths: torch.Tensor
    """tokens per episode, up to its last (multi-turn: the replies included; :attr:`steps` counts the policy's)"""
    group_size: int = 1
    """G consecutive episodes share one prompt (a selection keeps it: its prompts still repeat)"""
    prompts: list[str] = field(default_factory=list)
    """each episode's prompt text"""
    completions: list[str] = field(default_factory=list)
    """decoded completions"""
    values: torch.Tensor | None = None
    """value estimates (filled by actor-critic agents)"""
    sampling_weights: torch.Tensor | None = None
    """per-token truncated importance weights min(pi_old / mu, cap) when another sampler mu (a vLLM engine) drew
    the tokens (:mod:`lmgym.agents.scale.vllm`); None when the policy sampled them itself"""
    proximal_logprobs: torch.Tensor | None = None
    """log pi_prox of each token: the trainer's weights at the start of the update, recomputed when an off-policy
    correction is on (:mod:`lmgym.agents.common.off_policy`); None: pi_old is :attr:`logprobs`"""
    is_weights: torch.Tensor | None = None
    """per-token weights of the off-policy correction (None: no correction)"""
    policy_version: int = 0
    """the iteration whose weights sampled the rollout (an asynchronous collector's rollout lags behind)"""
    task_rewards: torch.Tensor | None = None
    """multi-turn: per-token rewards without the KL part, each turn reward on its turn's last token and the score
    on the episode's last (None for single-turn episodes: the score alone, on the last token)"""
    turn_index: torch.Tensor | None = None
    """multi-turn: the policy turn (0, 1, ...) each token belongs to, -1 on the environment's tokens and padding"""

    @property
    def old_logprobs(self) -> torch.Tensor:
        """log pi_old, the clipped surrogate's anchor: the proximal policy's when recomputed, else the sampler's."""
        return self.logprobs if self.proximal_logprobs is None else self.proximal_logprobs

    @property
    def returns(self) -> torch.Tensor:
        """Each episode's undiscounted return: score (+ turn rewards) - beta * sum KL."""
        return self.rewards.sum(1)

    @property
    def steps(self) -> int:
        """The policy's tokens in the batch: the environment steps it took (a reply is no step)."""
        return int(self.mask.sum())

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, idx: torch.Tensor) -> "Rollout":
        """The rollout's tensors restricted to the episodes ``idx`` (texts are left out: updates do not
        read them, and gathering them would cost a host round-trip per minibatch)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[idx] if isinstance(v, torch.Tensor) else v
        out["prompts"], out["completions"] = [], []
        return Rollout(**out)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """The mean of ``x`` over the entries where ``mask`` is 1 (along ``dim``, or all); 0 where none are."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` to unit variance (and zero mean) over the masked entries."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def policy_steps(mask: torch.Tensor):
    """The policy's tokens moved to the front of each row, in order: ``(pack, unpack)`` for ``(N, T)`` tensors.

    A multi-turn rollout has the environment's tokens between the policy's (``mask == 0`` there). A recursion
    over steps (GAE, n-step returns) runs on ``pack(x)``, whose row holds the policy's steps back to back (then
    zeros), and ``unpack`` puts its result back at the tokens' places (0 elsewhere). Without gaps both are the
    identity on the masked entries.
    """
    inside = mask > 0
    order = torch.argsort((~inside).to(torch.int8), dim=1, stable=True)  # policy tokens first, in order
    packed_mask = inside.gather(1, order)

    def pack(x: torch.Tensor) -> torch.Tensor:
        return torch.where(packed_mask, x.gather(1, order), torch.zeros((), dtype=x.dtype, device=x.device))

    def unpack(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x).scatter(1, order, x)
        return torch.where(inside, out, torch.zeros((), dtype=x.dtype, device=x.device))

    return pack, unpack
