"""Where episode prompts come from: a list (sampled) or any iterable (read in order)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from lmgym.envs.chat import is_chat_messages, render_chat
from lmgym.utils import checks

__all__ = ["Prompt", "PromptSource"]


class Prompt(NamedTuple):
    """A prompt as ``(text, token_ids, source)`` (a named tuple, so it pickles and copies like one).

    ``text`` is the prompt as the model reads it (a chat prompt rendered with its template);
    ``source`` the prompt as the user gave it when that was not text (chat messages).
    """

    text: str
    ids: list[int]
    source: Any = None

    @property
    def given(self):
        """The prompt as the user gave it, which reward functions receive: the text, or the chat messages."""
        return self.text if self.source is None else self.source


class PromptSource:
    """Prompts for episodes.

    A list or tuple is sampled uniformly, with replacement, from the environment's
    seeded RNG, so ``reset(seed=...)`` fixes the prompt order. Any other iterable
    (a generator, a data set stream) is read in order, once; running out is an error.
    A prompt is a string (tokenized with the tokenizer), a list of chat messages
    (``[{"role": "user", "content": ...}]``, rendered with the tokenizer's chat template
    and ``add_generation_prompt=True``), or a sequence of token ids; a numpy array of
    strings (or a 2-D array of token ids) is a list of prompts.

    Args:
        prompts: the prompts.
        tokenizer: turns text prompts into token ids, and token-id prompts into text.
        max_prompt_tokens: the longest prompt allowed; for a list it defaults to the
            longest prompt in it, for an iterable it must be given.
    """

    def __init__(self, prompts, tokenizer, *, max_prompt_tokens: int | None = None):
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
            raise TypeError(f"prompts must be a list or an iterable of prompts, got {type(prompts).__name__}"
                            + (" (wrap a single prompt in a list)" if isinstance(prompts, str) else ""))
        if hasattr(prompts, "tolist") and hasattr(prompts, "__len__"):
            prompts = prompts.tolist()  # a numpy array (or tensor, pandas Series) is a list of prompts
        if max_prompt_tokens is not None:
            max_prompt_tokens = checks.integer(max_prompt_tokens, "max_prompt_tokens", low=1)
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.items: list[Prompt] | None = None
        self._by_ids: dict[tuple[int, ...], Prompt] = {}
        self._stream = None
        if isinstance(prompts, Sequence):
            if len(prompts) == 0:
                raise ValueError("prompts is empty: give at least one prompt")
            self.items = [self.encode(p, where=f"prompt #{i}") for i, p in enumerate(prompts)]
            # Token ids back to the prompt they came from, so a prompt fixed by its ids (a resumed
            # run, an evaluation restoring its state) keeps the form the reward function expects.
            self._by_ids = {tuple(p.ids): p for p in reversed(self.items)}
            longest = max(len(p.ids) for p in self.items)
            if max_prompt_tokens is None:
                max_prompt_tokens = longest
            elif longest > max_prompt_tokens:
                i = max(range(len(self.items)), key=lambda k: len(self.items[k].ids))
                raise ValueError(f"prompt #{i} has {longest} tokens, more than max_prompt_tokens={max_prompt_tokens}")
        else:
            if max_prompt_tokens is None:
                raise ValueError("prompts is an iterable of unknown length: pass max_prompt_tokens too")
            self._stream = iter(prompts)
            self._drawn = 0
        if max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        self.max_prompt_tokens = int(max_prompt_tokens)

    def encode(self, prompt, *, where: str = "prompt") -> Prompt:
        """Turn a text or token-id prompt into a :class:`Prompt`, with a clear error for bad ones."""
        if isinstance(prompt, Prompt):
            return prompt
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt)["input_ids"])
            if not ids:
                raise ValueError(f"{where} {prompt!r} is empty after tokenization; an episode needs at least "
                                 "one prompt token to condition on")
            return Prompt(prompt, ids)
        if is_chat_messages(prompt):
            ids = render_chat(self.tokenizer, prompt, where=where)
            return Prompt(self.tokenizer.decode(ids), ids, [dict(m) for m in prompt])
        if isinstance(prompt, Mapping):
            raise TypeError(f"{where} is a single message {dict(prompt)!r}; a chat prompt is a list of messages, "
                            "and prompts a list of those: [[{'role': 'user', 'content': ...}], ...]")
        if isinstance(prompt, (bytes, bytearray)):  # iterating bytes would give byte values, not tokens
            raise TypeError(f"{where} is bytes ({bytes(prompt)[:40]!r}); decode it to a string first, "
                            "e.g. prompt.decode('utf-8')")
        if hasattr(prompt, "tolist"):
            prompt = prompt.tolist()  # a numpy / torch row of token ids
        try:
            ids = [int(t) for t in prompt]
        except (TypeError, ValueError) as err:
            raise TypeError(f"{where} must be a string or a sequence of token ids, got {prompt!r}") from err
        if any(isinstance(t, bool) or t != i for t, i in zip(prompt, ids)):  # 1.5 or True is no token id
            raise TypeError(f"{where} must be a string or a sequence of integer token ids, got {prompt!r}")
        if not ids:
            raise ValueError(f"{where} is empty; an episode needs at least one prompt token to condition on")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{where} has token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        known = self._by_ids.get(tuple(ids))
        return known if known is not None else Prompt(self.tokenizer.decode(ids), ids)

    @property
    def finite(self) -> bool:
        """True when the prompts are a known list (an exact optimum can then be computed)."""
        return self.items is not None

    def draw(self, rng: np.random.Generator, n: int) -> list[Prompt]:
        """The next ``n`` prompts."""
        if self.items is not None:
            return [self.items[i] for i in rng.integers(len(self.items), size=n)]
        out = []
        for _ in range(n):
            try:
                raw = next(self._stream)
            except StopIteration:
                raise RuntimeError(f"the prompt iterable ran out after {self._drawn} prompts; pass a longer or "
                                   "endless iterable (e.g. itertools.cycle) or a list to sample from") from None
            out.append(self.check_length(self.encode(raw, where=f"prompt #{self._drawn}")))
            self._drawn += 1
        return out

    def check_length(self, prompt: Prompt) -> Prompt:
        if len(prompt.ids) > self.max_prompt_tokens:
            raise ValueError(f"prompt {prompt.text[:40]!r} has {len(prompt.ids)} tokens, more than "
                             f"max_prompt_tokens={self.max_prompt_tokens}; raise max_prompt_tokens")
        return prompt
