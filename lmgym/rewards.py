"""Reward sources: anything that scores a batch of (prompt, completion) pairs."""

from __future__ import annotations

import inspect

import numpy as np

__all__ = ["RewardError", "RewardFunction"]


class RewardError(RuntimeError):
    """A reward callable failed or returned something that is not one finite score per completion."""


class RewardFunction:
    """Calls a user's reward callable on a batch and checks what comes back.

    The callable is called as ``fn(prompts, completions)`` with two lists of
    strings of equal length, and must return one finite number per completion
    (a list, a numpy array or a torch tensor). If its signature accepts
    ``prompt_ids`` / ``completion_ids`` (by name, or through ``**kwargs``), the
    token-id lists are passed too; completions exclude the stop token.
    """

    def __init__(self, fn):
        if isinstance(fn, RewardFunction):
            fn = fn.fn
        if not callable(fn):
            raise TypeError(f"reward_fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # some builtins have no signature
            params = {}
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.extra = [k for k in ("prompt_ids", "completion_ids") if takes_all or k in params]

    def __call__(self, prompts: list[str], completions: list[str], prompt_ids: list[list[int]],
                 completion_ids: list[list[int]]) -> np.ndarray:
        ids = {"prompt_ids": prompt_ids, "completion_ids": completion_ids}
        try:
            raw = self.fn(prompts, completions, **{k: ids[k] for k in self.extra})
        except Exception as err:
            raise RewardError(f"reward function {self.name!r} raised {type(err).__name__}: {err}") from err
        if hasattr(raw, "detach"):
            raw = raw.detach().cpu().numpy()
        try:
            scores = np.asarray(raw, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise RewardError(f"reward function {self.name!r} returned {type(raw).__name__}, which is not a "
                              "sequence of numbers") from err
        if scores.shape[0] != len(completions):
            raise RewardError(f"reward function {self.name!r} returned {scores.shape[0]} scores for "
                              f"{len(completions)} completions; return exactly one per completion")
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            i = int(bad[0])
            raise RewardError(f"reward function {self.name!r} returned {scores[i]} for completion {i} "
                              f"({completions[i][:40]!r}); scores must be finite numbers")
        return scores
