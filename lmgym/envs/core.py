"""The token-level MDP of DESIGN.md, batched over N episodes, with torch state on one device.

:class:`TextGenCore` is the one implementation of the MDP; the single-episode
``gymnasium.Env`` (``lmgym.envs.env``) and the batched ``VectorEnv`` (``lmgym.envs.vector``)
are thin views of it, so every path computes the same rewards for the same tokens. Its parts
that are concepts of their own live beside it: checking what an agent hands over
(:mod:`lmgym.envs.actions`), which prompt each episode starts from (:mod:`lmgym.envs.prompt_draw`),
how the rewards and ``info`` of an episode are put together (:mod:`lmgym.envs.episode_rewards`),
the reference's KV-cached scoring (:class:`lmgym.models.CachedLM`) and what the two views expose
(:mod:`lmgym.envs.view`).

Per-token reward (``beta = kl_coef``)::

    r_t = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))  [+ R(x, y) on the last step]

When neither the agent nor a bound policy supplies ``log pi(a_t|s_t)``, the
environment cannot compute the KL term and the reward is instead::

    r_t = beta * log pi_ref(a_t|s_t)  [+ R(x, y) on the last step]

whose expectation equals the KL-regularised objective once the agent adds an
entropy bonus of weight ``beta`` (``-beta * log pi`` per step), as maximum-entropy
agents such as PPO with ``ent_coef=beta`` do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from lmgym.utils import checks
from lmgym.envs.actions import as_logprobs, as_token_tensor
from lmgym.envs.chat import default_stop_token_ids
from lmgym.envs.episode_rewards import completions_of, episode_end_info, token_rewards
from lmgym.models import CachedLM, is_sharded_module, load_model, resolve_device, right_pad
from lmgym.envs.optimum import soft_optimal_values
from lmgym.envs.prompt_draw import PromptDraw
from lmgym.envs.prompts import Prompt, PromptSource
from lmgym.rewards.functions import RewardFunction
from lmgym.models.sampling import Sampling
from lmgym.models.precision import RolloutPrecision, as_autocast_dtype

__all__ = ["TextGenCore", "SequenceResult", "EpisodeError"]

MAX_KL_COEF = 1e6
"""The largest beta accepted. Rewards are float32 (finite up to 3.4e38) and beta multiplies a
log-prob gap, which real float32 models keep far below 1e6 nats, so beta * gap stays finite; and a
beta beyond 1e6 makes any score irrelevant to the objective (the optimum is pi_ref itself), which
no one means: ``kl_coef=0`` switches the penalty off in the other direction."""

class EpisodeError(RuntimeError):
    """An environment method was called in a state where it cannot run (e.g. a step after the episode ended)."""


@dataclass
class SequenceResult:
    """What :meth:`TextGenCore.score_sequences` returns: per-token tensors ``(N, T)`` and per-episode values ``(N,)``.

    Positions after an episode's end have ``mask == 0`` and zero reward.
    """

    rewards: torch.Tensor
    """Per-token rewards, exactly as per-token ``step`` would have returned them."""
    terminated: torch.Tensor
    """True at the step that emitted a stop token."""
    truncated: torch.Tensor
    """True at step ``max_new_tokens`` of an episode that emitted no stop token."""
    mask: torch.Tensor
    """1 for tokens inside the episode (up to and including the stop token), else 0."""
    ref_logprobs: torch.Tensor
    """log pi_ref of each submitted token."""
    logprobs: torch.Tensor | None
    """log pi of each token as handed over (None if none were)."""
    kl: torch.Tensor
    """Per-token KL estimate ``log pi - log pi_ref`` (NaN where log pi is unknown)."""
    scores: torch.Tensor
    """Task score R(x, y) of each episode."""
    lengths: torch.Tensor
    """Tokens in each episode."""
    prompts: list[str]
    """Each episode's prompt text."""
    completions: list[str]
    """Each episode's decoded completion (without the stop token)."""


