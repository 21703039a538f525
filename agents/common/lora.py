"""LoRA through PEFT: the policy is low-rank adapters on the environment's own reference model.

No second copy of the model is held: :class:`AdapterPolicy` injects PEFT adapters into
the environment's frozen reference model in place and keeps them **disabled** except
while the policy itself runs. Every forward the environment makes (prefill, stepping,
scoring submitted continuations) therefore sees exactly pi_ref, in eval mode; the
agent's sampling and its update (forward and backward, so that gradient checkpointing
recomputes with the adapters on) run inside :meth:`AdapterPolicy.active`. Only the
adapter weights train; they are float32 whatever the reference's dtype.

Needs the optional extra ``pip install lmgym[lora]`` (PEFT).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from lmgym.utils import checks

__all__ = ["AdapterPolicy", "make_peft_config", "base_model"]


def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError as err:
        raise ImportError("LoRA needs PEFT: pip install 'lmgym[lora]' (or pip install peft)") from err


def make_peft_config(peft_config):
    """A PEFT config from a ``PeftConfig`` or a dict of ``LoraConfig`` arguments (task_type CAUSAL_LM by default)."""
    _require_peft()
    from peft import LoraConfig, PeftConfig

    if isinstance(peft_config, PeftConfig):
        return peft_config
    if isinstance(peft_config, dict):
        # the settings whose bad values otherwise surface only as non-finite log-probs, an iteration in
        for key, low in (("lora_alpha", None), ("lora_dropout", 0.0)):
            if key in peft_config and peft_config[key] is not None:
                value = checks.real(peft_config[key], f"peft_config[{key!r}] (--{key.replace('_', '-')})", low=low)
                if key == "lora_dropout" and value >= 1:
                    raise ValueError(f"peft_config['lora_dropout'] must be below 1, got {value}")
        if "r" in peft_config:
            checks.integer(peft_config["r"], "peft_config['r'] (--lora-r)", low=1)
        return LoraConfig(**{"task_type": "CAUSAL_LM", **peft_config})
    raise TypeError(f"peft_config must be a peft.PeftConfig (e.g. LoraConfig(r=16, target_modules='all-linear')) "
                    f"or a dict of LoraConfig arguments, got {type(peft_config).__name__}")


class AdapterPolicy(nn.Module):
    """A trainable policy made of PEFT adapters on a shared, frozen reference model.

    Args:
        reference: the environment's reference model; adapters are injected into it in place.
        peft_config: a ``peft.PeftConfig`` or a dict of ``LoraConfig`` arguments.

    The wrapped ``PeftModel`` is ``self.model``. ``train()`` / ``eval()`` only record the
    mode the policy's own forwards run in; the shared model is otherwise kept in eval
    mode, so the environment's KV-cached forwards are never affected by it (gradient
    checkpointing, for one, switches caching off in train mode).
    """

    def __init__(self, reference: nn.Module, peft_config):
        super().__init__()
        _require_peft()
        from peft import get_peft_model

        config = make_peft_config(peft_config)
        # autocast_adapter_dtype: adapters of a bf16 / fp16 model are created in float32 (master weights).
        self.model = get_peft_model(reference, config, autocast_adapter_dtype=True)
        self._adapters = [p for p in self.model.parameters() if p.requires_grad]
        self._active = False
        self._set_adapters(False)
        self.model.eval()

    def _set_adapters(self, enabled: bool) -> None:
        if enabled:
            self.model.base_model.enable_adapter_layers()
        else:
            self.model.base_model.disable_adapter_layers()
            # PEFT also freezes disabled adapters; they stay the trainable parameters (the optimizer
            # collects them now, and the environment only ever runs the model without gradients).
            for p in self._adapters:
                p.requires_grad_(True)

    @property
    def base(self) -> nn.Module:
        """The model the adapters live in: the environment's reference model itself (what FSDP shards)."""
        return self.model.get_base_model()

    def get_base_model(self) -> nn.Module:
        """:attr:`base`, under PEFT's name for it (how :func:`lmgym.models.hf_api.hf_model` finds the model inside)."""
        return self.base

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter weights (the only parameters that train)."""
        return list(self._adapters)

    @property
    def config(self):
        return self.base.config

    @property
    def generation_config(self):
        return self.base.generation_config

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

    def train(self, mode: bool = True) -> "AdapterPolicy":
        self.training = mode  # applied to the shared model only inside active()
        if self._active:
            self.model.train(mode)
        return self

    @contextlib.contextmanager
    def active(self):
        """Adapters on and the shared model in this policy's mode; back to the plain reference on exit."""
        if self._active:
            yield self
            return
        self._active = True
        self._set_adapters(True)
        self.model.train(self.training)
        try:
            yield self
        finally:
            self._set_adapters(False)
            self.model.eval()
            self._active = False

    def forward(self, *args, **kwargs):
        with self.active():
            return self.model(*args, **kwargs)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter weights only (what training changes)."""
        return {k: v for k, v in self.named_parameters() if v.requires_grad}


def base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model a policy runs: a LoRA policy's base (the model its adapters live in), or the model."""
    return model.base if isinstance(model, AdapterPolicy) else model
