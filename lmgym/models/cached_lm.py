"""Stepping a batch of token sequences through a causal LM with a KV cache, and sampling continuations.

The batched stepping keeps prompts *left-padded* in the cache (as ``model.generate`` does), so that every
row's newest token sits in the last column and a prefill needs only the last position's logits. Rows may
be re-prefilled independently (a vector environment resets episodes one at a time); their new keys and
values are written into the rightmost columns and the columns before are masked out, which is exact
because a cached key/value does not depend on the column it is stored in, only on the position id it was
computed with (:mod:`lmgym.models.kv_cache` does this column surgery for full and sliding-window caches).
"""

from __future__ import annotations

import copy

import torch

from lmgym.models import kv_cache
from lmgym.models.hf_api import accepts_logits_to_keep, cache_keyword, cache_of, model_name
from lmgym.models.padding import left_pad
from lmgym.models.precision import RolloutPrecision
from lmgym.utils import fast_paths

__all__ = ["CachedLM", "token_logprobs", "sample_continuations"]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens], computed in float32 without materialising the whole log-softmax."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class CachedLM:
    """A batch of token sequences fed to a causal LM incrementally, with a KV cache.

    It holds, per row, the cache of everything fed so far and the log-probabilities
    of the *next* token (``next_logprobs``, ``(batch, vocab)`` float32). Rows can be
    restarted on new prompts independently with :meth:`restart_rows`.

    The cache is left-padded: every row's tokens form one contiguous block ending at
    the last column (see :mod:`lmgym.models.kv_cache`, which edits the columns of full- and
    sliding-window-attention caches). For models whose cache cannot be edited per
    column (recurrent layers, chunked attention) a partial restart re-prefills every
    row from the tokens it holds instead: slower, equally exact.

    Args:
        model: a Hugging Face causal LM (kept frozen; gradients are never taken).
        max_sequence_length: the longest prompt + continuation a row can hold. The
            cache is compacted when it grows to twice this, bounding memory under
            endless resets.
    """

    def __init__(self, model, *, max_sequence_length: int):
        self.model = model
        self.max_sequence_length = max_sequence_length
        self._keep_last = accepts_logits_to_keep(model, report=True)
        self._cache_keyword = cache_keyword(model, required=True)  # asked once: append runs at every token
        first = next(model.parameters())
        self._device_type = first.device.type  # asked once: the forward below runs at every token
        self.precision = RolloutPrecision(weights=first.dtype)
        """the precision transform of every forward (:mod:`lmgym.models.precision`); the environment sets its autocast"""
        self.cache = None
        self.mask: torch.Tensor | None = None  # (batch, cache columns) 1 where a column is a real token
        self.ids: torch.Tensor | None = None  # (batch, cache columns) the token in each column
        self.lengths: torch.Tensor | None = None  # (batch,) tokens fed per row = next position id
        self.next_logprobs: torch.Tensor | None = None
        self._editable = True  # whether the cache layout allows per-column edits (known after the first prefill)
        self._holes = True  # whether masked columns inside a live row are harmless (not for sliding windows)
        self._shareable = True  # whether a prefill may encode a repeated prompt once (known after the first try)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, ids, mask, position_ids, cache, last_only: bool):
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                      **{self._cache_keyword: cache})
        if last_only and self._keep_last:
            kwargs["logits_to_keep"] = 1
        with self.precision.context(self._device_type):
            return self.model(**kwargs)

    @torch.no_grad()
    def _prefill(self, prompts: list[list[int]]):
        # A group of episodes (GRPO, RLOO, evaluation) repeats its prompt: each distinct prompt is encoded once and
        # its cache rows copied, which is exact (a row's keys and values depend on its own tokens only).
        distinct: dict[tuple[int, ...], int] = {}
        index = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        shared = len(distinct) < len(prompts) and self._shareable
        encoded = [list(p) for p in distinct] if shared else prompts
        ids, mask = left_pad(encoded, 0, self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self._forward(ids, mask, positions, None, last_only=True)
        next_lp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        cache = cache_of(out)
        if shared:
            if not kv_cache.editable(cache, self.model.config):  # rows of this cache cannot be copied: encode all
                self._shareable = False
                fast_paths.fall_back("prefill sharing", f"{model_name(self.model)}'s KV cache "
                                     f"({kv_cache.describe(cache)}) cannot be copied by rows")
                return self._prefill(prompts)
            rows = torch.tensor(index, device=ids.device)
            kv_cache.select_rows(cache, rows)
            ids, mask, next_lp = ids[rows], mask[rows], next_lp[rows]
        return cache, ids, mask, mask.sum(1), next_lp

    def start(self, prompts: list[list[int]]) -> None:
        """Forget everything and prefill one prompt per row."""
        self.cache, self.ids, self.mask, self.lengths, self.next_logprobs = self._prefill(prompts)
        self._editable = kv_cache.editable(self.cache, self.model.config)
        self._holes = self._editable and kv_cache.takes_holes(self.cache)
        if not self._editable:
            fast_paths.fall_back("cache column edits", f"{model_name(self.model)}'s KV cache "
                                 f"({kv_cache.describe(self.cache)}) cannot be edited per column")

    def sequences(self) -> list[list[int]]:
        """The tokens fed to each row so far (prompt and continuation)."""
        return [row[m].tolist() for row, m in zip(self.ids.cpu(), self.mask.cpu().bool())]  # one copy to the host

    @torch.no_grad()
    def restart_rows(self, rows: torch.Tensor, prompts: list[list[int]]) -> None:
        """Prefill new prompts into the given rows (a long tensor of row indices), keeping the other rows."""
        if not self._editable:
            sequences = self.sequences()
            for r, p in zip(rows.tolist(), prompts):
                sequences[r] = list(p)
            self.start(sequences)
            return
        cache, ids, mask, lengths, next_lp = self._prefill(prompts)
        width = mask.shape[1]
        if width > self.mask.shape[1]:
            extra = width - self.mask.shape[1]
            kv_cache.grow_left(self.cache, extra)
            self.mask = torch.cat([self.mask.new_zeros(self.mask.shape[0], extra), self.mask], dim=1)
            self.ids = torch.cat([self.ids.new_zeros(self.ids.shape[0], extra), self.ids], dim=1)
        total = self.mask.shape[1]
        kv_cache.write_right(self.cache, rows, cache)
        row_mask = torch.zeros((len(prompts), total), dtype=self.mask.dtype, device=self.mask.device)
        row_mask[:, total - width:] = mask
        row_ids = torch.zeros((len(prompts), total), dtype=self.ids.dtype, device=self.ids.device)
        row_ids[:, total - width:] = ids
        self.mask[rows] = row_mask
        self.ids[rows] = row_ids
        self.lengths[rows] = lengths
        self.next_logprobs[rows] = next_lp

    def _compact(self) -> None:
        """Drop the leading columns no row uses (a row's block ends at the last column, and may hold masked holes
        where it waited while other rows took tokens)."""
        used = self.mask.any(0)
        drop = int(used.long().argmax()) if bool(used.any()) else self.mask.shape[1]
        if drop:
            kv_cache.drop_left(self.cache, drop)
            self.mask, self.ids = self.mask[:, drop:], self.ids[:, drop:]

    @torch.no_grad()
    def append(self, tokens: torch.Tensor, live: torch.Tensor | None = None, hold: bool = False) -> torch.Tensor:
        """Feed one token per row; returns (and stores) the next-token log-probs ``(batch, vocab)``.

        ``live`` (bool ``(batch,)``) marks the rows that take their token; the others get a masked
        placeholder column at position 0 (their own position may already be the last one the model has) and
        keep their state and next-token log-probs: rows about to be restarted, or, with ``hold=True``, rows that
        wait while the others finish a turn and go on afterwards (a cache whose rows must stay contiguous, a
        sliding window, then feeds the live rows by a re-prefill: exact, slower).
        """
        if hold and live is not None and not self._holes:
            counts = live.long()
            self._extend_by_prefill(tokens[:, None], counts, None)
            return self.next_logprobs
        if self.mask.shape[1] >= 2 * self.max_sequence_length:
            self._compact()
        column = self.mask.new_ones(self.mask.shape[0], 1) if live is None else live[:, None].to(self.mask.dtype)
        positions = self.lengths if live is None else torch.where(live, self.lengths, 0)
        self.mask = torch.cat([self.mask, column], dim=1)
        self.ids = torch.cat([self.ids, tokens[:, None].to(self.ids.dtype)], dim=1)
        out = self._forward(tokens[:, None], self.mask, positions[:, None], self.cache, last_only=True)
        self.cache = cache_of(out)
        self.lengths = self.lengths + (1 if live is None else live.long())
        next_lp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        self.next_logprobs = next_lp if live is None else torch.where(live[:, None], next_lp, self.next_logprobs)
        return self.next_logprobs

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, counts: torch.Tensor, sampling=None) -> torch.Tensor:
        """Feed each row its first ``counts[r]`` tokens of ``tokens`` ``(batch, W)`` (left-aligned; 0 leaves a row as
        it is) in one forward over the cache; returns their log-probs ``(batch, W)`` given everything before
        (under ``sampling`` when given; 0 past a row's count).

        A multi-turn episode feeds a whole turn, or the environment's reply, this way: the history is attended
        through the cache, never encoded again. Rows are fed right-aligned, so the columns left of a shorter
        row's tokens are masked holes; positions are explicit, so a hole changes nothing.
        """
        if sampling is not None and sampling.is_identity:
            sampling = None
        batch, width = tokens.shape
        counts = counts.to(self.lengths.device, torch.long)
        if width == 0 or not bool((counts > 0).any()):
            return torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
        if not self._holes:  # recurrent, chunked or sliding caches cannot take holes: re-prefill (exact, slower)
            return self._extend_by_prefill(tokens, counts, sampling)
        if self.mask.shape[1] + width >= 2 * self.max_sequence_length:
            self._compact()
        source = torch.arange(width, device=tokens.device) - (width - counts)[:, None]  # chunk index of each column
        fed = source >= 0
        ids = torch.where(fed, tokens.gather(1, source.clamp(min=0)), 0)
        positions = torch.where(fed, self.lengths[:, None] + source, 0)
        self.mask = torch.cat([self.mask, fed.to(self.mask.dtype)], dim=1)
        self.ids = torch.cat([self.ids, ids.to(self.ids.dtype)], dim=1)
        out = self._forward(ids, self.mask, positions, self.cache, last_only=False)
        self.cache = cache_of(out)
        first_lp = self.next_logprobs if sampling is None else sampling.log_probs(self.next_logprobs)[0]
        first = first_lp.gather(1, tokens[:, :1])
        rest = (token_logprobs(out.logits[:, :-1], ids[:, 1:]) if sampling is None
                else sampling.token_log_probs(out.logits[:, :-1], ids[:, 1:]))  # column c+1 predicted by column c
        # back to chunk order: token j >= 1 of a row sits in column width - count + j
        column = (torch.arange(width, device=tokens.device) + (width - counts)[:, None] - 1).clamp(0, max(width - 2, 0))
        lp = torch.cat([first, rest.gather(1, column[:, 1:])], dim=1) if width > 1 else first
        self.lengths = self.lengths + counts
        next_lp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        self.next_logprobs = torch.where((counts > 0)[:, None], next_lp, self.next_logprobs)
        inside = torch.arange(width, device=tokens.device) < counts[:, None]
        return torch.where(inside, lp, 0.0)

    def _extend_by_prefill(self, tokens, counts, sampling):
        """:meth:`extend` for caches that cannot take masked columns inside a row: every row's sequence with its
        chunk, prefilled afresh in one forward whose logits also score the chunks. Exact; it encodes the history
        again, which is why :meth:`extend` avoids it where the cache allows."""
        if not self._holes and self._editable:
            fast_paths.fall_back("multi-turn cache reuse", f"{model_name(self.model)}'s KV cache "
                                 f"({kv_cache.describe(self.cache)}) has sliding windows, which count columns, so its "
                                 "rows must stay contiguous")
        chunks = [row[:k] for row, k in zip(tokens.tolist(), counts.tolist())]
        sequences = [s + c for s, c in zip(self.sequences(), chunks)]
        ids, mask = left_pad(sequences, 0, self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self._forward(ids, mask, positions, None, last_only=False)
        self.cache, self.ids, self.mask, self.lengths = cache_of(out), ids, mask, mask.sum(1)
        self.next_logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        scored = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
        width = ids.shape[1]
        for r, chunk in enumerate(chunks):
            if not chunk:
                continue
            start = width - len(chunk) - 1  # the column that predicts the chunk's first token
            row_logits = out.logits[r, start:start + len(chunk)]
            row_tokens = torch.as_tensor(chunk, device=out.logits.device)
            scored[r, :len(chunk)] = (token_logprobs(row_logits, row_tokens) if sampling is None
                                      else sampling.token_log_probs(row_logits[None], row_tokens[None])[0])
        return scored

    def snapshot(self):
        """The state to :meth:`restore` if what follows fails (the cache's tensors are never edited in place by
        appending, so a shallow copy of its layers suffices)."""
        cache = _copy_cache(self.cache) if self._editable else copy.deepcopy(self.cache)
        return cache, self.mask, self.ids, self.lengths, self.next_logprobs

    def restore(self, state) -> None:
        self.cache, self.mask, self.ids, self.lengths, self.next_logprobs = state

    @torch.no_grad()
    def score_continuations(self, tokens: torch.Tensor, sampling=None) -> torch.Tensor:
        """Log-probs ``(batch, T)`` of whole continuations ``tokens`` ``(batch, T)`` of the current rows.

        One forward over the continuations on top of the cached prompts. The
        cache itself is left as it was (rows are expected to restart next). With a
        :class:`lmgym.models.sampling.Sampling`, the log-probs are those of the model's
        distribution under that sampling transformation.
        """
        if sampling is not None and sampling.is_identity:
            sampling = None
        first_lp = self.next_logprobs if sampling is None else sampling.log_probs(self.next_logprobs)[0]
        first = first_lp.gather(1, tokens[:, :1])
        if tokens.shape[1] == 1:
            return first
        steps = tokens.shape[1] - 1
        mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], steps)], dim=1)
        positions = self.lengths[:, None] + torch.arange(steps, device=tokens.device)
        cache = _copy_cache(self.cache) if self._editable else copy.deepcopy(self.cache)
        out = self._forward(tokens[:, :-1], mask, positions, cache, last_only=False)
        rest = (token_logprobs(out.logits, tokens[:, 1:]) if sampling is None
                else sampling.token_log_probs(out.logits, tokens[:, 1:]))
        return torch.cat([first, rest], dim=1)


