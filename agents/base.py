"""What every lmgym agent shares: the ``Agent`` interface, rollouts, the policy forward, checkpoints, logging.

An algorithm subclasses :class:`Agent` and writes one method, :meth:`Agent.update`,
which turns a :class:`Rollout` into a gradient step (or several). Collecting
episodes, the training loop, checkpoints, resume, TensorBoard and the NaN guards
are written once, here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lmgym.models import resolve_device, sample_continuations, token_logprobs, to_left_padded

__all__ = ["AgentConfig", "Agent", "Rollout", "Callback", "TrainingError", "CheckpointError", "ValueHead",
           "policy_forward", "masked_mean", "masked_whiten"]


class TrainingError(RuntimeError):
    """An update produced a non-finite quantity; training stopped before the bad step touched the weights."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to another agent or task."""


@dataclass
class AgentConfig:
    """Hyper-parameters every agent has. Algorithms extend this dataclass."""

    seed: int = 0
    """seed for sampling, minibatch order and initialisation"""
    learning_rate: float = 1e-4
    """AdamW learning rate"""
    anneal_lr: bool = False
    """decay the learning rate linearly to 0 over the run"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""
    update_epochs: int = 1
    """passes over each rollout"""
    num_minibatches: int = 1
    """minibatches per pass (each gets one optimizer step)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per minibatch, to bound memory"""
    temperature: float = 1.0
    """sampling temperature of the policy"""
    bf16: bool = True
    """bfloat16 autocast for forward passes on a CUDA device (ignored on the CPU)"""
    checkpoint_every: int = 0
    """write a checkpoint every this many iterations (0: only at the end of learn)"""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Rollout:
    """One batch of finished episodes: per-token tensors ``(N, T)`` and per-episode ``(N,)``, on one device."""

    query_ids: torch.Tensor
    """left-padded prompts ``(N, P)``"""
    query_mask: torch.Tensor
    """1 for prompt tokens"""
    tokens: torch.Tensor
    """sampled continuations ``(N, T)``"""
    mask: torch.Tensor
    """1.0 for tokens inside the episode"""
    logprobs: torch.Tensor
    """log pi_old of each token, from sampling"""
    ref_logprobs: torch.Tensor
    """log pi_ref of each token"""
    rewards: torch.Tensor
    """per-token rewards from the environment (KL penalty + score on the last step)"""
    scores: torch.Tensor
    """task score of each episode"""
    kl: torch.Tensor
    """per-token KL estimate log pi_old - log pi_ref"""
    lengths: torch.Tensor
    """tokens per episode"""
    group_size: int = 1
    """G consecutive episodes share one prompt"""
    prompts: list[str] = field(default_factory=list)
    """each episode's prompt text"""
    completions: list[str] = field(default_factory=list)
    """decoded completions"""
    values: torch.Tensor | None = None
    """value estimates (filled by actor-critic agents)"""

    @property
    def returns(self) -> torch.Tensor:
        """Each episode's undiscounted return: score - beta * sum KL."""
        return self.rewards.sum(1)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, idx: torch.Tensor) -> "Rollout":
        """The rollout's tensors restricted to the episodes ``idx`` (texts are left out: updates do not
        read them, and gathering them would cost a host round-trip per minibatch)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[idx] if isinstance(v, torch.Tensor) else v
        out["prompts"], out["completions"] = [], []
        return Rollout(**out)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` to unit variance (and zero mean) over the masked entries."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


class ValueHead(nn.Module):
    """A scalar head on a hidden state: V(s_t) read at the position that predicts token t."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def policy_forward(model, rollout: Rollout, *, temperature: float = 1.0, hidden: bool = False,
                   entropy_grad: bool = False):
    """One forward of ``model`` over prompt + continuation.

    Returns ``(logprobs, entropy, hidden_states)``, each ``(N, T)`` (hidden ``(N, T, H)``
    or None): the log-prob of each continuation token, the entropy of the policy at
    that state, and the last hidden state at the position that predicts it. The
    entropy carries gradients only with ``entropy_grad=True`` (an entropy bonus);
    otherwise it is a detached statistic for logging.
    """
    ids = torch.cat([rollout.query_ids, rollout.tokens], dim=1)
    mask = torch.cat([rollout.query_mask, torch.ones_like(rollout.tokens)], dim=1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=hidden)
    start = rollout.query_ids.shape[1] - 1
    logits = out.logits[:, start:-1].float() / temperature
    logprobs = token_logprobs(logits, rollout.tokens)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        probs = torch.softmax(logits, dim=-1)
        entropy = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
    h = out.hidden_states[-1][:, start:-1] if hidden else None
    return logprobs, entropy, h


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
        policy: the causal LM to train; by default a trainable copy of the env's reference model.
        logdir: TensorBoard and checkpoint folder (None: no logs, no checkpoints).
        device: ``"auto"`` (CUDA when available) or any torch device; by default the env's.
        **overrides: config fields to change, e.g. ``learning_rate=3e-4``.
    """

    config_class = AgentConfig
    name = "agent"

    def __init__(self, env, config: AgentConfig | None = None, *, policy=None, logdir: str | os.PathLike | None = None,
                 device=None, **overrides):
        if not hasattr(env, "score_sequences"):
            raise TypeError(f"{type(self).__name__} needs an lmgym TextGenVectorEnv (gym.make_vec('lmgym/...')), "
                            f"got {type(env).__name__}")
        self.config = self.make_config(config, overrides)
        self.env = env
        self.device = resolve_device(device) if device is not None else env.device
        if self.device != env.device:
            raise ValueError(f"the agent runs on {self.device} but the environment on {env.device}; "
                             "create the environment with the same device")
        torch.manual_seed(self.config.seed)
        self.policy = (policy if policy is not None else copy.deepcopy(env.reference_model)).to(self.device)
        self.policy.requires_grad_(True)
        self.policy.train()
        self.generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        self.setup()
        self.optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad],
                                           lr=self.config.learning_rate, eps=self.config.adam_eps,
                                           weight_decay=self.config.weight_decay)
        self.global_step = 0  # environment steps (tokens generated)
        self.iteration = 0
        self.episodes = 0
        self.logdir = Path(logdir) if logdir is not None else None
        self.writer = None
        self.last_checkpoint: Path | None = None
        self._env_started = False

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
                raise TypeError(f"{cls.__name__} has no hyper-parameter {key!r}{hint}")
            setattr(config, key, value)
        return config

    def setup(self) -> None:
        """Build algorithm-specific modules (value heads...) before the optimizer is made."""

    def parameters(self):
        """Every trainable parameter (the policy's, plus any head an algorithm adds)."""
        return list(self.policy.parameters())

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The modules whose weights a checkpoint holds, by name."""
        return {"policy": self.policy}

    # ------------------------------------------------------------------ rollouts
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
            tokens, logprobs = sample_continuations(
                self.policy, query_ids, query_mask, self.env.max_new_tokens, stop_token_ids=self.env.stop_token_ids,
                pad_token_id=self.env.tokenizer.pad_token_id, temperature=self.config.temperature,
                generator=self.generator)
        self.policy.train()
        if not bool(torch.isfinite(logprobs).all()):
            raise TrainingError(f"the policy's log-probs are not finite at iteration {self.iteration}: its weights "
                                f"hold nan or inf. The last good checkpoint is {self.last_checkpoint}.")
        result = self.env.score_sequences(tokens, logprobs)
        for name in ("rewards", "scores"):
            value = getattr(result, name)
            if not bool(torch.isfinite(value).all()):
                raise TrainingError(f"the environment returned non-finite {name} at iteration {self.iteration}")
        return Rollout(query_ids=query_ids, query_mask=query_mask, tokens=tokens, mask=result.mask,
                       logprobs=result.logprobs, ref_logprobs=result.ref_logprobs, rewards=result.rewards,
                       scores=result.scores, kl=result.kl, lengths=result.lengths, group_size=self.env.group_size,
                       prompts=result.prompts, completions=result.completions)

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
            for start in range(0, n, size):
                yield order[start:start + size]

    def micro_batches(self, idx: torch.Tensor):
        steps = self.config.gradient_accumulation_steps
        if len(idx) % steps:
            raise ValueError(f"gradient_accumulation_steps={steps} must divide the minibatch of {len(idx)}")
        return idx.chunk(steps)

    def check_finite(self, **values: torch.Tensor) -> None:
        """Stop with a clear error naming the first non-finite quantity, before it reaches the weights."""
        for name, value in values.items():
            if not bool(torch.isfinite(value).all()):
                where = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
                raise TrainingError(f"{name} is not finite (nan or inf) at iteration {self.iteration}, environment "
                                    f"step {self.global_step}; the update was stopped before changing the weights"
                                    f"{where}. Lower the learning rate or check the reward function.")

    def optimizer_step(self) -> float:
        """Clip gradients, check them, take an AdamW step; returns the gradient norm before clipping."""
        params = [p for p in self.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.check_finite(grad_norm=norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

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
        self._open_writer()
        bar = tqdm(total=total_steps, initial=self.global_step, disable=not progress, unit="tok",
                   desc=f"{self.name}", dynamic_ncols=True)
        callbacks = list(callbacks or [])
        try:
            while self.global_step < total_steps:
                self._anneal(total_steps)
                start = time.perf_counter()
                rollout = self.collect()
                collected = time.perf_counter()
                metrics = self.update(rollout)
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
                bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
                if self.config.checkpoint_every and self.iteration % self.config.checkpoint_every == 0:
                    self.checkpoint()
                if any(self._call(cb, metrics) is False for cb in callbacks):
                    break
        finally:
            bar.close()
        if self.logdir is not None:
            self.checkpoint()
        if self.writer is not None:
            self.writer.flush()
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
    def evaluate(self, num_batches: int = 4, seed: int | None = None) -> dict[str, float]:
        """Mean score, KL and return (score - beta * KL) of the current policy over fresh episodes.

        Prompts and samples come from ``seed`` (default: the config's seed + 10000), so two
        evaluations of one run (before and after training) see the same prompts and differ
        only by the policy. The training run's own prompt stream and RNG are left untouched.
        """
        seed = self.config.seed + 10_000 if seed is None else seed
        saved_generator, saved_started = self.generator, self._env_started
        env_state = self._env_snapshot() if self._env_started else None
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        try:
            self.env.reset(seed=seed)
            self._env_started = True
            batches = [self.collect() for _ in range(num_batches)]
        finally:
            self.generator = saved_generator
            self._env_started = saved_started
            if env_state is not None:
                self._env_restore(env_state)
        scores = torch.cat([b.scores for b in batches])
        kl = torch.cat([b.kl.sum(1) for b in batches])
        returns = torch.cat([b.returns for b in batches])
        return {"score": float(scores.mean()), "kl": float(kl.mean()), "return": float(returns.mean()),
                "return_std": float(returns.std()), "episodes": int(returns.numel())}

    # ------------------------------------------------------------------ logging
    def _open_writer(self) -> None:
        if self.logdir is None or self.writer is not None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.logdir))
        rows = "\n".join(f"|{k}|{v}|" for k, v in self.config.to_dict().items())
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")

    def log(self, metrics: dict) -> None:
        if self.writer is None:
            return
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, self.global_step)

    # ------------------------------------------------------------------ checkpoints
    def _env_snapshot(self) -> dict:
        core = self.env.core
        return {"rng": core.rng.bit_generator.state, "prompts": [list(p.ids) for p in core.row_prompts]}

    def _env_restore(self, snap: dict) -> None:
        self.env.reset(options={"prompts": snap["prompts"]})
        self.env.core.rng.bit_generator.state = snap["rng"]
        self._env_started = True

    def state(self) -> dict:
        """Everything besides the weights that a resumed run needs to continue identically."""
        return {"agent": self.name, "config": self.config.to_dict(), "global_step": self.global_step,
                "iteration": self.iteration, "episodes": self.episodes, "env_kl_coef": self.env.kl_coef,
                "task": self._task_signature(), "extra": self.extra_state()}

    def extra_state(self) -> dict:
        """Algorithm state to checkpoint (moving averages, KL controller...), JSON-serialisable."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def _task_signature(self) -> dict:
        core = self.env.core
        return {"vocab_size": core.vocab_size, "max_new_tokens": core.max_new_tokens, "num_envs": core.num_envs,
                "spec": getattr(getattr(self.env, "spec", None), "id", None)}

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write a checkpoint folder atomically: weights (safetensors), optimizer and RNG state, config.

        An existing folder is never replaced unless ``overwrite=True``.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True or choose another path")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            for name, module in self.trainable_modules().items():
                weights = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
                save_file(_untie(weights), tmp / f"{name}.safetensors")
            rng = {"torch_cpu": torch.get_rng_state(), "generator": self.generator.get_state().cpu()}
            torch.save({"optimizer": self.optimizer.state_dict(), "rng": rng}, tmp / "trainer_state.pt")
            state = self.state()
            state["env"] = self._env_snapshot() if self._env_started else None
            (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default))
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def checkpoint(self) -> Path | None:
        """Save to ``logdir/checkpoints/iter-NNNNNN`` and remember it as the last good checkpoint."""
        if self.logdir is None:
            return None
        path = self.logdir / "checkpoints" / f"iter-{self.iteration:06d}"
        if not path.exists():
            self.save(path)
        self.last_checkpoint = path
        return path

    def load(self, path: str | os.PathLike, *, resume: bool = True) -> "Agent":
        """Load a checkpoint written by :meth:`save` into this agent (same algorithm and task).

        With ``resume=True`` (default) the optimizer, RNG, step counters and the
        environment's prompt stream are restored too, so :meth:`learn` continues the
        same run exactly; with ``resume=False`` only the weights are loaded.
        """
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"the checkpoint folder {path} does not exist")
        if not (path / "state.json").is_file():
            raise CheckpointError(f"{path} is not an lmgym checkpoint (no state.json); pass the folder save() wrote")
        try:
            state = json.loads((path / "state.json").read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path / 'state.json'} is corrupt: {err}") from err
        if state.get("agent") != self.name:
            raise CheckpointError(f"{path} holds a {state.get('agent')!r} agent, not {self.name!r}")
        mine = self._task_signature()
        if state.get("task") != mine:
            raise CheckpointError(f"{path} was trained on another task ({state.get('task')}), not this one ({mine})")
        for name, module in self.trainable_modules().items():
            file = path / f"{name}.safetensors"
            try:
                weights = load_file(file, device=str(self.device))
            except Exception as err:  # a truncated or foreign file
                raise CheckpointError(f"{file} is missing or corrupt ({err}); the checkpoint cannot be loaded") from err
            try:
                missing = module.load_state_dict(weights, strict=False).missing_keys
                unexpected = set(weights) - set(module.state_dict())
            except RuntimeError as err:
                raise CheckpointError(f"{file} does not match this agent's {name} ({err})") from err
            if set(missing) - _tied_duplicates(module) or unexpected:
                raise CheckpointError(f"{file} does not match this agent's {name}: missing "
                                      f"{sorted(set(missing) - _tied_duplicates(module))[:3]}, unexpected "
                                      f"{sorted(unexpected)[:3]}")
        if resume:
            try:
                trainer = torch.load(path / "trainer_state.pt", map_location=self.device, weights_only=True)
            except Exception as err:
                raise CheckpointError(f"{path / 'trainer_state.pt'} is missing or corrupt ({err})") from err
            self.optimizer.load_state_dict(trainer["optimizer"])
            torch.set_rng_state(trainer["rng"]["torch_cpu"].cpu())
            self.generator.set_state(trainer["rng"]["generator"].to(self.generator.get_state().device))
            self.global_step, self.iteration, self.episodes = (state["global_step"], state["iteration"],
                                                               state["episodes"])
            self.env.kl_coef = state["env_kl_coef"]
            self.load_extra_state(state["extra"])
            if state.get("env") is not None:
                self._env_restore(state["env"])
        self.last_checkpoint = path
        return self


def _storage_key(v: torch.Tensor):
    return v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)


def _untie(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
    return set(state) - set(_untie({k: v.detach() for k, v in state.items()}))


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")

