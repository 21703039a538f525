"""What every lmgym agent shares: the ``Agent`` interface, rollouts, the policy forward, checkpoints, logging.

An algorithm subclasses :class:`Agent` and writes one method, :meth:`Agent.update`,
which turns a :class:`Rollout` into a gradient step (or several). Collecting
episodes, the training loop, checkpoints, resume, TensorBoard and the NaN guards
are written once, here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable

import torch
import torch.nn as nn

from lmgym.agents import checkpoint as checkpoints
from lmgym.agents import sharding
from lmgym.agents.checkpoint import CheckpointError
from lmgym.agents.config import ConfigError, Range, check_config
from lmgym.agents.distributed import DataParallel
from lmgym.agents.forward import policy_forward
from lmgym.agents.policy import build_policy
from lmgym.agents.rollout import Rollout, masked_mean, masked_whiten
from lmgym import fast_paths
from lmgym.heap import returning_large_frees
from lmgym.models import resolve_device, sample_continuations, to_left_padded
from lmgym.sampling import Sampling

__all__ = ["AgentConfig", "Agent", "Rollout", "Callback", "TrainingError", "CheckpointError", "ConfigError",
           "ValueHead", "policy_forward", "masked_mean", "masked_whiten"]


class TrainingError(RuntimeError):
    """An update produced a non-finite quantity, or an optimizer step produced unusable weights."""


@dataclass
class AgentConfig:
    """Hyper-parameters every agent has. Algorithms extend this dataclass.

    Each field's type and range (``Annotated[float, Range(gt=0)]``) are checked when an agent
    is built (:mod:`lmgym.agents.config`); floats must be finite.
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
    disable_dropout: bool = True
    """set every dropout probability of the trained model(s) to 0, so rollouts, ratios and values agree"""
    logprob_chunk_size: Annotated[int, Range(ge=0)] = 0
    """> 0: compute update log-probs this many positions at a time, recomputed in backward (saves memory)"""
    gradient_checkpointing: bool = False
    """recompute the policy's activations in backward instead of storing them (saves memory, costs time)"""
    cpu_mmap_threshold_mib: Annotated[float, Range(ge=0)] = 1.0
    """CPU only: during updates, allocations of at least this size are freed back to the OS at once, so peak RSS
    follows the live tensors (glibc; process-wide; lmgym.heap); 0 leaves the allocator alone"""
    checkpoint_every: Annotated[int, Range(ge=0)] = 0
    """write a checkpoint every this many iterations (0: only at the end of learn)"""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ValueHead(nn.Module):
    """A scalar head on a hidden state: V(s_t) read at the position that predicts token t."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


class Callback:
    """Called after every iteration of :meth:`Agent.learn`; return ``False`` to stop training.

    A plain function ``fn(agent, metrics)`` works as a callback too.
    """

    def on_iteration(self, agent: "Agent", metrics: dict[str, float]) -> bool | None:
        return None


class Agent:
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
        device: ``"auto"`` (CUDA when available) or any torch device; by default the env's.
        **overrides: config fields to change, e.g. ``learning_rate=3e-4``.
    """

    config_class = AgentConfig
    name = "agent"

    def __init__(self, env, config: AgentConfig | None = None, *, policy=None, peft_config=None,
                 logdir: str | os.PathLike | None = None, device=None, **overrides):
        if not hasattr(env, "score_sequences"):
            raise TypeError(f"{type(self).__name__} needs an lmgym TextGenVectorEnv (gym.make_vec('lmgym/...')), "
                            f"got {type(env).__name__}")
        self.config = self.make_config(config, overrides)
        self.env = env
        self.device = resolve_device(device) if device is not None else env.device
        if self.device != env.device:
            raise ValueError(f"the agent runs on {self.device} but the environment on {env.device}; "
                             "create the environment with the same device")
        # Under torchrun / accelerate launch: join the other processes; this one's environment is its
        # share of a batch of world_size * num_envs rows (lmgym.agents.distributed).
        self.distributed = DataParallel.from_environment(self.device)
        if self.distributed.active:
            env.core.set_shard(self.distributed.rank, self.distributed.world_size)
        self._check_batch_layout(env.num_envs)
        # The sampling transformation: the policy samples from it, its log-probs (handed to the
        # environment and used in the ratios) are the transformed distribution's, and the
        # environment scores the reference under the same transformation (lmgym.sampling).
        self.sampling = Sampling(self.config.temperature, self.config.top_k, self.config.top_p)
        env.sampling = self.sampling
        torch.manual_seed(self.config.seed)
        # LoRA injects adapters into the reference itself: fingerprint its weights before that.
        fingerprint = checkpoints.reference_fingerprint(env.reference_model) if peft_config is not None else None
        # float32 master weights whatever the reference's dtype, dropout off, or LoRA adapters on the
        # reference itself (see lmgym.agents.policy and lmgym.agents.lora)
        self.policy = build_policy(env, self.config, self.device, policy=policy, peft_config=peft_config)
        self.generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        self.setup()
        # FSDP when the launch asks for it (lmgym.agents.sharding): the policy's weights, gradients and AdamW
        # moments are then split over the processes (with LoRA: the base, which is the env's reference model).
        self.sharded = self.distributed.active and sharding.fsdp_requested()
        if self.sharded:
            sharding.shard_policy(self.policy)
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
        on: see :mod:`lmgym.agents.lora`); a no-op for a policy that is a model of its own."""
        active = getattr(self.policy, "active", None)
        return active() if active is not None else contextlib.nullcontext()

    def autocast(self):
        enabled = self.config.bf16 and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def collect(self) -> Rollout:
        """Sample one continuation per env with the policy (KV-cached) and score the batch in one call."""
        if not self._env_started:
            self.env.reset(seed=self.config.seed)
            self._env_started = True
        obs = self.env.observation()
        query_ids, query_mask = to_left_padded(obs["input_ids"], obs["attention_mask"], self.env.max_prompt_tokens)
        self.policy.eval()
        with self.autocast():
            tokens, logprobs = self.sample(query_ids, query_mask)
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
                       # set by an engine sampler (lmgym.agents.vllm) for the rollout it just drew
                       sampling_weights=self.__dict__.pop("pending_sampling_weights", None))

    def sample(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuations of the left-padded prompts and the log-probs of their tokens under the distribution
        sampled from: the policy's under :attr:`sampling`. An algorithm that samples from another
        distribution (NLPO's masked nucleus) overrides this; its log-probs are the ones the environment sees."""
        return sample_continuations(
            self.policy, query_ids, query_mask, self.env.max_new_tokens, stop_token_ids=self.env.stop_token_ids,
            pad_token_id=self.env.tokenizer.pad_token_id, temperature=self.sampling.temperature,
            top_k=self.sampling.top_k, top_p=self.sampling.top_p, generator=self.generator,
            **self.sampling_share())

    def sampling_share(self) -> dict:
        """Arguments of :func:`lmgym.models.sample_continuations` that make this process sample exactly its share
        of the data-parallel batch (none with one process); an agent with its own sampler passes them on."""
        if not self.distributed.active or not self._shard_sampling:
            return {}
        return {"noise_share": (self.distributed.rank, self.distributed.world_size),
                "all_finished": self.distributed.all_finished}

    def training_batch(self):
        """The data one iteration of :meth:`learn` trains on: a fresh rollout. An offline algorithm (DPO on a
        preference file) returns its next batch instead: anything with ``lengths`` (tokens per row, counted as
        steps) and ``len()``, that its :meth:`update` and :meth:`rollout_metrics` read."""
        return self.collect()

    def update(self, rollout: Rollout) -> dict[str, float]:
        """One training update on a rollout; returns metrics to log. Algorithms implement this."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the update machinery
    def minibatches(self, n: int):
        """Shuffled index sets for ``update_epochs`` passes of ``num_minibatches`` minibatches, seeded."""
        cfg = self.config
        if n % cfg.num_minibatches:
            raise ValueError(f"num_minibatches={cfg.num_minibatches} must divide the batch of {n} episodes")
        size = n // cfg.num_minibatches
        for _ in range(cfg.update_epochs):
            order = torch.randperm(n, generator=self.generator, device=self.device)
            # Every process draws the same permutation (their generators are equal); process 0's is made
            # authoritative so that an agent whose sampler drew unevenly cannot split the batch inconsistently.
            self.distributed.broadcast(order)
            for start in range(0, n, size):
                yield order[start:start + size]

    def micro_batches(self, idx: torch.Tensor):
        """The micro-batches of a minibatch ``idx`` (``gradient_accumulation_steps`` of them); under data
        parallelism, this process's equal part of each (the parts of all processes tile the micro-batch)."""
        steps = self.config.gradient_accumulation_steps
        if len(idx) % steps:
            raise ValueError(f"gradient_accumulation_steps={steps} must divide the minibatch of {len(idx)}")
        world = self.distributed.world_size
        if world > 1 and (len(idx) // steps) % world:
            raise ConfigError(f"micro-batches of {len(idx) // steps} episodes cannot be split over {world} processes; "
                              "make num_minibatches x gradient_accumulation_steps divide each process's num_envs")
        for micro in idx.chunk(steps):
            self.current_micro_batch = micro  # the whole micro-batch, for token_share
            yield micro if world == 1 else micro.chunk(world)[self.distributed.rank]

    def token_share(self, mask: torch.Tensor, part: torch.Tensor) -> torch.Tensor | float:
        """The factor that turns a token mean over this process's ``part`` of the current micro-batch into its share
        of the token mean over the whole micro-batch, gradients being averaged over the processes:
        ``world_size * tokens(part) / tokens(micro-batch)`` (1 with one process). ``mask`` is the rollout's."""
        if not self.distributed.active:
            return 1.0
        whole = self.current_micro_batch
        return self.distributed.world_size * mask[part].sum() / mask[whole].sum().clamp(min=1)

    def in_parts(self, fn: Callable[["Rollout"], torch.Tensor], rollout: "Rollout") -> torch.Tensor:
        """``fn(rollout)`` (rows first) computed by each process on its contiguous share of the rows and gathered,
        instead of by every process on all of them (e.g. PPO's value pass); just ``fn(rollout)`` with one."""
        if not self.distributed.active:
            return fn(rollout)
        share = torch.arange(len(rollout), device=self.device).chunk(self.distributed.world_size)
        return self.distributed.gather_rows(fn(rollout.select(share[self.distributed.rank])))

    def _last_good(self) -> str:
        return (f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "; no checkpoint of this run was written yet")

    def check_finite(self, **values: torch.Tensor) -> None:
        """Stop with a clear error naming the first non-finite quantity, before it reaches the weights."""
        for name, value in values.items():
            if not bool(torch.isfinite(value).all()):
                raise TrainingError(f"{name} is not finite (nan or inf) at iteration {self.iteration}, environment "
                                    f"step {self.global_step}; the update was stopped before changing the weights"
                                    f"{self._last_good()}. Lower the learning rate or check the reward function.")

    def optimizer_step(self) -> float:
        """Clip gradients, check them, take an AdamW step, check the weights; returns the pre-clip gradient norm.

        A non-finite gradient stops before the step. After the step one fused norm over all
        parameters (one host sync) checks that the weights are still finite and usable; if not,
        :class:`TrainingError` says so and the agent refuses to save them.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        self.distributed.average_gradients(params)  # every process then takes the same step
        if self.sharded:
            norm = float(sharding.clip_grad_norm(params, self.config.max_grad_norm))
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)  # the clipped gradients are nan: never accumulate into them
            self.check_finite(grad_norm=torch.tensor(norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not self._weights_usable(params):
            names = {id(p): name for name, p in self.named_trainable_parameters().items()}
            problem = checkpoints.weight_problem({names.get(id(p), f"parameter #{i}"): p
                                                  for i, p in enumerate(params)})
            raise TrainingError(f"the optimizer step at iteration {self.iteration}, environment step "
                                f"{self.global_step} left the weights unusable ({problem}); they will not be saved"
                                f"{self._last_good()}. Lower the learning rate (now "
                                f"{self.optimizer.param_groups[0]['lr']:g}) or max_grad_norm.")
        return norm

    def _weights_usable(self, params) -> bool:
        if not self.sharded:
            return checkpoints.weights_usable(params)
        local = [p.to_local() if sharding.is_sharded(p) else p for p in params]  # each process checks its shards
        flag = torch.tensor([int(checkpoints.weights_usable(local))], device=self.device)
        return bool(self.distributed.all_reduce(flag, torch.distributed.ReduceOp.MIN))

    def named_trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable modules' parameters by ``module.parameter`` name (tied parameters once)."""
        out, seen = {}, set()
        for module_name, module in self.trainable_modules().items():
            for name, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out[f"{module_name}.{name}"] = p
        return out

    def _anneal(self, total_steps: int) -> None:
        if self.config.anneal_lr:
            frac = max(0.0, 1.0 - self.global_step / max(1, total_steps))
            for group in self.optimizer.param_groups:
                group["lr"] = frac * self.config.learning_rate

    # ------------------------------------------------------------------ training loop
    def learn(self, total_steps: int, *, callbacks: list[Callback | Callable] | None = None,
              progress: bool = True) -> "Agent":
        """Train until ``total_steps`` environment steps (generated tokens) have been taken in total.

        A resumed agent continues from its ``global_step``. Callbacks run after each
        iteration; one returning ``False`` stops training.
        """
        from tqdm.auto import tqdm

        if total_steps <= self.global_step:
            return self
        check_config(self.config)  # settings changed on the agent since it was built are checked too
        self._check_batch_layout(self.env.num_envs)
        self._open_writer()
        bar = tqdm(total=total_steps, initial=self.global_step, disable=not progress or not self.distributed.is_main,
                   unit="tok", desc=f"{self.name}", dynamic_ncols=True)
        callbacks = list(callbacks or [])
        saved_at = None
        try:
            while self.global_step < total_steps:
                self._anneal(total_steps)
                start = time.perf_counter()
                rollout = self.training_batch()
                if isinstance(rollout, Rollout):  # every process holds the whole batch (lmgym.agents.distributed)
                    rollout = self.distributed.gather_rollout(rollout)
                collected = time.perf_counter()
                # CPU: the update's activations go back to the OS when freed (lmgym.heap)
                heap = returning_large_frees(self.config.cpu_mmap_threshold_mib if self.device.type == "cpu" else 0)
                with self.policy_active(), heap:
                    metrics = self.distributed.mean_metrics(self.update(rollout))
                done = time.perf_counter()
                steps = int(rollout.lengths.sum())
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
                stop = any(self._call(cb, metrics) is False for cb in callbacks)
                if self.distributed.any(stop):  # one process's callback (a time budget) stops them all
                    break
            if self.logdir is not None and saved_at != self.iteration:  # not just written by checkpoint_every
                self.checkpoint()
        finally:
            bar.close()
            self.close()  # the writer's thread ends with the run; log() opens a new one when needed
        return self

    def _call(self, cb, metrics):
        return cb.on_iteration(self, metrics) if isinstance(cb, Callback) else cb(self, metrics)

    def rollout_metrics(self, rollout: Rollout) -> dict:
        """The field's usual episode statistics."""
        kl = rollout.kl.sum(1)
        return {"objective/scores": float(rollout.scores.mean()), "objective/kl": float(kl.mean()),
                "objective/return": float(rollout.returns.mean()), "objective/kl_coef": float(self.env.kl_coef),
                "charts/episode_length": float(rollout.lengths.float().mean()),
                "charts/episodes": float(self.episodes)}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, num_batches: int = 4, seed: int | None = None, prompts=None) -> dict:
        """Mean score, KL and return (score - beta * KL) of the current policy over fresh episodes.

        Prompts and samples come from ``seed`` (default: the config's seed + 10000), so two
        evaluations of one run (before and after training) see the same prompts and differ
        only by the policy. The training run's own prompt stream and RNG are left untouched.

        With ``prompts`` (e.g. held-out prompts: text, chat messages or token ids), each of
        them is evaluated instead, ``group_size`` times, and ``num_batches`` is ignored; the
        result then also holds ``samples``, ``(prompt, completion, score)`` per episode.
        """
        seed = self.config.seed + 10_000 if seed is None else seed
        saved_generator, saved_started = self.generator, self._env_started
        env_state = self._env_snapshot() if self._env_started else None
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        samples = []
        try:
            if prompts is None:
                self.env.reset(seed=seed)
                self._env_started = True
                batches = [self.distributed.gather_rollout(self.collect()) for _ in range(num_batches)]
            else:
                # every process evaluates all the given prompts alike (no sharding of them or of the noise)
                self._shard_sampling, saved_shard = False, self.env.core.shard
                self.env.core.shard = (0, 1)
                try:
                    batches = self._collect_on(list(prompts), seed, samples)
                finally:
                    self._shard_sampling, self.env.core.shard = True, saved_shard
        finally:
            self.generator = saved_generator
            self._env_started = saved_started
            if env_state is not None:
                self._env_restore(env_state)
        scores = torch.cat([b.scores for b in batches])
        kl = torch.cat([b.kl.sum(1) for b in batches])
        returns = torch.cat([b.returns for b in batches])
        out = {"score": float(scores.mean()), "kl": float(kl.mean()), "return": float(returns.mean()),
               "return_std": float(returns.std()) if returns.numel() > 1 else 0.0, "episodes": int(returns.numel())}
        if prompts is not None:
            out["samples"] = samples
        return out

    def _collect_on(self, prompts: list, seed: int, samples: list) -> list[Rollout]:
        """Rollouts of every prompt in ``prompts``, ``group_size`` episodes each, in batches of the env's size."""
        if not prompts:
            raise ValueError("evaluate(prompts=...) needs at least one prompt")
        per_batch = self.env.num_envs // self.env.group_size
        batches = []
        for start in range(0, len(prompts), per_batch):
            chunk = prompts[start:start + per_batch]
            real = len(chunk) * self.env.group_size
            chunk = chunk + [chunk[0]] * (per_batch - len(chunk))  # fill the batch; the filler is dropped below
            self.env.reset(seed=seed, options={"prompts": chunk})
            self._env_started = True
            rollout = self.collect()
            keep = torch.arange(real, device=self.device)
            samples.extend(zip(rollout.prompts[:real], rollout.completions[:real], rollout.scores[:real].tolist()))
            batches.append(rollout.select(keep))
        return batches

    # ------------------------------------------------------------------ logging
    def _open_writer(self) -> None:
        if self.logdir is None or self.writer is not None or not self.distributed.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.logdir))
        # Closes the writer (and ends its thread) when the agent is garbage-collected, if close() was not called.
        self._close_writer = weakref.finalize(self, self.writer.close)
        rows = "\n".join(f"|{k}|{v}|" for k, v in self.config.to_dict().items())
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")

    def log(self, metrics: dict) -> None:
        """Write scalars to TensorBoard at the current environment step (nothing without a logdir)."""
        self._open_writer()
        if self.writer is None:
            return
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, self.global_step)

    def close(self) -> None:
        """Flush and close the TensorBoard writer, ending its thread. :meth:`learn` calls this when it returns."""
        if self._close_writer is not None:
            self._close_writer()  # runs writer.close() once, and detaches the garbage-collection hook
        self.writer, self._close_writer = None, None

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ checkpoints
    def _env_snapshot(self) -> dict:
        core = self.env.core
        return {"rng": core.rng.bit_generator.state, "prompts": [list(p.ids) for p in core.row_prompts]}

    def _checkpoint_payload(self) -> dict:
        """What process 0 needs from all processes to write a checkpoint (collectives: every process calls this):
        the whole batch's environment state, and with FSDP the gathered weights and optimizer moments."""
        payload = {"env": self._env_checkpoint_snapshot() if self._env_started else None}
        if self.sharded:
            weights = {}
            for name, module in self.trainable_modules().items():
                # what the checkpoint stores of the module: gathered only if sharded (a LoRA policy's adapters
                # stay whole on every process; its sharded base is never stored, so never gathered)
                stored = checkpoints.saved_state(module)
                full = any(sharding.is_sharded(v) for v in stored.values())
                weights[name] = checkpoints.untie(sharding.full_weights(module)) if full else \
                    checkpoints.untie({k: v.detach() for k, v in stored.items()})
            payload["weights"] = weights
            payload["optimizer_state"] = sharding.full_optimizer_state(self.optimizer)
        return payload

    def _env_checkpoint_snapshot(self) -> dict:
        """The environment state a checkpoint holds: the prompts in flight of the whole data-parallel batch
        (gathered from every process, a collective) and the prompt RNG, which is the same in every process."""
        snap = self._env_snapshot()
        snap["prompts"] = self.distributed.gather_objects(snap["prompts"])
        return snap

    def _env_restore(self, snap: dict) -> None:
        prompts, n, world = snap["prompts"], self.env.core.num_envs, self.distributed.world_size
        if world > 1 and len(prompts) == n * world:  # a checkpoint's whole batch: this process's share
            prompts = prompts[self.distributed.rank * n:(self.distributed.rank + 1) * n]
        self.env.reset(options={"prompts": prompts})
        self.env.core.rng.bit_generator.state = snap["rng"]
        self._env_started = True

    def state(self) -> dict:
        """Everything besides the weights that a resumed run needs to continue identically, and its lineage."""
        return {"format": checkpoints.FORMAT, "agent": self.name, "run_id": self.run_id,
                "config": self.config.to_dict(), "global_step": self.global_step, "iteration": self.iteration,
                "episodes": self.episodes, "kl_coef": {"initial": self.initial_kl_coef, "current": self.env.kl_coef},
                "task": self.task_signature(), "layout": self.batch_layout(),
                "extra": self.extra_state(), "resumes": self.resumes}

    def batch_layout(self) -> dict:
        """The batch a checkpoint's prompts in flight belong to: all processes' episodes, and the group size."""
        core = self.env.core
        return {"num_envs": core.num_envs * self.distributed.world_size, "group_size": core.group_size}

    def extra_state(self) -> dict:
        """Algorithm state to checkpoint (moving averages...), JSON-serialisable."""
        return {}

    def check_extra_state(self, state: dict) -> None:
        """Raise ``ValueError`` naming the field if ``state`` (read from a checkpoint) is not what
        :meth:`extra_state` writes; called before anything is loaded."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no extra state, found {sorted(state)}")

    def load_extra_state(self, state: dict) -> None:
        pass

    def task_signature(self) -> dict:
        """What a checkpoint must share with this agent's environment: task, horizon, vocabulary, reference model."""
        if self._reference_fingerprint is None:  # the reference is frozen: hash it once
            self._reference_fingerprint = checkpoints.reference_fingerprint(self.env.reference_model)
        return checkpoints.task_signature(self.env, self._reference_fingerprint)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write a checkpoint folder atomically: weights (safetensors), optimizer and RNG state, state.json and a
        manifest of sha256 checksums. Non-finite weights are refused.

        An existing folder is never replaced unless ``overwrite=True``.
        See :mod:`lmgym.agents.checkpoint`.
        """
        payload = self._checkpoint_payload()
        return self.distributed.on_main(lambda: checkpoints.save(self, path, overwrite=overwrite, **payload))

    def checkpoint(self) -> Path | None:
        """Save to ``logdir/checkpoints/iter-NNNNNN`` and remember it as the last good checkpoint.

        A checkpoint another run wrote at that path (e.g. the one this run resumed from, when it
        resumed into the same logdir) is kept, and this one is written alongside as
        ``iter-NNNNNN-2``, with a warning; the path returned is always the one just written.
        """
        if self.logdir is None:
            return None
        payload = self._checkpoint_payload()  # every process takes part

        def write() -> Path:  # on process 0 only
            for _attempt in range(100):
                path, replace = checkpoints.checkpoint_path(self.logdir, self.iteration, self.run_id)
                try:
                    return checkpoints.save(self, path, overwrite=replace, **payload)
                except FileExistsError:  # another process took that name while we wrote: take the next one
                    continue
            raise CheckpointError(f"could not find a free checkpoint folder for iteration {self.iteration} under "
                                  f"{self.logdir / 'checkpoints'}")

        self.last_checkpoint = self.distributed.on_main(write)
        return self.last_checkpoint

    def load(self, path: str | os.PathLike, *, resume: bool = True) -> "Agent":
        """Load a checkpoint written by :meth:`save` into this agent (same algorithm, task and reference model).

        Every file is checked first (checksums, fields, shapes, finiteness); on any problem
        :class:`CheckpointError` names it and the agent is left unchanged. With ``resume=True``
        (default) the optimizer, RNG, step counters and the environment's prompt stream are
        restored too, so :meth:`learn` continues the same run exactly; this agent's
        hyper-parameters (except ``seed``) and its environment's ``kl_coef`` apply from here on
        when they differ from the checkpoint's (a warning lists them, and ``state.json`` of the
        next checkpoint records them). The environment may have another ``num_envs`` or
        ``group_size``: the prompt stream then continues from the checkpoint's RNG with a new
        batch of prompts. With ``resume=False`` only the weights are loaded.
        """
        return checkpoints.load(self, path, resume=resume)
