"""Checking an agent's hyper-parameters: types from the config dataclass, ranges declared next to each field.

A config field states its type and, when it has one, its allowed range in one place::

    @dataclass
    class MyConfig(AgentConfig):
        clip_coef: Annotated[float, Range(gt=0)] = 0.2
        loss_type: Annotated[str, OneOf("grpo", "bnpo")] = "grpo"

:func:`check_config` reads both from the dataclass, so a subclass config is checked
the same way without writing any code. A subclass that re-declares a field only to
change its default (``learning_rate: float = 3e-4``) keeps the range its base class
declared. Every float must be finite unless its range says ``finite=False``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any

from lmgym.agents.common.off_policy import CORRECTIONS

__all__ = ["ConfigError", "Range", "OneOf", "check_config", "config_problems", "AgentConfig"]


class ConfigError(ValueError, TypeError):
    """One or more hyper-parameters have the wrong type or lie outside their range.

    It is both a ``ValueError`` and a ``TypeError``, so callers catching either see it.
    """


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field: ``ge`` / ``gt`` below, ``le`` / ``lt`` above (None: unbounded)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True

    def problem(self, value) -> str | None:
        if self.finite and not math.isfinite(value):
            return f"must be a finite number{self._describe(' ')}, got {value!r}"
        ok = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
              and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
        return None if ok else f"must be{self._describe(' ')}, got {value!r}"

    def _describe(self, lead: str) -> str:
        parts = [f"{op} {bound}" for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if bound is not None]
        return lead + " and ".join(parts) if parts else ""


@dataclass(frozen=True)
class OneOf:
    """The field takes one of a fixed set of values."""

    choices: tuple

    def __init__(self, *choices):
        object.__setattr__(self, "choices", tuple(choices))

    def problem(self, value) -> str | None:
        return None if value in self.choices else f"must be one of {list(self.choices)}, got {value!r}"


def _field_specs(config_class: type) -> dict[str, tuple[Any, list]]:
    """``name -> (type, constraints)`` for every field: the type from the most derived declaration, the
    constraints from the most derived declaration that has any (so re-declaring a default keeps the range)."""
    specs: dict[str, tuple[Any, list]] = {}
    for klass in reversed(config_class.__mro__):
        own = klass.__dict__.get("__annotations__", {})
        if not own or not dataclasses.is_dataclass(klass):
            continue
        try:
            hints = typing.get_type_hints(klass, include_extras=True)
        except (NameError, TypeError):  # an annotation naming something out of reach (e.g. a class local to a function)
            hints = {}
        for name in own:
            hint = hints.get(name, own[name])
            if isinstance(hint, str):
                hint = Any  # unresolvable: the type cannot be checked
            constraints = list(getattr(hint, "__metadata__", ()))
            base_type = typing.get_args(hint)[0] if constraints else hint
            inherited = specs.get(name, (None, []))[1]
            specs[name] = (base_type, constraints or inherited)
    names = {f.name for f in dataclasses.fields(config_class)}
    return {k: v for k, v in specs.items() if k in names}


def _coerce(value, kind) -> tuple[Any, str | None]:
    """``value`` as the declared type (ints for float fields, whole floats for int fields), or a problem.

    Types other than bool, int, float, str, None and ``Literal`` are checked with ``isinstance``
    where that is possible, and otherwise accepted as they are.
    """
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union \
        else (kind,)
    if value is None:
        return (None, None) if type(None) in options or Any in options else (value, "must not be None")
    for option in options:
        origin = typing.get_origin(option)
        if option is Any:
            return value, None
        if origin is typing.Literal:
            if value in typing.get_args(option):
                return value, None
        elif option is bool:
            if isinstance(value, bool):
                return value, None
        elif option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value, None
            if isinstance(value, float) and value.is_integer():
                return int(value), None  # 1e4 from a command line or a JSON file
        elif option is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value), None
        elif isinstance(origin or option, type):
            if isinstance(value, origin or option):
                return value, None
        else:
            return value, None  # a typing construct we cannot check
    names = " or ".join(_type_name(o) for o in options)
    return value, f"must be {'an' if names[0] in 'aeiou' else 'a'} {names}, got {value!r} ({type(value).__name__})"


def _type_name(option) -> str:
    if option is type(None):
        return "None"
    if typing.get_origin(option) is typing.Literal:
        return "value in " + str(list(typing.get_args(option)))
    return getattr(option, "__name__", str(option))


def config_problems(config_class: type, values: dict) -> tuple[dict, list[str]]:
    """Check ``values`` (field -> value) against ``config_class``'s field types and ranges.

    Returns the values converted to the declared types, and one ``"name: problem"`` line per
    invalid field. Fields ``values`` does not mention are not checked; unknown names are problems.
    """
    specs = _field_specs(config_class)
    converted, problems = dict(values), []
    for name, value in values.items():
        if name not in specs:
            problems.append(f"{name}: not a hyper-parameter of {config_class.__name__}")
            continue
        kind, constraints = specs[name]
        value, problem = _coerce(value, kind)
        if problem is None and value is not None and not isinstance(value, bool):
            problem = next((p for c in constraints if (p := c.problem(value)) is not None), None)
        if problem is None and isinstance(value, float) and not constraints and not math.isfinite(value):
            problem = f"must be a finite number, got {value!r}"
        if problem is not None:
            problems.append(f"{name} {problem}")
        converted[name] = value
    return converted, problems


def check_config(config) -> None:
    """Check every field of a config dataclass in place (converting ints to floats where declared);
    raise one :class:`ConfigError` listing every invalid field."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    converted, problems = config_problems(type(config), values)
    if problems:
        raise ConfigError(f"invalid {type(config).__name__}: " + "; ".join(problems))
    for name, value in converted.items():
        setattr(config, name, value)


