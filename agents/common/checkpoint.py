"""Checkpoints of an agent: written atomically, checked completely before anything is loaded.

A checkpoint is one folder::

    <module>.safetensors   the weights of each trainable module (policy, value_head, ...)
    trainer_state.pt       optimizer and RNG states (tensors only; read with weights_only=True)
    state.json             counters, config, KL coefficient, task signature with a fingerprint of the
                           reference model, the environment's prompt stream, and the run's lineage
    manifest.json          size and sha256 of each of the files above

:func:`save` refuses weights that are not finite, writes into a temporary folder and
renames it into place, so a crash never leaves half a checkpoint. :func:`load` reads
and checks every file (checksums, JSON schema, types and ranges, weights' names,
shapes and finiteness, the optimizer's parameter groups and state, RNG states) and
only then changes the agent; any problem raises :class:`CheckpointError` naming the
file and the field, with the agent left exactly as it was.

What may differ at resume: the agent's hyper-parameters except ``seed`` (the new values
are applied, including the learning rate in the restored optimizer, and recorded in
the run's lineage), the environment's ``kl_coef`` (applied, with GRPO's loss beta and
PPO's controller following it), and the batch layout (``num_envs``, ``group_size``):
the prompt stream then continues from the checkpoint's RNG but the batch of prompts in
flight is drawn anew. The task, the reference model and the algorithm may not differ.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lmgym.agents.common.config import config_problems
from lmgym.utils.checksums import file_sha256
from lmgym.envs.core import MAX_KL_COEF
from lmgym.utils.folders import written_atomically

__all__ = ["CheckpointError", "save", "load", "latest_checkpoint", "reference_fingerprint", "weights_usable",
           "weight_problem",
           "new_run_id", "FORMAT", "remove_interrupted_saves"]

FORMAT = 1
"""Version of the checkpoint layout written by :func:`save`."""

STATE, TRAINER, MANIFEST = "state.json", "trainer_state.pt", "manifest.json"
MAX_COUNTER = 2**62
"""Step, iteration and episode counters above this are not a real run's."""
FIXED_AT_RESUME = ("seed",)
"""Hyper-parameters a resumed run cannot change: the RNG streams restored from the checkpoint came from them."""
LAYOUT_KWARGS = {"num_envs", "group_size", "device", "vectorization_mode", "kl_coef", "dtype", "model", "tokenizer",
                 "reward_fn", "prompts", "trust_remote_code"}
"""Environment arguments left out of the task signature: the batch layout and the device may change at resume,
``kl_coef`` has its own rule, and the model, tokenizer, reward and prompts are compared by content, not by name."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, belongs to another agent, task or reference model, or cannot be written."""


def new_run_id() -> str:
    """A fresh identifier for one agent's run; checkpoints record it, resumed runs record their parent's."""
    return uuid.uuid4().hex[:16]


# ----------------------------------------------------------------------------- weights
def _storage_key(v: torch.Tensor):
    if _is_sharded(v):  # an FSDP shard has no storage of its own: tied parameters are the same object
        return "sharded", id(v)
    return v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)


def untie(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings): keep one copy of each storage."""
    seen, out = set(), {}
    for k, v in weights.items():
        if _storage_key(v) not in seen:
            seen.add(_storage_key(v))
            out[k] = v
    return out


def _tied_duplicates(module: nn.Module) -> set[str]:
    """The state-dict keys that :func:`_untie` leaves out because they share memory with an earlier key."""
    state = module.state_dict(keep_vars=True)
    return set(state) - set(untie({k: v.detach() for k, v in state.items()}))


def weights_usable(tensors) -> bool:
    """True when every floating tensor is finite and their joint L2 norm fits in float32.

    One fused norm over all the tensors and one host sync. Weights whose norm overflows float32
    (some ``|w|`` above about 1e19) are as unusable as nan: every forward pass through them overflows.
    """
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    return not floats or bool(torch.isfinite(torch.nn.utils.get_total_norm(floats, foreach=None)))


def weight_problem(named: dict[str, torch.Tensor]) -> str | None:
    """None when the weights are usable (:func:`weights_usable`), else which tensor is wrong and how."""
    if weights_usable(named.values()):
        return None
    floats = {k: v.detach() for k, v in named.items() if v.is_floating_point() and v.numel()}
    bad = [k for k, v in floats.items() if not bool(torch.isfinite(v).all())]
    if bad:
        return f"{bad[0]} holds nan or inf" + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else "")
    name, largest = max(((k, float(v.abs().max())) for k, v in floats.items()), key=lambda kv: kv[1])
    return f"their norm overflows float32 (largest |w| = {largest:.3g}, in {name})"


def saved_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of a trainable module: its state dict, or for a LoRA policy
    (``trainable_state_dict``) the adapters alone. Its frozen base is the environment's reference,
    which the checkpoint's reference fingerprint pins, so storing it again would only cost disk
    (a 135M model's 540 MB for a few MB of adapters)."""
    own = getattr(module, "trainable_state_dict", None)
    return dict(own()) if own is not None else dict(module.state_dict())


