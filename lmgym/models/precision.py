"""The precision rollouts are computed in, shared by the sampler and the reference so their KL is exact.

The environment's KL term is ``log pi(a|s) - log pi_ref(a|s)`` for the distribution that actually
sampled ``a``. At iteration 0 the policy *is* the reference, and the term must be 0 up to float
rounding. It is not when the two are computed in different precisions: a float32 policy (agents keep
float32 master weights) against a reference loaded in bfloat16 gives 2e-3 nats per token on
average (``benchmarks/iteration0_kl.py``), the gap between computing the same weights twice.

A :class:`RolloutPrecision` is the one transform both sides apply to their forwards:

- ``weights``: the dtype of the weights the forward runs with. The reference's is the dtype it
  was loaded in; a sampler whose master weights are float32 samples with a *compute copy* of them
  cast to that dtype (:func:`compute_copy`, refreshed from the master weights before each rollout),
  so at iteration 0 both run the same weights in the same kernels' precision.
- ``autocast``: ``torch.autocast`` to this dtype around every rollout forward, the sampler's and the
  reference's (bfloat16 on a CPU with AVX512-BF16 or AMX, or on a GPU), or None.

What remains is the rounding of that precision between kernels of different shapes (one token at a time
against a whole continuation): about 1e-8 per token on the diagnostic tasks' tiny models, 3e-6 on SmolLM2 in
float32 and 3e-2 on SmolLM2 in bfloat16 (docs/off_policy.md, ``benchmarks/bf16_rollout.py``). The update's forward runs in the trainer's
precision (float32, or the agent's ``bf16`` autocast on CUDA), so its pi_old differs from the
sampler's log-probs by the precision gap; ``lmgym.agents.common.off_policy`` says how agents recompute
pi_old and weigh that mismatch.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

__all__ = ["RolloutPrecision", "compute_copy", "refresh_compute_copy", "AUTOCAST_DTYPES"]

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RolloutPrecision:
    """The precision transform of a rollout's forwards: ``weights`` dtype, and ``autocast`` dtype or None."""

    weights: torch.dtype = torch.float32
    autocast: torch.dtype | None = None

    def context(self, device: torch.device | str):
        """``torch.autocast`` to :attr:`autocast` on ``device`` (a device or its type; a no-op when None)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.autocast)



def as_autocast_dtype(value) -> torch.dtype | None:
    """None, or one of :data:`AUTOCAST_DTYPES` given by name or as a ``torch.dtype``."""
    if value is None or value in ("off", "none", "float32"):
        return None
    if isinstance(value, torch.dtype) and value in AUTOCAST_DTYPES.values():
        return value
    if isinstance(value, str) and value in AUTOCAST_DTYPES:
        return AUTOCAST_DTYPES[value]
    raise ValueError(f"autocast must be None, 'bfloat16' or 'float16', got {value!r}")


def _floating_dtype(module: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def compute_copy(module: torch.nn.Module, dtype: torch.dtype, *, always: bool = False) -> torch.nn.Module:
    """``module`` itself when its weights are already ``dtype`` (unless ``always``); else a frozen eval-mode copy
    cast to ``dtype``."""
    if _floating_dtype(module) == dtype and not always:
        return module
    clone = copy.deepcopy(module).to(dtype).eval().requires_grad_(False)
    return clone


@torch.no_grad()
def refresh_compute_copy(clone: torch.nn.Module, master: torch.nn.Module) -> None:
    """Copy ``master``'s current weights (and buffers) into its compute copy, cast to the copy's dtype."""
    if clone is master:
        return
    for dst, src in zip(clone.parameters(), master.parameters()):
        dst.copy_(src)
    for dst, src in zip(clone.buffers(), master.buffers()):
        dst.copy_(src)
