"""Tools (issue 25, item 1): schemas from functions, Hermes calls, the worker process, and tool turns in the MDP.

A scripted policy emits a good call, a malformed one, an unknown tool, one that times out, one whose output is
huge and one that raises; each gets the documented tool reply, the episode goes on, and the rewards and masks
agree with an independent float64 reference over the whole token history.
"""

import time

import numpy as np
import pytest
import torch

from lmgym import TextGenVectorEnv
from lmgym.envs.tools import HermesParser, Tool, ToolCall, ToolError, ToolInteraction, ToolRunner, tool_prompt
from lmgym.models import tiny_model
from tests.test_multi_turn_render import bpe_tokenizer


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: digits, + - * / and parentheses
    """
    if not set(expression) <= set("0123456789+-*/() "):
        raise ValueError(f"not arithmetic: {expression!r}")
    return str(eval(expression))  # digits and operators only (checked above)


def slow(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: how long to sleep
    """
    time.sleep(seconds)
    return "awake"


def huge(n: int) -> str:
    """A long answer.

    Args:
        n: its length
    """
    return "x" * n


def boom() -> str:
    """Always fails."""
    raise RuntimeError("boom")


TOOLS = [calculate, slow, huge, boom]


def test_a_function_becomes_a_tool_schema():
    tool = Tool.from_function(calculate)
    assert tool.name == "calculate" and tool.description == "Evaluate an arithmetic expression."
    assert tool.parameters == {"type": "object", "properties": {"expression": {
        "type": "string", "description": "digits, + - * / and parentheses"}}, "required": ["expression"]}
    assert tool.schema["type"] == "function" and tool.schema["function"]["name"] == "calculate"

    def undocumented(x: int):
        return x

    with pytest.raises(ToolError, match="function undocumented cannot be a tool"):
        Tool.from_function(undocumented)
    with pytest.raises(ToolError, match="unique"):
        ToolRunner([calculate, calculate])

    def nested(x: int) -> int:
        """A nested function.

        Args:
            x: a number
        """
        return x

    with pytest.raises(ToolError, match="tool nested runs in a worker process that imports it by name, and it is "
                                        "defined in a function or a lambda"):
        ToolRunner([nested])


@pytest.mark.parametrize("text,expected", [
    ('<tool_call>{"name": "calculate", "arguments": {"expression": "1+2"}}</tool_call>',
     [ToolCall("calculate", {"expression": "1+2"})]),
    ('a <tool_call>{"name": "boom", "arguments": "{}"}</tool_call> b <tool_call>{"name": "huge", "arguments": '
     '{"n": 3}}</tool_call>', [ToolCall("boom", {}), ToolCall("huge", {"n": 3})]),
    ("no call here", []),
    ('<tool_call>{"name": calculate}</tool_call>', [ToolCall(error="malformed tool call: not JSON "
                                                                     "(Expecting value at character 9)")]),
    ('<tool_call>{"name": "f"', [ToolCall(error="malformed tool call: <tool_call> without </tool_call>")]),
    ('<tool_call>["f"]</tool_call>', [ToolCall(error='malformed tool call: expected {"name": "...", "arguments": '
                                                     '{...}}')]),
    ('<tool_call>{"name": "f", "arguments": 3}</tool_call>',
     [ToolCall("f", error="malformed tool call: arguments must be a JSON object")]),
])
def test_hermes_calls_are_parsed(text, expected):
    assert HermesParser().parse(text) == expected