def _module_weights(agent) -> dict[str, dict[str, torch.Tensor]]:
    return {name: untie({k: v.detach() for k, v in saved_state(module).items()})
            for name, module in agent.trainable_modules().items()}


def reference_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's weights rounded to bfloat16, with their names and shapes.

    Rounding first makes the fingerprint the same for a float32 reference on the CPU and its
    bfloat16 copy on a GPU, while any two differently trained or initialised models differ.
    """
    h = hashlib.sha256()
    state = untie({k: v.detach() for k, v in model.state_dict().items()})
    for name in sorted(state):
        t = state[name]
        kind = "float" if t.is_floating_point() else str(t.dtype)
        h.update(f"{name}|{tuple(t.shape)}|{kind};".encode())
        if t.is_floating_point():
            t = t.to(torch.bfloat16)
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- saving
def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def save(agent, path: str | os.PathLike, *, overwrite: bool = False, env: dict | None | bool = False,
         weights: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write ``agent``'s checkpoint to the folder ``path`` atomically (see the module docstring).

    ``env``: the environment snapshot to record, when the caller took it already (under data
    parallelism it gathers every process's prompts, so all of them take it before process 0 writes).
    ``weights`` / ``optimizer_state``: the gathered module weights and optimizer state of a sharded (FSDP)
    agent, in the one-process layout (see :mod:`lmgym.agents.scale.sharding`).

    An existing folder is replaced only with ``overwrite=True``. Weights that are not finite
    are never written: :class:`CheckpointError` names the offending tensor.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True or choose another path")
    modules = _module_weights(agent) if weights is None else weights
    for name, weights in modules.items():
        problem = weight_problem(weights)
        if problem is not None:
            raise CheckpointError(f"refusing to write {path}: the {name} weights are unusable ({problem})")
    with written_atomically(path, overwrite=overwrite) as tmp:
        for name, weights in modules.items():
            save_file({k: v.contiguous().cpu() for k, v in weights.items()}, tmp / f"{name}.safetensors")
        rng = {"torch_cpu": torch.get_rng_state(), "generator": agent.generator.get_state().cpu()}
        if agent.sampling_generator is not agent.generator:  # an asynchronous collector's own (max_lag >= 1)
            rng["sampling_generator"] = agent.sampling_generator.get_state().cpu()
        optimizer = agent.optimizer.state_dict() if optimizer_state is None else optimizer_state
        torch.save({"optimizer": optimizer, "rng": rng}, tmp / TRAINER)
        state = agent.state()
        if env is False:
            env = agent._env_snapshot() if agent._env_started else None
        state["env"] = env
        state["saved_at"] = time.time()
        (tmp / STATE).write_text(json.dumps(state, indent=1, default=_json_default, allow_nan=False))
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"format": FORMAT, "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": file_sha256(tmp / f)}
                                                for f in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return path


_ITER = re.compile(r"^iter-(\d+)(?:-(\d+))?$")


def checkpoint_path(logdir: Path, iteration: int, run_id: str) -> tuple[Path, bool]:
    """Where a run writes its checkpoint of ``iteration`` under ``logdir/checkpoints``, and whether it replaces
    a folder there.

    ``iter-NNNNNN`` unless another run (an earlier run in the same folder, or the run this one
    resumed from) already wrote it: that one is kept and the new one goes alongside as
    ``iter-NNNNNN-2`` (``-3``...). A folder this run wrote itself is replaced. A run is what
    one agent trained since it was built or since its last :func:`load` (``run_id``); state.json
    records the checkpoints it was resumed from under ``resumes``.
    """
    base = logdir / "checkpoints" / f"iter-{iteration:06d}"
    candidate, n = base, 1
    while candidate.exists():
        if _run_id_of(candidate) == run_id:
            return candidate, True
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    if n > 1:
        warnings.warn(f"{base} holds a checkpoint of another run (or of the run this one resumed from); it is kept, "
                      f"and this run's checkpoint is written alongside as {candidate.name}", stacklevel=3)
    return candidate, False


def remove_interrupted_saves(logdir: Path) -> list[Path]:
    """Remove the temporary folders (``checkpoints/.iter-NNNNNN.tmp-*``) of saves a killed process left behind.

    Each may hold a full set of weights. The caller holds the run folder's lock, so no live save is writing
    one. Returns what was removed."""
    folder = Path(logdir) / "checkpoints"
    removed = [p for p in folder.glob(".iter-*.tmp-*") if p.is_dir()] if folder.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _run_id_of(folder: Path) -> str | None:
    try:
        return json.loads((folder / STATE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The newest checkpoint of a run folder (the ``logdir`` of :class:`Agent`, or its ``checkpoints`` folder).

    Newest means saved last (``saved_at`` in its state.json), highest iteration on a tie: a run
    resumed from an earlier checkpoint into the same folder writes lower iterations (alongside
    existing ones, see :func:`checkpoint_path`) that are newer than the first run's last one.
    Raises :class:`CheckpointError` when there is none.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} does not exist" if not run_dir.exists() else f"{run_dir} is not a folder")
    folder = run_dir if run_dir.name == "checkpoints" else run_dir / "checkpoints"
    found = []
    for child in folder.iterdir() if folder.is_dir() else []:
        match = _ITER.match(child.name)
        if match and (child / STATE).is_file():
            try:
                saved_at = float(json.loads((child / STATE).read_text()).get("saved_at", 0.0))
            except (OSError, ValueError, TypeError, AttributeError):
                saved_at = 0.0
            found.append((int(match.group(1)), saved_at, child))
    if not found:
        raise CheckpointError(f"{run_dir} holds no checkpoint (looked for {folder}/iter-*/{STATE})")
    return max(found, key=lambda t: (t[1], t[0]))[2]


# ----------------------------------------------------------------------------- checking
class _Problem(Exception):
    """One thing wrong with one field of one file; turned into a CheckpointError naming both."""


def _int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Problem(f"{what} must be an int, got {value!r}")
    if not 0 <= value <= MAX_COUNTER:
        raise _Problem(f"{what} must lie in [0, 2**62], got {value!r}")
    return value


def _float(value, what: str, *, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        bounds = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise _Problem(f"{what} must be a finite number {bounds}, got {value!r}")
    return float(value)


def _dict(value, what: str, kind: str = "a JSON object") -> dict:
    if not isinstance(value, dict):
        raise _Problem(f"{what} must be {kind}, got {type(value).__name__}")
    return value


def _read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{file} is corrupt or unreadable ({err})") from err


def _check_manifest(path: Path, expected_weights: set[str], hint: str = "") -> None:
    """Every file of the checkpoint is listed in manifest.json with its size and sha256, and matches it.

    ``hint`` explains a different set of modules (e.g. the settings that differ)."""
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST} (the checksums of its files): it was not written by this "
                              "version of lmgym's Agent.save, or it is incomplete")
    manifest = _read_json(file)
    try:
        files = _dict(_dict(manifest, "the manifest").get("files"), "files")
        expected = {STATE, TRAINER} | expected_weights
        listed = set(files)
        present = {p.name for p in path.iterdir()} - {MANIFEST}
        if listed != expected:
            if {STATE, TRAINER} <= listed:
                modules = sorted(f.removesuffix(".safetensors") for f in listed - {STATE, TRAINER})
                raise CheckpointError(f"{path} holds the modules {modules}, this agent has "
                                      f"{sorted(f.removesuffix('.safetensors') for f in expected_weights)}{hint}")
            raise _Problem(f"files lists {sorted(listed)}, a checkpoint of this agent has {sorted(expected)}")
        if present != listed:
            raise _Problem(f"the folder holds files the manifest does not list ({sorted(present - listed)}) or lacks "
                           f"files it lists ({sorted(listed - present)})")
        for name in sorted(listed):
            entry = _dict(files[name], f"files.{name}")
            size, digest = entry.get("bytes"), entry.get("sha256")
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise _Problem(f"files.{name}.sha256 must be a sha256 hex digest, got {digest!r}")
            actual_size = (path / name).stat().st_size
            if actual_size != size:
                raise CheckpointError(f"{path / name} is corrupt: {actual_size} bytes, {MANIFEST} says {size!r}")
            actual = file_sha256(path / name)
            if actual != digest:
                raise CheckpointError(f"{path / name} is corrupt: its sha256 {actual[:12]}... does not match "
                                      f"{MANIFEST} ({digest[:12]}...)")
    except _Problem as err:
        raise CheckpointError(f"{file}: {err}") from None


def task_signature(env, fingerprint: str) -> dict:
    """What a checkpoint must share with the environment it is loaded into."""
    core = env.core
    spec = getattr(env, "spec", None)
    kwargs = {}
    for key, value in sorted((getattr(spec, "kwargs", None) or {}).items()):
        if key in LAYOUT_KWARGS:
            continue
        if isinstance(value, (tuple, list)) and all(isinstance(v, (str, int, float, bool)) for v in value):
            value = list(value)
        if value is None or isinstance(value, (str, int, float, bool, list)):
            kwargs[key] = value
    model = env.reference_model
    return {"spec": getattr(spec, "id", None), "vocab_size": int(core.vocab_size),
            "max_new_tokens": int(core.max_new_tokens), "env_kwargs": kwargs,
            "reference": {"sha256": fingerprint, "model_type": getattr(model.config, "model_type", None),
                          "parameters": sum(p.numel() for p in untie(dict(model.state_dict())).values())}}


def _task_differences(saved: dict, mine: dict) -> list[str]:
    out = []
    for key in ("spec", "vocab_size", "max_new_tokens"):
        if saved.get(key) != mine[key]:
            out.append(f"{key}: {saved.get(key)!r} in the checkpoint, {mine[key]!r} here")
    saved_kwargs, my_kwargs = saved.get("env_kwargs") or {}, mine["env_kwargs"]
    if not isinstance(saved_kwargs, dict):
        saved_kwargs = {}
    for key in sorted(set(saved_kwargs) | set(my_kwargs)):
        a, b = saved_kwargs.get(key, "(default)"), my_kwargs.get(key, "(default)")
        if a != b:
            out.append(f"environment argument {key}: {a!r} in the checkpoint, {b!r} here")
    ref, my_ref = saved.get("reference"), mine["reference"]
    if not isinstance(ref, dict) or ref.get("sha256") != my_ref["sha256"]:
        ref = ref if isinstance(ref, dict) else {}
        arch = [f"{k} {ref.get(k)!r} vs {my_ref[k]!r}" for k in ("model_type", "parameters") if ref.get(k) != my_ref[k]]
        what = ("a different architecture: " + ", ".join(arch)) if arch else \
            f"the same architecture ({my_ref['model_type']}, {my_ref['parameters']} parameters) with different weights"
        out.append(f"reference model: {what} (fingerprint {str(ref.get('sha256'))[:12]}... in the checkpoint, "
                   f"{my_ref['sha256'][:12]}... here)")
    return out


def _check_state(agent, state, path: Path, resume: bool) -> dict:
    """Schema, types and ranges of state.json; returns the checked values (the config converted)."""
    state = _dict(state, "state.json")
    if state.get("format") != FORMAT:
        raise _Problem(f"format must be {FORMAT}, got {state.get('format')!r}")
    if state.get("agent") != agent.name:
        raise CheckpointError(f"{path} holds a {state.get('agent')!r} agent, not {agent.name!r}")
    if not isinstance(state.get("run_id"), str):
        raise _Problem(f"run_id must be a string, got {state.get('run_id')!r}")
    config, problems = config_problems(agent.config_class, _dict(state.get("config"), "config"))
    if problems:
        raise _Problem("config." + "; config.".join(problems))
    out = {"config": config, "run_id": state["run_id"]}
    for key in ("global_step", "iteration", "episodes"):
        if key not in state:
            raise _Problem(f"{key} is missing")
        out[key] = _int(state[key], key)
    if out["iteration"] > out["episodes"]:
        raise _Problem(f"iteration ({out['iteration']}) exceeds episodes ({out['episodes']}): each iteration "
                       "collects at least one episode")
    kl = _dict(state.get("kl_coef"), "kl_coef")
    out["kl_initial"] = _float(kl.get("initial"), "kl_coef.initial", high=MAX_KL_COEF)
    out["kl_current"] = _float(kl.get("current"), "kl_coef.current", high=MAX_KL_COEF)
    out["task"] = _dict(state.get("task"), "task")
    layout = _dict(state.get("layout"), "layout")
    out["layout"] = {k: _int(layout.get(k), f"layout.{k}") for k in ("num_envs", "group_size")}
    extra = _dict(state.get("extra"), "extra")
    try:
        agent.check_extra_state(extra)
    except (ValueError, TypeError, KeyError) as err:
        raise _Problem(f"extra: {err}") from None
    out["extra"] = extra
    resumes = state.get("resumes", [])
    if not isinstance(resumes, list) or not all(isinstance(r, dict) for r in resumes):
        raise _Problem("resumes must be a list of JSON objects")
    out["resumes"] = resumes
    out["env"] = _check_env_snapshot(agent, state.get("env")) if resume else None
    return out


def _check_env_snapshot(agent, env):
    if env is None:
        return None
    env = _dict(env, "env")
    rng = _dict(env.get("rng"), "env.rng")
    bit_generator = type(agent.env.core.rng.bit_generator)
    if rng.get("bit_generator") != bit_generator.__name__:
        raise _Problem(f"env.rng.bit_generator must be {bit_generator.__name__!r}, got {rng.get('bit_generator')!r}")
    try:
        bit_generator().state = rng  # a scratch generator: the environment's own is untouched until loading
    except (ValueError, TypeError, KeyError, OverflowError) as err:
        raise _Problem(f"env.rng is not a valid {bit_generator.__name__} state ({err})") from None
    prompts = env.get("prompts")
    vocab = agent.env.core.vocab_size
    if not isinstance(prompts, list) or not prompts or not all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                              for t in p) for p in prompts):
        raise _Problem(f"env.prompts must be a non-empty list of non-empty lists of token ids in [0, {vocab})")
    longest, limit = max(len(p) for p in prompts), agent.env.max_prompt_tokens
    if longest > limit:
        raise _Problem(f"env.prompts holds a prompt of {longest} tokens; this environment's prompts have at most "
                       f"{limit}")
    return env


def _check_weights(agent, path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each module's safetensors file: the module's names (tied copies may be absent), its shapes, finite."""
    out = {}
    for name, module in agent.trainable_modules().items():
        file = path / f"{name}.safetensors"
        try:
            weights = load_file(file, device="cpu")
        except Exception as err:  # a truncated or foreign file
            raise CheckpointError(f"{file} is corrupt ({err}); the checkpoint cannot be loaded") from err
        own = saved_state(module)
        missing = set(own) - set(weights) - _tied_duplicates(module)
        unexpected = set(weights) - set(own)
        if missing or unexpected:
            raise CheckpointError(f"{file} does not match this agent's {name}: missing {sorted(missing)[:3]}, "
                                  f"unexpected {sorted(unexpected)[:3]}")
        for key, value in weights.items():
            if value.shape != own[key].shape or value.is_floating_point() != own[key].is_floating_point():
                raise CheckpointError(f"{file}: {key} is {tuple(value.shape)} {value.dtype}, this agent's {name} "
                                      f"has {tuple(own[key].shape)} {own[key].dtype}")
        problem = weight_problem(weights)
        if problem is not None:
            raise CheckpointError(f"{file}: the weights are unusable ({problem})")
        out[name] = weights
    return out


