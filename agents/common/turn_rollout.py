"""Collecting multi-turn episodes: the policy samples a turn for every running row, the environment answers, and
the batch of conversations goes on until every episode has ended.

The rollout an update reads is the single-turn one with the environment's tokens inside it: ``tokens`` holds
every token after the prompt (the policy's turns and the replies, in order), ``mask`` is 1 on the policy's
tokens only, and log-probs, rewards and KL are 0 on the environment's. Every update that reads ``mask``
(losses, KL, entropy, value targets, token counts) therefore leaves the environment's tokens out; GAE and
n-step returns step over policy tokens only (:func:`lmgym.agents.common.rollout.policy_steps`).
"""

from __future__ import annotations

import torch

from lmgym.agents.common.rollout import Rollout
from lmgym.models import to_left_padded
from lmgym.models.turn_sampler import TurnSampler

__all__ = ["collect_turns"]


@torch.no_grad()
def collect_turns(agent) -> Rollout:
    """One batch of multi-turn episodes of ``agent``'s environment, sampled by its policy (KV-cached across turns)."""
    from lmgym.agents.common.update import TrainingError

    from lmgym.agents.common.base import Agent
    from lmgym.agents.common.config import ConfigError

    own_sampler = "sample" in vars(agent) or type(agent).sample is not Agent.sample
    if own_sampler and type(agent).turn_mask is Agent.turn_mask:
        # never a silent switch to another sampler: the rollout would not be the distribution the agent means
        raise ConfigError(f"{type(agent).__name__} samples with its own sample() (a generation engine, or a "
                          "restricted distribution), which multi-turn episodes cannot use: they are sampled turn "
                          "by turn with the policy's KV cache. Restrict that sampling with turn_mask(), or train "
                          "on a single-turn environment")
    env = agent.env
    obs = env.observation()
    query_ids, query_mask = to_left_padded(obs["input_ids"], obs["attention_mask"], env.max_prompt_tokens)
    n, width, device = env.num_envs, env.max_new_tokens, agent.device
    prompts = [row[m.bool()].tolist() for row, m in zip(query_ids.cpu(), query_mask.cpu())]
    prompt_texts = list(env.prompts)  # the rows restart on new prompts once every episode has ended
    mask_model, mask_fn = agent.turn_mask()
    agent.sampler_policy.eval()
    with agent.rollout_context():
        sampler = TurnSampler(agent.sampler_policy, prompts, max_sequence_length=env.max_length,
                              sampling=agent.sampling, stop_token_ids=env.stop_token_ids,
                              pad_token_id=env.tokenizer.pad_token_id,
                              generator=agent.sampling_generator, mask_model=mask_model, mask_fn=mask_fn)
    pad = env.tokenizer.pad_token_id
    tokens = torch.full((n, width), pad, dtype=torch.long, device=device)
    per_token = {k: torch.zeros((n, width), dtype=torch.float32, device=device)
                 for k in ("mask", "logprobs", "ref_logprobs", "rewards", "kl", "task_rewards")}
    turn_index = torch.full((n, width), -1, dtype=torch.long, device=device)
    offset = torch.zeros(n, dtype=torch.long, device=device)  # tokens written after each row's prompt
    budget = torch.full((n,), width, dtype=torch.long, device=device)  # an episode's tokens: max_new_tokens
    running = torch.ones(n, dtype=torch.bool, device=device)
    scores = torch.zeros(n, dtype=torch.float32, device=device)
    turns = torch.zeros(n, dtype=torch.long, device=device)
    columns = torch.arange(width, device=device)
    turn = 0
    while True:
        with agent.rollout_context():
            turn_tokens, turn_logprobs, lengths = sampler.sample_turn(running, env.max_turn_tokens, budget - offset)
        if not bool(torch.isfinite(turn_logprobs).all()):
            raise TrainingError(f"the policy's log-probs are not finite at iteration {agent.iteration}: its weights "
                                f"are non-finite or too large{agent._last_good()}.")
        result = env.submit_turns(turn_tokens, turn_logprobs)
        if not torch.equal(result.lengths, lengths):
            raise RuntimeError("the environment ended a turn elsewhere than the sampler did (stop tokens or limits "
                               "differ); this is a bug in lmgym")
        if not bool(torch.isfinite(result.rewards).all()):
            raise TrainingError(f"the environment returned non-finite rewards at iteration {agent.iteration}")
        # the turn's tokens, at each row's offset
        steps = turn_tokens.shape[1]
        inside = torch.arange(steps, device=device) < lengths[:, None]
        cols = offset[:, None] + torch.arange(steps, device=device)
        rows = torch.arange(n, device=device)[:, None].expand_as(cols)
        r, c = rows[inside], cols[inside]
        tokens[r, c] = turn_tokens[inside]
        per_token["mask"][r, c] = 1.0
        per_token["logprobs"][r, c] = turn_logprobs[inside]
        per_token["ref_logprobs"][r, c] = result.ref_logprobs[inside]
        per_token["rewards"][r, c] = result.rewards[inside]
        per_token["kl"][r, c] = result.kl[inside]
        turn_index[r, c] = turn
        # the turn reward, and the score where the episode ended, on the turn's last token
        done = torch.as_tensor(result.done, device=device)
        score = torch.as_tensor(result.scores, dtype=torch.float32, device=device).nan_to_num(0.0)
        extra = result.turn_rewards + torch.where(done, score, 0.0)
        last = (offset + lengths - 1).clamp(min=0)
        took = lengths > 0
        per_token["task_rewards"][rows[:, 0][took], last[took]] += extra[took]
        scores = scores + torch.where(took, extra, 0.0)
        turns = turns + took
        offset = offset + lengths
        # the replies, fed to the policy's cache and written after the turns
        counts = torch.as_tensor([len(x) for x in result.replies], dtype=torch.long, device=device)
        if bool((counts > 0).any()):
            reply = torch.full((n, int(counts.max())), pad, dtype=torch.long, device=device)
            for i, ids in enumerate(result.replies):
                if ids:
                    reply[i, :len(ids)] = torch.as_tensor(ids, device=device)
            within = torch.arange(reply.shape[1], device=device) < counts[:, None]
            rcols = offset[:, None] + torch.arange(reply.shape[1], device=device)
            rrows = torch.arange(n, device=device)[:, None].expand_as(rcols)
            tokens[rrows[within], rcols[within]] = reply[within]
            with agent.rollout_context():
                sampler.feed(reply, counts)
            offset = offset + counts
        running = running & ~done
        turn += 1
        if result.all_done:
            break
    if agent.sampler_policy is agent.policy:
        agent.policy.train()
    used = max(int(offset.max()), 1)
    inside_episode = columns[:used] < offset[:, None]
    completions = env.tokenizer.batch_decode([row[:k] for row, k in zip(tokens.tolist(), offset.tolist())],
                                             skip_special_tokens=True)
    return Rollout(query_ids=query_ids, query_mask=query_mask,
                   tokens=torch.where(inside_episode, tokens[:, :used], pad),
                   mask=per_token["mask"][:, :used], logprobs=per_token["logprobs"][:, :used],
                   ref_logprobs=per_token["ref_logprobs"][:, :used], rewards=per_token["rewards"][:, :used],
                   scores=scores, kl=per_token["kl"][:, :used], lengths=offset, group_size=env.group_size,
                   prompts=prompt_texts, completions=completions,
                   task_rewards=per_token["task_rewards"][:, :used], turn_index=turn_index[:, :used],
                   policy_version=agent.sampler_version)
