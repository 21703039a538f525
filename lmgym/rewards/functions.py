"""Reward sources: anything that scores a batch of (prompt, completion) pairs."""

from __future__ import annotations

import inspect

import numpy as np

__all__ = ["RewardError", "RewardFunction", "MAX_ABS_SCORE"]

MAX_ABS_SCORE = float(np.finfo(np.float32).max)
"""Rewards are float32 tensors: a larger score would become inf."""


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
        # the callable gets copies: one that edits its arguments (clears a list, say) cannot change what the
        # environment scores, nor how many scores it expects
        n, texts = len(completions), list(completions)
        ids = {"prompt_ids": prompt_ids, "completion_ids": completion_ids}
        try:
            raw = self.fn(list(prompts), list(completions), **{k: [list(x) for x in ids[k]] for k in self.extra})
        except Exception as err:
            raise RewardError(f"reward function {self.name!r} raised {type(err).__name__}: {err}") from err
        if hasattr(raw, "detach"):
            # numpy has no bfloat16 (and float16 loses nothing by widening): float64 first
            raw = raw.detach().cpu().double().numpy() if raw.is_floating_point() else raw.detach().cpu().numpy()
        if raw is None:
            raise RewardError(f"reward function {self.name!r} returned None; return one number per completion "
                              "(a list, numpy array or tensor): is a `return` missing?")
        if isinstance(raw, (str, bytes)):
            raise RewardError(f"reward function {self.name!r} returned a string, not one number per completion")
        # numpy reads None as NaN: look for it first, so the message says what the callable did
        items = raw if isinstance(raw, (list, tuple)) else \
            raw.reshape(-1) if isinstance(raw, np.ndarray) and raw.dtype == object else ()
        missing = [i for i, v in enumerate(items) if v is None]
        if missing:
            raise RewardError(f"reward function {self.name!r} returned None for completion {missing[0]}; return "
                              "a number for every completion")
        try:
            scores = np.asarray(raw, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise RewardError(f"reward function {self.name!r} returned {type(raw).__name__}, which is not a "
                              "sequence of numbers") from err
        if scores.shape[0] != n:
            raise RewardError(f"reward function {self.name!r} returned {scores.shape[0]} scores for "
                              f"{n} completions; return exactly one per completion")
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            i = int(bad[0])
            raise RewardError(f"reward function {self.name!r} returned {scores[i]} for completion {i} "
                              f"({texts[i][:40]!r}); scores must be finite numbers")
        big = np.flatnonzero(np.abs(scores) > MAX_ABS_SCORE)
        if big.size:
            i = int(big[0])
            raise RewardError(f"reward function {self.name!r} returned {scores[i]:g} for completion {i}, beyond "
                              f"float32's range (|score| <= {MAX_ABS_SCORE:.3g}) in which rewards are kept; "
                              "rescale the reward")
        return scores