def test_the_runner_reports_every_failure_as_text_and_keeps_working():
    runner = ToolRunner(TOOLS, timeout=2, max_output_chars=20)
    try:
        assert runner.run(ToolCall("calculate", {"expression": "6*7"})) == ("ok", "42")
        assert runner.run(ToolCall("search", {})) == ("unknown", "error: unknown tool 'search'; the tools are: "
                                                                 "boom, calculate, huge, slow")
        outcome, text = runner.run(ToolCall("calculate", {"expr": "1"}))
        assert outcome == "arguments" and text.startswith("error: wrong arguments for calculate:")
        assert runner.run(ToolCall("boom", {})) == ("exception", "error: RuntimeError: boom")
        started = time.perf_counter()
        assert runner.run(ToolCall("slow", {"seconds": 30})) == ("timeout", "error: slow did not finish within 2 s")
        assert time.perf_counter() - started < 10
        assert runner.run(ToolCall("huge", {"n": 10**6})) == ("ok", "x" * 20 + " [output cut: 999980 more "
                                                                              "characters]")
        assert runner.run(ToolCall("calculate", {"expression": "1+1"})) == ("ok", "2")  # a fresh worker after all that
    finally:
        runner.close()


def exits(code: int) -> str:
    """Ends its own process.

    Args:
        code: the exit code
    """
    import os

    os._exit(code)


def test_a_tool_that_kills_its_process_is_reported_and_replaced():
    runner = ToolRunner([exits, calculate], timeout=5)
    try:
        assert runner.run(ToolCall("exits", {"code": 3})) == ("died", "error: exits ended its process (exit code 3)")
        assert runner.run(ToolCall("calculate", {"expression": "2*2"})) == ("ok", "4")
    finally:
        runner.close()


def test_tools_reach_the_model_through_the_template_or_the_fallback():
    tok = bpe_tokenizer("qwen2")  # its template knows nothing of tools: the fallback system message
    messages = [{"role": "user", "content": "what is two plus two"}]
    text = tok.decode(tool_prompt(tok, messages, [calculate]))
    assert text.startswith("<|im_start|>system\nYou may call these tools:\n{\"type\": \"function\"")
    assert '"name": "calculate"' in text and text.endswith("<|im_start|>assistant\n")
    tok.chat_template = ("{% if tools %}<|im_start|>system\ntools: {{ tools | map(attribute='function.name') | "
                         "join(', ') }}<|im_end|>\n{% endif %}" + tok.chat_template)
    assert tok.decode(tool_prompt(tok, messages, [calculate])).startswith("<|im_start|>system\ntools: calculate")


# ------------------------------------------------------------------------------------------------ the MDP with tools
BETA = 0.2
CALLS = [  # row: (the first turn's text, what the tool reply must say)
    ('<tool_call>{"name": "calculate", "arguments": {"expression": "3+4"}}</tool_call>', "7"),
    ('<tool_call>{"name": calculate}</tool_call>', "error: malformed tool call: not JSON"),
    ('<tool_call>{"name": "search", "arguments": {}}</tool_call>', "error: unknown tool 'search'"),
    ('<tool_call>{"name": "slow", "arguments": {"seconds": 30}}</tool_call>', "error: slow did not finish within"),
    ('<tool_call>{"name": "huge", "arguments": {"n": 100000}}</tool_call>', "[output cut: 99960 more characters]"),
    ('<tool_call>{"name": "boom", "arguments": {}}</tool_call>', "error: RuntimeError: boom"),
]
FINAL = "the answer is 7"


def logprob_for(position: int) -> float:
    return -0.3 - 0.05 * (position % 5)


