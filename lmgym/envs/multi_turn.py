"""The multi-turn MDP (docs/multi_turn.md): policy turns and environment turns in one token-level episode.

An episode is a prompt, then policy turns and environment replies in alternation. A policy turn ends at a
stop token or after ``max_turn_tokens``; the interaction (:mod:`lmgym.envs.interaction`) then sees the
conversation and replies, or ends the episode. Its reply is appended as tokens after the existing ids
(:mod:`lmgym.envs.reply_tokens`): the environment's tokens are forced transitions, with no action, no
reward, no KL and (for agents) no loss. With beta = ``kl_coef``::

    r_t = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))     on every policy token (pi_ref sees the whole history)
        + the turn reward                                     on the last token of its turn
        + the task score                                      on the episode's last policy token

so an episode's rewards sum to the turn rewards + the score - beta * the KL summed over policy tokens.

Limits: ``max_turns`` policy turns, ``max_turn_tokens`` per turn, and ``max_new_tokens`` tokens after the
prompt, the policy's and the environment's (the observation holds the longest prompt + ``max_new_tokens``,
which the model's context must hold). An episode that reaches one ends truncated with the reason in
``info["truncation"]`` (``"max_turns"``; ``"context"``: no room for the next reply, or the budget ran out in
a turn): a reply that would not fit is never cut, the episode ends before it.

:class:`MultiTurnCore` is the batched implementation both views use. Per-token ``step`` takes one policy token
per row, and the replies of rows whose turn ended appear in the next observation; ``submit_turns`` takes one
whole turn per row and returns exactly what stepping its tokens would have. The reference model's KV cache
lives across turns: a turn or a reply is one forward over the cache (:meth:`lmgym.models.CachedLM.extend`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmgym.envs.actions import as_logprobs, as_token_tensor
from lmgym.envs.core import EpisodeError, TextGenCore
from lmgym.envs.episode_rewards import token_rewards
from lmgym.envs.interaction import Caller, Conversation, InteractionError, as_batch_interaction
from lmgym.envs.reply_tokens import ReplyTokens
from lmgym.utils import checks

__all__ = ["MultiTurnCore", "TurnResult", "TRUNCATION_REASONS", "conversation_of"]

TRUNCATION_REASONS = ("max_turns", "context")
"""why a multi-turn episode ended truncated: its last allowed turn, or no room left for the next reply / token"""


@dataclass
class TurnResult:
    """What :meth:`MultiTurnCore.submit_turns` returns: ``(N, T)`` tensors for the submitted turn, ``(N,)`` per row."""

    rewards: torch.Tensor
    """per-token rewards of the turn, exactly as per-token ``step`` returns them"""
    mask: torch.Tensor
    """1.0 for the tokens of the turn (up to its stop token or limit), 0 elsewhere and on rows already done"""
    ref_logprobs: torch.Tensor
    logprobs: torch.Tensor | None
    kl: torch.Tensor
    terminated: torch.Tensor
    """True at the last token of a turn after which the interaction ended the episode"""
    truncated: torch.Tensor
    """True at the last token of a turn after which a limit ended the episode"""
    lengths: torch.Tensor
    """tokens in each row's turn (0 for rows already done)"""
    replies: list[list[int]]
    """the token ids appended after each row's turn (empty where the episode ended or the row was done)"""
    turn_rewards: torch.Tensor
    """each row's turn reward (0 for rows already done)"""
    done: np.ndarray
    """rows whose episode ended with this turn"""
    scores: np.ndarray
    """the task score of rows whose episode ended with this turn, NaN elsewhere"""
    truncation: np.ndarray
    """why each row that ended with this turn was truncated ("" when terminated or not ended)"""
    all_done: bool
    """every row's episode has ended: the rows have restarted on new prompts"""
    episode: dict
    """the episode-end entries per-token ``step`` puts in ``info`` for the rows that ended with this turn (``score``,
    ``turns``, ``turn_rewards``, ``truncation``, ``episode_length``, ``completion``, ``episode_kl``), each with its
    ``_<key>`` mask"""


