"""Export a trained policy as a standard Hugging Face model folder.

The folder holds the policy's weights (safetensors) and config, the tokenizer, and a
``generation_config.json`` whose ``eos_token_id`` lists the environment's stop tokens
and whose sampling settings (temperature, top-k, top-p) are those the agent trained
with, so ``AutoModelForCausalLM.from_pretrained`` and
``transformers.pipeline("text-generation")`` load it and generate as the policy did.
A small ``lmgym_export.json`` records where it came from.

Two entry points: :func:`save_pretrained` for a live agent (``agent.save_pretrained(dir)``),
and :func:`export_checkpoint` for a checkpoint or a run folder on disk (``lmgym export``).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from lmgym.utils.folders import written_atomically

__all__ = ["save_pretrained", "export_checkpoint", "find_checkpoint", "RUN_FILE", "ExportError"]

RUN_FILE = "lmgym_run.json"
"""Written into a run's log folder by ``lmgym train --model``: what is needed to rebuild its environment."""


class ExportError(ValueError):
    """A checkpoint or run folder that cannot be exported, or an output folder that is in the way."""


def _prepare_out(directory: Path, overwrite: bool) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise FileExistsError(f"{directory} already exists and is not empty; pass overwrite=True (--overwrite) "
                              "or choose another folder")


