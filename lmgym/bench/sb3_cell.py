"""The ``sb3-ppo`` cell of the grid: Stable-Baselines3's PPO with the LM itself as its policy, on the same
batched environment through the VecEnv bridge, logged under lmgym's tag names so its runs overlay lmgym's."""

from __future__ import annotations

import copy
import math
import time

import gymnasium as gym
import numpy as np

from lmgym.bench.report import BenchError

__all__ = ["run_sb3"]


def _optimum(venv) -> float | None:
    try:
        return venv.optimal_return
    except ValueError:
        return None


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


def run_sb3(task, agent, *, budget, seconds, seed, device, logdir, overrides, env_kwargs, num_envs, group, resume,
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
        task = r["score"] + r["turn_rewards"]  # the return without its KL part
        return {"score": r["score"], "return": r["return"], "kl": (task - r["return"]) / beta if beta else 0.0}

    start_eval = evaluate()
    curve, t0 = [], time.perf_counter()

    class Record(BaseCallback):
        """Per rollout, lmgym's episode statistics (objective/*) of the episodes that ended in it."""

        def _on_training_start(self) -> None:
            self.finished, self.episodes = [], 0

        def _on_step(self) -> bool:
            for info in self.locals.get("infos", []):
                if "score" in info and "episode" in info:  # the bridge's score, VecMonitor's return and length
                    task = info["score"] + info.get("turn_rewards", 0.0)  # the return without its KL part
                    self.finished.append((info["score"], info["episode"]["r"], info["episode"]["l"], task))
            return seconds is None or time.perf_counter() - t0 < seconds

        def _on_rollout_end(self) -> None:
            if not self.finished:
                return
            score, ret, length, task = (float(np.mean(x)) for x in zip(*self.finished))
            self.episodes += len(self.finished)
            self.finished = []
            # The policy is bound to the environment, so an episode's return is score (+ turn rewards) - beta * KL
            # exactly.
            kl = (task - ret) / beta if beta else 0.0
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
