"""Training runs and algorithm comparisons: what ``lmgym train`` and ``lmgym bench`` do.

:func:`run` trains one agent on one task under a budget and returns its curve and
final figures. :func:`bench` runs a grid of (task, agent, seed) under the same budget,
stores each finished run as JSON (so an interrupted grid resumes without redoing
runs), and writes ``results.json``, ``results.md``, ``curves.png`` and ``frontier.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import gymnasium as gym
import torch

import lmgym  # noqa: F401  registers the environments
from lmgym.bench.report import BenchError, _atomic_write, _jsonable, write_report
from lmgym.bench.sb3_cell import _optimum, run_sb3
from lmgym.utils import checks

__all__ = ["AGENT_NAMES", "RECOMMENDED", "run", "bench", "parse_overrides", "machine"]

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
    "lmgym/Guess-v0": {"learning_rate": 3e-3},
    "lmgym/Echo-v0": {"learning_rate": 3e-3},
    "lmgym/Arithmetic-v0": {"learning_rate": 3e-4},
    "lmgym/Sentiment-v0": {"learning_rate": 3e-4},
    "lmgym/Preference-v0": {"learning_rate": 3e-4},
}
"""Learning rates that suit the small default models of the built-in tasks (overridable). On Arithmetic-v0,
1e-3 made GRPO, RLOO and PPO collapse (end score below the start) while 3e-4 improved all four agents."""
RECOMMENDED_FOR_AGENT = {
    ("lmgym/Guess-v0", "rft"): {"threshold": 0.3},
}
"""Settings one agent needs on one task (overridable). Guess-v0's targets differ within a group, so RFT's default
best-of-group keeps lucky first guesses and rarely trains the turn that reads the answer (74% and 87% of the
optimum); keeping every episode whose return is at least 0.3 (right by the second guess) reached 99% and 95%."""


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


def _check_trl_task(task: str, agent: str) -> None:
    """A ``trl-*`` cell whose trainer cannot take the task (TRL's RLOOTrainer on a multi-turn task) is refused in one
    line, before any cell runs."""
    if agent in TRL_AGENTS:
        from lmgym.integrations.trl_bench import check_task

        try:
            check_task(task, agent)
        except ValueError as err:
            raise BenchError(str(err)) from None


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
    _check_values(agent, out)
    return out


def _check_values(agent: str, overrides: dict) -> None:
    """Build the agent's config from ``overrides`` and check it, before any folder or environment is made (a bad
    value was refused only once the environment had loaded, leaving an empty run folder behind)."""
    from lmgym.agents import AGENTS
    from lmgym.agents.common.config import check_config

    if agent not in AGENTS:
        return  # sb3-ppo and TRL's trainers check their own settings
    settings = {k: v for k, v in overrides.items() if k not in ENV_OPTIONS | {"num_envs", "group_size"}}
    check_config(AGENTS[agent].make_config(None, settings))


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
    call including building the environment and evaluations (``elapsed_seconds``), the process's CPU time over
    that whole call, every thread counted (``cpu_seconds``), tokens
    per second, peak memory, the :func:`machine` it ran on and the learning curve
    ``[[env_steps, seconds, score, kl], ...]``.

    ``logdir`` is locked while the run writes to it (another process gets a
    :class:`lmgym.utils.lock.LockedError` naming this one), and torch's thread count is capped
    at the usable physical cores (:func:`lmgym.utils.cpu.limit_torch_threads`). When resuming,
    ``steps`` is the total budget: a checkpoint that already reached it is refused.
    """
    from lmgym.utils.cpu import limit_torch_threads
    from lmgym.utils.lock import FolderLock
    from lmgym.models import resolve_device

    _check_task(task)
    _check_agent(agent)
    _require_trl(agent)
    _check_trl_task(task, agent)
    try:
        steps, seconds = checks.budget(steps, seconds)
    except ValueError as err:
        raise BenchError(f"{err} (--steps, --seconds)") from None
    if logdir is not None and Path(logdir).exists() and not Path(logdir).is_dir():
        raise BenchError(f"the log folder {logdir} is a file; choose another folder")
    started, cpu_started = time.perf_counter(), time.process_time()
    limit_torch_threads()
    overrides = {**RECOMMENDED.get(task, {}), **RECOMMENDED_FOR_AGENT.get((task, agent), {}), **(overrides or {})}
    dev = resolve_device(device)
    peak_reset = _reset_peak_memory(dev)
    env_kwargs = {k: overrides.pop(k) for k in list(overrides) if k in ENV_OPTIONS}
    num_envs = overrides.pop("num_envs", 16 if agent == "sb3-ppo" else 64)
    group = overrides.pop("group_size", GROUPED.get(agent, 1))
    # Under torchrun / accelerate launch num_envs is the whole batch, shared by the processes.
    parallel = _data_parallel(dev, agent, num_envs, group)
    num_envs //= parallel.world_size
    budget = steps if steps is not None else sys.maxsize
    runner = run_sb3 if agent == "sb3-ppo" else _run_trl if agent in TRL_AGENTS else _run_lmgym
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
                  elapsed_seconds=time.perf_counter() - started, machine=machine(dev),
                  cpu_seconds=time.process_time() - cpu_started)  # all threads, environment and evaluations included
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
        for t in tasks:
            _check_trl_task(t, a)
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
    from lmgym.models import resolve_device

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


# ----------------------------------------------------------------------------- the README's results block