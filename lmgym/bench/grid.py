"""Training runs and algorithm comparisons: what ``lmgym train`` and ``lmgym bench`` do.

:func:`run` trains one agent on one task under a budget and returns its curve and
final figures. :func:`bench` runs a grid of (task, agent, seed) under the same budget,
stores each finished run as JSON (so an interrupted grid resumes without redoing
runs), and writes ``results.json``, ``results.md``, ``curves.png`` and ``frontier.png``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import lmgym  # noqa: F401  registers the environments

__all__ = ["AGENT_NAMES", "RECOMMENDED", "run", "bench", "parse_overrides", "write_report", "readme_block",
           "update_readme", "machine"]

AGENT_NAMES = ("ppo", "grpo", "reinforce", "rloo", "a2c", "rft", "dpo", "online-dpo", "sb3-ppo", "nlpo", "trl-grpo",
               "trl-rloo")
TRL_AGENTS = ("trl-grpo", "trl-rloo")
"""Hugging Face TRL's GRPOTrainer and RLOOTrainer, trained through lmgym.integrations.trl (needs lmgym[trl])."""
GROUPED = {"grpo": 8, "rloo": 8, "rft": 8, "online-dpo": 8, "trl-grpo": 8, "trl-rloo": 8}
"""Agents that need several completions per prompt, and how many."""

RECOMMENDED = {
    "lmgym/TargetToken-v0": {"learning_rate": 3e-3},
    "lmgym/Copy-v0": {"learning_rate": 3e-3},
    "lmgym/Reverse-v0": {"learning_rate": 3e-3},
    "lmgym/Sort-v0": {"learning_rate": 3e-3},
    "lmgym/Arithmetic-v0": {"learning_rate": 3e-4},
    "lmgym/Sentiment-v0": {"learning_rate": 3e-4},
    "lmgym/Preference-v0": {"learning_rate": 3e-4},
}
"""Learning rates that suit the small default models of the built-in tasks (overridable). On Arithmetic-v0,
1e-3 made GRPO, RLOO and PPO collapse (end score below the start) while 3e-4 improved all four agents."""


class BenchError(ValueError):
    """A bad task, agent, hyper-parameter or output folder."""


def _check_task(task: str) -> None:
    known = sorted(k for k in gym.registry if k.startswith("lmgym/") and k != "lmgym/TextGen-v0")
    if task not in known:
        close = difflib.get_close_matches(task, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise BenchError(f"unknown task {task!r}{hint} (known: {', '.join(known)})")


def _check_agent(agent: str) -> None:
    if agent not in AGENT_NAMES:
        close = difflib.get_close_matches(agent, AGENT_NAMES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise BenchError(f"unknown agent {agent!r}{hint} (known: {', '.join(AGENT_NAMES)})")


def _require_trl(agent: str) -> None:
    """A ``trl-*`` cell without TRL installed is refused in one line, before any cell runs."""
    if agent in TRL_AGENTS:
        from lmgym.integrations.trl import MissingTRLError, require_trl

        try:
            require_trl()
        except MissingTRLError as err:
            raise BenchError(f"the agent {agent} is TRL's trainer: {err}") from None


def _config_fields(agent: str) -> set[str]:
    if agent in TRL_AGENTS:
        from lmgym.integrations.trl_bench import config_fields

        _require_trl(agent)
        return config_fields(agent)
    if agent == "sb3-ppo":
        return {"learning_rate", "n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda", "clip_range",
                "ent_coef", "vf_coef", "max_grad_norm", "num_envs"}
    from lmgym.agents import AGENTS

    return {f.name for f in dataclasses.fields(AGENTS[agent].config_class)} | {"num_envs", "group_size"}


ENV_OPTIONS = {"kl_coef", "max_new_tokens"}
"""Hyper-parameters that belong to the environment rather than the agent."""


def parse_overrides(pairs: list[tuple[str, str]], agent: str) -> dict:
    """Turn ``--agent.name value`` pairs into typed hyper-parameters, suggesting the closest name on a typo."""
    _check_agent(agent)
    allowed = _config_fields(agent) | ENV_OPTIONS
    out = {}
    for key, raw in pairs:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(sorted(allowed))})"
            raise BenchError(f"{agent} has no hyper-parameter {key!r}{hint}")
        out[key] = _parse_value(raw)
    return out