@pytest.fixture(scope="module")
def tool_episode():
    tok = bpe_tokenizer("qwen2")
    end = tok.eos_token_id
    model, _ = tiny_model(len(tok), hidden_size=16, num_layers=1, num_heads=2, max_positions=2048, tokenizer=tok)
    prompt = tool_prompt(tok, [{"role": "user", "content": "what is three plus four"}], TOOLS)
    interaction = ToolInteraction(TOOLS, score=lambda p, c: float("7" in c.last_turn_text), timeout=2,
                                  max_output_chars=40)
    n = len(CALLS)
    env = TextGenVectorEnv(n, model=model, tokenizer=tok, reward_fn=None, prompts=[prompt], interaction=interaction,
                           max_turns=3, max_turn_tokens=128, max_new_tokens=600, kl_coef=BETA, device="cpu",
                           stop_token_ids=[end])
    env.reset(seed=0)
    turns = [[tok.encode(text, add_special_tokens=False) + [end] for text, _ in CALLS],
             [tok.encode(FINAL, add_special_tokens=False) + [end]] * n]
    results, taken = [], [0] * n
    for turn in turns:
        width = max(len(t) for t in turn)
        toks = torch.full((n, width), end, dtype=torch.long)
        lps = torch.zeros((n, width))
        for r, t in enumerate(turn):
            toks[r, :len(t)] = torch.tensor(t)
            lps[r, :len(t)] = torch.tensor([logprob_for(taken[r] + j) for j in range(len(t))])
            taken[r] += len(t)
        results.append(env.submit_turns(toks, lps))
    return dict(tok=tok, model=model, prompt=prompt, turns=turns, results=results, interaction=interaction)


def test_each_call_gets_the_documented_reply_and_the_episode_goes_on(tool_episode):
    tok, (first, second) = tool_episode["tok"], tool_episode["results"]
    for r, (_, expected) in enumerate(CALLS):
        reply = tok.decode(first.replies[r])
        assert reply.startswith("\n<|im_start|>tool\n") and reply.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert expected in reply, (r, reply)
    assert not first.done.any() and second.done.all()
    np.testing.assert_array_equal(second.scores, 1.0)
    counts = tool_episode["interaction"].counts
    assert counts["turns_with_calls"] == 6 and counts["calls_ok"] == 2 and counts["calls_malformed"] == 1
    # six episodes called once each (in their first turn); the vector environment has started six more since
    assert counts["episodes_with_calls"] == 6 and counts["episodes"] == 12
    assert counts["calls_unknown"] == counts["calls_timeout"] == counts["calls_exception"] == 1


def test_rewards_and_masks_are_exact_against_a_float64_reference(tool_episode):
    t = tool_episode
    first, second = t["results"]
    model64 = t["model"].double()
    try:
        for r in range(len(CALLS)):
            ids = list(t["prompt"]) + t["turns"][0][r] + list(first.replies[r]) + t["turns"][1][r]
            policy = [0] * len(t["prompt"]) + [1] * len(t["turns"][0][r]) + [0] * len(first.replies[r]) \
                + [1] * len(t["turns"][1][r])
            with torch.no_grad():
                logp = torch.log_softmax(model64(input_ids=torch.tensor([ids])).logits[0], -1)
            positions = [i for i, m in enumerate(policy) if m]
            expected = [-BETA * (logprob_for(k) - float(logp[i - 1, ids[i]])) for k, i in enumerate(positions)]
            expected[-1] += 1.0  # the score, on the last policy token
            got = (first.rewards[r, :int(first.lengths[r])].tolist()
                   + second.rewards[r, :int(second.lengths[r])].tolist())
            assert int(first.mask[r].sum()) == len(t["turns"][0][r])  # the policy's tokens only, not the reply's
            np.testing.assert_allclose(got, expected, atol=2e-5)
    finally:
        t["model"].float()


def _call_in_child(runner, results):
    results.put(runner.run(ToolCall("calculate", {"expression": "5*5"})))


def test_a_runner_copied_into_a_forked_process_starts_its_own_worker():
    """The asynchronous collector's process backend forks the environment, tool runner included."""
    import multiprocessing

    runner = ToolRunner([calculate], timeout=5)
    try:
        assert runner.run(ToolCall("calculate", {"expression": "2*3"})) == ("ok", "6")
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        child = context.Process(target=_call_in_child, args=(runner, results))
        child.start()
        assert results.get(timeout=60) == ("ok", "25")
        child.join(timeout=30)
        assert runner.run(ToolCall("calculate", {"expression": "1+1"})) == ("ok", "2")  # the parent's worker lives on
    finally:
        runner.close()
