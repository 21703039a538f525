"""Stable-Baselines3 trains against lmgym without a fork: a VecEnv bridge, a transformer policy, and KL binding.

- :class:`LMGymVecEnv` wraps a batched :class:`lmgym.TextGenVectorEnv` as an SB3 ``VecEnv``
  (SB3 has no bridge for ``gymnasium.vector.VectorEnv``): same-step autoreset with
  ``terminal_observation``, ``TimeLimit.truncated``, infos as a list of dicts, float32 rewards.
- :class:`LMPolicy` is an ``ActorCriticPolicy`` whose actor is a causal LM's next-token
  distribution and whose critic is a value head on its last hidden state. It keeps the
  pretrained weights (no orthogonal re-initialisation) and, given ``env=``, binds itself
  to the environment so the per-token KL term is exact.
- :func:`lm_policy_kwargs` builds ``LMPolicy``'s ``policy_kwargs`` so the SB3 model saves and loads
  (``model.save``, ``PPO.load``, ``CheckpointCallback``, ``EvalCallback``).
- :func:`bind_sb3_model` binds any SB3 model's policy to an lmgym environment, and
  :func:`evaluate_return` measures the exact KL-regularised return of an SB3 model.

Without a bound policy, an lmgym environment's per-token reward is
``kl_coef * log pi_ref(a_t|s_t)`` (plus the score at the end): SB3's PPO or A2C with
``ent_coef=kl_coef`` then maximises the KL-regularised objective in expectation.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

__all__ = ["LMGymVecEnv", "LMPolicy", "lm_policy_kwargs", "bind_sb3_model", "evaluate_return"]


def _to_numpy(values):
    """Numpy of a tensor, or of each tensor in a dict; numpy values pass through (``output="numpy"`` envs)."""
    if isinstance(values, dict):
        return {k: _to_numpy(v) for k, v in values.items()}
    return values.cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


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
        term, trunc = _to_numpy(terminated), _to_numpy(truncated)
        dones = term | trunc
        obs_np = _to_numpy(obs)
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if dones.any():
            for i in np.flatnonzero(dones):
                infos[i] = {"terminal_observation": {k: v[i].copy() for k, v in obs_np.items()},
                            "TimeLimit.truncated": bool(trunc[i] and not term[i]),
                            "score": float(info["score"][i]), "completion": info["completion"][i]}
                if "turn_rewards" in info:  # a multi-turn episode's return holds its turn rewards too
                    infos[i]["turn_rewards"] = float(info["turn_rewards"][i])
            obs, _ = self.venv.reset(options={"reset_mask": dones})
            obs_np = _to_numpy(obs)
        return obs_np, _to_numpy(rewards).astype(np.float32), dones, infos

    def close(self) -> None:
        pass

    def set_action_mask_fn(self, fn) -> None:
        """Bind ``fn(observation) -> (n_envs, n_actions) bool`` (see ``TextGenVectorEnv.set_action_mask_fn``), e.g.
        ``lmgym.envs.masking.NucleusMask(model, top_p=0.9)``; ``None`` unbinds."""
        self.venv.set_action_mask_fn(fn)

    def action_masks(self) -> np.ndarray:
        """``(n_envs, n_actions)`` bool: the tokens allowed at the current states (all True without a mask
        function), in the layout sb3-contrib's ``MaskablePPO`` reads with ``get_action_masks(env)``."""
        return _to_numpy(self.venv.action_masks()).astype(bool)

    # The rest of SB3's VecEnv interface, answered by the one underlying environment.
    def get_attr(self, attr_name, indices=None):
        return [getattr(self.venv, attr_name)] * len(self._get_indices(indices))

    def set_attr(self, attr_name, value, indices=None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name, *method_args, indices=None, **method_kwargs):
        rows = self._get_indices(indices)
        if method_name == "action_masks":  # per-env results, which sb3-contrib stacks into (n_envs, n_actions)
            masks = self.action_masks()
            return [masks[i] for i in rows]
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        return [result] * len(rows)

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


