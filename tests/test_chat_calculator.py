"""lmgym/ChatCalculator-v0: the calculator tool, the splits, the score, and whole episodes with scripted turns.

The default suite plays the task on a tiny chat model (``model=``) with a character-level tokenizer; the test on
SmolLM2-135M-Instruct itself is marked ``smollm`` (run with ``-m smollm``).
"""

import itertools
import string
from fractions import Fraction

import gymnasium as gym
import numpy as np
import pytest
import torch

import lmgym  # noqa: F401
from lmgym.envs.interaction import Conversation
from lmgym.tasks import describe

from conftest import char_chat_model
from lmgym.tasks.chat_calculator import (EXAMPLES, CalculatorError, answer_score, calculate,
                                         chat_calculator_prompts, solve_question)

def tiny_chat_model():
    """A tiny random Llama with a character-level tokenizer (printable ASCII) whose ChatML markers are special."""
    return char_chat_model(string.printable, hidden_size=16, num_heads=2, max_positions=2048)


# ----------------------------------------------------------------------------- the tool
@pytest.mark.parametrize("expression, exact", [
    ("47 * 86", Fraction(4042)), ("12 * (3 + 4)", Fraction(84)), ("7 / 2", Fraction(7, 2)), ("10/2", Fraction(5)),
    ("-3 - -4", Fraction(1)), ("  99*99 ", Fraction(9801)), ("1.5 * 4", Fraction(6)), ("2 / 3", Fraction(2, 3)),
])
def test_calculate_agrees_with_exact_rational_arithmetic(expression, exact):
    got = calculate(expression)
    if exact.denominator == 1:
        assert got == str(exact.numerator)
    else:
        assert abs(Fraction(got) - exact) < Fraction(1, 10**9)


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('true')", "only numbers"), ("2 ** 100", "only numbers"), ("x * 2", "only numbers"),
    ("1 / 0", "division by zero"), ("47 * ", "cannot read"), ("9" * 20 + " * " + "9" * 20, "too large"),
    ("1 +" * 100 + "1", "longer than"), ("[1, 2]", "only numbers"),
])
def test_calculate_refuses_anything_but_arithmetic_in_one_line(expression, message):
    with pytest.raises(CalculatorError, match=message) as err:
        calculate(expression)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the splits and the score
def test_train_and_held_out_are_disjoint_fixed_and_cover_every_product_but_the_examples():
    train, held = chat_calculator_prompts("train"), chat_calculator_prompts("held_out")
    question = lambda p: p[-1]["content"]  # noqa: E731
    every = {f"What is {a} * {b}?" for a, b in itertools.product(range(10, 100), repeat=2)}
    examples = {f"What is {a} * {b}?" for a, b in EXAMPLES}
    assert len(held) == 200 and len(train) == len(every) - 200 - len(examples)
    assert not {question(p) for p in train} & {question(p) for p in held}
    assert {question(p) for p in train} | {question(p) for p in held} == every - examples
    assert chat_calculator_prompts("held_out") == held
    for prompt in held[:20]:
        a, b = (int(x) for x in question(prompt).removeprefix("What is ").removesuffix("?").split(" * "))
        assert solve_question(prompt) == a * b
    assert all(p[:-1] == held[0][:-1] for p in train[:50] + held)  # one system message and the same examples
    with pytest.raises(ValueError, match="split"):
        chat_calculator_prompts("test")


def conversation(prompt, final: str) -> Conversation:
    messages = list(prompt) + [{"role": "assistant", "content": final}]
    return Conversation(row=0, prompt=prompt, messages=messages, ids=[], policy_mask=[], turn=2)


@pytest.mark.parametrize("final, score", [
    ("4042", 1.0), ("The answer is 4,042.", 1.0), ("4041", 0.0), ("", 0.0), ("4042 or 4043", 0.0),
    ('<tool_call>{"name": "calculate", "arguments": {"expression": "47 * 86"}}</tool_call> 4042', 0.0),
])
def test_the_score_reads_the_last_number_of_an_answer_without_a_call(final, score):
    prompt = [{"role": "user", "content": "What is 47 * 86?"}]
    assert answer_score(prompt, conversation(prompt, final)) == score