@dataclass
class AgentConfig:
    """Hyper-parameters every agent has. Algorithms extend this dataclass.

    Each field's type and range (``Annotated[float, Range(gt=0)]``) are checked when an agent
    is built (:mod:`lmgym.agents.common.config`); floats must be finite.
    """

    seed: Annotated[int, Range(ge=0)] = 0
    """seed for sampling, minibatch order and initialisation"""
    learning_rate: Annotated[float, Range(ge=0)] = 1e-4
    """AdamW learning rate"""
    anneal_lr: bool = False
    """decay the learning rate linearly to 0 over the run"""
    weight_decay: Annotated[float, Range(ge=0)] = 0.0
    """AdamW weight decay"""
    adam_eps: Annotated[float, Range(gt=0)] = 1e-8
    """AdamW epsilon"""
    max_grad_norm: Annotated[float, Range(gt=0)] = 1.0
    """clip the global gradient norm to this"""
    update_epochs: Annotated[int, Range(ge=1)] = 1
    """passes over each rollout"""
    num_minibatches: Annotated[int, Range(ge=1)] = 1
    """minibatches per pass (each gets one optimizer step)"""
    gradient_accumulation_steps: Annotated[int, Range(ge=1)] = 1
    """micro-batches per minibatch, to bound memory"""
    temperature: Annotated[float, Range(gt=0)] = 1.0
    """sampling temperature of the policy (> 0)"""
    top_k: Annotated[int, Range(ge=0)] = 0
    """sample among the k most probable tokens only (0: all)"""
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    """sample from the smallest set of most probable tokens reaching this probability, in (0, 1] (1: all)"""
    bf16: bool = True
    """bfloat16 autocast for forward passes on a CUDA device (ignored on the CPU); weights stay float32"""
    rollout_autocast: Annotated[str, OneOf("auto", "off", "bfloat16", "float16")] = "auto"
    """autocast of the rollout's forwards, the policy's sampling and the environment's reference alike (auto: the
    environment's setting, else bfloat16 on CUDA when bf16 is set, else off); bfloat16 speeds up a CPU with
    AVX512-BF16 or AMX"""
    async_collect: bool = False
    """sample the next rollouts while the update runs, in a process or a thread (lmgym.agents.common.collector)"""
    max_lag: Annotated[int, Range(ge=0)] = 1
    """async_collect: each rollout is sampled with the weights of exactly this many updates before the one that trains
    on it (0: the synchronous loop, identical results)"""
    async_backend: Annotated[str, OneOf("auto", "process", "thread")] = "auto"
    """async_collect: sample in a forked process (CPU: Python-bound small models run truly in parallel) or a thread of
    this one (CUDA, large models); auto: process on the CPU below 20M policy parameters, thread otherwise"""
    off_policy_correction: Annotated[str, OneOf(*CORRECTIONS)] = "none"
    """weighting of tokens another distribution sampled (a stale policy, another precision): none, tis_token,
    tis_sequence, mis_token, mis_sequence, decoupled (lmgym.agents.common.off_policy)"""
    is_cap: Annotated[float, Range(ge=1)] = 2.0
    """C: the truncation of the tis_* importance weights"""
    is_band_low: Annotated[float, Range(gt=0, le=1)] = 0.5
    """mis_*: tokens (sequences) whose importance ratio is below this are dropped"""
    is_band_high: Annotated[float, Range(ge=1)] = 2.0
    """mis_*: tokens (sequences) whose importance ratio is above this are dropped"""
    disable_dropout: bool = True
    """set every dropout probability of the trained model(s) to 0, so rollouts, ratios and values agree"""
    logprob_chunk_size: Annotated[int, Range(ge=0)] = 0
    """> 0: compute update log-probs this many positions at a time, recomputed in backward (saves memory)"""
    gradient_checkpointing: bool = False
    """recompute the policy's activations in backward instead of storing them (saves memory, costs time)"""
    cpu_mmap_threshold_mib: Annotated[float, Range(ge=0)] = 1.0
    """CPU only: during updates, allocations of at least this size are freed back to the OS at once, so peak RSS
    follows the live tensors (glibc; process-wide; lmgym.utils.heap); 0 leaves the allocator alone"""
    checkpoint_every: Annotated[int, Range(ge=0)] = 0
    """write a checkpoint every this many iterations (0: only at the end of learn)"""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
