"""Checking user-given scalar arguments, with one clear error line naming the argument and the fix.

Python's truthiness makes ``"no"`` a true value and ``True`` an int equal to 1, so a
switch or a count given the wrong type would otherwise be taken silently.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["flag", "integer", "real", "budget"]


def flag(value, name: str) -> bool:
    """A switch: ``True`` or ``False`` (numpy bools too), never a string or a number."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def _scalar(value):
    """Unwrap 0-d numpy arrays and 0-d torch tensors to a scalar."""
    if hasattr(value, "detach") and getattr(value, "ndim", None) == 0:
        return value.detach().cpu().item()
    if isinstance(value, np.ndarray) and value.shape == ():
        return value[()]
    return value


def integer(value, name: str, *, low: int | None = None) -> int:
    """A whole number (Python or numpy int, not a bool) of at least ``low``."""
    value = _scalar(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def budget(steps, seconds) -> tuple[int | None, float | None]:
    """A training budget: ``steps`` (environment steps, an int >= 1) and/or ``seconds`` (> 0), at least one given."""
    if steps is None and seconds is None:
        raise ValueError("give a budget: steps, seconds, or both")
    if steps is not None:
        steps = integer(steps, "steps", low=1)
    if seconds is not None:
        seconds = real(seconds, "seconds", low=0.0)
        if seconds == 0:
            raise ValueError("seconds must be > 0 (a wall-clock budget), got 0")
    return steps, seconds


def real(value, name: str, *, low: float | None = None, high: float | None = None) -> float:
    """A finite real number (Python, numpy or 0-d torch scalar, not a bool) in ``[low, high]``."""
    value = _scalar(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if low is not None and high is not None else \
            f">= {low}" if low is not None else f"<= {high}" if high is not None else ""
        raise ValueError(f"{name} must be a finite number {bounds}, got {value!r}".replace("  ", " "))
    return value