def _parse_value(raw):
    if not isinstance(raw, str):
        return raw
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def _reset_peak_memory(device: torch.device) -> bool:
    """Start a run's peak-memory count from now, so that cells of one grid (one process) are measured apart
    rather than each reporting the largest process peak so far. False where the process's peak RSS cannot be
    reset (not Linux): it then stays the peak since the process started."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: writing 5 to clear_refs resets the resident-set high-water mark (VmHWM, ru_maxrss)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


# ----------------------------------------------------------------------------- one run
def run(task: str, agent: str, *, steps: int | None = 20_000, seconds: float | None = None, seed: int = 0,
        device="auto", logdir: str | os.PathLike | None = None, overrides: dict | None = None,
        resume: str | os.PathLike | None = None, progress: bool = True, eval_batches: int = 4) -> dict:
    """Train ``agent`` on ``task`` until ``steps`` environment steps (tokens) or ``seconds`` of wall time.

    Returns a dict with the start and end score / KL / return, the fraction of the exact
    optimum (diagnostic tasks), wall time of training (``wall_seconds``) and of the whole
    call including building the environment and evaluations (``elapsed_seconds``), tokens
    per second, peak memory, the :func:`machine` it ran on and the learning curve
    ``[[env_steps, seconds, score, kl], ...]``.

    ``logdir`` is locked while the run writes to it (another process gets a
    :class:`lmgym.utils.lock.LockedError` naming this one), and torch's thread count is capped
    at the usable physical cores (:func:`lmgym.utils.cpu.limit_torch_threads`). When resuming,
    ``steps`` is the total budget: a checkpoint that already reached it is refused.
    """
    from lmgym.utils.cpu import limit_torch_threads
    from lmgym.utils.lock import FolderLock
    from lmgym.models.loading import resolve_device

    _check_task(task)
    _check_agent(agent)
    _require_trl(agent)
    if steps is None and seconds is None:
        raise BenchError("give a budget: steps, seconds, or both")
    if logdir is not None and Path(logdir).exists() and not Path(logdir).is_dir():
        raise BenchError(f"the log folder {logdir} is a file; choose another folder")
    started = time.perf_counter()
    limit_torch_threads()
    overrides = {**RECOMMENDED.get(task, {}), **(overrides or {})}
    dev = resolve_device(device)
    peak_reset = _reset_peak_memory(dev)
    env_kwargs = {k: overrides.pop(k) for k in list(overrides) if k in ENV_OPTIONS}
    num_envs = overrides.pop("num_envs", 16 if agent == "sb3-ppo" else 64)
    group = overrides.pop("group_size", GROUPED.get(agent, 1))
    # Under torchrun / accelerate launch num_envs is the whole batch, shared by the processes.
    parallel = _data_parallel(dev, agent, num_envs, group)
    num_envs //= parallel.world_size
    budget = steps if steps is not None else sys.maxsize
    runner = _run_sb3 if agent == "sb3-ppo" else _run_trl if agent in TRL_AGENTS else _run_lmgym
    # One process at a time writes a run's logs and checkpoints (process 0 of a launch).
    lock = (FolderLock(logdir, f"lmgym training {agent} on {task}").acquire()
            if logdir is not None and parallel.is_main else None)
    try:
        result = runner(task, agent, budget=budget, seconds=seconds, seed=seed, device=dev, logdir=logdir,
                        overrides=overrides, env_kwargs=env_kwargs, num_envs=num_envs, group=group, resume=resume,
                        progress=progress, eval_batches=eval_batches)
    finally:
        if lock is not None:
            lock.release()
    result.update(task=task, agent=agent, seed=seed, device=str(dev), peak_memory_mib=_peak_memory_mib(dev),
                  memory_kind="cuda max allocated" if dev.type == "cuda" else
                  "process peak RSS during the run" if peak_reset else "process peak RSS",
                  elapsed_seconds=time.perf_counter() - started, machine=machine(dev))
    return result


def _data_parallel(device: torch.device, agent: str, num_envs: int, group: int):
    """This process's place in a torchrun / accelerate launch (one process: a no-op), after checking that the
    batch of ``num_envs`` episodes in groups of ``group`` splits evenly over the processes."""
    from lmgym.agents.scale.distributed import DataParallel, launcher_world

    _, world = launcher_world()
    if world > 1 and agent == "sb3-ppo":
        raise BenchError(f"sb3-ppo runs in one process; launch it without torchrun / accelerate (WORLD_SIZE={world})")
    if world > 1 and agent in TRL_AGENTS:
        raise BenchError(f"{agent} runs in one process here; launch it without torchrun / accelerate "
                         f"(WORLD_SIZE={world}), or run TRL's own launcher on the lmgym.integrations.trl task")
    if world > 1 and num_envs % (world * group):
        raise BenchError(f"num_envs={num_envs} (groups of {group}) cannot be shared by {world} processes: make "
                         f"num_envs a multiple of {world} x {group} = {world * group}")
    return DataParallel.from_environment(device)


def machine(device: torch.device | None = None) -> dict:
    """Where a run was measured: CPU model, usable physical cores, torch's threads, and the GPU if one was used."""
    import platform

    from lmgym.utils.cpu import available_cores

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": available_cores(), "torch_threads": torch.get_num_threads()}
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _optimum(venv) -> float | None:
    try:
        return venv.optimal_return
    except ValueError:
        return None


