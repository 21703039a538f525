"""The policy forward of an update: the log-prob (and entropy, hidden state) of every sampled token.

An update re-runs the policy over prompt + continuation with gradients. Two kinds of work
in the obvious single pass are wasted, and this module skips both, exactly:

- **Prompts encoded once per distinct prompt.** The completions of a GRPO/RLOO group share
  one prompt. Its keys and values are computed once and repeated (``index_select``, which
  autograd sums back over the repeats) to every completion that shares it; only the
  continuation runs per completion. With 8 prompts x 4 completions the prompt's positions
  cost 8 rows instead of 32, in the forward, the backward and the activations kept between.
- **No positions after an episode's end.** Continuations are padded to ``max_new_tokens``
  after their stop token, and those positions count for nothing. The rows are sorted by
  length and run in a few buckets (:data:`LENGTH_BUCKETS`), each cut to its longest row; an
  instruct model answering short questions in up to 24 tokens filled 54% of the positions.
  Each bucket is its own forward, and autograd keeps a weight's gradient from the first
  bucket's backward until the last bucket's arrives: with every weight trainable, that is a
  full set of gradients alive beside most of the activations (``benchmarks/update_forward.py``,
  GRPO on SmolLM2-135M: peak RSS 4139 MiB with 4 buckets against 3994 MiB with one, for an
  update taking 18% less time). So the buckets serve forwards without gradients and policies whose
  trainable weights are few (LoRA adapters: 2176 against 2470 MiB, 32% less time;
  :data:`FEW_TRAINABLE`); a fully trained policy runs one bucket cut to the longest row.

The bucket count depends on the batch's size and the model only and the prompt sharing on the
model and the rollout's shape, never on the data, so every process of a sharded run makes the same
forward calls. Prompt sharing needs a model that takes ``past_key_values`` and no
activation checkpointing (Hugging Face drops the cache inside checkpointed layers); the
buckets share the prompt's cache only when it is the plain per-layer kind
(``DynamicLayer``), else one bucket serves the batch. Without prompt sharing each bucket runs
prompt and continuation in one pass.

Outputs at positions after an episode's end are 0 (log-prob, entropy, hidden state).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lmgym.agents.common.logprobs import chunked_token_logprobs, selective_logprobs
from lmgym.models import kv_cache, token_logprobs
from lmgym.models.hf_api import (accepts_logits_to_keep, cache_keyword, cache_kwargs, cache_of,
                                 is_activation_checkpointing, model_name)
from lmgym.utils import fast_paths
from lmgym.models.sampling import Sampling

if TYPE_CHECKING:
    from lmgym.agents.common.rollout import Rollout

__all__ = ["policy_forward", "shares_prompts", "length_buckets", "bucket_count", "LENGTH_BUCKETS", "FEW_TRAINABLE"]

LENGTH_BUCKETS = 4
"""forward calls over the continuations of a batch, rows grouped by length (each call costs a pass over the
layers' weights, so a few buckets keep most of the saving)"""
FEW_TRAINABLE = 0.1
"""the largest trainable share of a model's parameters for which a forward with gradients uses length buckets"""


def bucket_count(model) -> int:
    """:data:`LENGTH_BUCKETS`, or 1 for a forward with gradients into most of the model's weights (see above)."""
    if not torch.is_grad_enabled():
        return LENGTH_BUCKETS
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return LENGTH_BUCKETS if trainable <= FEW_TRAINABLE * total else 1


def shares_prompts(model, rollout: "Rollout") -> bool:
    """Whether :func:`policy_forward` encodes each distinct prompt once for this model and rollout."""
    if getattr(rollout, "group_size", 1) < 2 or rollout.query_ids.shape[1] < 2:
        return False  # no prompt repeats: nothing to share
    if not accepts_logits_to_keep(model):
        reason = f"{model_name(model)}.forward takes no logits_to_keep"
    elif cache_keyword(model) is None:
        reason = f"{model_name(model)}.forward takes no KV cache (neither 'cache' nor 'past_key_values')"
    elif is_activation_checkpointing(model):
        reason = "activation checkpointing is on (Hugging Face drops the cache inside checkpointed layers)"
    else:
        return True
    fast_paths.fall_back("prompt sharing", reason)
    return False


def length_buckets(lengths: torch.Tensor, buckets: int = LENGTH_BUCKETS) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                                   list[int]]:
    """Rows grouped by length: ``(order, rows, widths)``.

    ``order`` sorts the rows longest first; ``rows`` splits it into ``min(buckets, N)`` runs of
    near-equal count and ``widths`` is each run's longest length (at least 1). One host read.
    """
    order = torch.argsort(lengths, descending=True, stable=True)
    rows = list(order.chunk(min(buckets, len(order))))
    firsts = torch.stack([r[0] for r in rows])
    widths = [max(1, int(w)) for w in lengths[firsts].tolist()]
    return order, rows, widths


