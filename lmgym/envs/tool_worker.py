"""The tool worker process: ``python -m lmgym.envs.tool_worker '<spec json>'`` (started by ``lmgym.envs.tools``).

It imports each tool by its module path (never the script that started training), says it is ready, then answers
calls one at a time. Requests and replies are length-prefixed JSON on its stdin and on a copy of its original
stdout; a tool's own prints go to stderr, so they cannot corrupt the exchange. Nothing is unpickled.
"""

from __future__ import annotations

import importlib
import json
import os
import struct
import sys

from lmgym.utils.processes import die_with_parent


def read_message(stream):
    """One length-prefixed JSON message from a binary stream, or None at its end."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    (size,) = struct.unpack(">I", head)
    body = stream.read(size)
    return json.loads(body.decode("utf-8")) if len(body) == size else None


def write_message(stream, value) -> None:
    body = json.dumps(value).encode("utf-8")
    stream.write(struct.pack(">I", len(body)) + body)
    stream.flush()


def load(path: str):
    """The function at ``"module:qualified.name"``."""
    module, _, qualname = path.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def main() -> None:
    die_with_parent()
    spec = json.loads(sys.argv[1])
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the tools' prints go to stderr
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer
    tools = {name: load(path) for name, path in spec["tools"].items()}
    limit = int(spec["max_output_chars"])
    write_message(replies, "ready")
    while (request := read_message(requests)) is not None:
        try:
            result = tools[request["name"]](**request["arguments"])
            text = result if isinstance(result, str) else json.dumps(result, default=str)
            ok = True
        except BaseException as err:  # the tool's own failure: reported to the model, never raised here
            text, ok = f"{type(err).__name__}: {err}", False
        if len(text) > limit:
            text = text[:limit] + f" [output cut: {len(text) - limit} more characters]"
        write_message(replies, {"ok": ok, "text": text})


if __name__ == "__main__":
    main()
