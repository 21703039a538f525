"""Checking the keyword arguments a task factory receives, with a suggestion for typos."""

from __future__ import annotations

import difflib
import inspect


def constructor_options(cls) -> set[str]:
    """The keyword arguments of an environment class's constructor."""
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def check_options(kwargs: dict, allowed: set[str], task: str, fixed: set[str] = frozenset(),
                  fixed_hint: str = "") -> None:
    """Raise a TypeError naming the first unknown (or fixed) argument, suggesting the closest allowed one."""
    for key in kwargs:
        if key in fixed:
            raise TypeError(f"{key!r} is fixed by {task}{fixed_hint}")
        if key == "max_episode_steps" and "max_new_tokens" in allowed:
            raise TypeError("max_episode_steps would cut episodes before their score; set the horizon with "
                            "max_new_tokens instead")
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {sorted(allowed)}"
            raise TypeError(f"unknown argument {key!r} for {task}{hint}")
