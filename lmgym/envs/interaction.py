"""What speaks between the policy's turns in a multi-turn episode: the interaction protocol.

A multi-turn episode (docs/multi_turn.md) alternates policy turns and environment turns. After each
policy turn the environment hands the conversation so far to an *interaction*, which answers with a
:class:`Reply`: a message (text, a chat message, or token ids) that is appended as tokens, a turn reward, and
whether the episode ends. The simplest interaction is a class with one method::

    class Echo(Interaction):
        def start(self, prompt, rng):          # optional: a new episode begins (draw hidden state here)
            self.word = rng.choice(["a", "b"])
        def respond(self, conversation):       # after every policy turn
            said = conversation.last_turn_text
            return Reply(self.word, reward=float(said == self.word))
        def score(self, conversation):         # optional: the task score when the episode ends
            return 0.0

The environment builds one instance per row (it calls the class, or any factory, ``num_envs`` times), so an
instance holds one episode's state. ``start`` gets a generator of the episode's own, seeded from the
environment's (so ``reset(seed=...)`` fixes what it draws, and a resumed run draws it again identically).
``start`` may be called again for an episode (restoring a checkpoint starts it anew from its seed), so it should
only set state. An interaction that answers many rows at once (a batched model call)
subclasses :class:`BatchInteraction` instead and gets every row whose turn just ended in one call.

``respond`` should depend only on the conversation and on what ``start`` drew: a step that fails (another
row's interaction raised) is undone and may be retried, and the retry must get the same replies.
"""

from __future__ import annotations

import concurrent.futures
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Reply", "Conversation", "Interaction", "BatchInteraction", "InteractionError", "as_batch_interaction"]


class InteractionError(RuntimeError):
    """An interaction raised, hung, or answered with something that is not a :class:`Reply` the environment can use."""


@dataclass
class Reply:
    """What an interaction answers after a policy turn.

    ``content`` is appended to the conversation: a string (a message of ``role``, rendered with the chat
    template when the tokenizer has one, else tokenized as plain text), a chat message ``{"role", "content"}``,
    or a list of token ids appended verbatim. It may be None only when ``done``.
    """

    content: Any = None
    """the message: text, a ``{"role", "content"}`` mapping, or token ids; None when the episode ends"""
    reward: float = 0.0
    """the turn reward, added to the reward of the turn's last policy token"""
    done: bool = False
    """the episode ends here (terminated); ``content`` is then ignored"""
    role: str = "user"
    """the role a text reply is rendered with (``"tool"`` for tool results)"""


@dataclass
class Conversation:
    """One row's episode so far, as the interaction sees it: messages and the token history."""

    row: int
    """the environment row (episode) this conversation is in"""
    prompt: Any
    """the prompt as the task gave it (text or chat messages)"""
    messages: list[dict]
    """the prompt's messages (a text prompt as one user message), then each turn decoded, policy turns as
    ``assistant``; special tokens left out"""
    ids: list[int]
    """every token of the episode: prompt, policy turns and replies, exactly as the policy conditions on them"""
    policy_mask: list[int]
    """1 where the policy chose the token in ``ids``"""
    turn: int
    """policy turns taken so far (1 after the first)"""
    turn_ids: list[int] = field(default_factory=list)
    """the tokens of the policy's last turn (a final stop token included)"""
    stopped: bool = False
    """the last turn ended with a stop token (else it reached max_turn_tokens or the context)"""

    @property
    def last_turn_text(self) -> str:
        """The policy's last turn as text (the last assistant message)."""
        return self.messages[-1]["content"]


class Interaction:
    """One row's environment side of a multi-turn episode. Subclass it and write :meth:`respond`."""

    def start(self, prompt, rng: np.random.Generator) -> None:
        """A new episode begins from ``prompt`` (text or chat messages); draw any hidden state from ``rng``."""

    def respond(self, conversation: Conversation) -> Reply:
        """The reply to the policy's last turn (see :class:`Reply`)."""
        raise NotImplementedError

    def score(self, conversation: Conversation) -> float:  # pragma: no cover - replaced or not used
        """The task score when the episode ends (defined by interactions that score; else the task's reward_fn)."""
        raise NotImplementedError

    # An interaction whose randomness is all drawn in start() may also list it, which makes the exact optimum of
    # a task computable (lmgym.envs.turn_optimum): hidden_states(prompt) -> [(probability, state), ...] and
    # start_with(prompt, state), which starts an episode in that state instead of drawing one.


