"""TRL's online trainers as cells of ``lmgym bench``: ``trl-grpo`` (``GRPOTrainer``) and ``trl-rloo`` (``RLOOTrainer``).

A cell trains with TRL through :class:`lmgym.integrations.trl.TRLTask` and is scored as every lmgym
cell is: lmgym's evaluation (:meth:`lmgym.agents.Agent.evaluate`, the same seed, so the same
prompts and samples as the other agents' evaluations) of the trained weights on the task's
environment, with its reference and per-token KL, before and after training, and the fraction of
the exact optimum on diagnostic tasks.

**Budget.** An environment step is a generated token. TRL's ``completion_ids`` hold each
completion's tokens up to and including the stop token that ended it, which is exactly the
environment's episode length, so the cell counts their lengths and stops TRL after the optimizer
step at which the count reaches ``steps`` (or the wall time reaches ``seconds``), as lmgym's agents
finish their last iteration. One TRL step is one batch of ``num_envs`` completions, ``group_size``
per prompt (``per_device_train_batch_size``, ``num_generations``, ``steps_per_generation=1``), one
optimizer step: the batch layout of lmgym's ``grpo`` and ``rloo`` cells.

**Multi-turn tasks.** ``trl-grpo`` trains on the episodes the environment plays (TRL's ``rollout_func``,
:mod:`lmgym.integrations.trl_episodes`); a step is a policy token, as for lmgym's agents (a reply is no step), and
the curve's KL is the one the environment charged while playing. ``trl-rloo`` is refused there (TRL 1.16's
``RLOOTrainer`` takes no rollout function).

**Like with like.** Unless overridden (``--agent.NAME VALUE`` takes any field of TRL's config but the
ones the bench sets: output folder, seed, batch layout, horizon, budget), the settings are those of
lmgym's own ``grpo`` / ``rloo``: ``beta`` = the task's ``kl_coef``; the ``grpo`` loss (per-sequence
token mean) with group-std advantages, clipping 0.2 / 0.28 and k3 in the loss for ``trl-grpo``; the
leave-one-out baseline on ``score - beta * sum_t k1_t`` without advantage normalisation for
``trl-rloo``; one optimizer step per batch, a constant learning rate (the task's recommended one,
else lmgym's default 1e-4), fused AdamW without weight decay, gradient norm clipped to 1,
temperature 1 without top-k / top-p, dropout off, float32 weights.

**Memory.** Cells share the bench's process: a TRL cell runs with whatever that process set, including the
mmap threshold lmgym's agents pin on the CPU (:mod:`lmgym.utils.heap`, process-wide; the cell's evaluator is an lmgym
agent), so lmgym's and TRL's cells are measured under the same allocator.

**Curve.** After each generation the cell asks the environment for the batch's KL (a policy forward
for the log-probs lmgym's agents hand over, then the environment's own reference pass); that
bookkeeping is timed and left out of the cell's wall time.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import torch

from lmgym.integrations.trl import TRLTask, require_trl

__all__ = ["TRL_AGENTS", "FIXED_FIELDS", "MULTI_TURN_TRAINERS", "check_task", "config_fields", "run_cell"]

TRL_AGENTS = {"trl-grpo": ("GRPOTrainer", "GRPOConfig"), "trl-rloo": ("RLOOTrainer", "RLOOConfig")}
"""Bench agent name -> TRL's trainer and config class."""

FIXED_FIELDS = {"output_dir", "seed", "data_seed", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                "num_generations", "generation_batch_size", "steps_per_generation", "max_completion_length",
                "gradient_accumulation_steps", "use_cpu", "model_init_kwargs", "report_to", "save_strategy",
                "logging_strategy", "disable_tqdm"}
"""TRL config fields the bench sets itself (the cell's batch layout, horizon, budget, seed and output)."""

_LIKE_LMGYM = {
    "trl-grpo": dict(loss_type="grpo", scale_rewards="group", epsilon=0.2, epsilon_high=0.28, num_iterations=1,
                     importance_sampling_level="token", mask_truncated_completions=False),
    "trl-rloo": dict(normalize_advantages=False, num_iterations=1, mask_truncated_completions=False),
}
_COMMON = dict(learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_epsilon=1e-8,
               max_grad_norm=1.0, shuffle_dataset=True, dataloader_num_workers=0)


