"""Turning a (possibly half-precision) reference model into the policy an agent trains.

Two things go wrong when a pretrained model is trained as loaded:

- **Precision.** A model given by path loads in bfloat16 on a GPU (``dtype="auto"``). AdamW
  steps of a size a fine-tuning learning rate gives (1e-5 relative to weights of ~1e-2)
  fall below bfloat16's resolution and are rounded away, so almost no weight moves.
  The trained policy (and any value model) therefore keeps **float32 master weights**;
  the forwards still run in bfloat16 under autocast on a GPU (``AgentConfig.bf16``).
- **Dropout.** Pretrained configs often carry dropout (GPT-2: 0.1). Rollouts are sampled
  in eval mode, so with dropout on in the update forward the first minibatch's ratio
  pi/pi_old is not 1 even at learning rate 0: the clipped surrogate clips noise. As
  TRL's ``disable_dropout`` does, every dropout probability is set to 0, so rollouts,
  ratios, values and the reference all see the same deterministic network. The module
  stays in train mode (gradient checkpointing, for one, runs only in train mode).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from lmgym.models.hf_api import enable_activation_checkpointing

__all__ = ["build_policy", "trainable_copy", "to_float32_master_weights", "disable_dropout",
           "enable_gradient_checkpointing"]

_HALF = (torch.float16, torch.bfloat16)


def to_float32_master_weights(module: nn.Module) -> nn.Module:
    """Cast the module's half-precision floating-point parameters and buffers to float32, in place."""
    if any(t.dtype in _HALF for t in list(module.parameters()) + list(module.buffers())):
        module.float()  # casts floating-point tensors only; integer buffers are kept
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "dtype"):
            config.dtype = torch.float32  # what save_pretrained then records
    return module


def disable_dropout(module: nn.Module) -> nn.Module:
    """Set every dropout probability in ``module`` to 0, in place.

    Covers ``nn.Dropout`` modules (GPT-2's ``attn_dropout`` and ``resid_dropout``...) and the
    float rates that attention layers keep as attributes and pass to a functional dropout
    in train mode (Llama's ``attention_dropout``). The model config is left as it was, so
    an exported model keeps its original dropout settings for whoever fine-tunes it next.
    """
    for sub in module.modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd):
            sub.p = 0.0
        for name, value in vars(sub).items():
            if "dropout" in name and isinstance(value, float):
                setattr(sub, name, 0.0)
    return module


def trainable_copy(model: nn.Module, device: torch.device, *, copy_model: bool = True,
                   no_dropout: bool = True) -> nn.Module:
    """The trainable form of ``model``: a float32, gradient-enabled module in train mode on ``device``.

    Args:
        model: the starting weights (the environment's reference model, or a user's policy).
        device: where the policy trains.
        copy_model: deep-copy ``model`` first (the reference must stay untouched); ``False``
            converts the given module in place.
        no_dropout: set every dropout probability to 0 (see :func:`disable_dropout`).
    """
    policy = copy.deepcopy(model) if copy_model else model
    policy = to_float32_master_weights(policy.to(device))
    if no_dropout:
        disable_dropout(policy)
    policy.requires_grad_(True)
    return policy.train()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (Hugging Face's non-reentrant gradient checkpointing)."""
    from lmgym.agents.common.lora import base_model

    base = base_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing; "
                         "set gradient_checkpointing=False")
    enable_activation_checkpointing(base)


def build_policy(env, config, device: torch.device, *, policy=None, peft_config=None) -> nn.Module:
    """The module an agent trains, from its config (``disable_dropout``, ``gradient_checkpointing``,
    ``logprob_chunk_size``): a float32 copy of the env's reference model, the user's ``policy``, or
    LoRA adapters on the reference itself when ``peft_config`` is given."""
    if config.logprob_chunk_size < 0:
        raise ValueError(f"logprob_chunk_size must be >= 0 (0: off), got {config.logprob_chunk_size}")
    if peft_config is not None:
        if policy is not None:
            raise ValueError("give either policy= (a model to train in full) or peft_config= (LoRA adapters on the "
                             "environment's reference model), not both")
        from lmgym.agents.common.lora import AdapterPolicy

        module = AdapterPolicy(env.reference_model, peft_config)
        if config.disable_dropout:
            disable_dropout(module)  # the adapters' own lora_dropout too
        module.train()
    else:
        module = trainable_copy(policy if policy is not None else env.reference_model, device,
                                copy_model=policy is None, no_dropout=config.disable_dropout)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(module)
    if config.logprob_chunk_size:
        from lmgym.agents.common.logprobs import check_plain_output_head

        check_plain_output_head(module)
    return module


class ValueHead(nn.Module):
    """A scalar head on a hidden state: V(s_t) read at the position that predicts token t."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)
