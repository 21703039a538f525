"""Tools: Python functions the policy calls from its turn, run in a separate process, answered as ``tool`` messages.

A tool is a plain function with type hints and a docstring (``Args:`` describing each parameter)::

    def calculate(expression: str) -> str:
        \"\"\"Evaluate an arithmetic expression.

        Args:
            expression: digits, + - * / and parentheses, e.g. "12 * (3 + 4)"
        \"\"\"

:class:`Tool` turns it into the JSON schema chat templates take (``tools=``); :func:`tool_prompt` renders a
conversation's prompt with it, through the template where the template shows tools to the model, else with a
system message that lists them and the call format (the documented fallback). After each policy turn
:class:`ToolInteraction` parses the calls in the turn (:class:`HermesParser` by default:
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; any object with ``parse(text)`` works), runs
each in a worker process (:class:`ToolRunner`) and appends the results as one ``tool`` message, as tokens, like
any environment turn. A turn without a call is the final answer: the episode ends and the task scores it.

Whatever goes wrong with a call becomes the text of the tool's reply, which the model reads, and the episode
goes on: a malformed call, an unknown tool, wrong arguments, an exception, a timeout, an output over the cap
(cut, with a note), a worker that died. Training never stops because of a tool.

**What the process boundary does and does not do.** Each call runs in a worker process, a fresh Python
interpreter (``python -m lmgym.envs.tool_worker``) that imports the tools by their module path (so a tool is a
function at the top level of a module, not in the script being run, not nested) and shares no thread, lock or
memory with training; one call at a time: a call that hangs is killed at ``timeout`` seconds and a fresh worker
takes the next call; a crash (segfault, ``os._exit``) or a call that exhausts its own memory does not take the
training process down; output beyond ``max_output_chars`` never crosses back; requests and results travel as
JSON, never pickles. It is **not a security sandbox**: the worker runs as the same user with the same files,
network and environment variables as the training process. Run untrusted tools in a container or a VM.
"""

from __future__ import annotations

import inspect
import json
import os
import select
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from lmgym.envs.interaction import BatchInteraction, Conversation, Reply
from lmgym.envs.tool_worker import read_message, write_message

__all__ = ["Tool", "ToolCall", "HermesParser", "ToolRunner", "ToolInteraction", "ToolError", "tool_prompt"]


class ToolError(ValueError):
    """A function cannot be a tool (no docstring, a parameter without a type hint...), or tools are misconfigured."""