def _copy_cache(cache):
    """A shallow copy whose layers can grow without touching the original tensors."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    return new


@torch.no_grad()
def sample_continuations(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
                         stop_token_ids, pad_token_id: int, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0, generator: torch.Generator | None = None, check_every: int = 8,
                         mask_model=None, mask_fn=None, noise_share: tuple[int, int] | None = None,
                         all_finished=None):
    """Sample continuations of left-padded prompts with a KV cache.

    Args:
        model: the policy LM.
        input_ids, attention_mask: left-padded prompts ``(batch, P)``.
        max_new_tokens: most tokens to sample per row.
        stop_token_ids: a row stops after emitting one of these; later slots hold ``pad_token_id``.
        temperature, top_k, top_p: the sampling transformation (see :class:`lmgym.models.sampling.Sampling`);
            the defaults sample the model's own distribution.
        generator: a ``torch.Generator`` on the model's device, for reproducible sampling.
        check_every: look at whether every row has stopped only every this many tokens,
            to avoid a host round-trip per token.
        mask_model, mask_fn: optionally a second LM stepped in lock-step with its own KV cache, and
            ``mask_fn(its next-token logits) -> (batch, vocab) bool``: each token is drawn from the
            sampling distribution restricted to that mask and renormalised (NLPO's masking policy).
        noise_share, all_finished: for one process's share of a data-parallel batch: ``(k, K)`` draws
            the random noise of all K shares and keeps the k-th (see :meth:`lmgym.models.sampling.Sampling.sample`),
            and ``all_finished(finished) -> bool`` says whether every row of *every* share has
            stopped, so all processes take the same number of steps (and random draws) as one process would.

    Returns:
        ``(tokens, logprobs)``, both ``(batch, T)`` with ``T <= max_new_tokens``; ``logprobs``
        are the log-probs of the chosen tokens under the distribution actually sampled from
        (tempered and truncated), 0 after a row stopped.
    """
    from lmgym.models.sampling import Sampling

    sampling = Sampling(temperature, top_k, top_p)
    device = input_ids.device
    stop = torch.as_tensor(list(stop_token_ids), device=device)
    batch = input_ids.shape[0]
    mask = attention_mask
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    models = [model] if mask_model is None else [model, mask_model]
    keywords = [cache_keyword(m, required=True) for m in models]  # asked once, not at every token
    caches, logits = [], []
    for m in models:
        keep = {"logits_to_keep": 1} if accepts_logits_to_keep(m, report=True) else {}
        out = m(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep)
        caches.append(cache_of(out))
        logits.append(out.logits[:, -1])
    lengths = mask.sum(1)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    for t in range(max_new_tokens):
        allowed = mask_fn(logits[1]) if mask_model is not None else None
        tok, lp = sampling.sample(logits[0], generator, allowed=allowed, noise_share=noise_share)
        tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
        tokens.append(tok)
        logprobs.append(torch.where(finished, torch.zeros_like(lp), lp))
        finished = finished | torch.isin(tok, stop)
        if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and (
                bool(finished.all()) if all_finished is None else all_finished(finished))):
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        for i, m in enumerate(models):
            out = m(input_ids=tok[:, None], attention_mask=mask, position_ids=lengths[:, None],
                    use_cache=True, **{keywords[i]: caches[i]})
            caches[i], logits[i] = cache_of(out), out.logits[:, -1]
        lengths = lengths + 1
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)