def _check_trainer_state(agent, path: Path) -> dict:
    file = path / TRAINER
    try:
        trainer = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{file} is corrupt or unreadable ({err})") from err
    try:
        trainer = _dict(trainer, "the trainer state", "a dict")
        _check_optimizer_state(agent.optimizer, trainer.get("optimizer"))
        rng = _dict(trainer.get("rng"), "rng", "a dict")
        keys = [("torch_cpu", torch.Generator()), ("generator", torch.Generator(device=agent.device))]
        if agent.sampling_generator is not agent.generator and "sampling_generator" in rng:
            keys.append(("sampling_generator", torch.Generator(device=agent.device)))
        for key, scratch in keys:
            value = rng.get(key)
            if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
                raise _Problem(f"rng.{key} must be a uint8 tensor, got {type(value).__name__}")
            try:
                scratch.set_state(value)  # a scratch generator checks the state without touching the agent's
            except (RuntimeError, ValueError, TypeError) as err:
                raise _Problem(f"rng.{key} is not a valid generator state ({err})") from None
    except _Problem as err:
        raise CheckpointError(f"{file}: {err}") from None
    return trainer


def _check_optimizer_state(optimizer: torch.optim.Optimizer, saved) -> None:
    """The saved optimizer state fits this optimizer: groups, their sizes and settings, per-parameter state."""
    saved = _dict(saved, "optimizer", "a dict")
    groups, state = saved.get("param_groups"), saved.get("state")
    mine = optimizer.state_dict()["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(mine):
        raise _Problem(f"optimizer.param_groups must be a list of {len(mine)} groups, got "
                       f"{len(groups) if isinstance(groups, list) else type(groups).__name__}")
    state = _dict(state, "optimizer.state", "a dict")
    shapes = {}
    for i, (group, own, params) in enumerate(zip(groups, mine, optimizer.param_groups)):
        group = _dict(group, f"optimizer.param_groups[{i}]", "a dict")
        missing = sorted(set(own) - set(group))
        if missing:
            raise _Problem(f"optimizer.param_groups[{i}] lacks {missing}")
        ids = group["params"]
        if not isinstance(ids, list) or len(ids) != len(params["params"]):
            raise _Problem(f"optimizer.param_groups[{i}].params must list {len(params['params'])} parameters")
        for key in ("lr", "eps", "weight_decay"):
            _float(group[key], f"optimizer.param_groups[{i}].{key}")
        betas = group.get("betas")
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(isinstance(b, float) and 0 <= b < 1 for b in betas)):
            raise _Problem(f"optimizer.param_groups[{i}].betas must be two numbers in [0, 1), got {betas!r}")
        shapes.update(zip(ids, (p.shape for p in params["params"])))
    if len(shapes) != sum(len(g["params"]) for g in groups):
        raise _Problem("optimizer.param_groups list a parameter id twice")
    for pid, entry in state.items():
        if pid not in shapes:
            raise _Problem(f"optimizer.state has an entry for parameter {pid!r}, which no group lists")
        for key, value in _dict(entry, f"optimizer.state[{pid}]", "a dict").items():
            if not isinstance(value, torch.Tensor):
                raise _Problem(f"optimizer.state[{pid}].{key} must be a tensor, got {type(value).__name__}")
            if value.dim() and value.shape != shapes[pid]:
                raise _Problem(f"optimizer.state[{pid}].{key} is {tuple(value.shape)}, its parameter "
                               f"{tuple(shapes[pid])}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise _Problem(f"optimizer.state[{pid}].{key} holds nan or inf")


# ----------------------------------------------------------------------------- loading
def load(agent, path: str | os.PathLike, *, resume: bool = True):
    """Check the checkpoint at ``path`` completely, then load it into ``agent`` (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a checkpoint folder written by Agent.save "
                              "(a run's are in LOGDIR/checkpoints/iter-NNNNNN)")
    if not (path / STATE).is_file():
        hint = ""
        if path.is_file() and path.parent.joinpath(STATE).is_file():
            hint = f"; {path.name} is a file of the checkpoint {path.parent}: pass that folder"
        elif (path / "checkpoints").is_dir():
            try:
                hint = f"; it looks like a run folder, whose latest checkpoint is {latest_checkpoint(path)}"
            except CheckpointError:
                hint = "; it looks like a run folder, but it holds no checkpoint"
        raise CheckpointError(f"{path} is not an lmgym checkpoint (no {STATE}){hint}")

    # 1. Check everything; nothing of the agent changes until all of it passes.
    raw = _read_json(path / STATE)
    if isinstance(raw, dict) and raw.get("agent") is not None and raw.get("agent") != agent.name:
        raise CheckpointError(f"{path} holds a {raw.get('agent')!r} agent, not {agent.name!r}")
    saved_config = raw.get("config") if isinstance(raw, dict) and isinstance(raw.get("config"), dict) else {}
    differing = [f"{k} {v!r} in the checkpoint, {getattr(agent.config, k)!r} here" for k, v in saved_config.items()
                 if hasattr(agent.config, k) and v != getattr(agent.config, k)]
    _check_manifest(path, {f"{name}.safetensors" for name in agent.trainable_modules()},
                    hint=f" (settings that differ: {'; '.join(differing)})" if differing else "")
    try:
        state = _check_state(agent, raw, path, resume)
    except _Problem as err:
        raise CheckpointError(f"{path / STATE}: {err}") from None
    differences = _task_differences(state["task"], agent.task_signature())
    if differences:
        raise CheckpointError(f"{path} was trained on another task or reference model: " + "; ".join(differences))
    changed = {k: [v, getattr(agent.config, k)] for k, v in state["config"].items()
               if v != getattr(agent.config, k)}
    if resume:
        fixed = {k: v for k, v in changed.items() if k in FIXED_AT_RESUME}
        if fixed:
            raise CheckpointError("; ".join(
                f"{path} continues a run with {k}={old!r}, this agent has {k}={new!r}: the random streams "
                f"restored from the checkpoint come from {k}={old!r}. Resume with {k}={old!r}, or load(path, "
                "resume=False) to start a new run from these weights" for k, (old, new) in fixed.items()))
    weights = _check_weights(agent, path)
    trainer = _check_trainer_state(agent, path) if resume else None

    # 2. Load.
    if resume:
        agent.load_extra_state(state["extra"])
    for name, module in agent.trainable_modules().items():
        # a LoRA policy's stored adapters are whole even when its base is sharded: loaded as they are
        if getattr(agent, "sharded", False) and any(_is_sharded(v) for v in saved_state(module).values()):
            from lmgym.agents.scale.sharding import load_full_weights

            load_full_weights(module, weights[name])  # each process keeps its shard of the full weights
        else:
            module.load_state_dict(weights[name], strict=False)
    if resume:
        _restore_training_state(agent, path, state, trainer, changed)
    # Whatever follows is a new segment of the lineage: its checkpoints never replace the ones it came from.
    agent.run_id = new_run_id()
    agent.last_checkpoint = path
    return agent


def _is_sharded(t: torch.Tensor) -> bool:
    from lmgym.agents.scale.sharding import is_sharded

    return is_sharded(t)


def _restore_training_state(agent, path: Path, state: dict, trainer: dict, changed: dict) -> None:
    optimizer_state = trainer["optimizer"]
    if getattr(agent, "sharded", False):
        from lmgym.agents.scale.sharding import shard_optimizer_state

        optimizer_state = shard_optimizer_state(agent.optimizer, optimizer_state)
    agent.optimizer.load_state_dict(optimizer_state)
    cfg = agent.config
    for group in agent.optimizer.param_groups:
        # The restored groups hold the checkpoint's settings: this agent's hyper-parameters win.
        group["eps"], group["weight_decay"] = cfg.adam_eps, cfg.weight_decay
        if not cfg.anneal_lr:  # an annealed rate is set from learning_rate before every iteration
            group["lr"] = cfg.learning_rate
    torch.set_rng_state(trainer["rng"]["torch_cpu"])
    agent.generator.set_state(trainer["rng"]["generator"])
    if agent.sampling_generator is not agent.generator and "sampling_generator" in trainer["rng"]:
        # (a checkpoint of a synchronous run has none: its resumed asynchronous sampler starts from its seed)
        agent.sampling_generator.set_state(trainer["rng"]["sampling_generator"])
    agent.global_step, agent.iteration, agent.episodes = state["global_step"], state["iteration"], state["episodes"]

    # The environment's beta: the checkpoint's (possibly adapted) value continues the run, unless this
    # environment was made with another kl_coef than the run started with; then the new one applies.
    if agent.initial_kl_coef == state["kl_initial"]:
        agent.env.kl_coef = state["kl_current"]
        agent.initial_kl_coef = state["kl_initial"]
    else:
        changed["env.kl_coef"] = [state["kl_initial"], agent.initial_kl_coef]

    env = state["env"]
    layout = agent.batch_layout()
    if env is not None and state["layout"] == layout and len(env["prompts"]) == layout["num_envs"]:
        agent._env_restore(env)
    elif env is not None:
        # Another batch layout: the prompts in flight cannot be mapped onto the new rows, so the
        # stream continues from the checkpoint's RNG with a freshly drawn batch.
        agent.env.np_random.bit_generator.state = env["rng"]
        agent.env.reset()  # draws the new batch from env.np_random, which becomes the prompt RNG
        agent._env_started = True
        changed["layout"] = [state["layout"], layout]

    agent.resumes = state["resumes"] + [{"checkpoint": str(path), "run_id": state["run_id"],
                                         "iteration": state["iteration"], "changed": changed}]
    if changed:
        warnings.warn(f"resuming {path} with changes, which apply from iteration {state['iteration']}: "
                      + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()), stacklevel=3)