def _classes(agent: str):
    trl = require_trl()
    trainer, config = TRL_AGENTS[agent]
    return getattr(trl, trainer), getattr(trl, config)


def config_fields(agent: str) -> set[str]:
    """The hyper-parameters a ``trl-*`` cell accepts: its TRL config's fields but :data:`FIXED_FIELDS`, plus
    ``num_envs`` and ``group_size`` (the batch and the group)."""
    _, config = _classes(agent)
    return ({f.name for f in dataclasses.fields(config)} - FIXED_FIELDS) | {"num_envs", "group_size"}


class _Recorder:
    """The task's reward (:attr:`TRLTask.reward`), which also counts the environment steps and logs the batch's score
    and environment KL.

    Single-turn: a step is a generated token (TRL's ``completion_ids`` end at the stop token, as the episode does)
    and the KL needs a policy forward and the environment's reference pass (timed, left out of the wall time).
    Multi-turn: the episodes come from :class:`lmgym.integrations.trl_episodes.EpisodeRollout`, which passes each
    one's policy tokens (the steps, as lmgym's agents count them: a reply is no step) and the KL the environment
    charged while playing it."""

    def __init__(self, task: TRLTask):
        self.task = task
        self.reward = task.reward
        self.items = list(task.core.prompts.items)
        self.__name__ = task.reward.__name__
        self.trainer = None
        self.tokens = 0
        self.curve: list[list[float]] = []
        self.t0 = time.perf_counter()
        self.bookkeeping = 0.0  # seconds spent on the curve's KL, left out of the wall time

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0 - self.bookkeeping

    def __call__(self, prompts, completions, completion_ids=None, prompt_index=None, **kwargs) -> list[float]:
        if self.task.multi_turn:
            scores = self.reward(prompts, completions, episode_return=kwargs.get("episode_return"))
            self.tokens += sum(kwargs["policy_tokens"])
            kl = float(np.mean(kwargs["episode_kl"]))
        else:
            scores = self.reward(prompts, completions, completion_ids=completion_ids, prompt_index=prompt_index)
            self.tokens += sum(len(c) for c in completion_ids)
            started = time.perf_counter()
            kl = self._environment_kl(prompt_index, completion_ids)
            self.bookkeeping += time.perf_counter() - started
        self.curve.append([self.tokens, self.elapsed(), float(np.mean(scores)), kl])
        return scores

    @torch.no_grad()
    def _environment_kl(self, prompt_index, completion_ids) -> float:
        """Mean episode KL of the batch as the environment accounts it, for the policy that sampled it."""
        from lmgym.agents.common.base import policy_forward
        from lmgym.models import left_pad, right_pad

        env = self.task.env
        if len(completion_ids) != env.num_envs:
            return math.nan
        prompts = [self.items[int(i)] for i in prompt_index]
        env.reset(options={"prompts": prompts})
        width = env.max_new_tokens
        tokens, mask = right_pad([list(ids)[:width] for ids in completion_ids], self.task.core.pad_token_id, env.device,
                                 width=width)
        query_ids, query_mask = left_pad([p.ids for p in prompts], self.task.core.pad_token_id, env.device)
        model = self.trainer.model
        logprobs, _, _ = policy_forward(model, SimpleNamespace(query_ids=query_ids, query_mask=query_mask,
                                                               tokens=tokens, mask=mask.float(),
                                                               group_size=env.group_size))
        result = env.score_sequences(tokens, logprobs.float())
        return float(result.kl.sum(1).mean())


MULTI_TURN_TRAINERS = ("trl-grpo",)
"""The cells that take multi-turn tasks: TRL 1.16's GRPOTrainer has a rollout_func with an environment mask, its
RLOOTrainer has neither."""


