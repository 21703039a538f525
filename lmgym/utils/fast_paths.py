"""Saying so, once, when a fast path cannot run.

lmgym's speed-ups (prompt sharing and length buckets in the update forward, the output layer
at chosen positions only, per-column KV-cache edits, fused AdamW) each need something of the
model, the installed libraries or the device. Where that is missing the code takes the exact
slow path, and this module makes sure the user learns it: the first time a path falls back
for a reason, a :class:`FastPathWarning` names the path, the reason and what it costs.
Repeats of the same (path, reason) are not warned again in the process.

:func:`fallbacks` lists what fell back so far, so tests can assert that the architectures
lmgym supports take every fast path (``tests/test_fast_paths.py``).
"""

from __future__ import annotations

import warnings

__all__ = ["FastPathWarning", "fall_back", "fallbacks", "PATHS"]

PATHS = {
    "prompt sharing": "each completion re-encodes its prompt in the update forward",
    "length buckets": "the update forward runs every row to the longest continuation",
    "logits_to_keep": "the output layer runs at every position, not only where a token is predicted",
    "cache column edits": "a reset re-prefills every row of the batch instead of writing the new prompt's columns",
    "prefill sharing": "a prompt repeated in a batch (a group) is encoded once per row instead of once",
    "fused AdamW": "AdamW runs as a chain of elementwise kernels",
    "multi-turn cache reuse": "each turn and each reply of a multi-turn episode re-encodes the whole history",
}
"""each fast path and what falling back from it costs"""


class FastPathWarning(UserWarning):
    """A fast path of lmgym could not run; results are the same, only slower (or larger)."""


_seen: dict[tuple[str, str], int] = {}


def fall_back(path: str, reason: str) -> None:
    """Record that ``path`` (a key of :data:`PATHS`) fell back because of ``reason``; warn the first time."""
    if path not in PATHS:
        raise KeyError(f"unknown fast path {path!r}; known: {sorted(PATHS)}")
    key = (path, reason)
    _seen[key] = _seen.get(key, 0) + 1
    if _seen[key] == 1:
        warnings.warn(f"lmgym fast path '{path}' is off: {reason}; {PATHS[path]} (same results, slower)",
                      FastPathWarning, stacklevel=3)


def fallbacks() -> dict[tuple[str, str], int]:
    """``{(path, reason): times}`` for every fall-back so far in this process."""
    return dict(_seen)


def forget() -> None:
    """Clear the record (tests), so the next fall-back warns again."""
    _seen.clear()
