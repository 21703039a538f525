"""``TextGenEnv``: one text-generation episode as a standard ``gymnasium.Env`` with numpy observations."""

from __future__ import annotations

import sys

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.wrappers import TimeLimit

from lmgym.envs.core import EpisodeError, TextGenCore
from lmgym.envs.multi_turn import MultiTurnCore
from lmgym.envs.view import CoreView

__all__ = ["TextGenEnv", "observation_space", "UnsupportedRenderMode"]


class UnsupportedRenderMode(TypeError, ValueError):
    """A ``render_mode`` the environment does not have.

    A ``TypeError`` because that is what Gymnasium-style constructors raise for an argument they
    do not take, and what Stable-Baselines3's ``make_vec_env`` catches when its default
    ``render_mode="rgb_array"`` is refused (it then builds the env without a render mode);
    a ``ValueError`` too, since the value is what is wrong.
    """


def observation_space(vocab_size: int, max_len: int, multi_turn: bool = False) -> spaces.Dict:
    """The observation space shared by the single and the vector environment (multi-turn: with ``policy_mask``)."""
    fields = {
        "input_ids": spaces.MultiDiscrete(np.full(max_len, vocab_size, dtype=np.int64)),
        "attention_mask": spaces.MultiBinary(max_len),
    }
    if multi_turn:
        fields["policy_mask"] = spaces.MultiBinary(max_len)
    return spaces.Dict(fields)


def _refuse_short_time_limit(env: "TextGenEnv") -> None:
    """Refuse a ``TimeLimit`` (``gym.make(id, max_episode_steps=k)``) that would cut episodes short.

    An episode cut by a wrapper before its end never reaches the step that adds the task score, so
    the return silently becomes the KL term alone. The wrapper sits above the environment and is
    invisible to it except on the call stack of ``reset``, which runs through every wrapper.
    """
    frame = sys._getframe(1).f_back  # the caller of reset(), then outwards through the wrappers
    for _ in range(64):
        if frame is None:
            return
        owner = frame.f_locals.get("self")
        if isinstance(owner, TimeLimit) and owner.unwrapped is env \
                and owner._max_episode_steps < env.core.max_new_tokens:
            raise ValueError(
                f"a TimeLimit of {owner._max_episode_steps} steps (gym.make(..., max_episode_steps=...) or the "
                f"TimeLimit wrapper) would cut episodes before max_new_tokens={env.core.max_new_tokens}, and a cut "
                "episode gets no score; shorten episodes with max_new_tokens="
                f"{owner._max_episode_steps} instead (it ends them with their score)")
        frame = frame.f_back


_EPISODE_END_KEYS = {"score": float, "episode_length": int, "completion": str, "episode_kl": float, "turns": int,
                     "turn_rewards": float, "truncation": str}


