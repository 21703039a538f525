"""Training your own model on your own prompts and reward: what ``lmgym train --model`` does.

- prompts come from a file: ``.txt`` (one prompt per line) or ``.jsonl`` (one chat
  conversation per line: a list of messages, or ``{"messages": [...]}``, or
  ``{"prompt": "text or messages"}``);
- the reward is a function ``MODULE:FUNCTION`` (``fn(prompts, completions) -> scores``; a
  module on the Python path or a ``path/to/file.py``), or a reward model folder written
  by ``lmgym reward-model train``;
- held-out prompts (``eval_prompts``) are evaluated before and after training and every
  ``sample_every`` iterations, with sample completions written to TensorBoard as text.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from lmgym.utils import checks
from lmgym.utils.jsonl import read_lines, read_records

__all__ = ["read_prompts", "load_reward", "load_reward_model", "train_own_model", "samples_markdown"]


def read_prompts(path: str | os.PathLike) -> list:
    """Prompts from a ``.txt`` file (one per line, blank lines skipped) or a ``.jsonl`` file of chat messages."""
    file = Path(path)
    if file.suffix == ".txt":
        prompts = read_lines(file, "prompt file")
    elif file.suffix == ".jsonl":
        prompts = []
        for record, where in read_records(file, "prompt file"):
            if isinstance(record, dict):
                if "messages" in record:
                    record = record["messages"]
                elif "prompt" in record:
                    record = record["prompt"]
                else:
                    raise ValueError(f"{where}: an object needs a 'messages' or a 'prompt' key, got {sorted(record)}")
            if not (isinstance(record, str) or (isinstance(record, list) and record
                                                and all(isinstance(m, dict) for m in record))):
                raise ValueError(f"{where}: expected a list of chat messages [{{'role': ..., 'content': ...}}] or "
                                 f"a string, got {type(record).__name__}")
            prompts.append(record)
    else:
        raise ValueError(f"prompt file {file} must end in .txt (one prompt per line) or .jsonl (chat messages)")
    if not prompts:
        raise ValueError(f"prompt file {file} holds no prompts")
    return prompts


def load_reward(spec: str):
    """The reward function ``MODULE:FUNCTION`` names (a dotted module name, or a path to a ``.py`` file)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--reward {spec!r} must be MODULE:FUNCTION, e.g. my_rewards:score or "
                         "path/to/rewards.py:score")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        file = Path(module_name)
        if not file.is_file():
            raise ValueError(f"--reward: the file {file} does not exist")
        spec_ = importlib.util.spec_from_file_location(f"lmgym_user_reward_{file.stem}", file)
        module = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:  # `lmgym` as a console script does not put the current folder on the path
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
                raise ValueError(f"--reward: there is no module named {module_name!r} (run from the folder that "
                                 "holds it, put it on PYTHONPATH, or give a path: path/to/rewards.py:FUNCTION)") \
                    from None
            raise
    fn = getattr(module, attr, None)
    if fn is None:
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"--reward: module {module_name!r} has no function {attr!r}"
                         + (f" (it defines {', '.join(public[:8])})" if public else ""))
    if not callable(fn):
        raise ValueError(f"--reward: {module_name}:{attr} is a {type(fn).__name__}, not a function")
    return fn