class _PromptCache:
    """The keys and values of each distinct prompt (all but its last token), computed once per forward."""

    def __init__(self, model, ids, mask, positions, start: int):
        head = torch.cat([ids[:, :start], mask[:, :start]], dim=1)
        distinct, self.row_of = torch.unique(head, dim=0, return_inverse=True)
        pick = torch.empty(distinct.shape[0], dtype=torch.long, device=ids.device)
        pick.scatter_(0, self.row_of, torch.arange(len(self.row_of), device=ids.device))  # a row holding each
        out = model(input_ids=ids[pick, :start], attention_mask=mask[pick, :start],
                    position_ids=positions[pick, :start], use_cache=True, logits_to_keep=1)
        self.cache = cache_of(out)
        from transformers.cache_utils import DynamicLayer

        self.splittable = all(type(layer) is DynamicLayer for layer in getattr(self.cache, "layers", [None]))

    def for_rows(self, rows: torch.Tensor, whole_batch: bool):
        """A cache holding the prompt of each of ``rows``."""
        from transformers.cache_utils import DynamicCache

        if whole_batch and not self.splittable:
            self.cache.reorder_cache(self.row_of)  # index_select, in place: used once
            return self.cache
        select = self.row_of[rows]
        return DynamicCache([(layer.keys.index_select(0, select), layer.values.index_select(0, select))
                             for layer in self.cache.layers])


def _bucket_outputs(model, ids, mask, positions, start: int, rows, width: int, prompts: _PromptCache | None, *,
                    hidden: bool, full_logits: bool, whole_batch: bool):
    """Logits ``(n, width, V)`` (None if not ``full_logits``) and last hidden states ``(n, width, H)`` (if
    ``hidden``) at the positions ``start .. start + width - 1`` of ``rows``, which predict their first
    ``width`` continuation tokens."""
    end = start + width
    if prompts is not None:
        out = model(input_ids=ids[rows, start:end], attention_mask=mask[rows, :end],
                    position_ids=positions[rows, start:end], use_cache=True, output_hidden_states=hidden,
                    **cache_kwargs(model, prompts.for_rows(rows, whole_batch)),
                    **({} if full_logits else {"logits_to_keep": 1}))
        return (out.logits if full_logits else None), (out.hidden_states[-1] if hidden else None)
    keep = accepts_logits_to_keep(model, report=True)
    if full_logits:
        # logits only where a continuation token is predicted: the output layer skips the prompt's positions
        kwargs = {"logits_to_keep": torch.arange(start, end, device=ids.device)} if keep else {}
    else:
        kwargs = {"logits_to_keep": 1} if keep else {}
    out = model(input_ids=ids[rows, :end], attention_mask=mask[rows, :end], position_ids=positions[rows, :end],
                output_hidden_states=hidden, use_cache=False, **kwargs)
    logits = (out.logits if keep else out.logits[:, start:end]) if full_logits else None
    return logits, (out.hidden_states[-1][:, start:end] if hidden else None)


def _token_stats(logits, tokens, sampling: Sampling, entropy_grad: bool, action_mask):
    """``(log-probs, entropy)`` of ``tokens`` under the sampled distribution of ``logits``."""
    if not sampling.truncates and action_mask is None and not entropy_grad:
        # the common case: a hand-written backward and a detached entropy (lmgym.agents.common.logprobs)
        z = logits.float() if sampling.temperature == 1 else logits.float() / sampling.temperature
        return selective_logprobs(z, tokens)
    if not sampling.truncates and action_mask is None:
        logits = logits.float() / sampling.temperature
        probs = torch.softmax(logits, dim=-1)
        entropy = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)  # with gradients (an entropy bonus)
        return token_logprobs(logits, tokens), entropy
    logq, kept = sampling.restricted_log_probs(logits, action_mask)  # renormalised over the allowed tokens kept
    logprobs = logq.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        inside = logq.masked_fill(~kept, float("-inf"))
        entropy = -(inside.exp() * logq.masked_fill(~kept, 0.0)).sum(-1)
    return logprobs, entropy