def _policy_logprob(model, deterministic: bool = False, env=None):
    """``fn(observation, actions) -> log pi(actions|observation)`` for an SB3 model (or policy).

    ``env``: the lmgym environment the function is bound to; a maskable policy (sb3-contrib) is then
    evaluated under that environment's action mask (``env.set_action_mask_fn``) at the observed states.

    ``deterministic``: the policy that ``model.predict(obs, deterministic=True)`` follows, a point
    mass on its choice, so log pi = log 1 = 0 for every action it takes. Otherwise the stochastic
    policy: the action distribution of actor-critic policies (PPO, A2C, ``LMPolicy``), or DQN's
    epsilon-greedy rule over its Q-values at the model's current exploration rate.
    """
    if deterministic:
        return lambda obs, actions: torch.zeros(actions.shape, dtype=torch.float32, device=actions.device)
    policy = getattr(model, "policy", model)
    if hasattr(policy, "get_distribution"):
        # sb3-contrib's maskable policies sample from their distribution restricted to the env's action mask:
        # that masked distribution is the policy whose log-prob the KL term needs.
        masked = env is not None and "action_masks" in inspect.signature(policy.get_distribution).parameters

        @torch.no_grad()
        def logprob(obs, actions):
            obs_t, _ = policy.obs_to_tensor(_to_numpy(obs))
            extra = {"action_masks": _to_numpy(env.core.action_masks(obs))} if masked else {}
            return policy.get_distribution(obs_t, **extra).log_prob(actions.to(policy.device)).float()
        return logprob
    if hasattr(policy, "q_net"):
        if not hasattr(model, "exploration_rate"):
            raise TypeError("a DQN policy alone does not know its exploration rate: bind the DQN model itself, "
                            "or evaluate with deterministic=True")

        @torch.no_grad()
        def epsilon_greedy_logprob(obs, actions):
            # predict() takes a uniformly random action with probability eps, else the greedy one.
            obs_t, _ = policy.obs_to_tensor(_to_numpy(obs))
            q = policy.q_net(obs_t)
            eps, greedy = float(model.exploration_rate), q.argmax(dim=1)
            prob = eps / q.shape[1] + (1.0 - eps) * (actions.to(q.device) == greedy).float()
            return prob.log()
        return epsilon_greedy_logprob
    raise TypeError(f"cannot compute log pi(a|s) for {type(policy).__name__}: it has neither an action "
                    "distribution (get_distribution) nor Q-values (q_net); evaluate with deterministic=True")


def bind_sb3_model(env, model) -> None:
    """Bind an SB3 model's policy to the lmgym environment(s) inside ``env``, so the KL term is exact.

    ``None`` as ``model`` unbinds. Each step then costs one extra policy evaluation.
    """
    for e in _lmgym_envs(env):
        e.bind_policy(None if model is None else _policy_logprob(model, env=e))


def evaluate_return(model, env, n_episodes: int = 200, deterministic: bool = False) -> dict[str, float]:
    """Mean exact return (score [+ turn rewards] - kl_coef * sum KL) of an SB3 model on a single lmgym
    ``gymnasium.Env``.

    The KL term is that of the policy actually run: with ``deterministic=True`` that is the greedy
    policy of ``model.predict(..., deterministic=True)``, whose log-prob of its own choice is 0, so
    each step's KL is ``-log pi_ref(a_t|s_t)`` and the return is ``score + kl_coef * sum log pi_ref``
    (never above ``optimal_return``: a deterministic policy is one of those the optimum ranges over).
    Works for any SB3 model with ``deterministic=True``; stochastic evaluation needs an action
    distribution or DQN's epsilon-greedy rule.
    """
    inner = env.unwrapped
    previous = inner.core.policy_fn
    inner.bind_policy(_policy_logprob(model, deterministic, env=inner))
    takes_masks = "action_masks" in inspect.signature(model.predict).parameters  # sb3-contrib's maskable models
    returns, scores, turn_rewards = [], [], []
    try:
        for ep in range(n_episodes):
            obs, _ = inner.reset(seed=ep if ep == 0 else None)
            total, done = 0.0, False
            while not done:
                mask = {"action_masks": inner.action_masks()} if takes_masks else {}
                action, _ = model.predict(obs, deterministic=deterministic, **mask)
                obs, reward, term, trunc, info = inner.step(int(action))
                total += reward
                done = term or trunc
            returns.append(total)
            scores.append(info["score"])
            turn_rewards.append(info.get("turn_rewards", 0.0))
    finally:
        inner.core.policy_fn = previous
    return {"return": float(np.mean(returns)), "score": float(np.mean(scores)),
            "turn_rewards": float(np.mean(turn_rewards)), "episodes": n_episodes}


