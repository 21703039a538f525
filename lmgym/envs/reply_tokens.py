"""An environment reply as tokens appended after the existing ids, never a re-tokenisation of the history.

With a chat template, a reply message is rendered as the *suffix* the template adds after a finished
assistant turn: the rest of the turn's closing text (what follows the policy's end-of-turn token, e.g. the
newline after ``<|im_end|>``; the whole closing text when the turn was cut at ``max_turn_tokens``), the
reply message, and the generation prompt of the next assistant turn. The suffix is found by rendering a
fixed two-message conversation with and without the reply and taking the difference, so the policy's own
tokens are never decoded and encoded again: what it conditions on is exactly prompt ids + turn ids + reply
ids + ... (``tests/test_multi_turn_render.py`` reports where a fresh rendering of the whole conversation
differs from that history). Without a chat template a text reply is tokenized as plain text; token ids are
appended as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["ReplyTokens"]

_MARK = "\u2063lmgym\u2063"  # an assistant message the templates copy verbatim, found again in the render


class ReplyTokens:
    """Turns :class:`~lmgym.envs.interaction.Reply` contents into the token ids appended to a conversation."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.templated = getattr(tokenizer, "chat_template", None) is not None
        self._closing: str | None = None

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def closing_text(self) -> str:
        """What the template writes after an assistant message's content (e.g. ``<|im_end|>\\n``)."""
        if self._closing is None:
            text = self._render([{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARK}], False)
            at = text.rfind(_MARK)
            if at < 0:
                raise ValueError("the tokenizer's chat template does not copy an assistant message into its output; "
                                 "replies cannot be rendered after the policy's turn")
            self._closing = text[at + len(_MARK):]
        return self._closing

    def message_suffix(self, message: Mapping) -> str:
        """The text the template adds for ``message`` after a finished assistant turn, generation prompt included."""
        history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARK}]
        before = self._render(history, False)
        after = self._render(history + [dict(message)], True)
        if not after.startswith(before):
            raise ValueError("the tokenizer's chat template renders the conversation before a reply differently once "
                             "the reply is added, so the reply cannot be appended as a suffix; give the reply as "
                             "token ids instead")
        return after[len(before):]

    def ids(self, content, role: str, turn_ids: list[int], stopped: bool) -> list[int]:
        """The ids to append for a reply ``content`` after a policy turn ``turn_ids`` (``stopped``: it ended with a
        stop token). Raises ``ValueError`` for ids outside the vocabulary or a reply that renders to nothing."""
        if not isinstance(content, (str, Mapping)):
            ids = [int(t) for t in content]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"the reply's token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
            return ids
        message = dict(content) if isinstance(content, Mapping) else {"role": role, "content": content}
        if not self.templated:
            # plain text follows the policy's turn as a new word (a byte-level BPE would glue it to the last one)
            ids = self.tokenizer.encode(" " + message["content"], add_special_tokens=False)
        else:
            closing = self.closing_text()
            if stopped:
                # the policy wrote the end-of-turn token itself; the template's text after it still follows
                said = self.tokenizer.decode(turn_ids[-1:], skip_special_tokens=False)
                closing = closing[len(said):] if said and closing.startswith(said) else closing
            ids = self.tokenizer.encode(closing + self.message_suffix(message), add_special_tokens=False)
        if not ids:
            raise ValueError(f"the reply {message['content']!r} is no tokens at all")
        return [int(t) for t in ids]
