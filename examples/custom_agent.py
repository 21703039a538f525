"""Plug in your own algorithm: reward-weighted regression (Peters & Schaal 2007) in a few lines.

Subclass ``Agent``, give it a config dataclass and write ``update``; sampling, scoring,
the training loop, logging, checkpoints and resume come from the base class.

Reward-weighted regression fits the policy to its own samples weighted by
``softmax(return / temperature)`` within each prompt's group: a soft version of
best-of-K fine-tuning, which lmgym ships as an agent (``lmgym.agents.RFT``, ``--agent rft``).

    python examples/custom_agent.py
"""

from dataclasses import dataclass

import gymnasium as gym
import torch

import lmgym  # noqa: F401  registers the environments
from lmgym.agents import Agent, AgentConfig, Rollout
from lmgym.agents.common import policy_forward


@dataclass
class RewardWeightedConfig(AgentConfig):
    """Hyper-parameters of reward-weighted regression."""

    learning_rate: float = 3e-3
    """AdamW learning rate"""
    temperature_of_weights: float = 0.1
    """softmax temperature of the returns within a group (lower: closer to keeping only the best)"""


class RewardWeighted(Agent):
    """Each iteration: weight each completion by softmax(return / temperature) within its group, maximise the
    weighted log-likelihood."""

    config_class = RewardWeightedConfig
    name = "reward_weighted"

    def update(self, rollout: Rollout) -> dict[str, float]:
        k = rollout.group_size
        weights = torch.softmax(rollout.returns.view(-1, k) / self.config.temperature_of_weights, dim=1).view(-1)
        logprobs, _, _ = policy_forward(self.policy, rollout)
        token_mean_logprob = (logprobs * rollout.mask).sum(1) / rollout.mask.sum(1)
        loss = -(weights * token_mean_logprob).sum() / (len(rollout) // k)  # mean over prompts
        self.check_finite(**{"loss/policy": loss})
        loss.backward()
        grad_norm = self.optimizer_step()
        return {"loss/policy": loss.item(), "loss/grad_norm": grad_norm}


def main(total_steps: int = 20_000, logdir: str | None = "runs/custom_agent") -> dict:
    venv = gym.make_vec("lmgym/TargetToken-v0", num_envs=64, group_size=8, device="cpu")
    agent = RewardWeighted(venv, logdir=logdir)
    before = agent.evaluate()
    agent.learn(total_steps)
    after = agent.evaluate()
    optimum = venv.optimal_return
    print(f"return {before['return']:.3f} -> {after['return']:.3f} "
          f"({after['return'] / optimum:.0%} of the exact optimum {optimum:.3f})")
    return {"before": before, "after": after, "optimum": optimum}


if __name__ == "__main__":
    main()
