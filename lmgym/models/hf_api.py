"""What the installed transformers calls things, asked of the model itself.

Transformers renames parts of its model API between releases; lmgym supports every release in
its declared range (``pyproject.toml``) by asking a model's ``forward`` what it takes instead of
assuming one name. Everything in lmgym that passes a KV cache, reads one back, asks for fewer
logits or asks whether activations are checkpointed goes through this module, so a rename is
handled here once:

- the KV cache keyword: ``cache`` from transformers 5.24 on, ``past_key_values`` before
  (5.24 still accepts the old name, with a deprecation warning, until 5.40);
- the cache on a model's output: ``output.cache`` / ``output.past_key_values`` likewise;
- activation checkpointing: ``activation_checkpointing_enable`` / ``is_activation_checkpointing``
  from 5.23 on, ``gradient_checkpointing_enable`` / ``is_gradient_checkpointing`` before;
- ``logits_to_keep`` (the output layer run at the last positions only).

Answers are cached per model class: ``inspect.signature`` is not free and the hot loops ask at
every token.
"""

from __future__ import annotations

import functools
import inspect

from lmgym.utils import fast_paths

__all__ = ["hf_model", "model_name", "cache_keyword", "cache_kwargs", "cache_of", "accepts_logits_to_keep",
           "is_activation_checkpointing", "enable_activation_checkpointing"]

_CACHE_NAMES = ("cache", "past_key_values")  # newest first


def hf_model(model):
    """The Hugging Face model inside ``model``: through a PEFT wrapper's ``get_base_model()``, else ``model``."""
    while hasattr(model, "get_base_model") and model.get_base_model() is not model:
        model = model.get_base_model()
    return model


@functools.lru_cache(maxsize=None)
def model_name(model) -> str:
    """The class name of the Hugging Face model inside ``model``, for messages."""
    return type(hf_model(model)).__name__


def _forward_parameters(cls) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _parameters(model) -> frozenset[str]:
    return _forward_parameters(type(hf_model(model)))


def cache_keyword(model, *, required: bool = False) -> str | None:
    """The keyword under which ``model.forward`` takes a KV cache (``cache`` or ``past_key_values``), or None
    (``required``: ``TypeError`` instead). Loops that pass a cache at every token ask once, before the loop."""
    names = _parameters(model)
    keyword = next((name for name in _CACHE_NAMES if name in names), None)
    if keyword is None and required:
        raise TypeError(f"{model_name(model)}.forward takes no KV cache (neither 'cache' nor 'past_key_values')")
    return keyword


def cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` for ``model.forward``; raises ``TypeError`` for a model that takes no cache."""
    return {cache_keyword(model, required=True): cache}


def cache_of(output):
    """The KV cache a model returned (``output.cache`` or, before transformers 5.24, ``output.past_key_values``)."""
    fields = getattr(type(output), "__dataclass_fields__", None) or {}
    for name in _CACHE_NAMES:
        if name in fields:
            return getattr(output, name)
    # a plain dict-like output: read the keys directly (reading a renamed attribute would warn)
    for name in _CACHE_NAMES:
        if name in getattr(output, "keys", lambda: ())():
            return output[name]
    return None


def accepts_logits_to_keep(model, *, report: bool = False) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (the output layer at chosen positions only); with
    ``report``, a model that does not is recorded as a fall-back of that fast path (warned once)."""
    accepts = "logits_to_keep" in _parameters(model)
    if not accepts and report:
        fast_paths.fall_back("logits_to_keep", f"{model_name(model)}.forward takes no logits_to_keep")
    return accepts


def is_activation_checkpointing(model) -> bool:
    """Whether ``model`` checkpoints its activations (either name transformers has used for it)."""
    base = hf_model(model)
    # ask the old name only where the new one is missing: from 5.23 on, reading it warns
    name = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(base, name, False))


def enable_activation_checkpointing(model) -> None:
    """Turn on non-reentrant activation checkpointing by the name the installed transformers uses."""
    base = hf_model(model)
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.23
        base.activation_checkpointing_enable({"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
