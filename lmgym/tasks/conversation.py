"""Multi-turn diagnostic tasks: an environment that answers, tiny vocabularies, and an exactly known optimum.

Each task's interaction lists its hidden states (what it draws at the start of an episode), so
``env.unwrapped.optimal_return`` is the exact optimum of the KL-regularised objective over the tree of
histories, with the expectation over the environment's replies (:mod:`lmgym.envs.turn_optimum`). The
reference model is a fixed tiny random LM, as for the single-turn diagnostic tasks.

- ``lmgym/Guess-v0``: a hidden number; each policy turn is a guess, the environment answers ``lower`` or
  ``higher`` (``what`` to a token that is not a number) until the guess is right; the fewer turns, the higher
  the score. The environment's reply depends on the hidden target, so acting well means reading the feedback.
- ``lmgym/Echo-v0``: the environment says a random word after each turn; the policy should say back the word
  it just heard (the prompt, at the first turn). Each echo earns a turn reward; there is no final score.
"""

from __future__ import annotations

import itertools

from lmgym.envs.env import TextGenEnv
from lmgym.envs.interaction import Interaction, Reply
from lmgym.envs.vector import TextGenVectorEnv
from lmgym.models import tiny_model
from lmgym.tasks.options import check_options, constructor_options
from lmgym.utils import checks

__all__ = ["GUESS_WORDS", "ECHO_WORDS", "GuessNumber", "EchoWord", "TASKS", "DOCS", "make_env", "make_vec_env"]

NUMBERS = ["1", "2", "3"]
GUESS_WORDS = ["guess", *NUMBERS, "lower", "higher", "what"]
"""Guess-v0's vocabulary after ``<eos>`` (id 0): the prompt word, the numbers, the three feedback words."""
ECHO_WORDS = ["a", "b", "c"]
"""Echo-v0's vocabulary after ``<eos>`` (id 0)."""


class GuessNumber(Interaction):
    """Guess-v0's environment: a target drawn uniformly from ``1 2 3`` at the start of each episode.

    A policy turn is one token. The right number ends the episode with the score ``(max_turns - k + 1) /
    max_turns`` at turn k; a wrong one gets ``lower`` (the target is lower) or ``higher``; anything else gets
    ``what``. No right guess within ``max_turns`` turns scores 0.
    """

    def __init__(self, max_turns: int = 3):
        self.max_turns = max_turns
        self.target = None

    def hidden_states(self, prompt):
        return [(1 / len(NUMBERS), t) for t in NUMBERS]

    def start_with(self, prompt, state) -> None:
        self.target = state

    def start(self, prompt, rng) -> None:
        self.start_with(prompt, NUMBERS[int(rng.integers(len(NUMBERS)))])

    def respond(self, conversation) -> Reply:
        guess = conversation.last_turn_text.strip()
        if guess == self.target:
            return Reply(done=True)
        if guess not in NUMBERS:
            return Reply("what")
        return Reply("lower" if int(self.target) < int(guess) else "higher")

    def score(self, conversation) -> float:
        solved = conversation.last_turn_text.strip() == self.target
        return (self.max_turns - conversation.turn + 1) / self.max_turns if solved else 0.0


class EchoWord(Interaction):
    """Echo-v0's environment: after each policy turn it says a word drawn uniformly from ``a b c`` (all drawn at
    the start); a turn that says back the word heard last (the prompt, at first) earns ``1 / max_turns``."""

    def __init__(self, max_turns: int = 3):
        self.max_turns = max_turns
        self.words: tuple[str, ...] = ()

    def hidden_states(self, prompt):
        sequences = list(itertools.product(ECHO_WORDS, repeat=self.max_turns - 1))
        return [(1 / len(sequences), s) for s in sequences]

    def start_with(self, prompt, state) -> None:
        self.words = tuple(state)

    def start(self, prompt, rng) -> None:
        self.start_with(prompt, [ECHO_WORDS[int(i)] for i in rng.integers(len(ECHO_WORDS), size=self.max_turns - 1)])

    def respond(self, conversation) -> Reply:
        k = conversation.turn
        heard = conversation.prompt.strip() if k == 1 else self.words[k - 2]
        reward = float(conversation.last_turn_text.strip() == heard) / self.max_turns
        if k >= self.max_turns:
            return Reply(done=True, reward=reward)
        return Reply(self.words[k - 1], reward=reward)

    def score(self, conversation) -> float:
        return 0.0


class _Factory:
    """A picklable ``cls(max_turns)`` (the environment calls it once per row)."""

    def __init__(self, cls, max_turns: int):
        self.cls, self.max_turns = cls, max_turns

    def __call__(self):
        return self.cls(self.max_turns)


def _guess(max_turns: int):
    return dict(words=GUESS_WORDS, prompts=["guess"], interaction=_Factory(GuessNumber, max_turns),
                max_turn_tokens=1, max_new_tokens=2 * max_turns)


