"""The ``Agent`` interface and its training loop: collect a rollout, update, log, checkpoint, repeat.

An algorithm subclasses :class:`Agent` and writes one method, :meth:`Agent.update`,
which turns a :class:`Rollout` into a gradient step (or several). Collecting
episodes and the training loop are here; the update machinery (:mod:`.update`),
evaluation (:mod:`.evaluation`), logging (:mod:`.log`) and checkpoints
(:mod:`.checkpointing`) are written once beside it and mixed into :class:`Agent`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from lmgym.agents.common import checkpoint as checkpoints
from lmgym.agents.scale import sharding
from lmgym.agents.common.checkpoint import CheckpointError
from lmgym.agents.common.checkpointing import Checkpointing
from lmgym.agents.common.config import AgentConfig, ConfigError, check_config
from lmgym.agents.common.evaluation import Evaluation
from lmgym.agents.common.log import Logging
from lmgym.agents.common.update import TrainingError, UpdateSteps
from lmgym.agents.scale.distributed import DataParallel
from lmgym.agents.common.forward import policy_forward
from lmgym.agents.common.policy import ValueHead, build_policy
from lmgym.agents.common.rollout import Rollout, masked_mean, masked_whiten
from lmgym.utils import fast_paths
from lmgym.utils.heap import returning_large_frees
from lmgym.models import resolve_device, sample_continuations, to_left_padded
from lmgym.models.sampling import Sampling
from lmgym.models.precision import RolloutPrecision, as_autocast_dtype, compute_copy, refresh_compute_copy

__all__ = ["AgentConfig", "Agent", "Rollout", "Callback", "TrainingError", "CheckpointError", "ConfigError",
           "ValueHead", "policy_forward", "masked_mean", "masked_whiten"]


class Callback:
    """Called after every iteration of :meth:`Agent.learn`; return ``False`` to stop training.

    A plain function ``fn(agent, metrics)`` works as a callback too.
    """

    def on_iteration(self, agent: "Agent", metrics: dict[str, float]) -> bool | None:
        return None


class Agent(UpdateSteps, Evaluation, Logging, Checkpointing):
    """Base class of lmgym's agents. Subclass it and write :meth:`update` to plug in an algorithm.

    Args:
        env: a :class:`lmgym.TextGenVectorEnv` (``gym.make_vec("lmgym/...", num_envs=N)``).
        config: the agent's config dataclass (defaults if None).
        policy: the causal LM to train; by default a copy of the env's reference model. Either way
            it is trained with float32 master weights (a half-precision model is cast in place)
            and, with ``disable_dropout`` (default), no dropout.
        peft_config: train LoRA adapters instead (a ``peft.LoraConfig`` or a dict of its arguments;
            needs ``pip install lmgym[lora]``): they are injected into the env's reference model,
            which then serves as pi_ref with its adapters disabled, so no second copy is held.
        logdir: TensorBoard and checkpoint folder (None: no logs, no checkpoints).
        weights_only: the agent will only hold weights loaded into it (an export), never train: algorithms
            read no training data (offline DPO's preference file may have moved since the run).
        device: ``"auto"`` (CUDA when available) or any torch device; by default the env's.
        **overrides: config fields to change, e.g. ``learning_rate=3e-4``.
    """

    config_class = AgentConfig
    name = "agent"
    corrects_off_policy = False
    """whether :meth:`update` applies ``off_policy_correction`` (calls :meth:`correct_off_policy`, weighs its loss)"""

    def __init__(self, env, config: AgentConfig | None = None, *, policy=None, peft_config=None,
                 logdir: str | os.PathLike | None = None, device=None, weights_only: bool = False, **overrides):
        if not hasattr(env, "score_sequences"):
            raise TypeError(f"{type(self).__name__} needs an lmgym TextGenVectorEnv (gym.make_vec('lmgym/...')), "
                            f"got {type(env).__name__}")
        self.config = self.make_config(config, overrides)
        if self.config.off_policy_correction != "none" and not self.corrects_off_policy:
            raise ConfigError(f"{type(self).__name__} has no off-policy correction (off_policy_correction="
                              f"{self.config.off_policy_correction!r}); PPO, NLPO, GRPO, REINFORCE and RLOO have them")
        self.env = env
        self.weights_only = weights_only
        self.device = resolve_device(device) if device is not None else env.device
        if self.device != env.device:
            raise ValueError(f"the agent runs on {self.device} but the environment on {env.device}; "
                             "create the environment with the same device")
        # Under torchrun / accelerate launch: join the other processes; this one's environment is its
        # share of a batch of world_size * num_envs rows (lmgym.agents.scale.distributed).
        self.distributed = DataParallel.from_environment(self.device)
        if self.distributed.active:
            if env.multi_turn:
                raise ConfigError("multi-turn environments train in one process: their episodes end in different "
                                  "turns, so processes would take different numbers of steps; launch without "
                                  "torchrun / accelerate")
            env.core.set_shard(self.distributed.rank, self.distributed.world_size)
        self._check_batch_layout(env.num_envs)
        # The sampling transformation: the policy samples from it, its log-probs (handed to the
        # environment and used in the ratios) are the transformed distribution's, and the
        # environment scores the reference under the same transformation (lmgym.models.sampling).
        self.sampling = Sampling(self.config.temperature, self.config.top_k, self.config.top_p)
        env.sampling = self.sampling
        torch.manual_seed(self.config.seed)
        # LoRA injects adapters into the reference itself: fingerprint its weights before that.
        fingerprint = checkpoints.reference_fingerprint(env.reference_model) if peft_config is not None else None
        # float32 master weights whatever the reference's dtype, dropout off, or LoRA adapters on the
        # reference itself (see lmgym.agents.common.policy and lmgym.agents.common.lora)
        self.policy = build_policy(env, self.config, self.device, policy=policy, peft_config=peft_config)
        self.generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        # sampling draws from the same generator as the minibatch order, except while a collector thread samples
        # concurrently with the update (async_collect with max_lag >= 1): each thread then has its own
        concurrent = self.config.async_collect and self.config.max_lag > 0
        self.sampling_generator = torch.Generator(device=self.device).manual_seed(self.config.seed + 1) \
            if concurrent else self.generator
        self._collector = None
        self.setup()
        # FSDP when the launch asks for it (lmgym.agents.scale.sharding): the policy's weights, gradients and AdamW
        # moments are then split over the processes (with LoRA: the base, which is the env's reference model).
        self.sharded = self.distributed.active and sharding.fsdp_requested()
        if self.sharded:
            sharding.shard_policy(self.policy)
        self._setup_rollout_precision()
        self._check_async()
        # one fused kernel per step instead of a chain of elementwise ops per parameter (same update up to
        # float rounding); not with FSDP (the fused kernel cannot take sharded tensors) nor on other devices
        fused = self.device.type in ("cpu", "cuda") and not self.sharded
        if not fused:
            fast_paths.fall_back("fused AdamW", "the policy is FSDP-sharded" if self.sharded
                                 else f"torch has no fused AdamW on {self.device.type}")
        self.optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad],
                                           lr=self.config.learning_rate, eps=self.config.adam_eps,
                                           weight_decay=self.config.weight_decay, fused=fused)
        self.global_step = 0  # environment steps (tokens generated)
        self.iteration = 0
        self.episodes = 0
        self.logdir = Path(logdir) if logdir is not None else None
        self.writer = None
        self._close_writer = None
        self._logdir_lock, self._release_logdir = None, None  # see hold_logdir
        self.last_checkpoint: Path | None = None
        """the last checkpoint this agent wrote or loaded; only finite, usable weights are ever written"""
        self._env_started = False
        self._shard_sampling = True  # off while every process evaluates the same given prompts
        self.current_micro_batch: torch.Tensor | None = None
        """the whole micro-batch whose part :meth:`micro_batches` yielded last (for :meth:`token_share`)"""
        self.run_id = checkpoints.new_run_id()
        self.initial_kl_coef = float(env.kl_coef)
        """the environment's kl_coef when the run started (an adaptive controller moves env.kl_coef)"""
        self.resumes: list[dict] = []
        """the run's lineage: each checkpoint it was resumed from, and the settings changed then"""
        self._reference_fingerprint: str | None = fingerprint

    # ------------------------------------------------------------------ configuration
    @classmethod
    def make_config(cls, config, overrides: dict):
        import difflib

        config = copy.deepcopy(config) if config is not None else cls.config_class()
        if not isinstance(config, cls.config_class):
            raise TypeError(f"{cls.__name__} needs a {cls.config_class.__name__}, got {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(config)}
        for key, value in overrides.items():
            if key not in names:
                close = difflib.get_close_matches(key, sorted(names), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{cls.__name__} has no hyper-parameter {key!r}{hint}")
            setattr(config, key, value)
        check_config(config)
        return config

    def _check_batch_layout(self, num_envs: int) -> None:
        """The minibatch settings must split the batch of ``num_envs`` episodes evenly (under data parallelism:
        each micro-batch must split evenly over the processes too)."""
        cfg = self.config
        world = self.distributed.world_size
        if world > 1 and num_envs % (cfg.num_minibatches * cfg.gradient_accumulation_steps):
            raise ConfigError(
                f"{world} processes cannot share the micro-batches evenly: num_minibatches={cfg.num_minibatches} x "
                f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must divide each process's "
                f"{num_envs} episodes (the batch is {world} x num_envs={num_envs}); change num_envs or those settings")
        if num_envs % cfg.num_minibatches:
            raise ConfigError(f"num_minibatches={cfg.num_minibatches} must divide the batch of {num_envs} episodes "
                              "(the environment's num_envs)")
        size = num_envs // cfg.num_minibatches
        if size % cfg.gradient_accumulation_steps:
            raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must divide the "
                              f"minibatch of {size} episodes (num_envs={num_envs} / num_minibatches="
                              f"{cfg.num_minibatches})")

    def setup(self) -> None:
        """Build algorithm-specific modules (value heads...) before the optimizer is made."""

    def parameters(self):
        """Every trainable parameter (the policy's, plus any head an algorithm adds)."""
        return list(self.policy.parameters())

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The modules whose weights a checkpoint holds, by name."""
        return {"policy": self.policy}

    def save_pretrained(self, directory: str | os.PathLike, *, dtype=None, merge: bool = True,
                        overwrite: bool = False) -> Path:
        """Write the policy as a standard Hugging Face model folder (weights, config, tokenizer, generation
        config with the environment's stop tokens and this agent's sampling); a LoRA policy merged, or as
        its adapters alone with ``merge=False``. See :mod:`lmgym.agents.export`."""
        from lmgym.agents.export import save_pretrained

        return save_pretrained(self, directory, dtype=dtype, merge=merge, overwrite=overwrite)

    # ------------------------------------------------------------------ rollouts
    def policy_active(self):
        """A context in which the policy's forwards and backwards run as the policy (a LoRA policy's adapters
        on: see :mod:`lmgym.agents.common.lora`); a no-op for a policy that is a model of its own."""
        active = getattr(self.policy, "active", None)
        return active() if active is not None else contextlib.nullcontext()

    def autocast(self):
        """The update's forwards: bfloat16 autocast on CUDA when ``bf16`` is set (see :meth:`rollout_context` for
        the rollout's)."""
        enabled = self.config.bf16 and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _setup_rollout_precision(self) -> None:
        """Sample in the precision the environment scores the reference in (:mod:`lmgym.models.precision`).

        The autocast of the rollout's forwards (``rollout_autocast``) is set on the environment too, and a
        policy whose float32 master weights differ from the reference's dtype samples with a compute copy in
        that dtype, so the KL term is 0 up to rounding while the policy equals the reference.
        """
        choice = self.config.rollout_autocast
        if choice == "auto":
            current = self.env.precision.autocast
            autocast = current if current is not None else (
                torch.bfloat16 if self.config.bf16 and self.device.type == "cuda" else None)
        else:
            autocast = as_autocast_dtype(choice)
        self.env.set_autocast(autocast)
        self.rollout_precision = RolloutPrecision(weights=self.env.precision.weights, autocast=autocast)
        """the precision transform of the rollout's forwards, the policy's sampling and the reference's scoring"""
        if self.sharded or hasattr(self.policy, "active"):
            # a LoRA policy runs on the reference's own weights; an FSDP-sharded one cannot be copied whole
            self.sampler_policy = self.policy
        else:  # the asynchronous collector's thread samples with a module of its own: the update changes the policy
            self.sampler_policy = compute_copy(self.policy, self.rollout_precision.weights,
                                               always=self.config.async_collect)
        """the module that samples: the policy, or its compute copy in the reference's dtype (refreshed from the
        master weights before each rollout)"""
        self.sampler_version = 0
        """the iteration whose weights the sampler holds"""

    def rollout_context(self):
        """The context of the rollout's forwards: the autocast of :attr:`rollout_precision` (if any)."""
        return self.rollout_precision.context(self.device)

    def sampler_modules(self) -> dict[str, tuple[nn.Module, nn.Module]]:
        """``name -> (trained module, the module sampling reads)``: what the sampler takes from the update, as a copy
        of its own where they differ. NLPO adds its masking policy."""
        return {"policy": (self.policy, self.sampler_policy)}

    def sync_sampler(self) -> None:
        """Bring the sampler's modules up to the trained ones' current weights (a no-op where they are the same)."""
        for trained, sampler in self.sampler_modules().values():
            refresh_compute_copy(sampler, trained)
        self.sampler_version = self.iteration

    def collect(self) -> Rollout:
        """Sample one continuation per env with the policy (KV-cached) and score the batch in one call; on a
        multi-turn environment, one turn per running row at a time until every episode has ended
        (:func:`lmgym.agents.common.turn_rollout.collect_turns`)."""
        self.sync_sampler()
        return self._collect_rollout()

    @torch.no_grad()
    def _collect_rollout(self) -> Rollout:
        """:meth:`collect` with the sampler's weights as they are (the asynchronous collector loads its own)."""
        if not self._env_started:
            self.env.reset(seed=self.config.seed)
            self._env_started = True
        if self.env.multi_turn:
            from lmgym.agents.common.turn_rollout import collect_turns

            return collect_turns(self)
        obs = self.env.observation()
        query_ids, query_mask = to_left_padded(obs["input_ids"], obs["attention_mask"], self.env.max_prompt_tokens)
        self.sampler_policy.eval()
        with self.rollout_context():
            tokens, logprobs = self.sample(query_ids, query_mask)
        if self.sampler_policy is self.policy:
            self.policy.train()
        if not bool(torch.isfinite(logprobs).all()):
            raise TrainingError(f"the policy's log-probs are not finite at iteration {self.iteration}: its weights "
                                f"are non-finite or too large{self._last_good()}.")
        result = self.env.score_sequences(tokens, logprobs)
        for name in ("rewards", "scores"):
            value = getattr(result, name)
            if not bool(torch.isfinite(value).all()):
                raise TrainingError(f"the environment returned non-finite {name} at iteration {self.iteration}")
        return Rollout(query_ids=query_ids, query_mask=query_mask, tokens=tokens, mask=result.mask,
                       logprobs=result.logprobs, ref_logprobs=result.ref_logprobs, rewards=result.rewards,
                       scores=result.scores, kl=result.kl, lengths=result.lengths, group_size=self.env.group_size,
                       prompts=result.prompts, completions=result.completions,
                       # set by an engine sampler (lmgym.agents.scale.vllm) for the rollout it just drew
                       sampling_weights=self.__dict__.pop("pending_sampling_weights", None),
                       policy_version=self.sampler_version)

    def sample(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuations of the left-padded prompts and the log-probs of their tokens under the distribution
        sampled from: the policy's under :attr:`sampling`. An algorithm that samples from another
        distribution (NLPO's masked nucleus) overrides this; its log-probs are the ones the environment sees.
        An override samples with :attr:`sampler_policy` and :attr:`sampling_generator` (and modules it lists in
        :meth:`sampler_modules`), never ``policy`` or ``generator``: with ``async_collect`` the update changes
        those while the sampler runs."""
        return sample_continuations(
            self.sampler_policy, query_ids, query_mask, self.env.max_new_tokens,
            stop_token_ids=self.env.stop_token_ids, pad_token_id=self.env.tokenizer.pad_token_id,
            temperature=self.sampling.temperature,
            top_k=self.sampling.top_k, top_p=self.sampling.top_p, generator=self.sampling_generator,
            **self.sampling_share())

    def turn_mask(self):
        """``(mask_model, mask_fn)`` restricting each token a multi-turn rollout samples (see
        :class:`lmgym.models.turn_sampler.TurnSampler`), or ``(None, None)``: the policy under :attr:`sampling`.
        An algorithm that overrides :meth:`sample` with a restricted distribution overrides this too."""
        return None, None

    def sampling_share(self) -> dict:
        """Arguments of :func:`lmgym.models.sample_continuations` that make this process sample exactly its share
        of the data-parallel batch (none with one process); an agent with its own sampler passes them on."""
        if not self.distributed.active or not self._shard_sampling:
            return {}
        return {"noise_share": (self.distributed.rank, self.distributed.world_size),
                "all_finished": self.distributed.all_finished}

    def training_batch(self):
        """The data one iteration of :meth:`learn` trains on: a fresh rollout (with ``async_collect``, the one the
        collector's thread sampled, :mod:`lmgym.agents.common.collector`). An offline algorithm (DPO on a
        preference file) returns its next batch instead: anything with ``lengths`` (tokens per row, counted as
        steps) and ``len()``, that its :meth:`update` and :meth:`rollout_metrics` read."""
        if not self.config.async_collect:
            return self.collect()
        if self._collector is None:
            from lmgym.agents.common.collector import make_collector

            self._collector = make_collector(self)
        return self._collector.next()

    def stop_collector(self) -> None:
        """Stop the asynchronous collector, if one runs: rollouts sampled but not trained on are dropped and the
        environment and sampling generator rewound, so they are sampled again when training goes on."""
        if self._collector is not None:
            collector, self._collector = self._collector, None
            collector.stop()

    def _check_async(self) -> None:
        cfg = self.config
        if not cfg.async_collect:
            return
        reason = None
        if self.distributed.active:
            reason = "data-parallel processes sample in lockstep"
        elif hasattr(self.policy, "active"):
            reason = "a LoRA policy shares its base weights with the reference the environment scores with"
        elif type(self).training_batch is not Agent.training_batch:
            reason = f"{type(self).__name__} trains on batches of its own, not on rollouts"
        else:
            from lmgym.agents.common.collector import collector_backend

            if collector_backend(self) == "thread" and getattr(cfg, "adaptive_kl", False):
                reason = ("the adaptive KL controller moves the environment's kl_coef, which the collector's thread "
                          "scores with at the same time (async_backend='process' gives the sampler its own "
                          "environment; or adaptive_kl=False)")
        if reason is not None:
            raise ConfigError(f"async_collect: {type(self).__name__} cannot sample beside its update: {reason}; "
                              "set async_collect=False")

    def update(self, rollout: Rollout) -> dict[str, float]:
        """One training update on a rollout; returns metrics to log. Algorithms implement this."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training loop
    def learn(self, total_steps: int, *, callbacks: list[Callback | Callable] | None = None,
              progress: bool = True) -> "Agent":
        """Train until ``total_steps`` environment steps (generated tokens) have been taken in total.

        A resumed agent continues from its ``global_step``. Callbacks run after each
        iteration; one returning ``False`` stops training.
        """
        from tqdm.auto import tqdm

        if self.weights_only:
            raise TrainingError(f"this {self.name} agent was built with weights_only=True (to hold an export's "
                                "weights): it read no training data and cannot train")
        if total_steps <= self.global_step:
            return self
        check_config(self.config)  # settings changed on the agent since it was built are checked too
        self.hold_logdir()
        self._check_batch_layout(self.env.num_envs)
        self._open_writer()
        # a budget of time alone comes as a huge step count: no total to show then, only the count
        bar = tqdm(total=total_steps if total_steps < sys.maxsize else None, initial=self.global_step,
                   disable=not progress or not self.distributed.is_main, unit="tok", desc=f"{self.name}",
                   dynamic_ncols=True)
        callbacks = list(callbacks or [])
        saved_at = None
        try:
            while self.global_step < total_steps:
                self._anneal(total_steps)
                start = time.perf_counter()
                rollout = self.training_batch()
                if isinstance(rollout, Rollout):  # every process holds the whole batch (lmgym.agents.scale.distributed)
                    rollout = self.distributed.gather_rollout(rollout)
                collected = time.perf_counter()
                # CPU: the update's activations go back to the OS when freed (lmgym.utils.heap)
                heap = returning_large_frees(self.config.cpu_mmap_threshold_mib if self.device.type == "cpu" else 0)
                with self.policy_active(), heap:
                    metrics = self.distributed.mean_metrics(self.update(rollout))
                done = time.perf_counter()
                # the policy's tokens (a multi-turn reply is no step); an offline batch counts its rows' lengths
                steps = rollout.steps if isinstance(rollout, Rollout) else int(rollout.lengths.sum())
                self.global_step += steps
                self.episodes += len(rollout)
                self.iteration += 1
                metrics.update(self.rollout_metrics(rollout))
                metrics["time/tokens_per_s"] = steps / (done - start)
                metrics["time/rollout_s"] = collected - start
                metrics["time/update_s"] = done - collected
                metrics["charts/learning_rate"] = self.optimizer.param_groups[0]["lr"]
                self.log(metrics)
                bar.update(steps)
                bar.set_postfix({name: f"{metrics[key]:.3f}" for name, key in (("score", "objective/scores"),
                                 ("kl", "objective/kl"), ("loss", "loss/policy")) if key in metrics})
                if self.config.checkpoint_every and self.iteration % self.config.checkpoint_every == 0:
                    self.checkpoint()
                    saved_at = self.iteration
                if self._collector is not None:  # the collector's thread may sample with these weights now
                    self._collector.publish()
                stop = any(self._call(cb, metrics) is False for cb in callbacks)
                if self.distributed.any(stop):  # one process's callback (a time budget) stops them all
                    break
            if self.logdir is not None and saved_at != self.iteration:  # not just written by checkpoint_every
                self.checkpoint()
        finally:
            self.stop_collector()
            # the bar ends at the steps trained: the last iteration may overshoot the budget (episodes are not
            # cut), a callback (a time budget) may stop short of it
            bar.total = bar.n
            bar.close()
            self.close()  # the writer's thread ends with the run; log() opens a new one when needed
        return self

    def _call(self, cb, metrics):
        return cb.on_iteration(self, metrics) if isinstance(cb, Callback) else cb(self, metrics)
