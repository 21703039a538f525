"""Training runs and algorithm comparisons: what ``lmgym train`` and ``lmgym bench`` do.

:func:`run` trains one agent on one task under a budget and returns its curve and
final figures. :func:`bench` runs a grid of (task, agent, seed) under the same budget,
stores each finished run as JSON (so an interrupted grid resumes without redoing
runs), and writes ``results.json``, ``results.md``, ``curves.png`` and ``frontier.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import lmgym  # noqa: F401  registers the environments

__all__ = ["AGENT_NAMES", "RECOMMENDED", "run", "bench", "parse_overrides", "write_report"]

AGENT_NAMES = ("ppo", "grpo", "reinforce", "rloo", "a2c", "rft", "dpo", "online-dpo", "sb3-ppo", "nlpo")
GROUPED = {"grpo": 8, "rloo": 8, "rft": 8, "online-dpo": 8}
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


def _config_fields(agent: str) -> set[str]:
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
    optimum (diagnostic tasks), wall time, tokens per second, peak memory and the
    learning curve ``[[env_steps, seconds, score, kl], ...]``.
    """
    from lmgym.models import resolve_device

    _check_task(task)
    _check_agent(agent)
    if steps is None and seconds is None:
        raise BenchError("give a budget: steps, seconds, or both")
    overrides = {**RECOMMENDED.get(task, {}), **(overrides or {})}
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    env_kwargs = {k: overrides.pop(k) for k in list(overrides) if k in ENV_OPTIONS}
    num_envs = overrides.pop("num_envs", 16 if agent == "sb3-ppo" else 64)
    group = overrides.pop("group_size", GROUPED.get(agent, 1))
    budget = steps if steps is not None else sys.maxsize
    runner = _run_sb3 if agent == "sb3-ppo" else _run_lmgym
    result = runner(task, agent, budget=budget, seconds=seconds, seed=seed, device=dev, logdir=logdir,
                    overrides=overrides, env_kwargs=env_kwargs, num_envs=num_envs, group=group, resume=resume,
                    progress=progress, eval_batches=eval_batches)
    result.update(task=task, agent=agent, seed=seed, device=str(dev), peak_memory_mib=_peak_memory_mib(dev),
                  memory_kind="cuda max allocated" if dev.type == "cuda" else "process peak RSS")
    return result


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

    Finished runs are stored under ``out/runs/`` and skipped when the grid is run again;
    a folder that holds a different grid is refused rather than mixed.
    """
    from tqdm.auto import tqdm

    for t in tasks:
        _check_task(t)
    for a in agents:
        _check_agent(a)
    overrides = overrides or {}
    out = Path(out)
    grid = {"tasks": list(tasks), "agents": list(agents), "seeds": list(seeds), "steps": steps, "seconds": seconds,
            "overrides": overrides}
    grid_file = out / "grid.json"
    if grid_file.exists():
        old = json.loads(grid_file.read_text())
        if old != json.loads(json.dumps(grid)):
            raise BenchError(f"{out} holds results of a different grid ({grid_file}); choose another --out folder "
                             "or delete it, rather than mixing results")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    grid_file.write_text(json.dumps(grid, indent=1))
    cells = [(t, a, s) for t in tasks for a in agents for s in seeds]
    results = []
    bar = tqdm(cells, desc="bench grid", unit="run", disable=not progress, position=0)
    for task, agent, seed in bar:
        name = f"{task.split('/')[-1]}__{agent}__seed{seed}"
        done_file = out / "runs" / f"{name}.json"
        bar.set_postfix_str(name)
        if done_file.exists():
            results.append(json.loads(done_file.read_text()))
            continue
        result = run(task, agent, steps=steps, seconds=seconds, seed=seed, device=device,
                     logdir=out / "tensorboard" / task.split("/")[-1] / agent / f"seed{seed}",
                     overrides=dict(overrides.get(agent, {})), progress=False)
        tmp = done_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=_jsonable))
        os.replace(tmp, done_file)  # a run counts as finished only once its file is complete
        results.append(result)
    report = write_report(out, results, grid)
    return report


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
    """Mean line and min-max band over seeds, interpolated onto a common x grid."""
    curves = [c for c in curves if len(c) > 1]
    if not curves:
        return
    top = min(c[-1, col] for c in curves)
    grid = np.linspace(max(c[0, col] for c in curves), top, 100)
    ys = np.stack([np.interp(grid, c[:, col], c[:, 2]) for c in curves])
    line = ax.plot(grid, ys.mean(0), label=label)[0]
    ax.fill_between(grid, ys.min(0), ys.max(0), alpha=0.2, color=line.get_color())


def _plot_curves(path: Path, results: list[dict], grid: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = grid["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.6 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for agent in grid["agents"]:
            curves = [np.asarray(r["curve"], dtype=float) for r in results
                      if r["task"] == task and r["agent"] == agent and r["curve"]]
            _banded(axes[row, 0], curves, 0, agent)
            _banded(axes[row, 1], curves, 1, agent)
        axes[row, 0].set(xlabel="environment steps (tokens)", ylabel="score", title=task)
        axes[row, 1].set(xlabel="wall-clock seconds", ylabel="score", title=task)
        axes[row, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_frontier(path: Path, results: list[dict], grid: dict) -> None:
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
        ax.set(xlabel="KL to the reference (per episode)", ylabel="score", title=f"{task}: reward vs KL")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