# ----------------------------------------------------------------------------- whole episodes on a tiny chat model
CALL = '<tool_call>{"name": "calculate", "arguments": {"expression": "47 * 86"}}</tool_call>'
SCRIPTS = [  # per row: its turns, and the episode's score
    ([CALL, "4042"], 1.0),                                                              # call, then the answer
    (["4042"], 1.0),                                                                    # right without the tool
    ([CALL, "4041"], 0.0),                                                              # a wrong answer
    (['<tool_call>{"name": "calculator", "arguments": {}}</tool_call>', "4042"], 1.0),  # unknown tool, then right
    ([CALL, CALL, CALL], 0.0),                                                          # never answers: turn limit
]


def test_scripted_conversations_get_the_tool_replies_and_the_documented_scores():
    model, tok = tiny_chat_model()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    n = len(SCRIPTS)
    # a character per token: the turn limits are widened to hold a call
    # (one prompt: rendering the 7,898 training prompts char by char would take most of the test's time)
    question = [p for p in chat_calculator_prompts("train") if p[-1]["content"] == "What is 47 * 86?"]
    env = gym.make_vec("lmgym/ChatCalculator-v0", num_envs=n, model=model, tokenizer=tok, device="cpu",
                       max_turn_tokens=96, max_new_tokens=400, prompts=question)
    env.reset(seed=0, options={"prompts": question * n})
    replies, scores = [[] for _ in range(n)], np.full(n, np.nan)
    for turn in range(3):
        texts = [turns[turn] if turn < len(turns) else "" for turns, _ in SCRIPTS]
        ids = [tok.encode(t, add_special_tokens=False) + [end] for t in texts]
        width = max(len(i) for i in ids)
        result = env.submit_turns(np.array([i + [end] * (width - len(i)) for i in ids]))
        for r in range(n):
            if result.replies[r]:
                replies[r].append(tok.decode(result.replies[r], skip_special_tokens=True))
            if result.done[r]:
                scores[r] = result.scores[r]
    np.testing.assert_array_equal(scores, [score for _, score in SCRIPTS])
    assert replies[0] == ["\ntool\n4042\nassistant\n"]
    assert replies[1] == [] and replies[2] == ["\ntool\n4042\nassistant\n"]
    assert "error: unknown tool 'calculator'; the tools are: calculate" in replies[3][0]
    assert len(replies[4]) == 2  # the third call was cut by max_turns=3: no reply, score 0
    worker = env.core.interaction.inner.runner._process
    assert worker is not None and worker.poll() is None
    env.close()  # ends the tool worker process
    assert worker.wait(timeout=10) is not None and env.core.interaction.inner.runner._process is None


def test_fixed_arguments_are_refused_and_the_docs_have_every_section():
    model, tok = tiny_chat_model()
    for key in ("reward_fn", "interaction"):
        with pytest.raises(TypeError, match=f"'{key}' is fixed by the chat_calculator task"):
            gym.make("lmgym/ChatCalculator-v0", model=model, tokenizer=tok, **{key: None})
    for section in ("## Description", "## Action Space", "## Observation Space", "## Rewards", "## Episode End",
                    "## Arguments"):
        assert section in describe("lmgym/ChatCalculator-v0")


@pytest.mark.smollm
def test_smollm2_plays_a_tool_call_through_its_chat_template():
    """The real model's tokenizer and template: a call gets the product back as a tool message, and the answer
    scores 1; GRPO evaluates held-out prompts end to end."""
    from lmgym.agents import GRPO

    torch.manual_seed(0)
    env = gym.make_vec("lmgym/ChatCalculator-v0", num_envs=2, group_size=2, device="cpu")
    tok = env.core.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end in env.core.stop_token_ids
    question = [p for p in chat_calculator_prompts("train") if p[-1]["content"] == "What is 47 * 86?"]
    env.reset(seed=0, options={"prompts": question * 2})
    first = env.submit_turns(np.array([tok.encode(CALL, add_special_tokens=False) + [end]] * 2))
    assert tok.decode(first.replies[0]) == "\n<|im_start|>tool\n4042<|im_end|>\n<|im_start|>assistant\n"
    second = env.submit_turns(np.array([tok.encode("4042", add_special_tokens=False) + [end]] * 2))
    np.testing.assert_array_equal(second.scores, [1.0, 1.0])
    result = GRPO(env, seed=0).evaluate(prompts=chat_calculator_prompts("held_out")[:1])
    assert result["episodes"] == 2 and 0.0 <= result["score"] <= 1.0