class TextGenEnv(CoreView, gym.Env):
    """Generate a completion of a prompt token by token; score it with a reward function, minus a KL penalty.

    ## Description

    The token-level MDP of RLHF (Ziegler et al. 2019; Ouyang et al. 2022). An
    episode starts from a prompt x drawn from ``prompts``; each step appends one
    token chosen by the agent; the episode ends when a stop token (EOS by default)
    is emitted or after ``max_new_tokens`` tokens. A frozen reference model
    pi_ref (``model``) anchors the policy through a per-token KL penalty.

    ## Action Space

    ``Discrete(vocab_size)``: the id of the next token.

    ## Observation Space

    ``Dict`` of two arrays of length ``L = max_prompt_tokens + max_new_tokens``:

    - ``input_ids``: ``MultiDiscrete([vocab_size] * L)``, the prompt tokens followed
      by the generated tokens, left-aligned, padded with the pad token id;
    - ``attention_mask``: ``MultiBinary(L)``, 1 where ``input_ids`` holds a real token.

    ## Rewards

    With beta = ``kl_coef``, at every step t::

        r_t = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))

    plus the task score R(x, y) = ``reward_fn([x], [y])`` on the last step, so an
    episode's rewards sum to ``R(x, y) - beta * sum_t KL_t``. The policy's
    log-prob ``log pi(a_t|s_t)`` comes from ``step(action, logprob=...)`` (on this env,
    which ``gym.make`` returns unwrapped; see :meth:`step`) or from a policy bound with
    ``bind_policy``. With neither, the
    environment cannot see the policy and the per-step part is
    ``beta * log pi_ref(a_t|s_t)`` instead: in expectation this equals the
    KL-regularised objective once the agent adds an entropy bonus of weight beta
    (e.g. Stable-Baselines3's ``ent_coef=kl_coef``).

    ## Starting State

    The prompt, drawn uniformly from a prompt list with ``self.np_random``
    (or read in order from an iterable); ``reset(options={"prompt": ...})`` fixes it.

    ## Episode End

    - Termination: the agent emits a stop token (``stop_token_ids``, default EOS and the
      generation config's end-of-turn tokens).
    - Truncation: ``max_new_tokens`` tokens were generated.

    ``info`` carries at each step ``ref_logprob``, plus ``logprob`` and ``kl`` when the
    policy's log-prob is known, and on the last step ``score``, ``completion``
    (decoded text), ``prompt``, ``episode_length`` and (when known) ``episode_kl``.

    ## Arguments

    - ``model``: reference LM, a local path, a hub name or a ``PreTrainedModel`` (the
      environment keeps a frozen copy; the object you pass is left as it was).
    - ``reward_fn``: ``fn(prompts, completions) -> scores`` over lists of strings (see
      :class:`lmgym.rewards.functions.RewardFunction`), called once per batch of finished episodes.
    - ``prompts``: a list of prompts or any iterable of them. A prompt is text, token ids, or a
      list of chat messages ``[{"role": "user", "content": ...}]`` rendered with the tokenizer's
      chat template (``add_generation_prompt=True``); the reward function receives each prompt
      in the form it was given and the completion decoded without special tokens.
    - ``tokenizer``: defaults to the model's.
    - ``max_new_tokens``: the horizon (default 32).
    - ``kl_coef``: beta, the KL coefficient (default 0.05; 0 switches the penalty off).
    - ``max_prompt_tokens``: the longest prompt (default: the longest in the list).
    - ``stop_token_ids``: tokens that end an episode (default: the tokenizer's EOS and every
      ``generation_config.eos_token_id`` of the model, e.g. an instruct model's end-of-turn token).
    - ``device``, ``dtype``: where and in which precision the reference model runs
      (default CPU, since observations are numpy).
    - ``trust_remote_code``: allow model code from the checkpoint (off by default).
    - ``render_mode``: ``"ansi"`` returns the prompt and completion as text.
    - ``interaction``: makes the episode multi-turn (docs/multi_turn.md; :mod:`lmgym.envs.multi_turn`): an
      :class:`lmgym.envs.interaction.Interaction` class (or factory), whose ``respond(conversation)`` answers each
      policy turn with a :class:`~lmgym.envs.interaction.Reply` (a message or token ids, a turn reward, whether the
      episode ends). A policy turn ends at a stop token or after ``max_turn_tokens``; the reply's tokens appear in
      the next observation (no action, no reward, no KL), ``policy_mask`` marks the policy's tokens, ``info``
      carries ``turn`` and, when a turn ends, ``turn_reward``; at the end ``turns``, ``turn_rewards``, ``score``,
      ``truncation`` (why a limit ended it, "" otherwise). ``max_new_tokens`` is then the budget of all tokens
      after the prompt, the policy's and the environment's.
    - ``max_turns`` (4), ``max_turn_tokens`` (``max_new_tokens``), ``interaction_timeout`` (30 s; None: no limit):
      the limits of a multi-turn episode.
    """

    metadata = {"render_modes": ["ansi"]}

    def __init__(self, model, reward_fn, prompts, *, tokenizer=None, max_new_tokens: int = 32,
                 kl_coef: float = 0.05, max_prompt_tokens: int | None = None, stop_token_ids=None,
                 device="cpu", dtype="auto", trust_remote_code: bool = False, render_mode: str | None = None,
                 interaction=None, max_turns: int = 4, max_turn_tokens: int | None = None,
                 interaction_timeout: float | None = 30.0):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise UnsupportedRenderMode(f"render_mode={render_mode!r} is not supported; use None or 'ansi'")
        common = dict(model=model, reward_fn=reward_fn, prompts=prompts, num_envs=1, tokenizer=tokenizer,
                      max_new_tokens=max_new_tokens, kl_coef=kl_coef, max_prompt_tokens=max_prompt_tokens,
                      stop_token_ids=stop_token_ids, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        if interaction is None:
            self.core = TextGenCore(**common)
        else:
            self.core = MultiTurnCore(interaction=interaction, max_turns=max_turns, max_turn_tokens=max_turn_tokens,
                                      interaction_timeout=interaction_timeout, **common)
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(self.core.vocab_size)
        self.observation_space = observation_space(self.core.vocab_size, self.core.max_len, self.multi_turn)
        self._done = True
        self._last_completion = ""

    def _obs(self) -> dict[str, np.ndarray]:
        return {k: v[0].cpu().numpy() for k, v in self.core.observation().items()}

    def action_masks(self) -> np.ndarray:
        """``(vocab_size,)`` bool: the tokens allowed now by the function bound with :meth:`set_action_mask_fn`
        (all True without one); sb3-contrib's ``MaskablePPO`` reads it through SB3's ``DummyVecEnv``."""
        return self.core.action_masks()[0].cpu().numpy()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        _refuse_short_time_limit(self)
        super().reset(seed=seed)
        options = dict(options or {})
        prompt = options.pop("prompt", None)
        if options:
            raise ValueError(f"unknown reset options {sorted(options)}; the only option is 'prompt'")
        self.core.rng = self.np_random
        self.core.reset(prompts=None if prompt is None else [prompt])
        self._done = False
        self._last_completion = ""
        return self._obs(), {"prompt": self.core.row_prompts[0].text}

    def step(self, action, logprob: float | None = None):
        """Append ``action`` to the text. ``logprob`` is log pi(action|state), for the exact KL term.

        ``gym.make`` returns this environment itself (lmgym registers its ids without Gymnasium's
        order-enforcing and checker wrappers, since the environment enforces order itself), so
        ``gym.make(id).step(action, logprob=...)`` works. A wrapper you add (``TimeLimit``,
        SB3's ``Monitor``, ...) only passes ``step(action)`` on: call ``env.unwrapped.step(action,
        logprob=...)``, or bind the policy (``env.unwrapped.bind_policy(fn)``) so the environment
        asks it for the log-prob and every wrapper keeps working.
        """
        if self._done:
            raise EpisodeError("the episode has ended (or never started): call reset() before step()")
        if isinstance(action, (str, bytes)):
            raise TypeError(f"action must be an integer token id, got {action!r}")
        action = np.asarray(action)
        if action.size != 1:
            raise ValueError(f"action must be one token id, got an array of shape {action.shape}; this environment "
                             "takes one action per step (the vector environment takes one per row)")
        if logprob is not None:
            try:
                logprob = float(logprob)  # its value is checked with the vector path's (finite, <= 0)
            except (TypeError, ValueError):
                raise TypeError(f"logprob must be a number, log pi(action|state), got {logprob!r}") from None
        _, rewards, terminated, truncated, info = self.core.step(
            action.reshape(1), None if logprob is None else [logprob])
        term, trunc = bool(terminated[0]), bool(truncated[0])
        out = {k: float(v[0]) for k, v in info.items() if k in ("ref_logprob", "logprob", "kl", "turn_reward")
               and info["_" + k][0]}
        if "turn" in info:
            out["turn"] = int(info["turn"][0])
        if term or trunc:
            self._done = True
            out.update({k: cast(info[k][0]) for k, cast in _EPISODE_END_KEYS.items() if k in info})
            out["prompt"] = self.core.row_prompts[0].text
            self._last_completion = out["completion"]
        return self._obs(), float(rewards[0]), term, trunc, out

    def render(self):
        if self.render_mode != "ansi":
            return None
        core = self.core
        if not core.started:
            raise EpisodeError("nothing to render yet: call reset() before render()")
        gen = core.tokens[0, core.prompt_len[0]:core.prompt_len[0] + core.gen_len[0]].tolist()
        text = self._last_completion if self._done else core.tokenizer.decode(gen, skip_special_tokens=True)
        return f"{core.row_prompts[0].text if core.row_prompts else ''} | {text}"