class _LMArgument:
    """An in-memory LM handed to :class:`LMPolicy` through SB3's ``policy_kwargs``, saved as its architecture.

    SB3 pickles ``policy_kwargs`` into every saved model, and a transformers model that has run
    with ``output_hidden_states`` cannot be pickled. The weights are in SB3's own ``policy.pth``
    already, so this argument pickles as the model class and config alone; ``PPO.load`` builds the
    architecture from them and then loads the trained weights into it.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __reduce__(self):
        return _build_architecture, (type(self.model), self.model.config)

    def __deepcopy__(self, memo):
        return _LMArgument(copy.deepcopy(self.model, memo))


def _build_architecture(model_class, config) -> nn.Module:
    """A freshly initialised model of the saved class and config (its weights are loaded afterwards)."""
    return model_class(config)


class _EnvArgument:
    """The environment ``LMPolicy`` binds to: live in this process, never saved (an environment holds a
    reference model and is bound to one process); a loaded policy is bound again with :func:`bind_sb3_model`."""

    def __init__(self, env):
        self.env = env

    def __reduce__(self):
        return _EnvArgument, (None,)

    def __deepcopy__(self, memo):
        return _EnvArgument(self.env)


def lm_policy_kwargs(model, env=None, **kwargs) -> dict[str, Any]:
    """``policy_kwargs`` for :class:`LMPolicy` with which the SB3 model can be saved and loaded.

    ``PPO(LMPolicy, env, policy_kwargs=lm_policy_kwargs(lm, env=env))``. ``model`` (trained in place)
    is saved as its architecture, its weights going into SB3's ``policy.pth``; ``env`` is bound now but
    not saved: after ``PPO.load(path, env=env)`` call ``bind_sb3_model(env, model)`` for the exact KL
    term. ``kwargs`` are further ``ActorCriticPolicy`` arguments.
    """
    if isinstance(model, nn.Module):
        model = _LMArgument(model)
    return dict(model=model, env=None if env is None else _EnvArgument(env), **kwargs)


class _TokenIds(BaseFeaturesExtractor):
    """Hands the raw observation dict through: the LM reads token ids, not one-hot features."""

    def __init__(self, observation_space: gym.spaces.Dict):
        super().__init__(observation_space, features_dim=1)

    def forward(self, observations):
        return observations


class LMPolicy(ActorCriticPolicy):
    """An SB3 actor-critic policy made of a causal LM: actor = next-token distribution, critic = value head.

    Use as ``PPO(LMPolicy, env, policy_kwargs=lm_policy_kwargs(lm, env=env))`` (see :func:`lm_policy_kwargs`;
    a plain ``dict(model=lm, env=env)`` trains too, but SB3 cannot save a model made that way).

    Args:
        model: a ``PreTrainedModel`` (trained in place) or a local path / hub name.
        env: the environment to bind to, so the per-token KL term is exact (optional).
        (the rest): SB3's ``ActorCriticPolicy`` arguments; ``ortho_init`` is forced off so
            the pretrained weights are kept.
    """

    def __init__(self, observation_space, action_space, lr_schedule, *, model, env=None, **kwargs):
        if isinstance(model, _LMArgument):
            model = model.model
        if isinstance(env, _EnvArgument):
            if env.env is None:  # a loaded model: the environment it was bound to was not saved
                warnings.warn("this LMPolicy was bound to an lmgym environment when it was saved; bind the loaded "
                              "model again with lmgym.agents.sb3.bind_sb3_model(env, model) for the exact KL term",
                              stacklevel=2)
            env = env.env
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
