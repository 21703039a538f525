"""Column surgery on a Hugging Face KV cache, so that the rows of a batch can restart independently.

The layout :class:`lmgym.models.cached_lm.CachedLM` keeps: a batch cache has ``C`` columns shared by
all rows, a 2-D attention mask ``(batch, C)`` says which columns hold a real token of each
row, and every live row's tokens form one contiguous block that ends at the last column
(left padding, as ``model.generate`` uses). A cached key/value depends on the position id it
was computed with, not on the column it is stored in, so a row restarts on a new prompt by
writing the prompt's keys/values into the rightmost columns and masking every column before.
Because each block is contiguous, a distance in columns is a distance in tokens, which is
what Hugging Face's sliding-window masks (computed over columns) need to be exact.

Transformers 5 stores the layers of a ``DynamicCache`` in three ways this module can edit:

- ``DynamicLayer`` (full attention): keys/values ``(batch, heads, C, head_dim)``;
- ``DynamicSlidingWindowLayer`` (Mistral, Gemma 2/3 sliding layers): only the *last*
  ``min(C, window - 1)`` columns, with ``cumulative_length == C``; the mask functions read the
  2-D mask from column ``C - window + 1`` on (``get_mask_sizes``), so stored columns stay
  aligned with mask columns as long as ``cumulative_length`` counts every column;
- ``DummyLayer`` (layers that share another layer's cache): nothing stored.

Anything else (recurrent linear-attention or convolution state, quantised or indexed layers,
chunked attention whose mask depends on where each row's padding ends) cannot be edited per
column: :func:`editable` says so, and the caller re-prefills the batch instead.
"""

from __future__ import annotations

import torch

__all__ = ["editable", "takes_holes", "describe", "grow_left", "drop_left", "write_right", "select_rows"]


def _layer_kinds():
    from transformers import cache_utils

    # DummyLayer (a layer sharing another's cache) exists from transformers 5.23 on
    names = ("DynamicLayer", "DynamicSlidingWindowLayer", "DummyLayer")
    return tuple(getattr(cache_utils, n) for n in names if hasattr(cache_utils, n))


def editable(cache, config) -> bool:
    """True when every layer of ``cache`` is one this module can edit column-wise."""
    from transformers.cache_utils import DynamicCache

    if not isinstance(cache, DynamicCache):
        return False
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if "chunked_attention" in (getattr(text_config, "layer_types", None) or ()) \
            or getattr(text_config, "attention_chunk_size", None) is not None:
        return False  # chunk boundaries are counted from each row's first real column: not movable
    kinds = _layer_kinds()
    return all(type(layer) in kinds for layer in cache.layers)


def takes_holes(cache) -> bool:
    """True when masked columns *inside* a live row's block change nothing (full attention only).

    A sliding-window layer keeps, and its mask counts, columns rather than positions, so masked columns in
    the middle of a row (a row that waited while others took tokens, or took no reply) would push real tokens
    out of its window: such caches must keep each row contiguous."""
    return not any(_is_sliding(layer) for layer in getattr(cache, "layers", ()))


def describe(cache) -> str:
    """The cache's kind in a few words, for a message: its class, or its layers' classes."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return type(cache).__name__
    return f"{type(cache).__name__} of " + ", ".join(sorted({type(layer).__name__ for layer in layers}))


def _stored(layer) -> bool:
    return getattr(layer, "keys", None) is not None and layer.keys.dim() == 4


def _is_sliding(layer) -> bool:
    return hasattr(layer, "cumulative_length") and hasattr(layer, "sliding_window")


def _set(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer.keys, layer.values = keys, values


def grow_left(cache, extra: int) -> None:
    """Add ``extra`` empty columns on the left of every row (the caller masks them)."""
    for layer in cache.layers:
        if not _stored(layer):
            continue
        if _is_sliding(layer):
            # A sliding layer stores the last min(C, window - 1) columns; it gains only what it lacks.
            columns = layer.cumulative_length + extra
            pad = max(0, min(columns, layer.sliding_window - 1) - layer.keys.shape[2])
            layer.cumulative_length = columns
        else:
            pad = extra
        if pad:
            zeros = layer.keys.new_zeros(layer.keys.shape[0], layer.keys.shape[1], pad, layer.keys.shape[3])
            vzeros = layer.values.new_zeros(layer.values.shape[0], layer.values.shape[1], pad,
                                            layer.values.shape[3])
            _set(layer, torch.cat([zeros, layer.keys], dim=2), torch.cat([vzeros, layer.values], dim=2))


def drop_left(cache, count: int) -> None:
    """Drop the ``count`` leftmost columns (masked in every live row: the caller makes sure)."""
    for layer in cache.layers:
        if not _stored(layer):
            continue
        if _is_sliding(layer):
            layer.cumulative_length -= count
            keep = min(layer.keys.shape[2], layer.cumulative_length)
        else:
            keep = layer.keys.shape[2] - count
        start = layer.keys.shape[2] - keep
        _set(layer, layer.keys[:, :, start:], layer.values[:, :, start:])


def write_right(cache, rows: torch.Tensor, prefill) -> None:
    """Write the cache of a left-padded prefill of ``len(rows)`` prompts into the rightmost columns of ``rows``.

    ``prefill`` must have no more columns than ``cache`` (grow it first with :func:`grow_left`).
    A sliding layer of the prefill holds only its last ``window - 1`` columns, which are exactly
    the ones the target layer keeps at its right end.
    """
    for old, new in zip(cache.layers, prefill.layers):
        if not _stored(old):
            continue
        width = new.keys.shape[2]
        if width > old.keys.shape[2]:
            raise AssertionError("grow the cache before writing a wider prefill into it")
        old.keys[rows, :, old.keys.shape[2] - width:] = new.keys.to(old.keys.dtype)
        old.values[rows, :, old.values.shape[2] - width:] = new.values.to(old.values.dtype)


def select_rows(cache, index: torch.Tensor) -> None:
    """Make row ``i`` of every layer a copy of row ``index[i]`` (the batch may grow: rows repeat)."""
    for layer in cache.layers:
        if _stored(layer):
            _set(layer, layer.keys.index_select(0, index), layer.values.index_select(0, index))