@dataclass
class _TurnEnds:
    """The outcome of the turns that ended this step, computed before any state changes (so a failure changes
    nothing): one entry per row in ``rows``."""

    rows: np.ndarray
    extra: np.ndarray
    """what the turn's last token gets besides its KL part: the turn reward, plus the score where the episode ended"""
    turn_reward: np.ndarray
    ended: np.ndarray
    terminated: np.ndarray
    """ended by the interaction (the others that ended reached a limit)"""
    reason: np.ndarray
    """why a limit ended the episode ("max_turns", "context"), "" otherwise"""
    replies: list
    """the ids to append after each turn (empty where the episode ended)"""
    roles: list
    scores: np.ndarray
    """the task score where the episode ended, NaN elsewhere"""


class MultiTurnCore(TextGenCore):
    """N multi-turn episodes in lock-step against one frozen reference model. See the module docstring; the
    arguments beyond :class:`TextGenCore`'s are documented on :class:`lmgym.envs.vector.TextGenVectorEnv`."""

    def close(self) -> None:
        """Release what the interaction holds (a tool worker process...); the environment's ``close()`` calls it."""
        self.interaction.close()

    def __init__(self, *, interaction, max_turns: int = 4, max_turn_tokens: int | None = None,
                 interaction_timeout: float | None = 30.0, reward_fn=None, **kwargs):
        num_envs = kwargs.get("num_envs", 1)
        self.interaction = as_batch_interaction(interaction, checks.integer(num_envs, "num_envs", low=1))
        if self.interaction.scores and reward_fn is not None:
            raise ValueError(f"interaction {self.interaction.name} defines score(), so it scores the episodes; "
                             "pass reward_fn=None (or drop score() from the interaction to score with reward_fn)")
        if not self.interaction.scores and reward_fn is None:
            raise ValueError(f"interaction {self.interaction.name} has no score(): pass reward_fn=fn(prompts, "
                             "completions) to score the conversations, or define score(conversation)")
        super().__init__(reward_fn=reward_fn, **kwargs)
        self.max_turns = checks.integer(max_turns, "max_turns", low=1)
        self.max_turn_tokens = checks.integer(max_turn_tokens if max_turn_tokens is not None else self.max_new_tokens,
                                              "max_turn_tokens", low=1)
        if interaction_timeout is not None:
            interaction_timeout = checks.real(interaction_timeout, "interaction_timeout", low=0.0)
        self.caller = Caller(self.interaction, interaction_timeout)
        self.replies = ReplyTokens(self.tokenizer, self.vocab_size)
        n, d = self.num_envs, self.device
        self.policy_mask = torch.zeros((n, self.max_len), dtype=torch.int8, device=d)
        self.turn_len = torch.zeros(n, dtype=torch.long, device=d)  # tokens of the current policy turn
        self.turns = np.zeros(n, dtype=np.int64)  # policy turns finished in the current episode
        self.turn_rewards = np.zeros(n)  # summed over the episode
        self.segments: list[list[tuple[str, int, int]]] = [[] for _ in range(n)]  # (role, start col, end col)
        self.finished = np.zeros(n, dtype=bool)  # submit_turns: rows whose episode ended, waiting for the others
        self.episode_seeds = np.zeros(n, dtype=np.int64)

    def replay_starts(self, seeds) -> None:
        """Start every row's current episode again with the given episode seeds (restoring a checkpoint's state:
        the interactions then hold the hidden states they drew then). Every row must be at its episode's start."""
        if bool(self.gen_len.any()):
            raise EpisodeError("replay_starts() needs every row at the start of its episode")
        seeds = np.asarray(seeds, dtype=np.int64).reshape(-1)
        if seeds.shape != (self.num_envs,):
            raise ValueError(f"replay_starts needs {self.num_envs} episode seeds, got {seeds.shape[0]}")
        rows = np.arange(self.num_envs)
        self.caller.start(rows.tolist(), [p.given for p in self.row_prompts],
                          [np.random.default_rng(int(s)) for s in seeds])
        self.episode_seeds[:] = seeds

    # ------------------------------------------------------------------ episode starts
    def _reward_function(self, reward_fn):
        return None if self.interaction.scores else super()._reward_function(reward_fn)

    def _start_interactions(self, rows: np.ndarray, chosen) -> np.ndarray:
        """Start the interactions of new episodes in ``rows``; returns their episode seeds. Each episode's interaction
        draws from a generator of its own, seeded here: a checkpoint stores the seeds and a resumed run starts the
        same hidden states again (:meth:`replay_starts`)."""
        seeds = self.rng.integers(0, 2**63, size=len(rows))
        self.caller.start([int(r) for r in rows], [p.given for p in chosen],
                          [np.random.default_rng(int(s)) for s in seeds])
        return seeds

    def _prepare_restart(self, rows: np.ndarray):
        """The new episodes of ``rows``, drawn and with their interactions started, before any state changes: a
        ``start`` that raises leaves the prompt stream and every row as they were."""
        rng_state = self.rng.bit_generator.state
        draw_state = (self.draw.episodes.copy(), {k: list(v) for k, v in self.draw._group_prompts.items()})
        try:
            chosen = self.draw.draw(self.rng, rows, self.shard)
            return chosen, self._start_interactions(rows, chosen)
        except BaseException:
            self.rng.bit_generator.state = rng_state
            self.draw.episodes, self.draw._group_prompts = draw_state
            raise

    def _restart_rows(self, rows: np.ndarray, prepared=None) -> None:
        chosen, seeds = prepared if prepared is not None else self._prepare_restart(rows)
        if len(rows) == self.num_envs:
            self.ref.start([p.ids for p in chosen])
        else:
            self.ref.restart_rows(torch.as_tensor(rows, device=self.device), [p.ids for p in chosen])
        self._write_prompts(rows, chosen, seeds)

    def _write_prompts(self, rows: np.ndarray, chosen, seeds=None) -> None:
        if seeds is None:  # reset(): the interactions start here
            seeds = self._start_interactions(rows, chosen)
        self.episode_seeds[rows] = seeds
        super()._write_prompts(rows, chosen)
        idx = torch.as_tensor(rows, device=self.device)
        self.policy_mask[idx] = 0
        self.turn_len[idx] = 0
        self.turns[rows] = 0
        self.turn_rewards[rows] = 0.0
        self.finished[rows] = False
        for r in rows:
            self.segments[r] = []

    def observation(self) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` as single-turn, and ``policy_mask``: 1 where the policy chose a token."""
        obs = super().observation()
        obs["policy_mask"] = self.policy_mask.clone()
        return obs

    def score_sequences(self, tokens, logprobs=None):
        raise EpisodeError("score_sequences() submits whole single-turn episodes; a multi-turn environment takes one "
                           "turn per row at a time with submit_turns(tokens, logprobs)")

    def optimal_return(self) -> float:
        from lmgym.envs.turn_optimum import multi_turn_optimal_return

        if not self.sampling.is_identity:
            raise ValueError(f"the exact optimum is that of sampling the model's own distribution, not under "
                             f"{self.sampling}")
        if getattr(self, "_optimal_return", None) is None:
            self._optimal_return = multi_turn_optimal_return(self)
        return self._optimal_return

    # ------------------------------------------------------------------ the end of a policy turn
    def _conversation(self, row: int, ids: list[int], mask: list[int], turn_ids: list[int], stopped: bool,
                      segments) -> Conversation:
        return conversation_of(self.tokenizer, self.row_prompts[row], row, ids, mask, segments,
                               int(self.turns[row]) + 1, turn_ids, stopped)

    def _end_turns(self, rows: np.ndarray, histories: list[list[int]], masks: list[list[int]],
                   turn_starts: list[int], stopped: list[bool]) -> _TurnEnds:
        """Ask the interaction about the turns of ``rows`` (each ``histories[i]`` ends with the turn), decide which
        episodes end and why, render the replies and score the ended episodes. Changes no state."""
        conversations = []
        for i, r in enumerate(rows):
            start = turn_starts[i]
            segments = self.segments[r] + [("assistant", start, len(histories[i]))]
            conversations.append(self._conversation(int(r), histories[i], masks[i], histories[i][start:],
                                                    stopped[i], segments))
        replies = self.caller.respond(conversations)
        k = len(rows)
        turn_reward = np.array([float(rep.reward) for rep in replies])
        ended, terminated = np.zeros(k, dtype=bool), np.zeros(k, dtype=bool)
        reason = np.full(k, "", dtype=object)
        reply_ids: list[list[int]] = [[] for _ in range(k)]
        roles = [rep.content.get("role", rep.role) if isinstance(rep.content, dict) else rep.role for rep in replies]
        for i, (r, rep, conv) in enumerate(zip(rows, replies, conversations)):
            length = len(histories[i])
            if rep.done:
                ended[i] = terminated[i] = True
                continue
            if self.turns[r] + 1 >= self.max_turns:
                ended[i], reason[i] = True, "max_turns"
                continue
            try:
                ids = self.replies.ids(rep.content, rep.role, conv.turn_ids, conv.stopped)
            except Exception as err:  # the template's own refusals (jinja raise_exception) included
                raise InteractionError(f"interaction {self.interaction.name}.respond, row {r} (turn {conv.turn}): "
                                       f"its reply cannot be appended: {type(err).__name__}: "
                                       f"{' '.join(str(err).split())}") from None
            # the reply and at least one more policy token must fit in the episode's max_new_tokens
            if length + len(ids) + 1 > len(self.row_prompts[r].ids) + self.max_new_tokens:
                ended[i], reason[i] = True, "context"
                continue
            reply_ids[i] = ids
        scores = np.full(k, np.nan)
        finished = np.flatnonzero(ended)
        if finished.size:
            scores[finished] = self._score_conversations([conversations[i] for i in finished],
                                                         [len(self.row_prompts[rows[i]].ids) for i in finished])
        extra = turn_reward + np.where(ended, np.nan_to_num(scores), 0.0)
        return _TurnEnds(rows=rows, extra=extra, turn_reward=turn_reward, ended=ended, terminated=terminated,
                         reason=reason, replies=reply_ids, roles=roles, scores=scores)

    def _score_conversations(self, conversations: list[Conversation], prompt_lengths: list[int]) -> np.ndarray:
        if self.reward_fn is None:
            return np.asarray(self.caller.score(conversations), dtype=np.float64)
        prompts = [self.row_prompts[c.row] for c in conversations]
        completion_ids = [c.ids[n:] for c, n in zip(conversations, prompt_lengths)]
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return self.reward_fn([p.given for p in prompts], texts, [p.ids for p in prompts], completion_ids)

    def _commit_turn_ends(self, ends: _TurnEnds, lengths_after: list[int]) -> None:
        """Record the ended turns: segments, turn counts and rewards; write the replies after the turns."""
        rows = ends.rows
        for i, r in enumerate(rows):
            self.segments[r].append(("assistant", self._turn_start_col(r), lengths_after[i]))
            self.turns[r] += 1
            self.turn_rewards[r] += ends.turn_reward[i]
        idx = [i for i in range(len(rows)) if ends.replies[i]]
        if not idx:
            return
        width = max(len(ends.replies[i]) for i in idx)
        reply = torch.full((self.num_envs, width), self.pad_token_id, dtype=torch.long, device=self.device)
        counts = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        for i in idx:
            reply[rows[i], :len(ends.replies[i])] = torch.as_tensor(ends.replies[i], device=self.device)
            counts[rows[i]] = len(ends.replies[i])
        self.ref.extend(reply, counts)
        cols = (self.prompt_len + self.gen_len)[:, None] + torch.arange(width, device=self.device)
        inside = torch.arange(width, device=self.device) < counts[:, None]
        cols = torch.where(inside, cols, 0).clamp(max=self.max_len - 1)
        row_ix = self.rows[:, None].expand_as(cols)
        self.tokens[row_ix[inside], cols[inside]] = reply[inside]
        self.obs_mask[row_ix[inside], cols[inside]] = 1
        for i in idx:
            r = rows[i]
            self.segments[r].append((ends.roles[i], lengths_after[i], lengths_after[i] + len(ends.replies[i])))
        self.gen_len = self.gen_len + counts

    def _turn_start_col(self, row: int) -> int:
        """The column where the row's current policy turn began."""
        return self.segments[row][-1][2] if self.segments[row] else len(self.row_prompts[row].ids)

    # ------------------------------------------------------------------ per-token stepping
    def step(self, actions, logprobs=None):
        """Advance every row by one policy token; rows whose turn ends get the interaction's reply appended (it is
        in the returned observation). Autoreset as :meth:`TextGenCore.step` (``NEXT_STEP``)."""
        if not self.started:
            raise EpisodeError("call reset() before step()")
        if self._reference_sharded:
            raise EpisodeError("step() cannot run on a reference model sharded by FSDP; use submit_turns()")
        if self.finished.any():
            raise EpisodeError("some episodes ended in submit_turns() and wait for the others: finish the batch with "
                               "submit_turns(), or reset()")
        n = self.num_envs
        actions = as_token_tensor(actions, (n,), "actions", self.vocab_size, self.device)
        restarting = np.flatnonzero(self.pending_reset)
        active = ~torch.as_tensor(self.pending_reset, device=self.device)
        state = self.observation() if (logprobs is None and self.policy_fn is not None) else None
        ref_lp = self._ref_next_logprobs().gather(1, actions[:, None]).squeeze(1)
        if logprobs is not None:
            pol_lp = as_logprobs(logprobs, (n,), active, self.device)
        elif self.policy_fn is not None:
            bound = torch.as_tensor(self.policy_fn(state, actions)).reshape(-1)
            pol_lp = as_logprobs(bound, (n,), active, self.device, "the bound policy's log-probs")
        else:
            pol_lp = None
        zero = torch.zeros_like(ref_lp)
        ref_lp = torch.where(active, ref_lp, zero)
        if pol_lp is not None:
            pol_lp = torch.where(active, pol_lp, zero)
        rewards, kl = token_rewards(self.kl_coef, ref_lp, pol_lp)
        rewards = torch.where(active, rewards, zero)
        kl_step = torch.where(active, kl, zero)

        col = (self.prompt_len + self.gen_len).clamp(max=self.max_len - 1)
        stopped = torch.isin(actions, self._stop) & active
        turn_len = self.turn_len + active
        full = col + 1 >= self.prompt_len + self.max_new_tokens  # the episode's token budget is spent
        turn_end = active & (stopped | (turn_len >= self.max_turn_tokens) | full)
        ends_host = turn_end.cpu().numpy()  # the one host sync per step: whose turn the interaction answers
        rows = np.flatnonzero(ends_host)
        ends = None
        if rows.size:  # everything that can fail happens before the state changes
            idx = torch.as_tensor(rows, device=self.device)
            hist = self.tokens[idx].tolist()
            pmask = self.policy_mask[idx].tolist()
            totals = (self.prompt_len[idx] + self.gen_len[idx]).tolist()
            acts = actions[idx].tolist()
            stops = stopped[idx].tolist()
            histories, masks, starts = [], [], []
            for i, r in enumerate(rows):
                histories.append(hist[i][:totals[i]] + [acts[i]])
                masks.append(pmask[i][:totals[i]] + [1])
                starts.append(self._turn_start_col(r))
            ends = self._end_turns(rows, histories, masks, starts, stops)
        prepared = self._prepare_restart(restarting) if restarting.size else None

        # commit: the policy's token
        self.tokens[self.rows, col] = torch.where(active, actions, self.tokens[self.rows, col])
        self.obs_mask[self.rows, col] = torch.where(active, torch.ones_like(self.obs_mask[:, 0]),
                                                    self.obs_mask[self.rows, col])
        self.policy_mask[self.rows, col] = torch.where(active, torch.ones_like(self.policy_mask[:, 0]),
                                                       self.policy_mask[self.rows, col])
        self.gen_len = self.gen_len + active
        self.turn_len = torch.where(turn_end, 0, turn_len)
        self.episode_kl = self.episode_kl + kl_step
        turn_index = torch.as_tensor(self.turns + 1, device=self.device)
        terminated = torch.zeros(n, dtype=torch.bool, device=self.device)
        truncated = torch.zeros_like(terminated)
        info = {"ref_logprob": ref_lp, "_ref_logprob": active, "turn": torch.where(active, turn_index, 0),
                "_turn": active}
        if pol_lp is not None:
            info.update(logprob=pol_lp, _logprob=active, kl=kl, _kl=active)
        done = np.zeros(n, dtype=bool)
        if ends is not None:
            idx = torch.as_tensor(rows, device=self.device)
            rewards[idx] += torch.as_tensor(ends.extra, dtype=rewards.dtype, device=self.device)
            terminated[idx] = torch.as_tensor(ends.terminated, device=self.device)
            truncated[idx] = torch.as_tensor(ends.ended & ~ends.terminated, device=self.device)
            done[rows] = ends.ended
            turn_reward = np.zeros(n)
            turn_reward[rows] = ends.turn_reward
            mask = np.zeros(n, dtype=bool)
            mask[rows] = True
            info.update(turn_reward=turn_reward, _turn_reward=mask)
        if not (done | self.pending_reset).all():
            self.ref.append(actions, live=active if restarting.size else None)
        if ends is not None:
            self._commit_turn_ends(ends, [len(h) for h in histories])
            info.update(self._episode_end_info(rows[ends.ended], ends.scores[ends.ended], ends.reason[ends.ended],
                                               kl_known=pol_lp is not None))
        if restarting.size:
            self._restart_rows(restarting, prepared)
        self.pending_reset = done
        self._fresh = False
        return self.observation(), rewards, terminated, truncated, info

    def _episode_end_info(self, rows: np.ndarray, scores, reasons, kl_known: bool) -> dict:
        """The ``info`` entries of the episodes of ``rows`` that just ended (their last turn committed), with
        Gymnasium's ``_<key>`` masks: ``score``, ``turns``, ``turn_rewards``, ``truncation``, ``episode_length``
        (policy tokens), ``completion`` (every token after the prompt, decoded) and, when known, ``episode_kl``."""
        n = self.num_envs
        mask = np.zeros(n, dtype=bool)
        mask[rows] = True
        out = {}

        def put(key, values, fill, dtype):
            arr = np.full(n, fill, dtype=dtype)
            if len(rows):
                arr[rows] = values
            out[key], out["_" + key] = arr, mask

        idx = torch.as_tensor(rows, device=self.device)
        lengths = self.policy_mask[idx].sum(1).tolist() if len(rows) else []
        completions = []
        for r in rows:
            ids = self.tokens[r, self.prompt_len[r]:self.prompt_len[r] + self.gen_len[r]].tolist()
            completions.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        put("score", scores, np.nan, np.float64)
        put("turns", self.turns[rows], 0, np.int64)
        put("turn_rewards", self.turn_rewards[rows], 0.0, np.float64)
        put("truncation", reasons, "", object)
        put("episode_length", lengths, 0, np.int64)  # policy tokens
        put("completion", completions, None, object)
        if kl_known:
            put("episode_kl", self.episode_kl[idx].cpu().numpy() if len(rows) else [], 0.0, np.float64)
        return out

    # ------------------------------------------------------------------ the submission path
    def submit_turns(self, tokens, logprobs=None) -> TurnResult:
        """Submit one whole policy turn per row; get exactly what per-token ``step`` over its tokens would give.

        Args:
            tokens: ``(N, T)`` token ids, ``T <= max_turn_tokens``: each running row's next turn, ending at its first
                stop token, at ``max_turn_tokens`` or where the observation is full (later tokens are ignored);
                with ``T < max_turn_tokens`` every running row's turn needs a stop token (or to fill the
                observation). Rows whose episode already ended (``TurnResult.done`` earlier) are ignored.
            logprobs: ``(N, T)`` log pi of each token, for the KL term (else the bound policy, else the
                ``beta * log pi_ref`` form).

        The reference scores every turn in one forward over its cache, the interaction answers every row,
        and the replies are fed to the cache. Once every row's episode has ended, all rows restart on new
        prompts (``TurnResult.all_done``), as after :meth:`TextGenCore.score_sequences`.
        """
        if not self.started:
            raise EpisodeError("call reset() before submit_turns()")
        if bool(self.turn_len.any()) or self.pending_reset.any():
            raise EpisodeError("submit_turns() needs every row at the start of a turn: call it after reset() or a "
                               "previous submit_turns(), not in the middle of per-token stepping")
        n = self.num_envs
        if not hasattr(tokens, "shape"):
            try:
                tokens = np.asarray(tokens)
            except ValueError:
                raise ValueError(f"tokens must be {n} rows of equal length; pad each after its stop token") from None
        if len(tokens.shape) != 2:
            raise ValueError(f"tokens must be a 2-D (num_envs={n}, T) array, got shape {tuple(tokens.shape)}")
        steps = int(tokens.shape[1])
        if not 1 <= steps <= self.max_turn_tokens:
            raise ValueError(f"tokens has {steps} columns; a turn has between 1 and max_turn_tokens="
                             f"{self.max_turn_tokens}")
        tokens = as_token_tensor(tokens, (n, steps), "tokens", self.vocab_size, self.device)
        running = torch.as_tensor(~self.finished, device=self.device)
        positions = torch.arange(steps, device=self.device)
        room = self.max_new_tokens - self.gen_len  # tokens left in each row's episode
        is_stop = torch.isin(tokens, self._stop)
        first_stop = torch.where(is_stop, positions, steps).min(1).values
        lengths = torch.minimum(torch.where(first_stop < steps, first_stop + 1, steps), room)
        lengths = torch.where(running, lengths, 0)
        stopped = running & (first_stop < lengths)
        ended_turn = stopped | (lengths >= self.max_turn_tokens) | (lengths >= room)
        if bool((running & ~ended_turn).any()):
            row = int(torch.nonzero(running & ~ended_turn)[0])
            raise ValueError(f"row {row}'s turn has no stop token in its {steps} tokens and {steps} < max_turn_tokens="
                             f"{self.max_turn_tokens}, so the turn has not ended; submit full-length turns")
        inside = positions < lengths[:, None]
        pol_lp = as_logprobs(logprobs, (n, steps), inside, self.device) if logprobs is not None else None
        if pol_lp is None and self.policy_fn is not None:
            pol_lp = as_logprobs(self._bound_turn_logprobs(tokens), (n, steps), inside, self.device,
                                 "the bound policy's log-probs")

        saved = self.ref.snapshot()
        try:
            ref_lp = torch.where(inside, self.ref.extend(tokens, lengths, self.sampling), 0.0)
            rows = np.flatnonzero(running.cpu().numpy())
            idx = torch.as_tensor(rows, device=self.device)
            hist = self.tokens[idx].tolist()
            pmask = self.policy_mask[idx].tolist()
            totals = (self.prompt_len[idx] + self.gen_len[idx]).tolist()
            turn = tokens[idx].tolist()
            counts = lengths[idx].tolist()
            stops = stopped[idx].tolist()
            histories = [h[:t] + tk[:c] for h, t, tk, c in zip(hist, totals, turn, counts)]
            masks = [m[:t] + [1] * c for m, t, c in zip(pmask, totals, counts)]
            ends = self._end_turns(rows, histories, masks, totals, stops) if rows.size else None
            will_end = self.finished.copy()
            if ends is not None:
                will_end[rows] |= ends.ended
            prepared = self._prepare_restart(np.arange(n)) if will_end.all() else None  # the next batch's episodes
        except BaseException:
            self.ref.restore(saved)
            raise

        rewards, kl = token_rewards(self.kl_coef, ref_lp, pol_lp)
        rewards = torch.where(inside, rewards, 0.0)
        kl = torch.where(inside, kl, 0.0)
        last = inside & (positions == (lengths - 1)[:, None])
        extra = torch.zeros(n, dtype=rewards.dtype, device=self.device)
        ended = np.zeros(n, dtype=bool)
        terminated_rows = np.zeros(n, dtype=bool)
        scores, reasons = np.full(n, np.nan), np.full(n, "", dtype=object)
        turn_rewards = torch.zeros(n, dtype=torch.float32, device=self.device)
        replies: list[list[int]] = [[] for _ in range(n)]
        if ends is not None:
            extra[idx] = torch.as_tensor(ends.extra, dtype=rewards.dtype, device=self.device)
            turn_rewards[idx] = torch.as_tensor(ends.turn_reward, dtype=torch.float32, device=self.device)
            ended[rows], terminated_rows[rows] = ends.ended, ends.terminated
            scores[rows], reasons[rows] = ends.scores, ends.reason
            for i, r in enumerate(rows):
                replies[r] = ends.replies[i]
        rewards = rewards + last * extra[:, None]
        ended_t = torch.as_tensor(ended, device=self.device)
        terminated = last & torch.as_tensor(terminated_rows, device=self.device)[:, None]
        truncated = last & (ended_t & ~torch.as_tensor(terminated_rows, device=self.device))[:, None]

        # commit: the turns' tokens, then the replies after them
        cols = (self.prompt_len + self.gen_len)[:, None] + positions
        row_ix = self.rows[:, None].expand_as(cols)
        self.tokens[row_ix[inside], cols[inside]] = tokens[inside]
        self.obs_mask[row_ix[inside], cols[inside]] = 1
        self.policy_mask[row_ix[inside], cols[inside]] = 1
        self.gen_len = self.gen_len + lengths
        self.episode_kl = self.episode_kl + kl.sum(1)
        if ends is not None:
            self._commit_turn_ends(ends, [t + c for t, c in zip(totals, counts)])
        self.finished |= ended
        all_done = bool(self.finished.all())
        finished_now = np.flatnonzero(ended)
        episode = self._episode_end_info(finished_now, scores[finished_now], reasons[finished_now],
                                         kl_known=pol_lp is not None)
        result = TurnResult(rewards=rewards, mask=inside.float(), ref_logprobs=ref_lp, logprobs=pol_lp, kl=kl,
                            terminated=terminated, truncated=truncated, lengths=lengths, replies=replies,
                            turn_rewards=turn_rewards, done=ended, scores=scores, truncation=reasons,
                            all_done=all_done, episode=episode)
        if all_done:
            self._restart_rows(np.arange(n), prepared)
            self._fresh = True
        else:
            self._fresh = False
        return result

    def _bound_turn_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Ask the bound policy for each token of the submitted turns, one call per position."""
        out = []
        tokens_buf, mask_buf, pmask_buf = self.tokens.clone(), self.obs_mask.clone(), self.policy_mask.clone()
        base = self.prompt_len + self.gen_len
        for t in range(tokens.shape[1]):
            state = {"input_ids": tokens_buf.clone(), "attention_mask": mask_buf.clone(),
                     "policy_mask": pmask_buf.clone()}
            out.append(torch.as_tensor(self.policy_fn(state, tokens[:, t]), dtype=torch.float32,
                                       device=self.device).reshape(-1))
            col = (base + t).clamp(max=self.max_len - 1)
            tokens_buf[self.rows, col] = tokens[:, t]
            mask_buf[self.rows, col] = 1
            pmask_buf[self.rows, col] = 1
        return torch.stack(out, dim=1)


def conversation_of(tokenizer, prompt, row: int, ids: list[int], mask: list[int], segments, turn: int,
                    turn_ids: list[int], stopped: bool) -> Conversation:
    """The :class:`Conversation` an interaction sees: the prompt's messages (a text prompt as one user message),
    then each segment ``(role, start, end)`` of ``ids`` decoded without special tokens."""
    given = prompt.given
    messages = [dict(m) for m in given] if isinstance(given, list) and given and isinstance(given[0], dict) \
        else [{"role": "user", "content": prompt.text}]
    for role, start, end in segments:
        messages.append({"role": role, "content": tokenizer.decode(ids[start:end], skip_special_tokens=True)})
    return Conversation(row=row, prompt=given, messages=messages, ids=list(ids), policy_mask=list(mask), turn=turn,
                        turn_ids=list(turn_ids), stopped=stopped)