def _echo(max_turns: int):
    return dict(words=ECHO_WORDS, prompts=list(ECHO_WORDS), interaction=_Factory(EchoWord, max_turns),
                max_turn_tokens=1, max_new_tokens=2 * max_turns)


TASKS = {"guess": _guess, "echo": _echo}

_DOC = """{title}

    ## Description

    {description} A multi-turn episode (docs/multi_turn.md): the environment's replies are
    forced tokens (no action, no reward, no KL), marked 0 in ``policy_mask``. The reference model pi_ref is a
    fixed tiny random LM and ``env.unwrapped.optimal_return`` is the exact optimum of the KL-regularised
    objective, by soft dynamic programming over histories with the expectation over the environment's replies.

    ## Action Space

    ``Discrete({vocab})``: {tokens}.

    ## Observation Space

    ``input_ids``, ``attention_mask`` and ``policy_mask`` of length ``1 + 2 * max_turns``.

    ## Rewards

    {reward} Per policy token, the KL penalty with ``kl_coef`` (default 0.05).

    ## Episode End

    {end}

    ## Arguments

    - ``max_turns`` (3), ``kl_coef`` (0.05), ``reference_seed`` (0), ``uniform_reference`` (False), ``device``,
      ``interaction_timeout``, and the other ``TextGenEnv`` / ``TextGenVectorEnv`` arguments except the model,
      tokenizer, prompts, interaction and the turn limits, which the task fixes.
"""

DOCS = {
    "guess": _DOC.format(
        title="lmgym/Guess-v0: find a hidden number from lower / higher answers.",
        description="The prompt is `guess`; a target is drawn from `1 2 3`. Each policy turn is one token, a "
                    "guess; the environment answers `lower`, `higher` (or `what` to a non-number).",
        vocab=len(GUESS_WORDS) + 1, tokens="``<eos>`` (0), " + ", ".join(f"``{w}`` ({i + 1})"
                                                                       for i, w in enumerate(GUESS_WORDS)),
        reward="A right guess at turn k scores (max_turns - k + 1) / max_turns; none scores 0.",
        end="Termination at the right guess; truncation after max_turns turns."),
    "echo": _DOC.format(
        title="lmgym/Echo-v0: say back the word you just heard.",
        description="The prompt is one of `a b c`; after each policy turn (one token) the environment says a "
                    "random word of `a b c`, which the next turn should repeat.",
        vocab=len(ECHO_WORDS) + 1, tokens="``<eos>`` (0), ``a`` (1), ``b`` (2), ``c`` (3)",
        reward="Each turn that repeats the word heard last earns the turn reward 1 / max_turns; no final score.",
        end="Termination after max_turns turns."),
}

_FIXED = {"model", "tokenizer", "prompts", "reward_fn", "interaction", "max_turn_tokens", "max_new_tokens"}


def _task_kwargs(task: str, vector: bool, kwargs: dict) -> dict:
    if task not in TASKS:
        raise ValueError(f"unknown multi-turn task {task!r}; known: {sorted(TASKS)}")
    own = {"reference_seed", "uniform_reference"}
    allowed = (constructor_options(TextGenVectorEnv if vector else TextGenEnv) - _FIXED) | own
    check_options(kwargs, allowed, "this multi-turn task", _FIXED, "; use lmgym/TextGen-v0 with an interaction")
    kwargs = dict(kwargs)
    max_turns = checks.integer(kwargs.pop("max_turns", 3), "max_turns", low=2)
    if max_turns > 6:
        raise ValueError(f"max_turns must be at most 6 for the exact optimum to stay small, got {max_turns}")
    spec = TASKS[task](max_turns)
    words = spec.pop("words")
    model, tokenizer = tiny_model(words, hidden_size=16, num_layers=1, num_heads=2, max_positions=32,
                                  seed=checks.integer(kwargs.pop("reference_seed", 0), "reference_seed", low=0),
                                  init_std=0.2, uniform=checks.flag(kwargs.pop("uniform_reference", False),
                                                                    "uniform_reference"))
    spec.update(kwargs)
    return dict(model=model, tokenizer=tokenizer, reward_fn=None, max_turns=max_turns, **spec)


def make_env(task: str, **kwargs) -> TextGenEnv:
    """Build a multi-turn diagnostic task as a single ``TextGenEnv`` (the ``gym.make`` entry point)."""
    return TextGenEnv(**_task_kwargs(task, False, kwargs))


def make_vec_env(task: str, num_envs: int = 8, **kwargs) -> TextGenVectorEnv:
    """Build a multi-turn diagnostic task as a ``TextGenVectorEnv`` (the ``gym.make_vec`` entry point)."""
    return TextGenVectorEnv(num_envs, **_task_kwargs(task, True, kwargs))