def _run_lmgym(task, agent, *, budget, seconds, seed, device, logdir, overrides, env_kwargs, num_envs, group,
               resume, progress, eval_batches) -> dict:
    from lmgym.agents import AGENTS

    venv = gym.make_vec(task, num_envs=num_envs, group_size=group, device=device, **env_kwargs)
    learner = AGENTS[agent](venv, logdir=logdir, seed=seed, **overrides)
    if resume is not None:
        learner.load(resume)
        if budget <= learner.global_step:
            raise BenchError(f"the checkpoint {resume} has already trained {learner.global_step} environment steps "
                             f"and steps={budget} is the total budget, so there is nothing to do; ask for more "
                             f"(e.g. --steps {learner.global_step + budget})")
    optimum = _optimum(venv)
    start_eval = learner.evaluate(eval_batches)
    curve, t0 = [], time.perf_counter()

    def record(agent_, metrics):
        if "objective/scores" in metrics:  # offline agents (DPO on a file) sample no episodes while training
            curve.append([agent_.global_step, time.perf_counter() - t0, metrics["objective/scores"],
                          metrics["objective/kl"]])
        if seconds is not None and time.perf_counter() - t0 >= seconds:
            return False
        return None

    steps_before = learner.global_step
    learner.learn(budget, callbacks=[record], progress=progress)
    wall = time.perf_counter() - t0
    end_eval = learner.evaluate(eval_batches)
    tokens = learner.global_step - steps_before
    return {"start": start_eval, "end": end_eval, "optimum": optimum,
            "fraction_of_optimum": end_eval["return"] / optimum if optimum else None,
            "wall_seconds": wall, "env_steps": learner.global_step, "tokens_per_s": tokens / wall if wall else 0.0,
            "curve": curve, "hyperparameters": learner.config.to_dict(), "kl_coef": venv.kl_coef,
            "checkpoint": str(learner.last_checkpoint) if learner.last_checkpoint else None}


def _run_trl(task, agent, *, budget, seconds, seed, device, logdir, overrides, env_kwargs, num_envs, group, resume,
             progress, eval_batches) -> dict:
    from lmgym.integrations.trl_bench import run_cell

    if resume is not None:
        raise BenchError(f"--resume is not supported for {agent} (the cell trains with TRL and keeps no checkpoint)")
    return run_cell(task, agent, budget=budget, seconds=seconds, seed=seed, device=device, logdir=logdir,
                    overrides=overrides, env_kwargs=env_kwargs, num_envs=num_envs, group=group,
                    eval_batches=eval_batches, progress=progress)


# SB3's log keys under lmgym's names (agents/base.py, agents/ppo.py), with the factor that turns the one into
# the other, so an sb3-ppo run overlays lmgym's runs in TensorBoard tag by tag.
_SB3_TO_LMGYM_TAGS = {
    "train/policy_gradient_loss": ("loss/policy", 1.0),
    "train/value_loss": ("loss/value", 1.0),
    "train/clip_fraction": ("policy/clipfrac", 1.0),
    "train/approx_kl": ("policy/approxkl", 1.0),
    "train/entropy_loss": ("objective/entropy", -1.0),  # SB3 logs minus the mean entropy
    "train/explained_variance": ("val/explained_variance", 1.0),
    "train/learning_rate": ("charts/learning_rate", 1.0),
    "time/fps": ("time/tokens_per_s", 1.0),  # one environment step is one token
    # objective/return and charts/episode_length, logged per rollout, replace SB3's 100-episode means.
    "rollout/ep_rew_mean": None,
    "rollout/ep_len_mean": None,
}


