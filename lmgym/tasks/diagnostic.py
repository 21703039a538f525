"""Diagnostic tasks: tiny vocabularies, a fixed tiny reference model, and an exactly known optimum.

Every task here uses the vocabulary ``<eos> a b c`` (4 actions), a reference model
built offline from a fixed seed (:func:`lmgym.models.tiny_model`), and a finite
prompt list, so ``env.unwrapped.optimal_return`` is the exact optimum of the
KL-regularised objective (soft dynamic programming, :mod:`lmgym.envs.optimum`). An
agent's mean return divided by it is a fraction of the true optimum.
"""

from __future__ import annotations

import itertools

from lmgym.utils import checks
from lmgym.envs.env import TextGenEnv
from lmgym.models import tiny_model
from lmgym.tasks.options import check_options, constructor_options
from lmgym.envs.vector import TextGenVectorEnv

__all__ = ["WORDS", "reference_model", "TargetCount", "SequenceMatch", "TASKS", "make_env", "make_vec_env"]

WORDS = ["a", "b", "c"]
"""The diagnostic vocabulary (EOS is id 0, then a=1, b=2, c=3)."""


def reference_model(seed: int = 0, uniform: bool = False):
    """The fixed tiny reference LM of the diagnostic tasks (about 2k parameters), and its tokenizer.

    Its weights are drawn with a large standard deviation so that pi_ref is far from
    uniform and differs from state to state, which makes the KL term matter.
    """
    return tiny_model(WORDS, hidden_size=16, num_layers=1, num_heads=2, max_positions=32, seed=seed,
                      init_std=0.2, uniform=uniform)


class TargetCount:
    """Score = (occurrences of ``target`` in the completion) / ``max_new_tokens``."""

    def __init__(self, target: str, max_new_tokens: int):
        self.target, self.max_new_tokens = target, max_new_tokens

    def __call__(self, prompts, completions):
        return [c.split().count(self.target) / self.max_new_tokens for c in completions]


class SequenceMatch:
    """Score = positions where the completion equals ``transform(prompt)`` / max(len(target), len(completion)).

    1 for an exact answer; a completion that is too long or too short loses credit.
    """

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, prompts, completions):
        scores = []
        for p, c in zip(prompts, completions):
            target, got = self.transform(p.split()), c.split()
            matches = sum(x == y for x, y in zip(target, got))
            scores.append(matches / max(len(target), len(got), 1))
        return scores


def _target_token(prompt_length: int, max_new_tokens: int | None):
    """Emit as many ``a`` as possible."""
    horizon = max_new_tokens or 6
    return dict(prompts=list(WORDS), reward_fn=TargetCount("a", horizon), max_new_tokens=horizon)


def _transform_task(transform):
    def build(prompt_length: int, max_new_tokens: int | None):
        prompts = [list(p) for p in itertools.product(WORDS, repeat=prompt_length)]
        return dict(prompts=[" ".join(p) for p in prompts], reward_fn=SequenceMatch(transform),
                    max_new_tokens=max_new_tokens or prompt_length + 1)
    return build


def _reversed(words: list[str]) -> list[str]:
    return words[::-1]


# Module-level transforms (not lambdas): an environment holding its reward must pickle.
TASKS = {
    "target": _target_token,
    "copy": _transform_task(list),
    "reverse": _transform_task(_reversed),
    "sort": _transform_task(sorted),
}

