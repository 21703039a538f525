"""``TextGenVectorEnv``: N text-generation episodes in lock-step, state kept as torch tensors on one device."""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from lmgym.envs.core import SequenceResult, TextGenCore
from lmgym.envs.multi_turn import MultiTurnCore, TurnResult
from lmgym.envs.view import CoreView
from lmgym.envs.env import observation_space

__all__ = ["TextGenVectorEnv"]


class TextGenVectorEnv(CoreView, VectorEnv):
    """A batch of :class:`lmgym.envs.env.TextGenEnv` episodes stepped together on one device (the fast path).

    The MDP, rewards and observation layout are those of ``TextGenEnv``; here
    observations are a dict of ``(num_envs, L)`` torch tensors, and rewards,
    ``terminated``, ``truncated`` and per-step infos are ``(num_envs,)`` tensors, all
    on ``device`` (CUDA when available with ``"auto"``). That is the default because an
    agent whose policy runs on the same device reads them with no copy to the host per
    token. ``output="numpy"`` returns numpy arrays from ``reset`` and ``step`` instead (still
    one batched model, copied to the host once per step), which is what Gymnasium's vector
    wrappers (``gymnasium.wrappers.vector.RecordEpisodeStatistics``, ``FlattenObservation``,
    ``NormalizeReward``, ...) and other numpy code expect. The reference model keeps a
    KV cache, so a step costs one decode step of it. Each step synchronises with
    the device once, to learn which episodes ended and need scoring.

    Two ways to run episodes:

    - ``step(actions, logprobs=None)``: one token per env. Autoreset is
      ``AutoresetMode.NEXT_STEP``: the call after an episode ends resets that env
      (its action is ignored, its reward is 0).
    - ``score_sequences(tokens, logprobs=None)``: an agent that sampled whole
      continuations itself submits them right after a reset and gets the exact
      per-token rewards, dones and infos stepping would have produced, from one
      reference forward over the batch. All envs then restart on new prompts.

    Per-step infos ``ref_logprob``, ``logprob`` and ``kl`` (the last two only when the
    policy's log-prob is known) are ``(num_envs,)`` tensors, each with a boolean mask
    ``_ref_logprob`` / ``_logprob`` / ``_kl`` (Gymnasium's vector-info convention) that is
    False for envs whose action was ignored on an autoreset step; their values are 0
    there, like the reward, so summing ``info["kl"]`` over an episode's steps gives its
    ``episode_kl``. Episode-end infos (``score``, ``completion``, ``episode_kl``,
    ``episode_length``) are numpy arrays with Gymnasium's ``_name`` masks.

    Args:
        num_envs: number of episodes stepped together.
        model, reward_fn, prompts, tokenizer, max_new_tokens, kl_coef, max_prompt_tokens,
            stop_token_ids, dtype, trust_remote_code: as for ``TextGenEnv``.
        group_size: G consecutive envs share each prompt (GRPO / RLOO groups); must divide ``num_envs``.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:N"``.
        output: ``"torch"`` (default: tensors on ``device``) or ``"numpy"`` (numpy arrays from ``reset``,
            ``step`` and ``observation``; ``score_sequences`` returns tensors either way).
        interaction, max_turns, max_turn_tokens, interaction_timeout: a multi-turn episode (see ``TextGenEnv``);
            rows then sit in different turns, the interaction is called once per step for every row whose turn
            just ended, and ``submit_turns(tokens, logprobs)`` replaces ``score_sequences``: one whole turn per
            row, returning exactly what per-token stepping gives (:class:`lmgym.envs.multi_turn.TurnResult`).
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 8, *, model, reward_fn, prompts, tokenizer=None, max_new_tokens: int = 32,
                 kl_coef: float = 0.05, group_size: int = 1, max_prompt_tokens: int | None = None,
                 stop_token_ids=None, device="auto", dtype="auto", trust_remote_code: bool = False,
                 output: str = "torch", interaction=None, max_turns: int = 4, max_turn_tokens: int | None = None,
                 interaction_timeout: float | None = 30.0):
        if output not in ("torch", "numpy"):
            raise ValueError(f"output must be 'torch' or 'numpy', got {output!r}")
        self.output = output
        common = dict(model=model, reward_fn=reward_fn, prompts=prompts, num_envs=num_envs, tokenizer=tokenizer,
                      max_new_tokens=max_new_tokens, kl_coef=kl_coef, group_size=group_size,
                      max_prompt_tokens=max_prompt_tokens, stop_token_ids=stop_token_ids, device=device, dtype=dtype,
                      trust_remote_code=trust_remote_code)
        if interaction is None:
            self.core = TextGenCore(**common)
        else:
            self.core = MultiTurnCore(interaction=interaction, max_turns=max_turns, max_turn_tokens=max_turn_tokens,
                                      interaction_timeout=interaction_timeout, **common)
        self.num_envs = self.core.num_envs
        self.single_action_space = spaces.Discrete(self.core.vocab_size)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.single_observation_space = observation_space(self.core.vocab_size, self.core.max_len, self.multi_turn)
        self.observation_space = batch_space(self.single_observation_space, num_envs)

    @property
    def group_size(self) -> int:
        return self.core.group_size

    @property
    def prompts(self) -> list[str]:
        """The prompt text of each env's current episode."""
        return [p.text for p in self.core.row_prompts]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start new episodes.

        ``options={"prompts": [...]}`` fixes the prompts (one per env or per group);
        ``options={"reset_mask": mask}`` (Gymnasium's partial reset) restarts only the envs
        where ``mask`` is True, drawing new prompts, and leaves the others as they are.
        """
        if seed is not None:
            self._np_random, self._np_random_seed = seeding.np_random(seed)
        options = dict(options or {})
        prompts, mask = options.pop("prompts", None), options.pop("reset_mask", None)
        if options:
            raise ValueError(f"unknown reset options {sorted(options)}; the options are 'prompts' and 'reset_mask'")
        self.core.rng = self.np_random
        if mask is not None:
            if prompts is not None:
                raise ValueError("reset takes either 'prompts' or 'reset_mask', not both")
            if not self.core.started:
                raise ValueError("a partial reset (reset_mask) needs a full reset() first")
            mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool).reshape(-1)
            if mask.shape != (self.num_envs,):
                raise ValueError(f"reset_mask must have {self.num_envs} entries, got {mask.shape[0]}")
            self.core.restart(np.flatnonzero(mask))
        else:
            self.core.reset(prompts=prompts)
        return self.observation(), {"prompt": np.array(self.prompts, dtype=object)}

    def step(self, actions, logprobs=None):
        """One token per env; ``logprobs`` (num_envs,) are log pi of the actions, for the exact KL term."""
        obs, rewards, terminated, truncated, info = self.core.step(actions, logprobs)
        if self.output == "numpy":
            return (_to_numpy(obs), rewards.cpu().numpy(), terminated.cpu().numpy(), truncated.cpu().numpy(),
                    _to_numpy(info))
        return obs, rewards, terminated, truncated, info

    def score_sequences(self, tokens, logprobs=None) -> SequenceResult:
        """Submit whole continuations ``(num_envs, T)``; see the class docstring and :class:`SequenceResult`."""
        return self.core.score_sequences(tokens, logprobs)

    def submit_turns(self, tokens, logprobs=None) -> TurnResult:
        """A multi-turn environment: submit one whole turn per row ``(num_envs, T)``; see :class:`TurnResult`."""
        if not self.multi_turn:
            raise TypeError("submit_turns() is for multi-turn environments (made with an interaction); submit whole "
                            "episodes with score_sequences()")
        return self.core.submit_turns(tokens, logprobs)

    def action_masks(self):
        """``(num_envs, vocab_size)`` bool: the tokens allowed at the current states by the function bound with
        :meth:`set_action_mask_fn` (all True without one); a tensor on ``device``, or numpy with ``output="numpy"``."""
        mask = self.core.action_masks()
        return mask.cpu().numpy() if self.output == "numpy" else mask

    def observation(self) -> dict[str, torch.Tensor]:
        """The current observation (after ``score_sequences``, the new prompts)."""
        obs = self.core.observation()
        return _to_numpy(obs) if self.output == "numpy" else obs


def _to_numpy(values: dict) -> dict:
    """The same dict with every tensor copied to a numpy array (numpy values are kept as they are)."""
    return {k: v.cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in values.items()}
