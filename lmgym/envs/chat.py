"""Chat and instruct models: chat-message prompts and the end-of-turn tokens that stop an episode.

A chat prompt is a list of messages, ``[{"role": "user", "content": "..."}]``, as
``tokenizer.apply_chat_template`` takes it. lmgym renders it with the tokenizer's
chat template and ``add_generation_prompt=True``, so the episode starts where the
assistant's answer begins. Instruct models end their turn with a token of their own
(``<|im_end|>``, ``<|eot_id|>``...) that their ``generation_config.eos_token_id``
lists; :func:`default_stop_token_ids` makes those tokens end an episode too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["is_chat_messages", "render_chat", "default_stop_token_ids"]


ROLES = ("system", "user", "assistant", "tool")
"""the roles a chat message may have (the ones chat templates know)"""


def is_chat_messages(prompt) -> bool:
    """True for a non-empty list of ``{"role": ..., "content": ...}`` mappings (one conversation)."""
    return (isinstance(prompt, Sequence) and not isinstance(prompt, (str, bytes)) and len(prompt) > 0
            and all(isinstance(m, Mapping) for m in prompt))


def render_chat(tokenizer, messages, *, where: str = "prompt") -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template, ending with the generation prompt.

    Raises:
        ValueError: the tokenizer has no chat template, or a message lacks ``role`` / ``content``.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"{where} is a list of chat messages but the tokenizer {name!r} has no chat template; "
                         "pass text prompts instead, use an instruct model's tokenizer, or set "
                         "tokenizer.chat_template to a Jinja template")
    for i, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            raise ValueError(f"{where}: message #{i} {dict(message)!r} needs both 'role' and 'content' keys")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: message #{i} has role {message['role']!r}; a chat role is one of "
                             f"{', '.join(ROLES)}")
        content = message["content"]
        parts_ok = isinstance(content, list) and all(isinstance(p, Mapping) and "type" in p for p in content)
        if not isinstance(content, str) and not parts_ok:
            raise ValueError(f"{where}: message #{i} ({message['role']}) has content {content!r}; content is the "
                             "message's text (a string), or a list of typed parts ({'type': 'text', ...})")
    try:
        encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
    except Exception as err:  # the template's own checks (jinja2 raise_exception: "roles must alternate", ...)
        raise ValueError(f"{where}: the tokenizer's chat template refused these messages: "
                         f"{' '.join(str(err).split())}") from err
    return [int(t) for t in encoded["input_ids"]]


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def default_stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end an episode by default: the tokenizer's EOS and every ``generation_config.eos_token_id``.

    ``generation_config.eos_token_id`` may be an int or a list (instruct models list their
    end-of-turn token there). Raises ``ValueError`` when neither names a token.
    """
    config = getattr(model, "generation_config", None)
    stop = set(_as_id_list(tokenizer.eos_token_id)) | set(_as_id_list(getattr(config, "eos_token_id", None)))
    if not stop:
        raise ValueError("the tokenizer has no EOS token and the model's generation config names none, so nothing "
                         "would end an episode: pass stop_token_ids=[...] (the token ids that end one)")
    return sorted(stop)
