"""Sharded policies: torch FSDP2 (``fully_shard``) across the processes of a launch, for models too big for one device.

Switched on by the launcher's configuration: ``accelerate launch`` with an FSDP config (it exports
``ACCELERATE_USE_FSDP=true``), or ``LMGYM_FSDP=1`` under ``torchrun``. Then each decoder layer of the
policy (the classes the model names in ``_no_split_modules``) and the model itself become FSDP units:
every process keeps 1/world of each weight, gradient and AdamW moment; forwards all-gather a layer at
a time and backwards reduce-scatter its gradient (FSDP averages it over the processes itself, so
:meth:`lmgym.agents.scale.distributed.DataParallel.average_gradients` leaves sharded parameters alone).

Checkpoints stay the one-process format: the full weights and the full AdamW moments are gathered
for process 0 to write, and a checkpoint is sharded again when loaded, so a run can move between
one process, data parallelism and FSDP. The environment's reference model of a full fine-tuning run
is not sharded (it only runs forward passes, under ``torch.no_grad``).

**LoRA.** A LoRA policy (:mod:`lmgym.agents.common.lora`) is adapters injected into the environment's
reference model, so its base *is* the reference: that model is what gets sharded, and the
environment's own forwards (pi_ref, adapters off) all-gather its layers like the policy's do. The
adapters are left out of FSDP (``ignored_params``): every process holds them whole, their
gradients are averaged like plain data parallelism's, and a checkpoint writes them as they are
(it holds the adapters only, see :func:`lmgym.agents.common.checkpoint.saved_state`): the frozen base is
never gathered. Adapters are a few MB against the base's GB, so keeping them whole costs little
and spares a gather per checkpoint.

**Every forward of a sharded model is a collective**: all processes must run the same forwards in
the same order, or they wait on each other forever. lmgym's agents keep them in lockstep: sampling
takes as many decode steps on every process as the longest row of the whole batch needs (see
:func:`lmgym.models.sample_continuations`'s ``all_finished``); the environment's submission path runs
the same reference forwards everywhere (one prefill per restart of all rows, one scoring forward over
the ``T`` sampled columns, ``T`` being equal on every process); the update forwards equal parts of
each micro-batch. The environment's per-token ``step`` is *not* lockstep (rows restart when their
own episode ends), so an agent that steps token by token (SB3) cannot run with a sharded reference:
``step`` refuses it in one line.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from lmgym.models import is_sharded

__all__ = ["fsdp_requested", "shard_policy", "is_sharded", "full_weights", "full_weights_everywhere",
           "load_full_weights", "full_optimizer_state", "shard_optimizer_state", "clip_grad_norm"]


def fsdp_requested() -> bool:
    """True when the launch asks for FSDP (accelerate's FSDP config, or ``LMGYM_FSDP=1``)."""
    flags = (os.environ.get("LMGYM_FSDP", ""), os.environ.get("ACCELERATE_USE_FSDP", ""))
    return any(v.strip().lower() in ("1", "true", "yes") for v in flags)


def shard_policy(policy: nn.Module) -> nn.Module:
    """Shard ``policy`` in place with ``fully_shard``: one unit per decoder layer, plus the rest at the root.

    A LoRA policy's base model (the environment's reference) is sharded instead, with its adapters left
    whole on every process (see the module docstring)."""
    from torch.distributed.fsdp import fully_shard

    from lmgym.agents.common.lora import AdapterPolicy

    if isinstance(policy, AdapterPolicy):
        model, whole = policy.base, set(policy.adapter_parameters())
    else:
        model, whole = policy, set()
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard (it names none in "
                         "_no_split_modules); train it without FSDP")
    # every call names the adapters: each fully_shard takes the parameters of its subtree not yet managed
    for layer in layers:
        fully_shard(layer, ignored_params=whole or None)
    fully_shard(model, ignored_params=whole or None)
    return policy


def full_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's full state dict on the CPU of process 0 (empty elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied weights (input and output embeddings) come back as separate copies: keep the first name only,
    # as the one-process checkpoint does.
    seen, tied = set(), set()
    for key, value in module.state_dict(keep_vars=True).items():
        if id(value) in seen:
            tied.add(key)
        seen.add(id(value))
    return {k: v for k, v in full.items() if k not in tied}


def full_weights_everywhere(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's full state dict on every process, on its device (a collective: every process calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))


def load_full_weights(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load full (unsharded) weights, which every process read, into a sharded module: each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded moment gathered to a full CPU tensor (a collective), so the
    checkpoint has the layout a one-process run writes."""
    state = optimizer.state_dict()
    # state_dict() hands out the optimizer's live per-parameter dicts: build new ones, never replace its moments
    state["state"] = {index: {key: value.full_tensor().cpu() if isinstance(value, torch.Tensor) and is_sharded(value)
                              else value for key, value in per_param.items()}
                      for index, per_param in state["state"].items()}
    return state


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A one-process optimizer state dict with each moment of a sharded parameter cut to this process's shard."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, per_param in state["state"].items():
        p = params[int(index)]
        if not is_sharded(p):
            continue
        for key, value in list(per_param.items()):
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(p.shape):
                # every process read the same full tensor: each keeps its own shard, no communication
                per_param[key] = distribute_tensor(value.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                                   src_data_rank=None)
    return state


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over a mix of sharded and plain parameters: the global norm of all gradients."""
    sharded = [p.grad for p in params if p.grad is not None and is_sharded(p.grad)]
    plain = [p.grad for p in params if p.grad is not None and not is_sharded(p.grad)]
    squares = torch.zeros((), dtype=torch.float32)
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded)
        squares = squares + norm.full_tensor().float().cpu() ** 2
    if plain:
        squares = squares + torch.nn.utils.get_total_norm(plain).float().cpu() ** 2
    total = squares.sqrt()
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in sharded + plain:
        g.mul_(scale.to(g.device))
    return total