class TextGenCore:
    """N text-generation episodes stepped in lock-step against one frozen reference model.

    See :class:`lmgym.envs.vector.TextGenVectorEnv` for the arguments.
    """

    def __init__(self, *, model, reward_fn, prompts, num_envs: int = 1, tokenizer=None, max_new_tokens: int = 32,
                 kl_coef: float = 0.05, group_size: int = 1, max_prompt_tokens: int | None = None,
                 stop_token_ids=None, device="auto", dtype="auto", trust_remote_code: bool = False):
        num_envs = checks.integer(num_envs, "num_envs", low=1)
        group_size = checks.integer(group_size, "group_size", low=1)
        if num_envs % group_size:
            raise ValueError(f"group_size must divide num_envs={num_envs}, got {group_size!r}")
        max_new_tokens = checks.integer(max_new_tokens, "max_new_tokens", low=1)
        trust_remote_code = checks.flag(trust_remote_code, "trust_remote_code")
        self.device = resolve_device(device)
        if isinstance(model, torch.nn.Module):
            # pi_ref is a frozen *copy*: a caller who goes on training the object they passed
            # must not move the reference, nor find their model frozen.
            model = copy.deepcopy(model)
        self.model, self.tokenizer = load_model(model, device=self.device, dtype=dtype, tokenizer=tokenizer,
                                                trust_remote_code=trust_remote_code)
        self.model.requires_grad_(False)
        self.vocab_size = int(self.model.config.vocab_size)
        self.reward_fn = self._reward_function(reward_fn)
        self.prompts = PromptSource(prompts, self.tokenizer, max_prompt_tokens=max_prompt_tokens)
        self.num_envs, self.group_size = num_envs, group_size
        self.max_new_tokens = max_new_tokens
        self.set_kl_coef(kl_coef)
        self.max_len = self.prompts.max_prompt_tokens + max_new_tokens
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context is not None and self.max_len > context:
            raise ValueError(f"prompts of up to {self.prompts.max_prompt_tokens} tokens plus max_new_tokens="
                             f"{max_new_tokens} need {self.max_len} positions, but the model's context is {context}; "
                             "shorten the prompts or lower max_new_tokens")
        if stop_token_ids is None:  # EOS, and an instruct model's end-of-turn token from its generation config
            stop_token_ids = default_stop_token_ids(self.model, self.tokenizer)
        if isinstance(stop_token_ids, (str, bytes)) or not hasattr(stop_token_ids, "__iter__"):
            raise TypeError(f"stop_token_ids must be a list of token ids, e.g. [{stop_token_ids!r}], "
                            f"got {stop_token_ids!r}")
        stop = sorted({checks.integer(t, "stop_token_ids entries") for t in stop_token_ids})
        if not stop or any(not 0 <= t < self.vocab_size for t in stop):
            raise ValueError(f"stop_token_ids {stop} must be a non-empty list of ids in [0, {self.vocab_size})")
        self.stop_token_ids = stop
        self._stop = torch.as_tensor(stop, device=self.device)
        if self.tokenizer.pad_token_id is None:  # neither pad nor EOS: padding is masked, any id does
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(stop[0])
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self.ref = CachedLM(self.model, max_sequence_length=self.max_len)
        self.policy_fn = None
        self.action_mask_fn = None
        self.sampling = Sampling()

        n, d = num_envs, self.device
        self.tokens = torch.full((n, self.max_len), self.pad_token_id, dtype=torch.long, device=d)
        self.obs_mask = torch.zeros((n, self.max_len), dtype=torch.int8, device=d)
        self.prompt_len = torch.zeros(n, dtype=torch.long, device=d)
        self.gen_len = torch.zeros(n, dtype=torch.long, device=d)
        self.episode_kl = torch.zeros(n, dtype=torch.float32, device=d)
        self.rows = torch.arange(n, device=d)
        self.row_prompts: list[Prompt | None] = [None] * n
        self.pending_reset = np.zeros(n, dtype=bool)  # episodes that ended last step (host side: known after the sync)
        self.started = False
        self._reference_sharded = False
        self._fresh = False  # every row is at the start of an episode
        self.draw = PromptDraw(self.prompts, num_envs, group_size)
        self.rng = np.random.default_rng()
        self.shard = (0, 1)
        """``(k, K)``: these rows are the k-th of K equal shares of a data-parallel batch (see :meth:`set_shard`)"""

    def _reward_function(self, reward_fn) -> RewardFunction | None:
        """The task score's source (a multi-turn environment's interaction may score instead, and give None)."""
        return RewardFunction(reward_fn)

    def set_shard(self, index: int, count: int) -> None:
        """Make this environment the ``index``-th of ``count`` equal shares of one batch of ``count * num_envs`` rows.

        Every new batch of prompts (``reset`` and the restart after ``score_sequences``) is then drawn
        for the whole batch, in the order a single environment of ``count * num_envs`` rows draws it,
        and this share's rows kept: with the same seed, share k holds exactly the prompts rows
        ``k * num_envs ...`` of the single environment would hold (GRPO groups stay inside a share).
        Used by data-parallel agents (:mod:`lmgym.agents.scale.distributed`); rows restarted one by one
        (per-token stepping) draw from this share's stream alone.
        """
        index, count = checks.integer(index, "index", low=0), checks.integer(count, "count", low=1)
        if index >= count:
            raise ValueError(f"shard index {index} must be below the number of shards {count}")
        self.shard = (index, count)

    def set_kl_coef(self, kl_coef: float) -> None:
        """Set beta: any real number type (numpy, 0-d torch) in ``[0, MAX_KL_COEF]``."""
        self.kl_coef = checks.real(kl_coef, "kl_coef", low=0.0, high=MAX_KL_COEF)
        self._optimal_return = None  # the optimum depends on beta

    def set_sampling(self, sampling) -> None:
        """Score the reference under the agent's sampling transformation (see :mod:`lmgym.models.sampling`)."""
        if sampling is None:
            sampling = Sampling()
        if not isinstance(sampling, Sampling):
            raise TypeError(f"sampling must be an lmgym.models.sampling.Sampling, got {type(sampling).__name__}")
        self.sampling = sampling

    @property
    def precision(self) -> RolloutPrecision:
        """The precision the reference's forwards run in: its weights' dtype and the autocast set (if any)."""
        return self.ref.precision

    def set_autocast(self, dtype) -> None:
        """Run the reference's forwards under ``torch.autocast`` to ``dtype`` (``"bfloat16"``, ``"float16"``), or
        not (None). An agent sampling under the same autocast sees a KL of 0 (up to rounding) at iteration 0."""
        self.ref.precision = RolloutPrecision(weights=self.ref.precision.weights, autocast=as_autocast_dtype(dtype))

    def _ref_next_logprobs(self) -> torch.Tensor:
        """log pi_ref of every next token, transformed as the agent samples."""
        if self.sampling.is_identity:
            return self.ref.next_logprobs
        return self.sampling.log_probs(self.ref.next_logprobs)[0]

    # ------------------------------------------------------------------ prompts and resets
    def bind_policy(self, fn) -> None:
        """Bind ``fn(observation, actions) -> log pi(actions|observation)`` (a ``(N,)`` tensor) for the KL term.

        ``observation`` is the dict of ``(N, L)`` tensors of the state the actions were taken in.
        ``None`` unbinds.
        """
        if fn is not None and not callable(fn):
            raise TypeError(f"bind_policy needs a callable or None, got {type(fn).__name__}")
        self.policy_fn = fn

    def set_action_mask_fn(self, fn) -> None:
        """Bind ``fn(observation) -> (N, vocab) bool`` (True: the token may be chosen); ``None`` unbinds."""
        if fn is not None and not callable(fn):
            raise TypeError(f"set_action_mask_fn needs a callable or None, got {type(fn).__name__}")
        self.action_mask_fn = fn

    def action_masks(self, observation: dict | None = None) -> torch.Tensor:
        """``(N, vocab)`` bool on the device: the tokens the bound mask function allows at the current states, or
        at the states of a batched ``observation`` (every token when no function is bound)."""
        if observation is None:
            if not self.started:
                raise EpisodeError("there is no state to mask yet: call reset() before action_masks()")
            observation = self.observation()
        shape = (len(observation["input_ids"]), self.vocab_size)
        if self.action_mask_fn is None:
            return torch.ones(shape, dtype=torch.bool, device=self.device)
        mask = torch.as_tensor(self.action_mask_fn(observation)).to(self.device)
        if tuple(mask.shape) != shape:
            raise ValueError(f"the action mask function returned shape {tuple(mask.shape)}; it must return one "
                             f"boolean per env and token, {shape}")
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"the action mask function must return booleans (or 0/1), got {mask.dtype}")
            mask = mask.bool()
        empty = torch.nonzero(~mask.any(1)).flatten().tolist()
        if empty:
            raise ValueError(f"the action mask allows no token at all in env(s) {empty[:5]}; keep at least the "
                             "stop tokens allowed so every episode can end")
        return mask

    def reset(self, *, seed: int | None = None, prompts=None) -> None:
        """Start a new episode in every row, with prompts drawn from the source or given."""
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.draw.restart()
        rows = np.arange(self.num_envs)
        chosen = self.draw.given(prompts) if prompts is not None else self.draw.draw(self.rng, rows, self.shard)
        # per-token step() cannot drive a sharded reference (see step); asked here once, not at every token
        self._reference_sharded = is_sharded_module(self.model)
        self.ref.start([p.ids for p in chosen])
        self._write_prompts(rows, chosen)
        self.pending_reset[:] = False
        self.started = True
        self._fresh = True

    def restart(self, rows: np.ndarray) -> None:
        """Start a new episode in the given rows only (a partial reset); the others carry on."""
        if len(rows):
            self._restart_rows(rows)
            self.pending_reset[rows] = False
            self._fresh = not self.gen_len.any().item() and not self.pending_reset.any()

    def _restart_rows(self, rows: np.ndarray) -> None:
        chosen = self.draw.draw(self.rng, rows, self.shard)
        if len(rows) == self.num_envs:
            self.ref.start([p.ids for p in chosen])
        else:
            self.ref.restart_rows(torch.as_tensor(rows, device=self.device), [p.ids for p in chosen])
        self._write_prompts(rows, chosen)

    def _write_prompts(self, rows: np.ndarray, chosen: list[Prompt]) -> None:
        ids, mask = right_pad([p.ids for p in chosen], self.pad_token_id, self.device, width=self.max_len)
        idx = torch.as_tensor(rows, device=self.device)
        self.tokens[idx] = ids
        self.obs_mask[idx] = mask.to(torch.int8)
        self.prompt_len[idx] = torch.as_tensor([len(p.ids) for p in chosen], device=self.device)
        self.gen_len[idx] = 0
        self.episode_kl[idx] = 0
        for r, p in zip(rows, chosen):
            self.row_prompts[r] = p

    def observation(self) -> dict[str, torch.Tensor]:
        """The current states: left-aligned prompt + generated tokens, padded, and the mask of real tokens."""
        return {"input_ids": self.tokens.clone(), "attention_mask": self.obs_mask.clone()}

    # ------------------------------------------------------------------ the MDP
    def _score(self, rows: np.ndarray, completion_ids: list[list[int]]) -> np.ndarray:
        prompts = [self.row_prompts[r] for r in rows]
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return self.reward_fn([p.given for p in prompts], texts, [p.ids for p in prompts], completion_ids)

    def step(self, actions, logprobs=None):
        """Advance every row by one token.

        Rows whose episode ended on the previous call are reset instead (their
        action is ignored; reward 0, not done), as Gymnasium's ``NEXT_STEP``
        autoreset mode specifies.

        Returns:
            ``(observation, rewards, terminated, truncated, info)`` with tensors on the device.
        """
        if not self.started:
            raise EpisodeError("call reset() before step()")
        if self._reference_sharded:
            # each row restarts when its own episode ends, so processes would call the sharded reference a
            # different number of times and wait for each other forever
            raise EpisodeError("step() cannot run on a reference model sharded by FSDP (LoRA under LMGYM_FSDP): "
                               "its processes must forward in lockstep; submit whole continuations with "
                               "score_sequences(), as lmgym's agents do")
        actions = as_token_tensor(actions, (self.num_envs,), "actions", self.vocab_size, self.device)
        restarting = np.flatnonzero(self.pending_reset)
        active = ~torch.as_tensor(self.pending_reset, device=self.device)
        state = self.observation() if (logprobs is None and self.policy_fn is not None) else None

        ref_lp = self._ref_next_logprobs().gather(1, actions[:, None]).squeeze(1)
        if logprobs is not None:
            pol_lp = as_logprobs(logprobs, (self.num_envs,), active, self.device)
        elif self.policy_fn is not None:
            bound = torch.as_tensor(self.policy_fn(state, actions)).reshape(-1)
            pol_lp = as_logprobs(bound, (self.num_envs,), active, self.device, "the bound policy's log-probs")
        else:
            pol_lp = None
        # Rows restarting this step took no action: reward, log-probs and KL are 0 there, and the
        # "_<key>" masks of Gymnasium's vector-info convention say which rows took a step.
        zero = torch.zeros_like(ref_lp)
        ref_lp = torch.where(active, ref_lp, zero)
        if pol_lp is not None:
            pol_lp = torch.where(active, pol_lp, zero)
        rewards, kl = token_rewards(self.kl_coef, ref_lp, pol_lp)
        rewards = torch.where(active, rewards, zero)

        col = (self.prompt_len + self.gen_len).clamp(max=self.max_len - 1)
        self.tokens[self.rows, col] = torch.where(active, actions, self.tokens[self.rows, col])
        self.obs_mask[self.rows, col] = torch.where(active, torch.ones_like(self.obs_mask[:, 0]),
                                                    self.obs_mask[self.rows, col])
        # new tensors rather than in place: the old ones are what a failed step puts back (below)
        length_before, kl_before = self.gen_len, self.episode_kl
        self.gen_len = self.gen_len + active
        self.episode_kl = self.episode_kl + torch.where(active, kl, zero)
        terminated = torch.isin(actions, self._stop) & active
        truncated = (self.gen_len >= self.max_new_tokens) & active & ~terminated
        done = (terminated | truncated).cpu().numpy()  # the one host sync per step: who needs scoring

        info = {"ref_logprob": ref_lp, "_ref_logprob": active}
        if pol_lp is not None:  # without the policy's log-prob the KL is unknown, and left out
            info.update(logprob=pol_lp, _logprob=active, kl=kl, _kl=active)
        finished = np.flatnonzero(done)
        if finished.size:
            try:
                info.update(self._finish(finished, rewards, kl_known=pol_lp is not None))
            except BaseException:
                # a failed step leaves every episode as it was (fix the reward and step again), never half-applied:
                # an active row's new column held padding (rows are written whole, right-padded, at each restart)
                self.tokens[self.rows, col] = torch.where(active, self.pad_token_id, self.tokens[self.rows, col])
                self.obs_mask[self.rows, col] = torch.where(active, 0, self.obs_mask[self.rows, col])
                self.gen_len, self.episode_kl = length_before, kl_before
                raise
        if not (done | self.pending_reset).all():
            # Rows restarting this step ignore their action: it must not reach the model at a position
            # past the end of their episode (one past a learned position table for the longest prompt).
            self.ref.append(actions, live=active if restarting.size else None)
        if restarting.size:
            self._restart_rows(restarting)
        self.pending_reset = done
        self._fresh = False
        return self.observation(), rewards, terminated, truncated, info

    def _finish(self, finished: np.ndarray, rewards: torch.Tensor, kl_known: bool) -> dict:
        """Score the episodes that ended this step and add the score to their last reward."""
        idx = torch.as_tensor(finished, device=self.device)
        starts, lengths = self.prompt_len[idx].tolist(), self.gen_len[idx].tolist()
        completion_ids = completions_of(self.tokens[idx].tolist(), starts, lengths, self.stop_token_ids)
        scores = self._score(finished, completion_ids)
        rewards[idx] += torch.as_tensor(scores, dtype=rewards.dtype, device=self.device)
        return episode_end_info(self.num_envs, finished, scores,
                                self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True), lengths,
                                self.episode_kl[idx].cpu().numpy() if kl_known else None)

    def score_sequences(self, tokens, logprobs=None) -> SequenceResult:
        """Submit whole continuations for the current prompts; get exactly what per-token ``step`` would give.

        Args:
            tokens: ``(N, T)`` token ids sampled for the current episodes, ``T <= max_new_tokens``.
                Each episode ends at its first stop token (later tokens are ignored) or at
                ``max_new_tokens``; with ``T < max_new_tokens`` every row needs a stop token.
            logprobs: ``(N, T)`` log pi of each token under the sampling policy, for the KL term.
                Without them the bound policy is asked once over the whole batch, else the
                reward is the documented ``beta * log pi_ref`` form.

        The reference model scores every continuation in one forward over the batch,
        on top of its cached prompts. Afterwards every episode has ended and all rows
        restart on new prompts; read them with :meth:`observation`.
        """
        if not self.started:
            raise EpisodeError("call reset() before score_sequences()")
        if not self._fresh:
            raise EpisodeError("score_sequences() needs every episode at its start: call it right after reset() "
                               "or a previous score_sequences(), not in the middle of per-token stepping")
        n = self.num_envs
        if not hasattr(tokens, "shape"):
            try:
                tokens = np.asarray(tokens)  # a list of lists
            except ValueError:
                raise ValueError(f"tokens must be {n} rows of equal length (a 2-D array of token ids), got rows of "
                                 "different lengths; pad them after their stop token") from None
        if len(tokens.shape) != 2:
            raise ValueError(f"tokens must be a 2-D (num_envs={n}, T) array of token ids, got shape "
                             f"{tuple(tokens.shape)}")
        steps = int(tokens.shape[1])
        if not 1 <= steps <= self.max_new_tokens:
            raise ValueError(f"tokens has {steps} columns; it needs between 1 and max_new_tokens="
                             f"{self.max_new_tokens}")
        tokens = as_token_tensor(tokens, (n, steps), "tokens", self.vocab_size, self.device)

        is_stop = torch.isin(tokens, self._stop)
        has_stop = is_stop.any(1)
        positions = torch.arange(steps, device=self.device)
        first_stop = torch.where(is_stop, positions, steps).min(1).values
        lengths = torch.where(has_stop, first_stop + 1, torch.full_like(first_stop, steps))
        if steps < self.max_new_tokens and not bool(has_stop.all()):
            row = int(torch.nonzero(~has_stop)[0])
            raise ValueError(f"row {row} has no stop token in its {steps} tokens and {steps} < max_new_tokens="
                             f"{self.max_new_tokens}, so its episode has not ended; submit full-length rows")
        inside = positions < lengths[:, None]
        mask = inside.to(torch.float32)
        last = positions == (lengths - 1)[:, None]
        # Steps after an episode's end count for nothing: their log-probs may be anything (padding).
        pol_lp = as_logprobs(logprobs, (n, steps), inside, self.device) if logprobs is not None else None

        ref_lp = torch.where(inside, self.ref.score_continuations(tokens, self.sampling), 0.0)
        if pol_lp is None and self.policy_fn is not None:
            pol_lp = as_logprobs(self._bound_policy_logprobs(tokens), (n, steps), inside, self.device,
                                 "the bound policy's log-probs")
        rewards, kl = token_rewards(self.kl_coef, ref_lp, pol_lp)
        rewards = torch.where(inside, rewards, 0.0)
        kl = torch.where(inside, kl, 0.0)

        lengths_host = lengths.tolist()
        tokens_host = tokens.tolist()
        completion_ids = [row[:k - 1] if has else row[:k]
                          for row, k, has in zip(tokens_host, lengths_host, has_stop.tolist())]
        rows = np.arange(n)
        scores = self._score(rows, completion_ids)
        score_t = torch.as_tensor(scores, dtype=rewards.dtype, device=self.device)
        rewards = rewards + last * score_t[:, None]
        result = SequenceResult(
            rewards=rewards, terminated=last & has_stop[:, None], truncated=last & ~has_stop[:, None], mask=mask,
            ref_logprobs=ref_lp, logprobs=pol_lp, kl=kl,
            scores=score_t, lengths=lengths, prompts=[p.text for p in self.row_prompts],
            completions=self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True))
        self._restart_rows(rows)
        self._fresh = True
        return result

    def optimal_return(self) -> float:
        """The exact optimal expected return over the prompt distribution (see :mod:`lmgym.envs.optimum`)."""
        if not self.sampling.is_identity:
            raise ValueError(f"the exact optimum is that of sampling the model's own distribution; under "
                             f"{self.sampling} the KL term compares transformed distributions and that optimum "
                             "does not apply")
        if getattr(self, "_optimal_return", None) is None:
            if not self.prompts.finite:
                raise ValueError("the exact optimum needs a known list of prompts, not a stream")
            # Episodes hand the reward the prompt text as given, which need not survive a
            # decode(encode(text)) round trip: count (text, ids) pairs, never ids alone.
            weights: dict[tuple[str, tuple[int, ...]], int] = {}
            given = {}  # what the reward receives: the text, or a chat prompt's messages
            for p in self.prompts.items:
                key = (p.text, tuple(p.ids))
                weights[key] = weights.get(key, 0) + 1
                given[key] = p.given
            distinct = list(weights)

            def score(k, completions):
                text, prompt_ids = distinct[k]
                return self.reward_fn([given[distinct[k]]] * len(completions),
                                      self.tokenizer.batch_decode(completions, skip_special_tokens=True),
                                      [list(prompt_ids)] * len(completions), completions)

            values = soft_optimal_values(self.model, [list(ids) for _, ids in distinct], score,
                                         max_new_tokens=self.max_new_tokens, stop_token_ids=self.stop_token_ids,
                                         kl_coef=self.kl_coef)
            self._optimal_return = float(np.dot(list(weights.values()), values) / len(self.prompts.items))
        return self._optimal_return

    def _bound_policy_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Ask the bound policy for each submitted token, in one call per position (states differ per step)."""
        out = []
        tokens_buf, mask_buf = self.tokens.clone(), self.obs_mask.clone()
        for t in range(tokens.shape[1]):
            state = {"input_ids": tokens_buf.clone(), "attention_mask": mask_buf.clone()}
            out.append(torch.as_tensor(self.policy_fn(state, tokens[:, t]), dtype=torch.float32,
                                       device=self.device).reshape(-1))
            col = (self.prompt_len + t).clamp(max=self.max_len - 1)
            tokens_buf[self.rows, col] = tokens[:, t]
            mask_buf[self.rows, col] = 1
        return torch.stack(out, dim=1)