class _TextPromptReward:
    """Hands a text-only reward source (a reward model) chat prompts as text rendered with its own tokenizer."""

    def __init__(self, reward, tokenizer):
        self.reward, self.tokenizer = reward, tokenizer

    def _text(self, prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        if getattr(self.tokenizer, "chat_template", None) is not None:
            return self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return "\n".join(str(m.get("content", "")) for m in prompt)

    def __call__(self, prompts, completions):
        return self.reward([self._text(p) for p in prompts], completions)


def load_reward_model(path: str | os.PathLike, device="cpu"):
    """A reward model folder (``lmgym reward-model train --out``) as a reward function."""
    from lmgym.rewards.reward_model import LearnedReward, RewardModel

    model = RewardModel.load(path, device=device)
    return _TextPromptReward(LearnedReward(model), model.tokenizer)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def samples_markdown(samples, limit: int = 16) -> str:
    """A markdown table of ``(prompt, completion, score)`` rows, for TensorBoard's text tab."""
    rows = [f"|{_cell(p)}|{_cell(c)}|{s:.4g}|" for p, c, s in samples[:limit]]
    return "\n".join(["|prompt|completion|score|", "|-|-|-|", *rows])


def train_own_model(*, model: str, prompts, agent: str, reward=None, reward_model=None, eval_prompts=None,
                    steps: int | None = 20_000, seconds: float | None = None, seed: int = 0, device="auto",
                    dtype="auto", logdir: str | os.PathLike, overrides: dict | None = None, num_envs: int = 16,
                    group_size: int | None = None, max_new_tokens: int = 32, kl_coef: float = 0.05,
                    sample_every: int = 10, resume=None, trust_remote_code: bool = False, lora: dict | None = None,
                    progress: bool = True) -> dict:
    """Train ``agent`` on a model, prompt list and reward of your own; returns the run's summary.

    ``reward`` is a callable or a ``MODULE:FUNCTION`` string; ``reward_model`` a reward model
    folder (give exactly one). ``overrides`` are the agent's hyper-parameters; ``lora`` (a dict
    of ``peft.LoraConfig`` arguments) trains LoRA adapters instead of the whole model. Logs,
    checkpoints and ``lmgym_run.json`` (what ``lmgym export`` needs) go to ``logdir``.
    """
    import contextlib
    import time

    import gymnasium as gym

    import lmgym  # noqa: F401  registers lmgym/TextGen-v0
    from lmgym.agents import AGENTS
    from lmgym.agents.export import RUN_FILE
    from lmgym.models import load_tokenizer, resolve_device
    from lmgym.envs.prompts import PromptSource
    from lmgym.utils.lock import FolderLock

    if agent not in AGENTS:
        raise ValueError(f"--agent {agent!r} cannot train your own model; use one of {', '.join(AGENTS)}")
    if (reward is None) == (reward_model is None):
        raise ValueError("give the reward as exactly one of --reward MODULE:FUNCTION and --reward-model DIR")
    steps, seconds = checks.budget(steps, seconds)
    dev = resolve_device(device)
    reward_fn = load_reward(reward) if isinstance(reward, str) else reward
    if reward_model is not None:
        reward_fn = load_reward_model(reward_model, device=dev)
    if group_size is None:
        grouped = agent in ("grpo", "rloo") or (overrides or {}).get("baseline") == "rloo"
        group_size = 4 if grouped else 1
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    # Size the environment for the longest prompt of either set, so held-out prompts fit too.
    longest = max(PromptSource(p, tokenizer).max_prompt_tokens for p in (prompts, eval_prompts) if p)
    # Under torchrun / accelerate launch num_envs is the whole batch, shared by the processes (process 0 writes).
    from lmgym.agents.scale.distributed import launcher_world

    rank, world = launcher_world()
    if num_envs % (world * group_size):
        raise ValueError(f"num_envs={num_envs} (groups of {group_size}) cannot be shared by {world} processes: "
                         f"make it a multiple of {world * group_size}")
    venv = gym.make_vec("lmgym/TextGen-v0", num_envs=num_envs // world, group_size=group_size, model=model,
                        tokenizer=tokenizer, reward_fn=reward_fn, prompts=prompts, max_new_tokens=max_new_tokens,
                        kl_coef=kl_coef, max_prompt_tokens=longest, device=dev, dtype=dtype,
                        trust_remote_code=trust_remote_code)
    logdir = Path(logdir)
    # One process writes a run folder: the same lock as `lmgym train --task` and the agent itself take.
    with FolderLock(logdir, f"lmgym train --model ({agent})") if rank == 0 else contextlib.nullcontext():
        learner = AGENTS[agent](venv, logdir=logdir, seed=seed, peft_config=lora, **(overrides or {}))
        if resume is not None:
            learner.load(resume)
        # written once every check has passed: a refused resume leaves the run's file as it was
        if rank == 0:
            local = Path(model).expanduser()
            (logdir / RUN_FILE).write_text(json.dumps({
                "model": str(local.resolve()) if local.exists() else model, "agent": agent, "num_envs": num_envs,
                "group_size": group_size, "max_new_tokens": max_new_tokens, "stop_token_ids": venv.stop_token_ids,
                "reward": reward if isinstance(reward, str) else None,
                "reward_model": str(reward_model) if reward_model is not None else None, "peft_config": lora},
                indent=1))
        watched = eval_prompts if eval_prompts else prompts[:max(1, num_envs // group_size)]

        def report(agent_, metrics):
            if sample_every and agent_.iteration % sample_every == 0:
                result = agent_.evaluate(prompts=watched)
                if agent_.writer is not None:
                    tag = "eval" if eval_prompts else "train_prompts"
                    agent_.writer.add_scalar(f"{tag}/score", result["score"], agent_.global_step)
                    agent_.writer.add_scalar(f"{tag}/kl", result["kl"], agent_.global_step)
                    agent_.writer.add_text("samples", samples_markdown(result["samples"]), agent_.global_step)
            if seconds is not None and time.perf_counter() - t0 >= seconds:
                return False
            return None

        start = learner.evaluate(prompts=eval_prompts) if eval_prompts else None
        t0 = time.perf_counter()
        learner.learn(steps if steps is not None else sys.maxsize, callbacks=[report], progress=progress)
        wall = time.perf_counter() - t0
        end = learner.evaluate(prompts=eval_prompts) if eval_prompts else None
        summary = {"model": model, "agent": agent, "iterations": learner.iteration,
                   "env_steps": learner.global_step, "wall_seconds": wall,
                   "checkpoint": str(learner.last_checkpoint) if learner.last_checkpoint else None,
                   "logdir": str(logdir),
                   "eval_start": {k: v for k, v in start.items() if k != "samples"} if start else None,
                   "eval_end": {k: v for k, v in end.items() if k != "samples"} if end else None,
                   "eval_samples": end["samples"][:16] if end else None}
        if rank == 0:
            (logdir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if learner.writer is not None:
            learner.writer.flush()
        return summary