def _run_sb3(task, agent, *, budget, seconds, seed, device, logdir, overrides, env_kwargs, num_envs, group, resume,
             progress, eval_batches) -> dict:
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import KVWriter, Logger
    from stable_baselines3.common.vec_env import VecMonitor

    from lmgym.agents.sb3 import LMGymVecEnv, LMPolicy, evaluate_return, lm_policy_kwargs

    if resume is not None:
        raise BenchError("--resume is not supported for sb3-ppo (SB3 checkpoints are pickles)")
    venv = gym.make_vec(task, num_envs=num_envs, device=device, **env_kwargs)
    env = VecMonitor(LMGymVecEnv(venv, seed=seed))
    kwargs = dict(n_steps=32, batch_size=128, learning_rate=3e-3, seed=seed, device=device)
    kwargs.update(overrides)
    model = PPO(LMPolicy, env, policy_kwargs=lm_policy_kwargs(copy.deepcopy(venv.reference_model), env=env),
                **kwargs)
    writer = None
    if logdir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(logdir))
        rows = "\n".join(f"|{k}|{v}|" for k, v in kwargs.items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")

        class LmgymTags(KVWriter):
            """SB3's log records written to TensorBoard under lmgym's tag names (others under their own)."""

            def write(self, key_values, key_excluded, step=0):
                for key, value in key_values.items():
                    excluded = "tensorboard" in (key_excluded.get(key) or ())
                    if excluded or not isinstance(value, (int, float, np.number)):
                        continue
                    tag = _SB3_TO_LMGYM_TAGS.get(key, (key, 1.0))
                    if tag is not None:
                        writer.add_scalar(tag[0], tag[1] * value, step)
                writer.flush()

        model.set_logger(Logger(folder=None, output_formats=[LmgymTags()]))
    single = gym.make(task, device="cpu", **env_kwargs) if device.type == "cpu" else gym.make(task, **env_kwargs)
    beta = venv.kl_coef
    optimum = _optimum(venv)
    episodes = max(32, eval_batches * 16)

    def evaluate():
        r = evaluate_return(model, single, episodes)
        return {"score": r["score"], "return": r["return"], "kl": (r["score"] - r["return"]) / beta if beta else 0.0}

    start_eval = evaluate()
    curve, t0 = [], time.perf_counter()

    class Record(BaseCallback):
        """Per rollout, lmgym's episode statistics (objective/*) of the episodes that ended in it."""

        def _on_training_start(self) -> None:
            self.finished, self.episodes = [], 0

        def _on_step(self) -> bool:
            for info in self.locals.get("infos", []):
                if "score" in info and "episode" in info:  # the bridge's score, VecMonitor's return and length
                    self.finished.append((info["score"], info["episode"]["r"], info["episode"]["l"]))
            return seconds is None or time.perf_counter() - t0 < seconds

        def _on_rollout_end(self) -> None:
            if not self.finished:
                return
            score, ret, length = (float(np.mean(x)) for x in zip(*self.finished))
            self.episodes += len(self.finished)
            self.finished = []
            # The policy is bound to the environment, so an episode's return is score - beta * KL exactly.
            kl = (score - ret) / beta if beta else 0.0
            curve.append([self.num_timesteps, time.perf_counter() - t0, score, kl if beta else math.nan])
            if writer is not None:
                for name, value in (("objective/scores", score), ("objective/kl", kl), ("objective/return", ret),
                                    ("objective/kl_coef", beta), ("charts/episode_length", length),
                                    ("charts/episodes", float(self.episodes))):
                    writer.add_scalar(name, value, self.num_timesteps)

    try:
        model.learn(budget, callback=Record(), progress_bar=False)
    finally:
        if writer is not None:
            writer.close()
    wall = time.perf_counter() - t0
    end_eval = evaluate()
    return {"start": start_eval, "end": end_eval, "optimum": optimum,
            "fraction_of_optimum": end_eval["return"] / optimum if optimum else None, "wall_seconds": wall,
            "env_steps": model.num_timesteps, "tokens_per_s": model.num_timesteps / wall if wall else 0.0,
            "curve": [c for c in curve if not math.isnan(c[2])],
            "hyperparameters": {k: str(v) if k == "device" else v for k, v in kwargs.items()}, "kl_coef": beta,
            "checkpoint": None}


# ----------------------------------------------------------------------------- the grid
def bench(out: str | os.PathLike, *, tasks: list[str], agents: list[str], seeds: list[int], steps: int | None,
          seconds: float | None = None, device="auto", overrides: dict[str, dict] | None = None,
          progress: bool = True) -> dict:
    """Run every (task, agent, seed) under the same budget and write the report into ``out``.

    Finished runs are stored under ``out/runs/`` with the full configuration of their
    cell, and reused when the grid is run again only if that configuration is the same;
    a folder that holds a different grid is refused rather than mixed. A cell that is
    (re)done starts from an empty log folder, so its TensorBoard run holds one attempt.
    The output folder is locked for the duration: a second ``lmgym bench`` into it is
    refused, naming the process that holds it.
    """
    from tqdm.auto import tqdm

    from lmgym.utils.lock import FolderLock

    for t in tasks:
        _check_task(t)
    for a in agents:
        _check_agent(a)
        _require_trl(a)
    overrides = overrides or {}
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out} is a file, not a folder; choose a folder for the bench results")
    grid = {"tasks": list(tasks), "agents": list(agents), "seeds": list(seeds), "steps": steps, "seconds": seconds,
            "overrides": overrides}
    grid = json.loads(json.dumps(grid))  # as it reads back from grid.json
    # Under torchrun / accelerate launch every process trains each cell (its share of the batch, see run);
    # process 0 alone reads and writes the folder, and tells the others which cells are done.
    from lmgym.agents.scale.distributed import DataParallel
    from lmgym.models.loading import resolve_device

    parallel = DataParallel.from_environment(resolve_device(device))
    progress = progress and parallel.is_main
    with FolderLock(out, "lmgym bench") if parallel.is_main else contextlib.nullcontext():
        cells = {f"{t.split('/')[-1]}__{a}__seed{s}": {"task": t, "agent": a, "seed": s, "steps": steps,
                                                        "seconds": seconds, "overrides": grid["overrides"].get(a, {})}
                 for t in tasks for a in agents for s in seeds}

        def prepare() -> dict:
            _check_grid_file(out, grid)
            done = {name: _finished_run(out / "runs" / f"{name}.json", cell) for name, cell in cells.items()}
            (out / "runs").mkdir(parents=True, exist_ok=True)
            _atomic_write(out / "grid.json", json.dumps(grid, indent=1))  # only once every stored run fits this grid
            return done

        finished = parallel.on_main(prepare)
        results = []
        bar = tqdm(cells.items(), desc="bench grid", unit="run", disable=not progress, position=0, dynamic_ncols=True)
        for name, cell in bar:
            task, agent, seed = cell["task"], cell["agent"], cell["seed"]
            done = finished[name]
            bar.set_postfix_str(name)
            if done is not None:
                results.append(done)
                continue
            logdir = out / "tensorboard" / task.split("/")[-1] / agent / f"seed{seed}"
            # an unfinished attempt: its curves and checkpoints would mix with this one
            parallel.on_main(lambda: shutil.rmtree(logdir) if logdir.exists() else None)
            result = run(task, agent, steps=steps, seconds=seconds, seed=seed, device=device, logdir=logdir,
                         overrides=dict(overrides.get(agent, {})), progress=progress)
            result["cell"] = cell
            parallel.on_main(lambda: _atomic_write(out / "runs" / f"{name}.json",
                                                   json.dumps(result, indent=1, default=_jsonable)))
            results.append(result)
        bar.close()
        return parallel.on_main(lambda: write_report(out, results, grid))


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` is either the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_grid_file(out: Path, grid: dict) -> None:
    grid_file = out / "grid.json"
    if not grid_file.exists():
        return
    try:
        old = json.loads(grid_file.read_text())
    except (ValueError, OSError) as err:
        raise BenchError(f"{grid_file} is unreadable ({err}); delete it (finished runs are still checked one by "
                         "one against their recorded configuration) or choose another --out folder") from err
    if old != grid:
        raise BenchError(f"{out} holds results of a different grid ({grid_file}); choose another --out folder "
                         "or delete it, rather than mixing results")


def _finished_run(file: Path, cell: dict) -> dict | None:
    """The stored result of a finished cell, or None if the cell has not finished. A result recorded under
    another configuration (or none) is refused, never reused under this one."""
    if not file.exists():
        return None
    try:
        result = json.loads(file.read_text())
        recorded = result.get("cell")
    except (ValueError, OSError, AttributeError) as err:
        raise BenchError(f"{file} is corrupt ({err}); delete it to run that cell again") from err
    if not isinstance(recorded, dict):
        raise BenchError(f"{file} does not record the configuration it was run with (an older lmgym), so it "
                         "cannot be reused safely; delete it to run that cell again, or choose another --out folder")
    if recorded != cell:
        what = ", ".join(f"{k}={recorded.get(k)!r} here but {v!r} now" for k, v in cell.items()
                         if recorded.get(k) != v)
        raise BenchError(f"{file} is a run of another configuration ({what}); choose another --out folder or "
                         "delete the old runs rather than mixing results")
    return result


def _jsonable(obj):
    """numpy scalars as numbers; anything else JSON cannot hold (devices, paths) as text."""
    return obj.item() if isinstance(obj, np.generic) else str(obj)


def _summary(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def write_report(out: Path, results: list[dict], grid: dict) -> dict:
    """``results.json``, ``results.md``, ``curves.png`` and ``frontier.png`` from finished runs."""
    table: dict[str, dict[str, dict]] = {}
    for task in grid["tasks"]:
        for agent in grid["agents"]:
            runs = [r for r in results if r["task"] == task and r["agent"] == agent]
            if not runs:
                continue
            table.setdefault(task, {})[agent] = {
                "seeds": [r["seed"] for r in runs],
                "score": _summary([r["end"]["score"] for r in runs]),
                "start_score": _summary([r["start"]["score"] for r in runs]),
                "kl": _summary([r["end"]["kl"] for r in runs]),
                "return": _summary([r["end"]["return"] for r in runs]),
                "fraction_of_optimum": _summary([r["fraction_of_optimum"] for r in runs]),
                "wall_seconds": _summary([r["wall_seconds"] for r in runs]),
                "tokens_per_s": _summary([r["tokens_per_s"] for r in runs]),
                "peak_memory_mib": _summary([r["peak_memory_mib"] for r in runs]),
                "optimum": runs[0]["optimum"], "memory_kind": runs[0]["memory_kind"],
            }
    report = {"grid": grid, "table": table, "runs": results}
    (out / "results.json").write_text(json.dumps(report, indent=1, default=_jsonable))
    (out / "results.md").write_text(results_markdown(table, grid))
    _plot_curves(out / "curves.png", results, grid)
    _plot_frontier(out / "frontier.png", results, grid)
    return report


def _fmt(pair, digits=3) -> str:
    mean, std = pair
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_markdown(table: dict, grid: dict) -> str:
    budget = f"{grid['steps']} environment steps" if grid["steps"] else f"{grid['seconds']} s"
    lines = [f"Budget per run: {budget}; seeds {grid['seeds']}; mean ± std over seeds. Return = score - "
             "kl_coef * KL; 'of optimum' = return / the exact KL-regularised optimum (diagnostic tasks).", ""]
    for task, agents in table.items():
        opt = next(iter(agents.values()))["optimum"]
        lines += [f"### {task}" + (f" (exact optimum {opt:.3f})" if opt else ""), "",
                  "| agent | score (start → end) | KL to ref | return | of optimum | wall s | tokens/s | peak MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for agent, row in agents.items():
            frac = row["fraction_of_optimum"]
            frac_s = "-" if math.isnan(frac[0]) else f"{frac[0]:.1%} ± {frac[1]:.1%}"
            lines.append(f"| {agent} | {row['start_score'][0]:.3f} → {_fmt(row['score'])} | {_fmt(row['kl'], 2)} | "
                         f"{_fmt(row['return'])} | {frac_s} | {row['wall_seconds'][0]:.1f} | "
                         f"{row['tokens_per_s'][0]:.0f} | {row['peak_memory_mib'][0]:.0f} |")
        lines.append("")
    kind = next(iter(next(iter(table.values())).values()))["memory_kind"] if table else ""
    lines.append(f"Peak memory: {kind}.")
    return "\n".join(lines) + "\n"


def _banded(ax, curves: list[np.ndarray], col: int, label: str) -> None:
    """Mean line and min-max band over seeds of the return against column ``col`` (steps or seconds).

    Seeds are interpolated onto a common x grid. The mean and band cover the range every
    seed has reached (up to the fastest seed's end); past it, each slower seed continues
    as its own thin line to its end, so the plot runs to the slowest seed without a
    mean over fewer seeds posing as one over all. A dot marks each seed's end.
    """
    curves = [c for c in curves if len(c) > 1]
    if not curves:
        return
    first_end = min(c[-1, col] for c in curves)
    grid = np.linspace(max(c[0, col] for c in curves), first_end, 200)
    ys = np.stack([np.interp(grid, c[:, col], c[:, 2]) for c in curves])
    line = ax.plot(grid, ys.mean(0), label=label)[0]
    color = line.get_color()
    ax.fill_between(grid, ys.min(0), ys.max(0), alpha=0.2, color=color, linewidth=0)
    for c in curves:
        if c[-1, col] > first_end:
            rest = c[c[:, col] >= first_end]
            xs = np.concatenate([[first_end], rest[:, col]])
            ax.plot(xs, np.concatenate([[np.interp(first_end, c[:, col], c[:, 2])], rest[:, 2]]), color=color,
                    linewidth=0.8, alpha=0.7)
    ax.plot([c[-1, col] for c in curves], [c[-1, 2] for c in curves], "o", ms=3, color=color)


def _return_curve(run: dict) -> np.ndarray:
    """``[steps, seconds, return]`` rows of a run's curve, return = score - kl_coef * KL (rows without KL dropped),
    starting at (0, 0) with the evaluated return of the policy before training."""
    c = np.asarray(run["curve"], dtype=float).reshape(-1, 4)
    c = c[np.isfinite(c[:, 2]) & np.isfinite(c[:, 3])]
    rows = np.column_stack([c[:, 0], c[:, 1], c[:, 2] - run["kl_coef"] * c[:, 3]])
    start = run.get("start", {}).get("return")
    if start is not None:
        rows = np.vstack([[0.0, 0.0, start], rows])
    return rows


def _optimum_of(results: list[dict], task: str) -> float | None:
    return next((r["optimum"] for r in results if r["task"] == task and r.get("optimum") is not None), None)


def _plot_curves(path: Path, results: list[dict], grid: dict) -> None:
    import matplotlib.pyplot as plt

    fig = curves_figure(results, grid)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_figure(results: list[dict], grid: dict):
    """Return against environment steps and against wall-clock seconds, one row per task; the exact optimum
    as a dashed line where it is known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = grid["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.6 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for agent in grid["agents"]:
            curves = [_return_curve(r) for r in results if r["task"] == task and r["agent"] == agent and r["curve"]]
            _banded(axes[row, 0], curves, 0, agent)
            _banded(axes[row, 1], curves, 1, agent)
        optimum = _optimum_of(results, task)
        for ax in axes[row]:
            if optimum is not None:
                ax.axhline(optimum, color="black", linestyle="--", linewidth=1,
                           label=f"exact optimum {optimum:.3f}")
        axes[row, 0].set(xlabel="environment steps (tokens)", ylabel="return = score - kl_coef * KL", title=task)
        axes[row, 1].set(xlabel="wall-clock seconds (thin lines: seeds still running)",
                         ylabel="return = score - kl_coef * KL", title=task)
        axes[row, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plot_frontier(path: Path, results: list[dict], grid: dict) -> None:
    import matplotlib.pyplot as plt

    fig = frontier_figure(results, grid)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frontier_figure(results: list[dict], grid: dict):
    """Each run's final score against its KL. Where the exact optimum R* is known, no policy can lie above the
    line score = R* + kl_coef * KL (its return would exceed R*); the optimal policy is where it touches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = grid["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for col, task in enumerate(tasks):
        ax = axes[0, col]
        for agent in grid["agents"]:
            runs = [r for r in results if r["task"] == task and r["agent"] == agent]
            if runs:
                kl = [r["end"]["kl"] for r in runs]
                score = [r["end"]["score"] for r in runs]
                ax.scatter(kl, score, label=agent, alpha=0.8)
        optimum = _optimum_of(results, task)
        if optimum is not None:
            beta = next(r["kl_coef"] for r in results if r["task"] == task)
            lo, hi = ax.get_xlim()
            xs = np.linspace(min(0.0, lo), hi, 50)
            ax.plot(xs, optimum + beta * xs, color="black", linestyle="--", linewidth=1,
                    label=f"return = exact optimum {optimum:.3f}")
            ax.set_xlim(min(0.0, lo), hi)
        ax.set(xlabel="KL to the reference (per episode)", ylabel="score", title=f"{task}: reward vs KL")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- the README's results block
README_BEGIN = ("<!-- lmgym bench results: generated from docs/bench/results.json by "
                "`lmgym bench --out docs/bench --readme README.md`; do not edit by hand -->")
README_END = "<!-- end of lmgym bench results -->"
DEFAULT_README_SOURCE = "docs/bench/results.json"


def readme_markers(source: str = DEFAULT_README_SOURCE) -> tuple[str, str]:
    """The two lines that enclose a README's block generated from ``source`` (its results.json, as a path
    relative to the README): a README may hold one block per results file (the default grid's, a comparison
    grid's...), each rewritten only from its own file."""
    if source == DEFAULT_README_SOURCE:
        return README_BEGIN, README_END
    folder = Path(source).parent.as_posix()
    return (f"<!-- lmgym bench results: generated from {source} by `lmgym bench --out {folder} --readme "
            "README.md`; do not edit by hand -->", f"<!-- end of lmgym bench results from {source} -->")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def readme_block(report: dict, source: str = DEFAULT_README_SOURCE) -> str:
    """The README's results section rendered from a ``results.json`` report (the file ``source``): where and how
    long it was measured, then the tables of ``results.md``, between the :func:`readme_markers` of ``source``."""
    grid, runs = report["grid"], report["runs"]
    machines = [r.get("machine") for r in runs]
    if runs and all(machines) and all(m == machines[0] for m in machines):
        m = machines[0]
        where = (f"{m['cpu']}, {m['cores']} usable physical core{'s' * (m['cores'] != 1)}, torch "
                 f"{m['torch_threads']} thread{'s' * (m['torch_threads'] != 1)}" + (f", {m['gpu']}" if "gpu" in m
                                                                                    else ""))
        total = sum(r["elapsed_seconds"] for r in runs)
        measured = (f"Measured on this machine ({where}): the {len(runs)} runs took {_duration(total)} in all, "
                    "each run's wall time including building its environment and, the first time a task needs "
                    "it, its zoo model.")
    else:
        measured = "These results do not record the machine they were measured on."
    budget = (f" --steps {grid['steps']}" if grid["steps"] else "") + (f" --seconds {grid['seconds']}"
                                                                      if grid["seconds"] else "")
    command = (f"lmgym bench --tasks {' '.join(grid['tasks'])} --agents {' '.join(grid['agents'])} --seeds "
               f"{' '.join(map(str, grid['seeds']))}{budget}")
    overrides = f", hyper-parameters {json.dumps(grid['overrides'])}" if grid.get("overrides") else ""
    head = f"The grid: `{command}`{overrides}. {measured}"
    begin, end = readme_markers(source)
    return "\n".join([begin, "", head, "", results_markdown(report["table"], grid).rstrip(), "", end])


def update_readme(readme: str | os.PathLike, results_json: str | os.PathLike) -> None:
    """Replace the results block of ``readme`` marked as generated from ``results_json`` (:func:`readme_markers`
    of its path relative to the README) with :func:`readme_block` of that file."""
    readme, results_json = Path(readme), Path(results_json)
    source = Path(os.path.relpath(results_json.resolve(), readme.resolve().parent)).as_posix()
    begin, end = readme_markers(source)
    text = readme.read_text()
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"{readme} needs exactly one results block for {source}, between the lines {begin!r} and "
                         f"{end!r}; add those two lines where the table should go")
    try:
        report = json.loads(results_json.read_text())
    except ValueError as err:
        raise BenchError(f"{results_json} is corrupt ({err})") from err
    before, rest = text.split(begin)
    after = rest.split(end, 1)[1]
    _atomic_write(readme, before + readme_block(report, source) + after)
