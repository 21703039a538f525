"""lmgym's multi-turn episodes as TRL's ``rollout_func``: ``GRPOTrainer`` trains on the episodes the environment played.

TRL 1.16's ``GRPOTrainer`` has two ways to multi-turn training (``trl/trainer/grpo_trainer.py``):

- ``environment_factory`` (and ``tools``): TRL generates, parses tool calls from the completion with the
  tokenizer's response template, calls the environment's methods as tools and appends the results with the chat
  template (``_tool_call_loop``, ``_get_tool_suffix_ids``). The environment speaks only when the policy called a
  tool, and the tokenizer's chat template must render tool calls (``supports_tool_calling``). lmgym's interactions
  answer after every policy turn, whatever it said (Guess-v0's ``lower`` / ``higher``), and its diagnostic tasks
  have no chat template, so this route cannot play them.
- ``rollout_func(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs", "env_mask", ...}``: the
  caller generates. ``env_mask`` (1 on the model's tokens, 0 on the environment's) becomes TRL's ``tool_mask``,
  which multiplies the completion mask in the policy loss, the ``beta * k3`` KL term, the entropy and the token
  counts; other keys reach the reward functions as keyword arguments.

:class:`EpisodeRollout` is a ``rollout_func``: for the batch of prompts TRL drew (``num_generations`` copies of
each, in a row) it plays a batch of episodes on the task's environment with TRL's current model as the policy,
through the same collection code lmgym's agents use (:func:`lmgym.agents.common.turn_rollout.collect_turns`:
the policy samples a turn with its KV cache, the environment answers with reply tokens appended after the
history, never re-tokenised), and hands TRL each episode's token ids, the policy's sampling log-probs (0 on
the environment's tokens, as TRL's own tool loop writes them) and ``env_mask`` = the environment's
``policy_mask``. So the tokens TRL trains on are the episode's tokens, id for id.

:class:`EpisodeReturn` is the matching reward function: each episode's return as the environment computed it
(its turn rewards plus its score; the KL stays TRL's ``beta``), read from the ``episode_return`` column the
rollout passes along.
"""

from __future__ import annotations

from dataclasses import dataclass

import json

import torch

from lmgym.envs.chat import is_chat_messages

__all__ = ["EpisodeBatch", "EpisodeRollout", "EpisodeReturn", "prompt_key"]


@dataclass
class EpisodeBatch:
    """One batch of episodes exactly as :class:`EpisodeRollout` handed it to TRL (kept for inspection)."""

    prompt_ids: list[list[int]]
    """each episode's prompt token ids"""
    completion_ids: list[list[int]]
    """every token after the prompt, the policy's and the environment's, in order"""
    env_mask: list[list[int]]
    """1 where the policy chose the token, 0 on the environment's replies"""
    logprobs: list[list[float]]
    """the policy's sampling log-prob of each of its tokens, 0 on the environment's"""
    returns: list[float]
    """turn rewards plus the task score of each episode (no KL)"""
    kl: list[float]
    """each episode's KL to the environment's reference, summed over the policy's tokens (k1, as the env charges it)"""


def prompt_key(prompt) -> str:
    """A hashable key of a prompt as a dataset column holds it (text, or a list of message dicts)."""
    if is_chat_messages(prompt):
        return "chat:" + json.dumps([dict(m) for m in prompt], sort_keys=True)
    return "text:" + str(prompt)


