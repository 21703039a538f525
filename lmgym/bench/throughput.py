"""Speed benchmarks, each a ratio against a baseline measured in the same run.

``environment_rollout`` times, for the same model, batch and lengths:

(a) the baseline: ``model.generate`` (sampling, KV cache) plus one reference-model
    forward over the result to get the reference log-probs;
(b) an lmgym rollout through the submission path: the policy samples whole
    continuations (KV-cached), then ``score_sequences`` returns every per-token reward;
(c) an lmgym rollout through per-token ``step``: a KV-cached sampling loop that
    calls ``env.step(actions, logprobs)`` for each token.

It reports median seconds per rollout and the ratios b/a and c/a.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from lmgym.models.hf_api import cache_kwargs, cache_of
from lmgym.models import resolve_device, sample_continuations, tiny_model, to_left_padded, token_logprobs
from lmgym.envs.vector import TextGenVectorEnv

__all__ = ["bench_model", "environment_rollout", "agent_iteration", "sb3_bridge"]


def bench_model(size: str = "4M", seed: int = 0):
    """A randomly initialised Llama-style model of about 4M or 100M parameters, and its tokenizer."""
    shapes = {"4M": dict(vocab=2048, hidden_size=256, num_layers=4, num_heads=4),
              "100M": dict(vocab=32000, hidden_size=768, num_layers=10, num_heads=12)}
    if size not in shapes:
        raise ValueError(f"size must be one of {sorted(shapes)}, got {size!r}")
    s = shapes[size]
    return tiny_model(s["vocab"], hidden_size=s["hidden_size"], num_layers=s["num_layers"],
                      num_heads=s["num_heads"], max_positions=256, seed=seed)


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def environment_rollout(size: str = "4M", batch: int = 64, new_tokens: int = 32, prompt_tokens: int = 16,
                        device="auto", repeats: int = 3, seed: int = 0) -> dict:
    """Time the three rollouts described in the module docstring; returns seconds and ratios."""
    dev = resolve_device(device)
    ref, tok = bench_model(size, seed)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ref = ref.to(dev, dtype)
    policy = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(seed)
    # Prompts of varied length; token 0 is EOS, so prompts avoid it.
    prompts = [torch.randint(1, len(tok), (int(n),), generator=g).tolist()
               for n in torch.randint(prompt_tokens // 2, prompt_tokens + 1, (batch,), generator=g)]
    # Episodes run to full length in every path, so each does the same work.
    never = [len(tok) - 1]
    env = TextGenVectorEnv(batch, model=ref, tokenizer=tok, reward_fn=lambda p, c: [float(len(x)) for x in c],
                           prompts=prompts, max_new_tokens=new_tokens, stop_token_ids=never, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)

    def baseline():
        obs = env.observation()
        ids, mask = to_left_padded(obs["input_ids"], obs["attention_mask"], env.max_prompt_tokens)
        out = policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, pad_token_id=0, top_k=0, top_p=1.0)
        full_mask = torch.cat([mask, torch.ones_like(out[:, ids.shape[1]:])], dim=1)
        logits = ref(input_ids=out, attention_mask=full_mask).logits[:, ids.shape[1] - 1:-1].float()
        lp = logits.gather(-1, out[:, ids.shape[1]:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
        return lp.sum()

    def submission():
        obs = env.observation()
        ids, mask = to_left_padded(obs["input_ids"], obs["attention_mask"], env.max_prompt_tokens)
        tokens, logprobs = sample_continuations(policy, ids, mask, new_tokens, stop_token_ids=never,
                                                pad_token_id=0, generator=gen)
        return env.score_sequences(tokens, logprobs).rewards.sum()

    def stepping():
        obs = env.observation()
        ids, mask = to_left_padded(obs["input_ids"], obs["attention_mask"], env.max_prompt_tokens)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = policy(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache, lengths, total = cache_of(out), mask.sum(1), 0.0
        for t in range(new_tokens):
            logp = torch.log_softmax(out.logits[:, -1].float(), -1)
            action = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
            _, reward, *_ = env.step(action, logp.gather(1, action[:, None]).squeeze(1))
            total = total + reward.sum()
            if t + 1 < new_tokens:
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                out = policy(input_ids=action[:, None], attention_mask=mask, position_ids=lengths[:, None],
                             use_cache=True, **cache_kwargs(policy, cache))
                cache, lengths = cache_of(out), lengths + 1
        env.step(torch.zeros(batch, dtype=torch.long, device=dev))  # the NEXT_STEP autoreset to new prompts
        return total

    env.reset(seed=seed)
    results = {"device": str(dev), "model_parameters": sum(p.numel() for p in ref.parameters()), "batch": batch,
               "new_tokens": new_tokens}
    results["a_generate_plus_ref_s"] = _time(baseline, repeats, dev)
    results["b_submission_s"] = _time(submission, repeats, dev)
    env.reset(seed=seed)
    results["c_per_token_step_s"] = _time(stepping, repeats, dev)
    results["ratio_b_over_a"] = results["b_submission_s"] / results["a_generate_plus_ref_s"]
    results["ratio_c_over_a"] = results["c_per_token_step_s"] / results["a_generate_plus_ref_s"]
    return results


def agent_iteration(algo: str = "grpo", size: str = "4M", prompts: int = 8, group: int = 8, new_tokens: int = 32,
                    device="auto", repeats: int = 3, seed: int = 0) -> dict:
    """Time one lmgym GRPO or PPO iteration against a minimal hand-written loop doing the same work.

    The floor, in plain PyTorch + transformers: ``model.generate`` of ``prompts * group``
    completions, one reference forward, (PPO: one no-grad value forward,) one
    forward + backward of the policy, and one AdamW step. lmgym's agent runs one
    iteration with one epoch and one minibatch, so it does the same work.
    """
    from lmgym.agents import GRPO, PPO
    from lmgym.agents.common.base import ValueHead

    if algo not in ("grpo", "ppo"):
        raise ValueError(f"algo must be 'grpo' or 'ppo', got {algo!r}")
    dev = resolve_device(device)
    ref, tok = bench_model(size, seed)
    ref = ref.to(dev)
    batch = prompts * group
    g = torch.Generator().manual_seed(seed)
    prompt_ids = [torch.randint(1, len(tok), (12,), generator=g).tolist() for _ in range(prompts)]
    never = [len(tok) - 1]

    def reward(p, c):
        return [float(len(x) % 7) for x in c]

    env = TextGenVectorEnv(batch, model=ref, tokenizer=tok, reward_fn=reward, prompts=prompt_ids,
                           group_size=group if algo == "grpo" else 1, max_new_tokens=new_tokens,
                           stop_token_ids=never, device=dev)
    cls = GRPO if algo == "grpo" else PPO
    agent = cls(env, update_epochs=1, num_minibatches=1, seed=seed)

    # The floor: its own policy copy, value head and optimizer.
    policy = copy.deepcopy(ref).requires_grad_(True)
    head = ValueHead(ref.config.hidden_size).to(dev)
    params = list(policy.parameters()) + (list(head.parameters()) if algo == "ppo" else [])
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids, mask = to_left_padded(*[torch.as_tensor(x, device=dev) for x in _batch_prompts(prompt_ids, group)])
    width = ids.shape[1]
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def floor():
        with torch.no_grad(), autocast:
            out = policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, pad_token_id=0, top_k=0, top_p=1.0)
            full_mask = torch.cat([mask, torch.ones_like(out[:, width:])], dim=1)
            positions = (full_mask.cumsum(1) - 1).clamp(min=0)
            ref_logits = ref(input_ids=out, attention_mask=full_mask, position_ids=positions).logits
            ref_lp = token_logprobs(ref_logits[:, width - 1:-1], out[:, width:])
            texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
            scores = torch.tensor(reward(None, texts), device=dev)
            if algo == "ppo":
                h = policy(input_ids=out, attention_mask=full_mask, position_ids=positions,
                           output_hidden_states=True).hidden_states[-1][:, width - 1:-1]
                advantages = (scores[:, None] - head(h)).detach()
            else:
                grouped = scores.view(-1, group)
                advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4))
                advantages = advantages.reshape(-1, 1)
        with autocast:
            out_p = policy(input_ids=out, attention_mask=full_mask, position_ids=positions,
                           output_hidden_states=algo == "ppo")
            lp = token_logprobs(out_p.logits[:, width - 1:-1], out[:, width:])
            loss = -(lp * advantages).mean() + 0.05 * (torch.exp(ref_lp - lp) - (ref_lp - lp) - 1).mean()
            if algo == "ppo":
                loss = loss + 0.5 * ((head(out_p.hidden_states[-1][:, width - 1:-1]) - scores[:, None]) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def lmgym_iteration():
        agent.update(agent.collect())

    results = {"algo": algo, "device": str(dev), "model_parameters": sum(p.numel() for p in ref.parameters()),
               "completions": batch, "new_tokens": new_tokens}
    results["floor_s"] = _time(floor, repeats, dev)
    results["lmgym_s"] = _time(lmgym_iteration, repeats, dev)
    results["ratio"] = results["lmgym_s"] / results["floor_s"]
    return results


def _batch_prompts(prompt_ids: list[list[int]], group: int):
    """Right-padded (left-aligned) ids and mask of each prompt repeated ``group`` times."""
    width = max(len(p) for p in prompt_ids)
    ids = [p + [0] * (width - len(p)) for p in prompt_ids for _ in range(group)]
    mask = [[1] * len(p) + [0] * (width - len(p)) for p in prompt_ids for _ in range(group)]
    return ids, mask


def sb3_bridge(num_envs: int = 16, total_steps: int = 4096, task: str = "lmgym/TargetToken-v0",
               seed: int = 0) -> dict:
    """SB3 PPO ("MultiInputPolicy") environment steps per second over the lmgym VecEnv bridge vs. a
    ``DummyVecEnv`` of single lmgym envs, same task, same number of envs, measured in one run."""
    import gymnasium as gym
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    from lmgym.agents.sb3 import LMGymVecEnv

    def run(env) -> float:
        model = PPO("MultiInputPolicy", env, n_steps=64, batch_size=256, seed=seed, device="cpu")
        model.learn(num_envs * 64)  # warm-up
        start = time.perf_counter()
        model.learn(total_steps, reset_num_timesteps=True)
        return total_steps / (time.perf_counter() - start)

    dummy = run(DummyVecEnv([lambda: gym.make(task) for _ in range(num_envs)]))
    bridge = run(LMGymVecEnv(gym.make_vec(task, num_envs=num_envs, device="cpu"), seed=seed))
    return {"task": task, "num_envs": num_envs, "dummy_vec_env_steps_per_s": dummy,
            "bridge_steps_per_s": bridge, "ratio_bridge_over_dummy": bridge / dummy}
