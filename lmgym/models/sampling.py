"""The sampling transformation (temperature, top-k, top-p) and the log-probs that go with it.

An agent that samples with temperature T, top-k and top-p does not sample from its
model's distribution p but from the transformed distribution

    q(a) = softmax(z)[a] restricted to S and renormalised,   z = logits / T,

where S is the set of tokens the truncation keeps: the top-k tokens of z (ties at the
k-th value kept), then, of those, the smallest most-probable set whose probability
reaches top_p (the order and conventions of Hugging Face's ``generate``). The log-prob
an lmgym agent hands to the environment is ``log q(a)`` (its behaviour distribution),
and the environment transforms the reference in exactly the same way, so the KL term
compares like with like: with policy == reference every per-token KL estimate
``log q_pi(a) - log q_ref(a)`` is zero, at any temperature, top-k and top-p.

One convention keeps everything finite: :meth:`Sampling.log_probs` gives every token,
also those outside S, the value ``z_a - logsumexp_{b in S} z_b``. Sampling never picks a
token outside S, so for the sampled tokens this is exactly ``log q``. Where it matters
is the other model: once the policy has moved, it may sample a token that the
*reference's* truncation drops. The strict KL would then be infinite and the reward
``-inf``; instead the reference's log-prob of that token is its tempered probability
over the reference's kept mass, a finite (and large) penalty. The same holds for the
ratio pi/pi_old of a token that left the current policy's set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Sampling"]


@dataclass(frozen=True)
class Sampling:
    """Temperature, top-k and top-p of a sampler, and the log-probs of the distribution it samples from.

    Args:
        temperature: divides the logits; must be > 0 (1 leaves them as they are).
        top_k: keep the k most probable tokens (0 keeps all).
        top_p: keep the smallest set of most probable tokens whose probability reaches top_p;
            in (0, 1] (1 keeps all).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 switches it off), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 switches it off), got {p!r}")

    @property
    def truncates(self) -> bool:
        """True when top-k or top-p may drop tokens."""
        return self.top_k > 0 or self.top_p < 1

    @property
    def is_identity(self) -> bool:
        """True when the sampler draws from the model's own distribution."""
        return self.temperature == 1 and not self.truncates

    def kept(self, z: torch.Tensor, min_tokens_to_keep: int = 1) -> torch.Tensor:
        """The boolean mask of tokens the truncation keeps, for tempered logits ``z`` ``(..., V)``.

        The top-p nucleus keeps at least ``min_tokens_to_keep`` tokens, the most probable in the same order the
        nucleus is taken in (tied tokens are broken the same way for both, so the minimum never adds a tie the
        nucleus left out)."""
        keep = torch.ones_like(z, dtype=torch.bool)
        if self.top_k > 0 and self.top_k < z.shape[-1]:
            kth = torch.topk(z, self.top_k, dim=-1).values[..., -1:]
            keep = z >= kth
        if self.top_p < 1:
            masked = z.masked_fill(~keep, float("-inf"))
            ascending, order = torch.sort(masked, dim=-1)
            cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cumulative <= 1 - self.top_p
            drop_sorted[..., -max(1, min_tokens_to_keep):] = False  # the most probable token(s) always stay
            keep = keep & ~drop_sorted.scatter(-1, order, drop_sorted)
        return keep

    def log_probs(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(log q, kept)`` for logits ``(..., V)``: float32 log-probs of the sampled distribution.

        ``kept`` is the mask of tokens sampling can pick (None when nothing is truncated).
        Every entry of ``log q`` is finite (see the module docstring for tokens outside the
        kept set). Log-probs (any shift of the logits) give the same result as logits.
        """
        z = logits.float()
        if self.temperature != 1:
            z = z / self.temperature
        if not self.truncates:
            return torch.log_softmax(z, dim=-1), None
        with torch.no_grad():
            keep = self.kept(z)
        norm = torch.logsumexp(z.masked_fill(~keep, float("-inf")), dim=-1, keepdim=True)
        return z - norm, keep

    def restricted_log_probs(self, logits: torch.Tensor, allowed: torch.Tensor | None):
        """``(log q, kept)`` of the sampled distribution restricted to the ``allowed`` tokens (bool, like
        ``logits``; NLPO's nucleus) and renormalised; without ``allowed``, :meth:`log_probs`.

        ``allowed`` is a hard constraint (an action space) and the truncation applies within it: in a
        row where top-k / top-p keep no allowed token, the allowed tokens alone are kept, weighted by q.
        """
        logq, keep = self.log_probs(logits)
        if allowed is None:
            return logq, keep
        both = allowed if keep is None else keep & allowed
        both = torch.where(both.any(dim=-1, keepdim=True), both, allowed)
        return logq - torch.logsumexp(logq.masked_fill(~both, float("-inf")), dim=-1, keepdim=True), both

    def token_log_probs(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``log q(tokens)`` for logits ``(..., V)`` and tokens ``(...)``."""
        if not self.truncates:  # no full log-softmax needed
            z = logits.float() / self.temperature if self.temperature != 1 else logits.float()
            return z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
        logq, _ = self.log_probs(logits)
        return logq.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None = None,
               allowed: torch.Tensor | None = None, noise_share: tuple[int, int] | None = None):
        """Draw one token per row of ``logits`` ``(B, V)``; returns ``(tokens, log q(tokens))``.

        ``allowed`` (a ``(B, V)`` bool mask, e.g. NLPO's nucleus) restricts q to those tokens and
        renormalises it (:meth:`restricted_log_probs`); the log-probs returned are then the restricted
        distribution's.

        Uses the Gumbel-max trick, ``argmax(log q + G)`` with ``G = -log(-log U)``, which
        samples from q without a host round-trip and lets non-finite log-probs through for
        the caller to report.

        ``noise_share=(k, K)`` says these B rows are the k-th of K equal shares of a batch of
        K * B rows (one process's share under data parallelism): the noise of the whole batch is
        drawn and the share's rows kept, so each row gets exactly the token it would get in the
        one-process run of K * B rows, and ``generator`` advances as it would there.
        """
        logq, keep = self.restricted_log_probs(logits, allowed)
        scores = logq if keep is None else logq.masked_fill(~keep, float("-inf"))
        if noise_share is None:
            uniform = torch.rand(scores.shape, generator=generator, device=scores.device)
        else:
            k, count = noise_share
            rows = scores.shape[0]
            uniform = torch.rand((rows * count, *scores.shape[1:]), generator=generator,
                                 device=scores.device)[k * rows:(k + 1) * rows]
        # torch.rand may return exactly 0 (2**-24 per entry), whose Gumbel noise is -inf: when that hits the only
        # kept token every score is -inf and argmax picks token 0, which q may exclude. The smallest positive
        # float gives a finite (very low) noise instead; the distribution is unchanged otherwise.
        gumbel = uniform.clamp_(min=torch.finfo(uniform.dtype).tiny).log_().neg_().log_().neg_()
        tokens = (scores + gumbel).argmax(dim=-1)
        return tokens, logq.gather(-1, tokens[:, None]).squeeze(-1)