class BatchInteraction:
    """The environment side of every row at once: :meth:`respond` gets all rows whose turn just ended."""

    def start(self, rows: list[int], prompts: list, rngs: list[np.random.Generator]) -> None:
        """New episodes begin in ``rows`` from ``prompts``; ``rngs[i]`` is row ``rows[i]``'s episode generator."""

    def respond(self, conversations: list[Conversation]) -> list[Reply]:
        """One reply per conversation, in order."""
        raise NotImplementedError

    def score(self, conversations: list[Conversation]) -> list[float]:  # pragma: no cover
        """The task scores of episodes that ended (defined by interactions that score)."""
        raise NotImplementedError


def _defines(obj, name: str, base: type) -> bool:
    return getattr(type(obj), name, None) is not getattr(base, name, None) and callable(getattr(obj, name, None))


class _RowFailure(Exception):
    """An exception of one row's interaction, carried out of the batched call with the row it happened on."""

    def __init__(self, row: int, error: BaseException):
        super().__init__(str(error))
        self.row, self.error = row, error


def _each_row(fn, rows, *args_per_row):
    out = []
    for r, *args in zip(rows, *args_per_row):
        try:
            out.append(fn(r, *args))
        except Exception as err:
            raise _RowFailure(r, err) from err
    return out


def _close(obj) -> None:
    """Call ``obj.close()`` if the interaction has one (it holds a process, a connection...)."""
    close = getattr(obj, "close", None)
    if callable(close):
        close()


class _PerRow(BatchInteraction):
    """One :class:`Interaction` per row behind the batched protocol (the default)."""

    def __init__(self, factory, num_envs: int):
        self.factory = factory
        try:
            self.rows = [factory() for _ in range(num_envs)]
        except Exception as err:
            raise TypeError(f"interaction must be a factory called with no arguments that makes one row's "
                            f"interaction (pass the Interaction class, or lambda: MyInteraction(...)); calling "
                            f"{getattr(factory, '__qualname__', factory)!r}() raised {type(err).__name__}: "
                            f"{err}") from None
        for obj in self.rows[:1]:
            if not callable(getattr(obj, "respond", None)):
                raise TypeError(f"the interaction factory made a {type(obj).__name__}, which has no respond(); an "
                                "interaction is an lmgym.envs.interaction.Interaction (or any object with "
                                "respond(conversation) -> Reply)")
        self.name = _name(self.rows[0])
        self.scores = _defines(self.rows[0], "score", Interaction)

    def start(self, rows, prompts, rngs):
        if callable(getattr(self.rows[0], "start", None)):
            _each_row(lambda r, p, rng: self.rows[r].start(p, rng), rows, prompts, rngs)

    def respond(self, conversations):
        return _each_row(lambda r, c: self.rows[r].respond(c), [c.row for c in conversations], conversations)

    def score(self, conversations):
        return _each_row(lambda r, c: self.rows[r].score(c), [c.row for c in conversations], conversations)

    def close(self):
        for row in self.rows:
            _close(row)


class _Batched(BatchInteraction):
    def __init__(self, inner: BatchInteraction):
        self.inner, self.name = inner, _name(inner)
        self.scores = _defines(inner, "score", BatchInteraction)

    def start(self, rows, prompts, rngs):
        self.inner.start(rows, prompts, rngs)

    def respond(self, conversations):
        return self.inner.respond(conversations)

    def score(self, conversations):
        return self.inner.score(conversations)

    def close(self):
        _close(self.inner)


def _name(obj) -> str:
    return type(obj).__qualname__


def as_batch_interaction(interaction, num_envs: int) -> "_PerRow | _Batched":
    """The batched form the environment calls: a :class:`BatchInteraction` instance as it is, else a factory
    (a class or any callable) called once per row."""
    if isinstance(interaction, BatchInteraction):
        return _Batched(interaction)
    if isinstance(interaction, Interaction) or (not callable(interaction) and hasattr(interaction, "respond")):
        raise TypeError(f"interaction must be a factory that makes one interaction per row (pass the class "
                        f"{type(interaction).__name__}, or a lambda returning a fresh instance), or a "
                        "BatchInteraction instance; got an instance of one row's interaction")
    if not callable(interaction):
        raise TypeError(f"interaction must be an Interaction class (or factory) or a BatchInteraction, got "
                        f"{type(interaction).__name__}")
    return _PerRow(interaction, num_envs)