@dataclass(frozen=True)
class Tool:
    """A function the policy may call, with the JSON schema that describes it to the model."""

    name: str
    description: str
    parameters: dict
    """JSON schema of the arguments (``{"type": "object", "properties": ..., "required": [...]}``)"""
    function: Callable = field(repr=False, compare=False)

    @classmethod
    def from_function(cls, function: Callable) -> "Tool":
        """The tool of a function with type hints and a Google-style docstring (transformers' ``get_json_schema``)."""
        from transformers.utils import get_json_schema

        if not callable(function):
            raise ToolError(f"a tool must be a function, got {type(function).__name__}")
        try:
            schema = get_json_schema(function)["function"]
        except Exception as err:  # transformers' DocstringParsingException / TypeHintParsingException
            name = getattr(function, "__name__", repr(function))
            raise ToolError(f"function {name} cannot be a tool: {err} (give it type hints and a docstring with an "
                            "Args: section describing each parameter)") from None
        return cls(schema["name"], schema.get("description", ""), schema.get("parameters", {}), function)

    @property
    def schema(self) -> dict:
        """The ``{"type": "function", "function": {...}}`` entry chat templates take in ``tools=``."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def as_tools(tools) -> list[Tool]:
    out = [t if isinstance(t, Tool) else Tool.from_function(t) for t in tools]
    if not out:
        raise ToolError("give at least one tool")
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ToolError(f"tool names must be unique, got {names}")
    return out


@dataclass(frozen=True)
class ToolCall:
    """One call parsed from a turn: a name and arguments, or the reason it could not be parsed."""

    name: str | None = None
    arguments: dict = field(default_factory=dict)
    error: str | None = None


class HermesParser:
    """Hermes-style calls, as Qwen's and SmolLM's templates ask for them:
    ``<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>``, any number per turn.

    ``arguments`` may also be a JSON string holding the object. A ``<tool_call>`` left open (the turn was cut)
    is a malformed call.
    """

    open_tag, close_tag = "<tool_call>", "</tool_call>"

    def parse(self, text: str) -> list[ToolCall]:
        calls = []
        for block, closed in self._blocks(text):
            if not closed:
                calls.append(ToolCall(error=f"malformed tool call: {self.open_tag} without {self.close_tag}"))
                continue
            try:
                value = json.loads(block)
            except json.JSONDecodeError as err:
                calls.append(ToolCall(error=f"malformed tool call: not JSON ({err.msg} at character {err.pos})"))
                continue
            calls.append(self._call(value))
        return calls

    def _blocks(self, text: str):
        start = 0
        while (at := text.find(self.open_tag, start)) >= 0:
            body = at + len(self.open_tag)
            end = text.find(self.close_tag, body)
            if end < 0:
                yield text[body:], False
                return
            yield text[body:end].strip(), True
            start = end + len(self.close_tag)

    @staticmethod
    def _call(value) -> ToolCall:
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return ToolCall(error='malformed tool call: expected {"name": "...", "arguments": {...}}')
        arguments = value.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return ToolCall(name=value["name"], error="malformed tool call: arguments are not a JSON object")
        if not isinstance(arguments, dict):
            return ToolCall(name=value["name"], error="malformed tool call: arguments must be a JSON object")
        return ToolCall(name=value["name"], arguments=arguments)


STARTUP_TIMEOUT = 60.0
"""seconds a new worker process may take to start and import the tools (not counted in a call's time limit)"""
TIMED_OUT = object()
"""what :meth:`ToolRunner._receive` returns when the worker did not answer in time"""


def import_path(tool: Tool) -> str:
    """``"module:qualified.name"`` by which the worker process imports ``tool``'s function."""
    function = tool.function
    module, qualname = getattr(function, "__module__", None), getattr(function, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        where = "the script being run" if module == "__main__" else "a function or a lambda"
        raise ToolError(f"tool {tool.name} runs in a worker process that imports it by name, and it is defined in "
                        f"{where}: define it at the top level of a module of its own and import it from there")
    return f"{module}:{qualname}"


class ToolRunner:
    """Runs calls in a worker process (``python -m lmgym.envs.tool_worker``), one at a time, with a time limit
    and a cap on the output.

    The worker is a fresh interpreter that imports each tool by its module path: it shares no state, lock or thread
    with the training process, and never re-runs the script that started it. Tools must therefore be importable
    functions, at the top level of a module.

    Args:
        tools: the tools (functions or :class:`Tool`).
        timeout: seconds a call may take; past it the worker is killed (a fresh one takes the next call).
        max_output_chars: the longest result text sent back; longer output is cut, with a note saying so.
    """

    def __init__(self, tools, *, timeout: float = 5.0, max_output_chars: int = 2000):
        self.tools = {t.name: t for t in as_tools(tools)}
        if not timeout > 0 or not max_output_chars > 0:
            raise ToolError(f"timeout and max_output_chars must be > 0, got {timeout!r} and {max_output_chars!r}")
        self.timeout, self.max_output_chars = float(timeout), int(max_output_chars)
        self._spec = json.dumps({"tools": {name: import_path(t) for name, t in self.tools.items()},
                                 "max_output_chars": self.max_output_chars})
        self._process: subprocess.Popen | None = None
        self._owner = os.getpid()

    def _start(self) -> None:
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen([sys.executable, "-m", "lmgym.envs.tool_worker", self._spec],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         env=environment)
        self._owner = os.getpid()
        ready = self._receive(STARTUP_TIMEOUT)
        if not isinstance(ready, str) or ready != "ready":
            code = self._process.poll()
            self.close()
            raise ToolError(f"the tool worker process did not start within {STARTUP_TIMEOUT:g} s (exit code {code}; "
                            "can it import the tools?)")

    def _receive(self, timeout: float):
        """The worker's next message; ``TIMED_OUT`` when it did not answer within ``timeout``; None when it ended."""
        stream = self._process.stdout
        if not select.select([stream], [], [], timeout)[0]:
            return TIMED_OUT
        try:
            return read_message(stream)
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        """End the worker process (a later call starts a new one)."""
        if self._process is not None and self._owner == os.getpid():
            self._process.kill()
            self._process.wait(timeout=5)
            for stream in (self._process.stdin, self._process.stdout):
                stream.close()
        self._process = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def run(self, call: ToolCall) -> tuple[str, str]:
        """``(outcome, text)`` of one call: outcome ``"ok"``, or what went wrong (``"malformed"``, ``"unknown"``,
        ``"arguments"``, ``"exception"``, ``"timeout"``, ``"died"``); ``text`` is what the model reads."""
        if call.error is not None:
            return "malformed", f"error: {call.error}"
        tool = self.tools.get(call.name)
        if tool is None:
            return "unknown", (f"error: unknown tool {call.name!r}; the tools are: "
                               + ", ".join(sorted(self.tools)))
        try:
            inspect.signature(tool.function).bind(**call.arguments)
        except TypeError as err:
            return "arguments", f"error: wrong arguments for {call.name}: {err}"
        if self._process is not None and self._owner != os.getpid():
            self._process = None  # a forked copy of this runner (a collector process): the worker is the parent's
        if self._process is None or self._process.poll() is not None:
            try:
                self._start()
            except (ToolError, OSError) as err:
                return "died", f"error: {err}"
        try:
            write_message(self._process.stdin, {"name": call.name, "arguments": call.arguments})
        except (OSError, ValueError):
            reply = None
        else:
            reply = self._receive(self.timeout)
        if reply is TIMED_OUT:
            self.close()
            return "timeout", f"error: {call.name} did not finish within {self.timeout:g} s"
        if reply is None:  # the worker's output ended: it exited
            try:
                code = self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            self.close()
            return "died", f"error: {call.name} ended its process (exit code {code})"
        return ("ok", reply["text"]) if reply["ok"] else ("exception", f"error: {reply['text']}")


class ToolInteraction(BatchInteraction):
    """The environment side of a tool-using conversation: answers each turn's calls with their results.

    A turn with calls gets one ``tool`` message holding each result (one per line, in order; at most
    ``max_calls_per_turn`` are run, the rest answered with an error); a turn without a call ends the episode,
    which ``score(prompt, conversation)`` then scores (the final answer is ``conversation.last_turn_text``).

    Args:
        tools: the functions (or :class:`Tool`) the policy may call.
        score: ``fn(prompt, conversation) -> float``, the task score of a finished episode.
        parser: an object with ``parse(text) -> list[ToolCall]`` (default :class:`HermesParser`).
        timeout, max_output_chars: per call, see :class:`ToolRunner`.
        max_calls_per_turn: calls run per turn.

    :attr:`counts` adds up what happened (episodes, episodes with at least one call, turns with calls, calls by
    outcome), for reports.
    """

    def __init__(self, tools, score: Callable[[Any, Conversation], float], *, parser=None, timeout: float = 5.0,
                 max_output_chars: int = 2000, max_calls_per_turn: int = 4):
        if not callable(score):
            raise ToolError(f"score must be a function (prompt, conversation) -> float, got {type(score).__name__}")
        self.runner = ToolRunner(tools, timeout=timeout, max_output_chars=max_output_chars)
        self.tools = list(self.runner.tools.values())
        self.score_fn = score
        self.parser = parser if parser is not None else HermesParser()
        if not callable(getattr(self.parser, "parse", None)):
            raise ToolError("parser must have a parse(text) -> list[ToolCall] method")
        self.max_calls_per_turn = int(max_calls_per_turn)
        self.prompts: dict[int, Any] = {}
        self.called: set[int] = set()  # the rows whose current episode has called a tool
        self.counts: dict[str, int] = {}

    def close(self) -> None:
        """End the tool worker process (the environment's ``close()`` calls this; a later call starts a new one)."""
        self.runner.close()

    def _count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def start(self, rows, prompts, rngs) -> None:
        for row, prompt in zip(rows, prompts):
            self.prompts[row] = prompt
            self.called.discard(row)
        self._count("episodes", len(rows))

    def respond(self, conversations: list[Conversation]) -> list[Reply]:
        replies = []
        for conversation in conversations:
            calls = list(self.parser.parse(conversation.last_turn_text))
            if not calls:
                replies.append(Reply(done=True))
                continue
            self._count("turns_with_calls")
            if conversation.row not in self.called:
                self.called.add(conversation.row)
                self._count("episodes_with_calls")
            results = []
            for i, call in enumerate(calls):
                if i >= self.max_calls_per_turn:
                    outcome, text = "over_limit", f"error: at most {self.max_calls_per_turn} calls per turn"
                else:
                    outcome, text = self.runner.run(call)
                self._count(f"calls_{outcome}")
                results.append(text)
            replies.append(Reply({"role": "tool", "content": "\n".join(results)}, role="tool"))
        return replies

    def score(self, conversations: list[Conversation]) -> list[float]:
        return [float(self.score_fn(self.prompts.get(c.row, c.prompt), c)) for c in conversations]


def tool_prompt(tokenizer, messages: list[dict], tools) -> list[int]:
    """The prompt ids of a chat conversation that offers ``tools`` (functions or :class:`Tool`) to the model.

    Through the chat template's ``tools=`` where the template renders them; where it does not (the rendering is
    the same with and without), a system message is put first (or the existing one extended) that lists the
    tools' JSON schemas and asks for Hermes-style calls.
    """
    from lmgym.envs.chat import render_chat

    tools = as_tools(tools)
    schemas = [t.schema for t in tools]
    messages = [dict(m) for m in messages]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ToolError("tools reach the model through a chat template; this tokenizer has none")
    plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    try:
        offered = tokenizer.apply_chat_template(messages, tools=schemas, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that fails on tools= is a template without tools
        offered = plain
    if offered != plain:
        encoded = tokenizer.apply_chat_template(messages, tools=schemas, tokenize=True, return_dict=True,
                                                add_generation_prompt=True)
        return [int(t) for t in encoded["input_ids"]]
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = messages[0]["content"] + "\n\n" + tools_system_text(tools)
    else:
        messages.insert(0, {"role": "system", "content": tools_system_text(tools)})
    return render_chat(tokenizer, messages)


def tools_system_text(tools) -> str:
    """The fallback's system message: the tools' JSON schemas and the call format."""
    listing = "\n".join(json.dumps(t.schema) for t in as_tools(tools))
    return ("You may call these tools:\n" + listing + "\nTo call one, write <tool_call>{\"name\": <tool name>, "
            "\"arguments\": <JSON object>}</tool_call>; its result comes back as a tool message. Answer without "
            "a tool call when you are done.")
