"""The environment in a few lines: make a diagnostic task, play episodes, read the rewards and the optimum.

    python examples/quickstart.py
"""

import gymnasium as gym
import torch

import lmgym  # noqa: F401  registers the lmgym/... environments
from lmgym.models import sample_continuations, to_left_padded

# The standard path: one episode at a time, numpy observations.
env = gym.make("lmgym/Copy-v0")
obs, info = env.reset(seed=0)
print("prompt:", info["prompt"])
done = False
while not done:
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    done = terminated or truncated
print("completion:", info["completion"], "| score:", info["score"], "| last reward:", round(reward, 4))

# The fast path: a batch of episodes on one device; the reference policy samples whole
# continuations and submits them, getting back the exact per-token rewards.
venv = gym.make_vec("lmgym/Copy-v0", num_envs=256, device="cpu")
venv.reset(seed=0)
policy = venv.reference_model  # pi = pi_ref here, so the KL term is 0
obs = venv.observation()

ids, mask = to_left_padded(obs["input_ids"], obs["attention_mask"], venv.max_prompt_tokens)
tokens, logprobs = sample_continuations(policy, ids, mask, venv.max_new_tokens, stop_token_ids=venv.stop_token_ids,
                                        pad_token_id=0, generator=torch.Generator().manual_seed(0))
result = venv.score_sequences(tokens, logprobs)
returns = result.rewards.sum(1)
print(f"reference policy: mean return {returns.mean():.3f} (mean KL {result.kl.sum(1).mean():.4f})")
print(f"exact optimum of the KL-regularised objective: {venv.optimal_return:.3f}")
print(f"the reference policy reaches {returns.mean() / venv.optimal_return:.1%} of it")