class Caller:
    """Calls an interaction with a time limit and checks what comes back, naming the interaction and the row."""

    def __init__(self, interaction, timeout_s: float | None):
        self.interaction = interaction
        self.timeout_s = timeout_s
        self._pool = None

    def _run(self, what: str, rows: list[int], fn, *args):
        if self.timeout_s is None:
            try:
                return fn(*args)
            except Exception as err:
                raise self._failed(what, rows, err) from err
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lmgym-interaction")
        future = self._pool.submit(fn, *args)
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            # the hung call cannot be stopped from here: leave its thread behind and use a fresh one
            self._pool.shutdown(wait=False)
            self._pool = None
            raise InteractionError(f"interaction {self.interaction.name}.{what} did not return within "
                                   f"interaction_timeout={self.timeout_s} s for row(s) {_rows(rows)}; make it "
                                   "faster or raise the limit") from None
        except Exception as err:
            raise self._failed(what, rows, err) from err

    def _failed(self, what, rows, err) -> InteractionError:
        if isinstance(err, _RowFailure):
            return InteractionError(f"interaction {self.interaction.name}.{what} raised on row {err.row}: "
                                    f"{type(err.error).__name__}: {err.error}")
        return InteractionError(f"interaction {self.interaction.name}.{what} raised on row(s) {_rows(rows)}: "
                                f"{type(err).__name__}: {err}")

    def start(self, rows: list[int], prompts: list, rngs) -> None:
        self._run("start", rows, self.interaction.start, rows, prompts, rngs)

    def respond(self, conversations: list[Conversation]) -> list[Reply]:
        rows = [c.row for c in conversations]
        replies = self._run("respond", rows, self.interaction.respond, conversations)
        if not isinstance(replies, Sequence) or isinstance(replies, (str, bytes)) or len(replies) != len(rows):
            raise InteractionError(f"interaction {self.interaction.name}.respond must return one Reply per "
                                   f"conversation ({len(rows)}), got {_short(replies)}")
        return [self._check_reply(r, c) for r, c in zip(replies, conversations)]

    def score(self, conversations: list[Conversation]) -> list[float]:
        rows = [c.row for c in conversations]
        scores = self._run("score", rows, self.interaction.score, conversations)
        try:
            values = [float(s) for s in scores]
        except (TypeError, ValueError):
            raise InteractionError(f"interaction {self.interaction.name}.score must return numbers, got "
                                   f"{_short(scores)} for row(s) {_rows(rows)}") from None
        if len(values) != len(rows):
            raise InteractionError(f"interaction {self.interaction.name}.score returned {len(values)} scores for "
                                   f"{len(rows)} conversations")
        for r, v in zip(rows, values):
            if not np.isfinite(v):
                raise InteractionError(f"interaction {self.interaction.name}.score gave row {r} the score {v}; a "
                                       "score must be finite")
        return values

    def _check_reply(self, reply, conversation: Conversation) -> Reply:
        where = f"interaction {self.interaction.name}.respond, row {conversation.row} (turn {conversation.turn})"
        if reply is None:
            raise InteractionError(f"{where} returned None; return a Reply (Reply(text), or Reply(done=True) to end "
                                   "the episode)")
        if not isinstance(reply, Reply):
            raise InteractionError(f"{where} returned {_short(reply)}, not a Reply; wrap the message: "
                                   "Reply(content, reward=..., done=...)")
        if isinstance(reply.reward, bool) or not isinstance(reply.reward, numbers.Real) \
                or not np.isfinite(float(reply.reward)):
            raise InteractionError(f"{where}: the turn reward {reply.reward!r} must be a finite number")
        if not isinstance(reply.done, (bool, np.bool_)):
            raise InteractionError(f"{where}: done must be True or False, got {reply.done!r}")
        if reply.done:
            return reply
        content = reply.content
        ok = (isinstance(content, str) or _is_id_list(content)
              or (isinstance(content, Mapping) and isinstance(content.get("content"), str)))
        if not ok:
            raise InteractionError(f"{where} replied with {_short(content)}; a reply is text, a chat message "
                                   "{'role': ..., 'content': ...}, or a non-empty list of token ids (or "
                                   "Reply(done=True) to end the episode)")
        return reply


def _is_id_list(value) -> bool:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray)):
        return False
    return len(value) > 0 and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)


def _rows(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:8])) + (" ..." if len(rows) > 8 else "")


def _short(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"
