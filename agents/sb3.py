"""Stable-Baselines3 trains against lmgym without a fork: a VecEnv bridge, a transformer policy, and KL binding.

- :class:`LMGymVecEnv` wraps a batched :class:`lmgym.TextGenVectorEnv` as an SB3 ``VecEnv``
  (SB3 has no bridge for ``gymnasium.vector.VectorEnv``): same-step autoreset with
  ``terminal_observation``, ``TimeLimit.truncated``, infos as a list of dicts, float32 rewards.
- :class:`LMPolicy` is an ``ActorCriticPolicy`` whose actor is a causal LM's next-token
  distribution and whose critic is a value head on its last hidden state. It keeps the
  pretrained weights (no orthogonal re-initialisation) and, given ``env=``, binds itself
  to the environment so the per-token KL term is exact.
- :func:`bind_sb3_model` binds any SB3 model's policy to an lmgym environment, and
  :func:`evaluate_return` measures the exact KL-regularised return of an SB3 model.

Without a bound policy, an lmgym environment's per-token reward is
``kl_coef * log pi_ref(a_t|s_t)`` (plus the score at the end): SB3's PPO or A2C with
``ent_coef=kl_coef`` then maximises the KL-regularised objective in expectation.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

__all__ = ["LMGymVecEnv", "LMPolicy", "bind_sb3_model", "evaluate_return"]


def _to_numpy(obs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.cpu().numpy() for k, v in obs.items()}


class LMGymVecEnv(VecEnv):
    """An SB3 ``VecEnv`` over a batched :class:`lmgym.TextGenVectorEnv`.

    Episodes that end are reset in the same step (SB3's convention): the returned
    observation of such an env is the first of its next episode, and
    ``infos[i]["terminal_observation"]`` is the real last observation of the one that
    ended. Episode-end infos also carry ``score``, ``completion`` and ``TimeLimit.truncated``.

    Args:
        venv: the lmgym vector environment (``gym.make_vec("lmgym/...", num_envs=N)``).
        seed: seed of the first reset.
    """

    def __init__(self, venv, seed: int | None = None):
        if not hasattr(venv, "score_sequences"):
            raise TypeError(f"LMGymVecEnv wraps an lmgym TextGenVectorEnv, got {type(venv).__name__}")
        self.venv = venv
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._seed = seed
        self._actions = None

    def reset(self):
        obs, _ = self.venv.reset(seed=self._seed)
        self._seed = None
        return _to_numpy(obs)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs)

    def step_wait(self):
        obs, rewards, terminated, truncated, info = self.venv.step(self._actions)
        term, trunc = terminated.cpu().numpy(), truncated.cpu().numpy()
        dones = term | trunc
        obs_np = _to_numpy(obs)
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if dones.any():
            for i in np.flatnonzero(dones):
                infos[i] = {"terminal_observation": {k: v[i].copy() for k, v in obs_np.items()},
                            "TimeLimit.truncated": bool(trunc[i] and not term[i]),
                            "score": float(info["score"][i]), "completion": info["completion"][i]}
            obs, _ = self.venv.reset(options={"reset_mask": dones})
            obs_np = _to_numpy(obs)
        return obs_np, rewards.cpu().numpy().astype(np.float32), dones, infos

    def close(self) -> None:
        pass

    # The rest of SB3's VecEnv interface, answered by the one underlying environment.
    def get_attr(self, attr_name, indices=None):
        return [getattr(self.venv, attr_name)] * len(self._get_indices(indices))

    def set_attr(self, attr_name, value, indices=None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name, *method_args, indices=None, **method_kwargs):
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        return [result] * len(self._get_indices(indices))

    def env_is_wrapped(self, wrapper_class, indices=None):
        return [False] * len(self._get_indices(indices))

    def seed(self, seed: int | None = None):
        self._seed = seed
        return [seed] * self.num_envs


def _lmgym_envs(env) -> list:
    """The lmgym environments behind an SB3 VecEnv (any wrappers), a gymnasium env, or a vector env."""
    while isinstance(env, VecEnvWrapper):
        env = env.venv
    if isinstance(env, LMGymVecEnv):
        return [env.venv]
    if hasattr(env, "envs"):  # DummyVecEnv
        return [e.unwrapped for e in env.envs]
    if isinstance(env, gym.Env):
        return [env.unwrapped]
    if hasattr(env, "bind_policy"):
        return [env]
    raise TypeError(f"cannot find an lmgym environment inside {type(env).__name__}")


def bind_sb3_model(env, model) -> None:
    """Bind an SB3 model's policy to the lmgym environment(s) inside ``env``, so the KL term is exact.

    ``None`` as ``model`` unbinds. Each step then costs one extra policy evaluation.
    """
    policy = None if model is None else getattr(model, "policy", model)

    @torch.no_grad()
    def logprob(obs: dict[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        obs_t, _ = policy.obs_to_tensor(_to_numpy(obs))
        dist = policy.get_distribution(obs_t)
        return dist.log_prob(actions.to(policy.device)).float()

    for e in _lmgym_envs(env):
        e.bind_policy(None if policy is None else logprob)


def evaluate_return(model, env, n_episodes: int = 200, deterministic: bool = False) -> dict[str, float]:
    """Mean exact return (score - kl_coef * sum KL) of an SB3 model on a single lmgym ``gymnasium.Env``."""
    inner = env.unwrapped
    previous = inner.core.policy_fn
    bind_sb3_model(inner, model)
    returns, scores = [], []
    try:
        for ep in range(n_episodes):
            obs, _ = inner.reset(seed=ep if ep == 0 else None)
            total, done = 0.0, False
            while not done:
                action, _ = model.predict(obs, deterministic=deterministic)
                obs, reward, term, trunc, info = inner.step(int(action))
                total += reward
                done = term or trunc
            returns.append(total)
            scores.append(info["score"])
    finally:
        inner.core.policy_fn = previous
    return {"return": float(np.mean(returns)), "score": float(np.mean(scores)), "episodes": n_episodes}


class _TokenIds(BaseFeaturesExtractor):
    """Hands the raw observation dict through: the LM reads token ids, not one-hot features."""

    def __init__(self, observation_space: gym.spaces.Dict):
        super().__init__(observation_space, features_dim=1)

    def forward(self, observations):
        return observations


class LMPolicy(ActorCriticPolicy):
    """An SB3 actor-critic policy made of a causal LM: actor = next-token distribution, critic = value head.

    Use as ``PPO(LMPolicy, env, policy_kwargs=dict(model=lm, env=env))``.

    Args:
        model: a ``PreTrainedModel`` (trained in place) or a local path / hub name.
        env: the environment to bind to, so the per-token KL term is exact (optional).
        (the rest): SB3's ``ActorCriticPolicy`` arguments; ``ortho_init`` is forced off so
            the pretrained weights are kept.
    """

    def __init__(self, observation_space, action_space, lr_schedule, *, model, env=None, **kwargs):
        if isinstance(model, (str, bytes)) or not isinstance(model, nn.Module):
            from lmgym.models import load_model

            model, _ = load_model(model, device="cpu", dtype="float32")
        if model.config.vocab_size != action_space.n:
            raise ValueError(f"the model has {model.config.vocab_size} tokens but the action space "
                             f"{action_space.n}; use the environment's own model family")
        self.__dict__["_pending_lm"] = model  # read by _build, which SB3 calls inside __init__
        kwargs.update(ortho_init=False, features_extractor_class=_TokenIds, share_features_extractor=True)
        kwargs.pop("net_arch", None)
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)
        if env is not None:
            self.bind(env)

    def _build(self, lr_schedule) -> None:
        self.lm = self.__dict__.pop("_pending_lm")
        self.lm.requires_grad_(True)  # a copy of a frozen reference model arrives frozen
        self.lm.train()
        self.value_head = nn.Linear(self.lm.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def bind(self, env) -> None:
        """Bind to the lmgym environment(s) inside ``env`` so their KL term uses this policy's log-probs."""
        bind_sb3_model(env, self)

    def _lm(self, obs) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits and value at each state (the last real token of each row)."""
        ids, mask = obs["input_ids"].long(), obs["attention_mask"].long()
        width = int(mask.sum(1).max())  # skip columns that are padding in every row
        ids, mask = ids[:, :width], mask[:, :width]
        out = self.lm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        last = mask.sum(1) - 1
        rows = torch.arange(ids.shape[0], device=ids.device)
        logits = out.logits[rows, last].float()
        values = self.value_head(out.hidden_states[-1][rows, last].float())
        return logits, values

    def forward(self, obs, deterministic: bool = False):
        logits, values = self._lm(obs)
        dist = self.action_dist.proba_distribution(action_logits=logits)
        actions = dist.get_actions(deterministic=deterministic)
        return actions, values, dist.log_prob(actions)

    def evaluate_actions(self, obs, actions):
        logits, values = self._lm(obs)
        dist = self.action_dist.proba_distribution(action_logits=logits)
        return values, dist.log_prob(actions), dist.entropy()

    def get_distribution(self, obs):
        logits, _ = self._lm(obs)
        return self.action_dist.proba_distribution(action_logits=logits)

    def predict_values(self, obs):
        return self._lm(obs)[1]