_DOC = """{title}

    ## Description

    {description} The vocabulary is ``<eos> a b c``; the reference model pi_ref is a
    fixed tiny random LM (``lmgym.tasks.diagnostic.reference_model``), and
    ``env.unwrapped.optimal_return`` is the exact optimum of the KL-regularised
    objective, so returns can be read as a fraction of the optimum.

    ## Action Space

    ``Discrete(4)``: ``<eos>`` (0), ``a`` (1), ``b`` (2), ``c`` (3).

    ## Observation Space

    As ``TextGenEnv``: ``input_ids`` and ``attention_mask`` of length
    ``prompt_length + max_new_tokens``.

    ## Rewards

    {reward} Per step, the KL penalty of ``TextGenEnv`` with ``kl_coef`` (default 0.05).

    ## Episode End

    Termination on ``<eos>``; truncation after {horizon} tokens.

    ## Arguments

    - ``kl_coef`` (0.05), ``prompt_length`` ({length}), ``reference_seed`` (0),
      ``uniform_reference`` (False: a uniform pi_ref instead of the random LM),
      ``device``, and the other ``TextGenEnv`` / ``TextGenVectorEnv`` arguments except
      the model, tokenizer, prompts and reward, which the task fixes.
"""

DOCS = {
    "target": _DOC.format(title="lmgym/TargetToken-v0: say `a` as often as you can.",
                          description="The prompt is one word; the agent should answer `a a a a a a`.",
                          reward="The score is the number of `a` in the completion divided by max_new_tokens.",
                          horizon="max_new_tokens (default 6)", length="ignored"),
    "copy": _DOC.format(title="lmgym/Copy-v0: repeat the prompt.",
                        description="The prompt is `prompt_length` words; the agent should repeat them, then stop.",
                        reward="The score is the number of positions matching the prompt divided by "
                               "max(len(prompt), len(completion)).",
                        horizon="max_new_tokens (default prompt_length + 1)", length="3"),
    "reverse": _DOC.format(title="lmgym/Reverse-v0: say the prompt backwards.",
                           description="The prompt is `prompt_length` words; the agent should say them in "
                                       "reverse order, then stop.",
                           reward="The score is the number of positions matching the reversed prompt divided "
                                  "by max(len(prompt), len(completion)).",
                           horizon="max_new_tokens (default prompt_length + 1)", length="3"),
    "sort": _DOC.format(title="lmgym/Sort-v0: sort the prompt's words.",
                        description="The prompt is `prompt_length` words; the agent should say them in "
                                    "alphabetical order, then stop.",
                        reward="The score is the number of positions matching the sorted prompt divided by "
                               "max(len(prompt), len(completion)).",
                        horizon="max_new_tokens (default prompt_length + 1)", length="3"),
}

_FIXED = {"model", "tokenizer", "prompts", "reward_fn"}


def _task_kwargs(task: str, vector: bool, kwargs: dict) -> dict:
    if task not in TASKS:
        raise ValueError(f"unknown diagnostic task {task!r}; known: {sorted(TASKS)}")
    own = {"prompt_length", "reference_seed", "uniform_reference"}
    allowed = (constructor_options(TextGenVectorEnv if vector else TextGenEnv) - _FIXED) | own
    check_options(kwargs, allowed, "this diagnostic task", _FIXED, "; use lmgym/TextGen-v0 to choose your own")
    kwargs = dict(kwargs)
    length = kwargs.pop("prompt_length", 3)
    if not isinstance(length, int) or not 1 <= length <= 6:
        raise ValueError(f"prompt_length must be an int in [1, 6], got {length!r}")
    model, tokenizer = reference_model(checks.integer(kwargs.pop("reference_seed", 0), "reference_seed", low=0),
                                       checks.flag(kwargs.pop("uniform_reference", False), "uniform_reference"))
    spec = TASKS[task](length, kwargs.pop("max_new_tokens", None))
    spec.update(kwargs)
    return dict(model=model, tokenizer=tokenizer, **spec)


def make_env(task: str, **kwargs) -> TextGenEnv:
    """Build a diagnostic task as a single ``TextGenEnv`` (the ``gym.make`` entry point)."""
    return TextGenEnv(**_task_kwargs(task, False, kwargs))


def make_vec_env(task: str, num_envs: int = 8, **kwargs) -> TextGenVectorEnv:
    """Build a diagnostic task as a ``TextGenVectorEnv`` (the ``gym.make_vec`` entry point)."""
    return TextGenVectorEnv(num_envs, **_task_kwargs(task, True, kwargs))