def policy_forward(model, rollout: "Rollout", *, sampling: Sampling | None = None, temperature: float = 1.0,
                   hidden: bool = False, entropy_grad: bool = False, chunk_size: int = 0,
                   action_mask: torch.Tensor | None = None):
    """One forward of ``model`` over prompt + continuation.

    ``rollout`` is a :class:`~lmgym.agents.common.rollout.Rollout` or anything with its ``query_ids``,
    ``query_mask``, ``tokens`` and ``mask``; a ``group_size`` above 1 says prompts repeat.

    Returns ``(logprobs, entropy, hidden_states)``, each ``(N, T)`` (hidden ``(N, T, H)``
    or None): the log-prob of each continuation token, the entropy of the policy at
    that state, and the last hidden state at the position that predicts it; 0 after the
    episode's end (``rollout.mask``). The entropy carries gradients only with
    ``entropy_grad=True`` (an entropy bonus); otherwise it is a detached statistic for logging.

    Log-probs and entropy are those of the distribution the agent samples from:
    ``sampling`` (temperature, top-k, top-p; see :mod:`lmgym.models.sampling`), or, without it,
    the model's distribution at ``temperature``. ``chunk_size > 0`` takes the memory-saving
    path of :mod:`lmgym.agents.common.logprobs` (no full-vocabulary logits kept for backward).
    ``action_mask`` (bool ``(N, T, V)``) restricts that distribution further to the allowed tokens,
    renormalised (NLPO's nucleus; not with ``chunk_size``). See the module's docstring for the
    work this skips.
    """
    sampling = sampling if sampling is not None else Sampling(temperature)
    if action_mask is not None and chunk_size:
        raise ValueError("policy_forward: an action_mask needs the full logits; use chunk_size=0")
    ids = torch.cat([rollout.query_ids, rollout.tokens], dim=1)
    mask = torch.cat([rollout.query_mask, torch.ones_like(rollout.tokens)], dim=1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    start = rollout.query_ids.shape[1] - 1  # the position whose output predicts the first continuation token
    n, steps = rollout.tokens.shape
    inside = rollout.mask > 0
    lengths = (inside * torch.arange(1, steps + 1, device=inside.device)).amax(1)  # through the last step inside

    stats, states = [], []
    # A LoRA policy runs with its adapters on (lmgym.agents.common.lora); other models have no such switch.
    with (model.active() if hasattr(model, "active") else contextlib.nullcontext()):
        prompts = _PromptCache(model, ids, mask, positions, start) if shares_prompts(model, rollout) else None
        # a cache of another kind (sliding windows, recurrent states) serves one bucket, reordered in place
        one_bucket = prompts is not None and not prompts.splittable
        if one_bucket and bucket_count(model) > 1:
            fast_paths.fall_back("length buckets", f"the prompt's KV cache ({kv_cache.describe(prompts.cache)}) "
                                 "cannot be split by rows")
        order, buckets, widths = length_buckets(lengths, 1 if one_bucket else bucket_count(model))
        for rows, width in zip(buckets, widths):
            logits, state = _bucket_outputs(model, ids, mask, positions, start, rows, width, prompts,
                                            hidden=hidden or bool(chunk_size), full_logits=not chunk_size,
                                            whole_batch=len(buckets) == 1)
            if not chunk_size:
                stats.append(_token_stats(logits, rollout.tokens[rows, :width], sampling, entropy_grad,
                                          None if action_mask is None else action_mask[rows, :width]))
            if state is not None:
                states.append(F.pad(state, (0, 0, 0, steps - width)))

    unsort = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=order.device))

    def in_rollout_order(parts: list[torch.Tensor]) -> torch.Tensor:
        """The buckets' rows, each padded to the full width, back in the rollout's order; 0 after the end."""
        padded = [F.pad(part, (0, steps - part.shape[1])) if part.dim() == 2 else part for part in parts]
        whole = torch.cat(padded).index_select(0, unsort)
        where = inside if whole.dim() == 2 else inside[..., None]
        return torch.where(where, whole, 0.0)  # not a product: a truncated sampler's log-prob may be -inf there

    full_states = in_rollout_order(states) if states else None
    if chunk_size:
        # only the positions inside episodes go through the output layer
        logprobs, entropy = chunked_token_logprobs(full_states[inside][None], rollout.tokens[inside][None],
                                                   model.get_output_embeddings(), sampling, chunk_size, entropy_grad)
        zeros = torch.zeros(n, steps, dtype=logprobs.dtype, device=logprobs.device)
        logprobs, entropy = zeros.masked_scatter(inside, logprobs[0]), zeros.masked_scatter(inside, entropy[0])
    else:
        logprobs = in_rollout_order([lp for lp, _ in stats])
        entropy = in_rollout_order([e for _, e in stats])
    return logprobs, entropy, full_states if hidden else None