def generation_config_for(agent):
    """The policy's generation config with the environment's stop tokens and the agent's sampling settings."""
    from transformers import GenerationConfig

    base = getattr(agent.policy, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    stop = list(agent.env.stop_token_ids)
    config.eos_token_id = stop[0] if len(stop) == 1 else stop
    config.pad_token_id = int(agent.env.tokenizer.pad_token_id)
    config.max_new_tokens = int(agent.env.max_new_tokens)
    config.max_length = None
    s = agent.sampling
    config.do_sample = True
    config.temperature, config.top_k, config.top_p = float(s.temperature), int(s.top_k), float(s.top_p)
    return config


def save_pretrained(agent, directory: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                    merge: bool = True, overwrite: bool = False) -> Path:
    """Write ``agent``'s policy as a Hugging Face model folder (see the module docstring).

    Args:
        agent: a trained :class:`lmgym.agents.Agent`.
        directory: the folder to write; written atomically, never over a non-empty folder
            unless ``overwrite=True``.
        dtype: cast the weights on export (e.g. ``"bfloat16"`` halves the size); default:
            the policy's float32 master weights.
        merge: for a LoRA policy, write the reference with the adapters merged into it (a
            plain model folder); ``False`` writes the adapters alone (``adapter_config.json``
            and ``adapter_model.safetensors``, for ``peft.PeftModel.from_pretrained``).

    Returns:
        the folder's path.
    """
    from lmgym.models import is_sharded_module, resolve_dtype

    if is_sharded_module(agent.policy):
        raise ExportError("the policy is sharded over processes by FSDP, so no process holds it whole; export the "
                          "checkpoint the run writes instead: lmgym export CHECKPOINT_OR_RUN DIR")
    directory = Path(directory)
    _prepare_out(directory, overwrite)
    model = agent.policy
    lora = hasattr(model, "active")
    if not lora and not merge:
        raise ExportError("adapters alone (--adapter-only, merge=False) need a LoRA run; this run trained the whole "
                          "model: export it without --adapter-only")
    if lora and dtype is not None:
        raise ValueError("dtype applies to full models; a LoRA export keeps the adapters' and reference's dtypes")
    if lora and merge:
        # A merged copy: merging into the live model would change the shared reference.
        model = copy.deepcopy(model.model).merge_and_unload()
    elif lora:
        model = model.model
    if dtype is not None:
        model = copy.deepcopy(model).to(resolve_dtype(dtype, agent.device))
        model.config.dtype = resolve_dtype(dtype, agent.device)
    # the old folder stays until the new one is complete (removing it first lost both on a crash)
    with written_atomically(directory, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        agent.env.tokenizer.save_pretrained(tmp)
        generation_config_for(agent).save_pretrained(tmp)
        spec = getattr(getattr(agent.env, "spec", None), "id", None)
        (tmp / "lmgym_export.json").write_text(json.dumps(
            {"agent": agent.name, "iteration": agent.iteration, "global_step": agent.global_step, "task": spec,
             "stop_token_ids": list(agent.env.stop_token_ids),
             "contents": "lora adapters" if lora and not merge else "model"}, indent=1))
    return directory


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder ``path`` names: itself, or a run folder's newest ``checkpoints/iter-*``."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist; pass a checkpoint folder or a run's log folder")
    if (path / "state.json").is_file():
        return path
    from lmgym.agents.common.checkpoint import CheckpointError, latest_checkpoint

    try:
        return latest_checkpoint(path)
    except CheckpointError:
        raise ExportError(f"{path} is neither an lmgym checkpoint (no state.json) nor a run folder with "
                          "checkpoints/iter-*; pass the folder a training run wrote") from None


def _run_info(checkpoint: Path) -> dict | None:
    """The run file of the run the checkpoint belongs to (``RUN/checkpoints/iter-N`` -> ``RUN/lmgym_run.json``)."""
    for folder in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        file = folder / RUN_FILE
        if file.is_file():
            try:
                info = json.loads(file.read_text())
            except (OSError, ValueError) as err:
                raise ExportError(f"{file} cannot be read ({err}); it is the run file `lmgym train --model` writes: "
                                  "restore it, or delete it and pass the base model (--model PATH)") from err
            if not isinstance(info, dict):
                raise ExportError(f"{file} holds a {type(info).__name__}, not the JSON object `lmgym train --model` "
                                  "writes; restore it, or delete it and pass the base model (--model PATH)")
            return info
    return None


def _no_score(prompts, completions):
    return [0.0] * len(completions)


def rebuild_agent(checkpoint: Path, *, model=None, device="cpu"):
    """An agent like the one that wrote ``checkpoint``, with the checkpoint's weights loaded (no optimizer state).

    The environment is rebuilt with the arguments the checkpoint's task signature recorded,
    from the task it names (a built-in task) or, for a run of your own model, from the model
    the run file ``lmgym train --model`` wrote names (or ``model``): only its model,
    tokenizer and stop tokens matter for an export, so it gets a placeholder reward and prompt.
    """
    import gymnasium as gym

    import lmgym  # noqa: F401  registers the tasks
    from lmgym.agents import AGENTS

    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{checkpoint / 'state.json'} cannot be read ({err})") from err
    name, task = state.get("agent"), state.get("task") or {}
    if name not in AGENTS:
        raise ExportError(f"{checkpoint} holds a {name!r} agent; only lmgym's own agents ({', '.join(AGENTS)}) "
                          "can be exported this way")
    agent_cls = AGENTS[name]
    layout = state.get("layout") or {}
    num_envs = int(layout.get("num_envs", task.get("num_envs", 1)))
    run = _run_info(checkpoint)
    grouped = name in ("grpo", "rloo") or state.get("config", {}).get("baseline") == "rloo"
    # The weights do not depend on the group size; any group size >= 2 dividing num_envs builds a grouped agent.
    group = int(layout.get("group_size") or (run or {}).get("group_size") or (num_envs if grouped else 1))
    # The environment arguments the checkpoint's task signature recorded, so the rebuilt one matches it.
    env_kwargs = {**(task.get("env_kwargs") or {}), "num_envs": num_envs, "group_size": group, "device": device}
    spec = task.get("spec")
    own_model = model if model is not None else (run or {}).get("model")
    if own_model is not None:
        if run and run.get("tokenizer"):
            env_kwargs["tokenizer"] = run["tokenizer"]
        env = gym.make_vec("lmgym/TextGen-v0", model=own_model, reward_fn=_no_score, prompts=[[0]], **env_kwargs)
    elif spec and spec in gym.registry and spec != "lmgym/TextGen-v0":
        env = gym.make_vec(spec, **env_kwargs)
    else:
        raise ExportError(f"{checkpoint} was trained on {spec or 'an environment built by hand'}, whose model the "
                          "checkpoint does not name: pass the base model (--model PATH / model=...)")
    config = agent_cls.config_class(**{k: v for k, v in state.get("config", {}).items()
                                       if k in agent_cls.config_class.__dataclass_fields__})
    agent = agent_cls(env, config, peft_config=(run or {}).get("peft_config"), weights_only=True)
    agent.load(checkpoint, resume=False)
    agent.iteration, agent.global_step = state.get("iteration", 0), state.get("global_step", 0)
    return agent


def export_checkpoint(source: str | os.PathLike, out: str | os.PathLike, *, model=None, dtype=None,
                      merge: bool = True, overwrite: bool = False, device="cpu") -> Path:
    """Export the policy of a checkpoint (or of a run folder's latest checkpoint) as a Hugging Face folder
    (a LoRA run's adapters merged, or alone with ``merge=False``)."""
    _prepare_out(Path(out), overwrite)
    agent = rebuild_agent(find_checkpoint(source), model=model, device=device)
    return save_pretrained(agent, out, dtype=dtype, merge=merge, overwrite=overwrite)