def check_task(task: str, agent: str) -> None:
    """Refuse, in one line, a TRL trainer that cannot train on ``task`` (a multi-turn task and no rollout function)."""
    from lmgym.tasks import MULTI_TURN_IDS

    if task in MULTI_TURN_IDS and agent not in MULTI_TURN_TRAINERS:
        raise ValueError(f"{agent} cannot train on the multi-turn task {task}: TRL's {TRL_AGENTS[agent][0]} takes no "
                         f"rollout function or environment mask; use {' or '.join(MULTI_TURN_TRAINERS)}")


def run_cell(task: str, agent: str, *, budget: int, seconds: float | None, seed: int, device: torch.device,
             logdir, overrides: dict, env_kwargs: dict, num_envs: int, group: int, eval_batches: int,
             progress: bool) -> dict:
    """Train TRL's trainer ``agent`` on ``task``; the same result dict as lmgym's own cells (``lmgym.bench.run``)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer_class, config_class = _classes(agent)
    check_task(task, agent)
    unknown = set(overrides) - config_fields(agent)
    if unknown:
        raise ValueError(f"{agent} has no hyper-parameter {sorted(unknown)[0]!r} (or the bench sets it itself)")
    venv = gym.make_vec(task, num_envs=num_envs, group_size=group, device=device, **env_kwargs)
    with tempfile.TemporaryDirectory(prefix="lmgym-trl-") as scratch:
        adapter = TRLTask(venv, scratch)
        optimum = adapter.optimal_return
        start_eval = adapter.evaluator(seed=seed).evaluate(eval_batches)  # as lmgym's cells evaluate
        recorder = _Recorder(adapter)
        settings = {**_COMMON, **_LIKE_LMGYM[agent], **adapter.config_kwargs(), **overrides}
        steps_bound = min(10**9, math.ceil(budget / num_envs) + 1)  # every completion is at least one token
        args = config_class(output_dir=str(Path(scratch) / "trainer"), seed=seed, max_steps=steps_bound,
                            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                            **settings)

        bar = tqdm(total=budget if budget < 10**15 else None, disable=not progress, unit="tok", desc=agent,
                   dynamic_ncols=True)

        class Budget(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                bar.update(recorder.tokens - bar.n)
                bar.set_postfix({"score": f"{recorder.curve[-1][2]:.3f}", "kl": f"{recorder.curve[-1][3]:.3f}"})
                if recorder.tokens >= budget or (seconds is not None and recorder.elapsed() >= seconds):
                    control.should_training_stop = True

        trainer = trainer_class(**{**adapter.trainer_kwargs(), "reward_funcs": [recorder]}, args=args,
                                callbacks=[Budget()])
        # Trainer prints its logs (a dict per log step, and a summary at the end) through these callbacks; the
        # bench reports through its own table and TensorBoard, so they would only interleave with its progress bar.
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        recorder.trainer = trainer
        recorder.t0 = time.perf_counter()
        try:
            trainer.train()
        finally:
            bar.close()
        wall = recorder.elapsed()
        end_eval = adapter.evaluator(trainer.model, seed=seed).evaluate(eval_batches)
    if logdir is not None:
        _write_tensorboard(logdir, recorder.curve, float(venv.kl_coef), settings)
    hyper = {k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool, type(None), dict))}
    return {"start": start_eval, "end": end_eval, "optimum": optimum,
            "fraction_of_optimum": end_eval["return"] / optimum if optimum else None,
            "wall_seconds": wall, "env_steps": recorder.tokens,
            "tokens_per_s": recorder.tokens / wall if wall else 0.0, "curve": recorder.curve,
            "hyperparameters": hyper, "kl_coef": float(venv.kl_coef), "checkpoint": None,
            "curve_bookkeeping_seconds": recorder.bookkeeping}


def _write_tensorboard(logdir, curve, beta: float, settings: dict) -> None:
    """The cell's curve under lmgym's tag names, so it overlays lmgym's runs in TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(logdir)) as writer:
        rows = "\n".join(f"|{k}|{v}|" for k, v in settings.items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")
        for steps, _, score, kl in curve:
            writer.add_scalar("objective/scores", score, steps)
            writer.add_scalar("objective/kl", kl, steps)
            writer.add_scalar("objective/return", score - beta * kl, steps)