class EpisodeRollout:
    """TRL's ``rollout_func`` playing lmgym's multi-turn episodes; see the module docstring.

    Args:
        env: the task's multi-turn ``TextGenVectorEnv``; TRL's generation batch must be its ``num_envs`` rows.
        prompts: the task's prompt list (``core.prompts.items``): TRL hands back the dataset's ``prompt`` column
            (a text prompt's text, a chat prompt's messages), which is matched to them.
        seed: seeds the environment's episode generator and the policy's sampling generator on the first call
            (default: the trainer's ``args.seed``).
    """

    def __init__(self, env, prompts: list, seed: int | None = None):
        if not env.multi_turn:
            raise TypeError("EpisodeRollout plays multi-turn environments (made with an interaction); a single-turn "
                            "task trains with TRL's own generation")
        self.env, self.seed = env, seed
        self._by_key = {}
        for item in reversed(prompts):  # the first of equal prompts wins
            self._by_key[prompt_key(item.given if is_chat_messages(item.given) else item.text)] = item
        self._sampler = None
        self._model = None
        self.last: EpisodeBatch | None = None
        """the batch handed to TRL by the latest call"""
        self.episodes = 0
        self.policy_tokens = 0
        self.environment_tokens = 0

    def _sampler_for(self, model):
        """An lmgym agent whose policy *is* ``model`` (no copy): it samples the turns and feeds the replies to the
        policy's cache. Building it must not change TRL's model: parameters keep their ``requires_grad`` (a LoRA
        model's base stays frozen), and a model that is not float32 is refused (the agent would cast it)."""
        if self._sampler is not None and self._model is model:
            return self._sampler
        seed = 0 if self.seed is None else self.seed
        from lmgym.agents import Agent

        dtypes = {p.dtype for p in model.parameters()}
        if dtypes != {torch.float32}:
            raise ValueError(f"the multi-turn rollout samples with TRL's model in place, which must hold float32 "
                             f"weights (got {sorted(str(d) for d in dtypes)}); keep model_init_kwargs="
                             "{'dtype': 'float32'} and use bf16=True for mixed precision")
        flags = [(p, p.requires_grad) for p in model.parameters()]
        was_training = model.training
        rng = torch.get_rng_state()  # the agent seeds torch's global generator; TRL's stream goes on untouched
        try:
            self._sampler = Agent(self.env, policy=model, seed=seed)
        finally:
            torch.set_rng_state(rng)
            for p, flag in flags:
                p.requires_grad_(flag)
            model.train(was_training)
        self._model = model
        self.env.reset(seed=seed)
        return self._sampler

    def prompt_items(self, prompts) -> list:
        """The task's prompts that TRL's batch holds, in order."""
        out = []
        for p in prompts:
            item = self._by_key.get(prompt_key(p))
            if item is None:
                raise ValueError(f"TRL handed the rollout a prompt that is not one of the task's ({str(p)[:60]!r}); "
                                 "train on the dataset of TRLTask.dataset()")
            out.append(item)
        return out

    def play(self, model, prompts) -> EpisodeBatch:
        """Play one batch of episodes from ``prompts`` (one per environment row) with ``model`` as the policy."""
        from lmgym.agents.common.turn_rollout import collect_turns

        env = self.env
        if len(prompts) != env.num_envs:
            raise ValueError(f"TRL's generation batch has {len(prompts)} prompts but the environment plays "
                             f"{env.num_envs} episodes at a time; set per_device_train_batch_size x "
                             f"steps_per_generation = num_envs (TRLTask.config_kwargs() does)")
        items = self.prompt_items(prompts)
        sampler = self._sampler_for(model)
        was_training = model.training
        env.reset(options={"prompts": items})
        try:
            rollout = collect_turns(sampler)
        finally:
            model.train(was_training)
        lengths = rollout.lengths.tolist()
        tokens, mask = rollout.tokens.tolist(), rollout.mask.tolist()
        logprobs = rollout.logprobs.tolist()
        batch = EpisodeBatch(prompt_ids=[list(p.ids) for p in items],
                             completion_ids=[row[:n] for row, n in zip(tokens, lengths)],
                             env_mask=[[int(m) for m in row[:n]] for row, n in zip(mask, lengths)],
                             logprobs=[row[:n] for row, n in zip(logprobs, lengths)],
                             returns=[float(s) for s in rollout.scores.tolist()],
                             kl=[float(k) for k in rollout.kl.sum(1).tolist()])
        self.episodes += len(items)
        policy = sum(sum(m) for m in batch.env_mask)
        self.policy_tokens += policy
        self.environment_tokens += sum(lengths) - policy
        self.last = batch
        return batch

    def __call__(self, prompts, trainer) -> dict:
        if self.seed is None:
            self.seed = int(trainer.args.seed)
        model = trainer.accelerator.unwrap_model(trainer.model)
        batch = self.play(model, prompts)
        return {"prompt_ids": batch.prompt_ids, "completion_ids": batch.completion_ids, "logprobs": batch.logprobs,
                "env_mask": batch.env_mask, "episode_return": batch.returns, "episode_kl": batch.kl,
                "policy_tokens": [sum(m) for m in batch.env_mask]}


class EpisodeReturn:
    """A TRL reward function: each episode's return as the environment computed it (turn rewards plus the score),
    from the ``episode_return`` column :class:`EpisodeRollout` passes to the reward functions."""

    __name__ = "lmgym_episode_return"  # TRL logs rewards under their function's name

    def __call__(self, prompts, completions, episode_return=None, **kwargs) -> list[float]:
        if episode_return is None:
            raise ValueError("the episode's return comes with the episodes EpisodeRollout plays: pass TRLTask's "
                             "rollout_func to the trainer (TRLTask.trainer_kwargs() does)")
        if len(episode_return) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(episode_return)} episode returns")
        return [float(r) for r in episode_return]
