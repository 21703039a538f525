"""Checking what an agent hands the environment: token ids and log-probabilities, before they are believed.

Every check names what was wrong and what to pass instead. On a GPU the value checks run on the
device (``torch._assert_async``), so the environment never waits on the host for them.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

__all__ = ["LOGPROB_ROUNDING", "as_token_tensor", "check_token_range", "as_logprobs"]

LOGPROB_ROUNDING = 1e-5
"""How far above 0 a handed-over log-prob may lie (float rounding of a near-certain token)."""


def as_token_tensor(values, shape: tuple[int, ...], what: str, vocab_size: int, device) -> torch.Tensor:
    """``values`` (tensor, numpy array or list) as a long tensor of ``shape`` on ``device``, every id a token."""
    if isinstance(values, torch.Tensor):
        t = values
    else:
        arr = np.asarray(values)
        if arr.dtype == object and arr.size and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                                    for v in arr.flat):
            pass  # Python ints beyond int64: the range check below names them
        elif np.issubdtype(arr.dtype, np.floating) and arr.size and np.isfinite(arr).all() \
                and np.all(arr == np.round(arr)):
            pass  # SB3 and others hand over whole-number floats
        elif arr.dtype == object or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{what} must be integer token ids, got {arr.dtype} values {arr.ravel()[:4]}")
        if tuple(arr.shape) != shape:
            raise ValueError(f"{what} must have shape {shape}, got {tuple(arr.shape)}")
        check_token_range(arr, what, vocab_size)  # before the cast to int64, which would wrap 2**63 around
        t = torch.as_tensor(arr.astype(np.int64))
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{what} must be an integer tensor of token ids, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{what} must have shape {shape}, got {tuple(t.shape)}")
    t = t.to(device, torch.long)
    if t.device.type == "cpu":
        check_token_range(t, what, vocab_size)
    else:  # checked on the device, without waiting for it
        torch._assert_async(((t >= 0) & (t < vocab_size)).all(), f"{what} contain a token id outside [0, {vocab_size})")
    return t


def check_token_range(values, what: str, vocab_size: int) -> None:
    """Raise naming the first token id outside ``[0, vocab_size)`` (numpy array, object array or tensor)."""
    flat = values.reshape(-1)
    if isinstance(flat, np.ndarray) and flat.dtype == object:  # Python ints of any size
        outside = [v for v in flat if not 0 <= v < vocab_size]
    else:
        outside = flat[(flat < 0) | (flat >= vocab_size)]
    if len(outside):
        bad = outside[0].item() if hasattr(outside[0], "item") else outside[0]
        raise ValueError(f"{what} contain token id {bad}, outside the action space [0, {vocab_size})")


def as_logprobs(values, shape: tuple[int, ...], inside: torch.Tensor, device, what: str = "logprobs"):
    """Log-probs as a float32 tensor, checked where ``inside`` (the steps that count) and 0 elsewhere.

    A log-probability is finite and <= 0; a NaN would turn the rewards into NaN, and a
    positive value means the caller handed over something else (a probability, a logit).
    ``LOGPROB_ROUNDING`` above 0 is let through: float rounding of a near-certain token.
    """
    if not isinstance(values, torch.Tensor):
        arr = np.asarray(values)
        if arr.dtype.kind not in "biuf" or arr.dtype == bool:
            raise TypeError(f"{what} must be numbers (log pi of each action), got {arr.dtype} values "
                            f"{arr.ravel()[:4]}")
        values = arr
    elif values.dtype == torch.bool or values.is_complex():
        raise TypeError(f"{what} must be real numbers (log pi of each action), got a {values.dtype} tensor")
    t = torch.as_tensor(values, dtype=torch.float32, device=device)
    if tuple(t.shape) != shape:
        raise ValueError(f"{what} must have shape {shape} (one per action), got {tuple(t.shape)}")
    ok = torch.isfinite(t) & (t <= LOGPROB_ROUNDING) | ~inside
    if t.device.type == "cpu":
        if not bool(ok.all()):
            bad = t[~ok][0].item()
            raise ValueError(f"{what} contain {bad}, which is not a log-probability: pass finite log pi(a|s) "
                             "values <= 0 (log_softmax of the policy's logits, gathered at the actions)")
    else:  # checked on the device, without waiting for it
        torch._assert_async(ok.all(), f"{what} must be finite log-probabilities <= 0")
    return torch.where(inside, t, torch.zeros_like(t))
