"""Plug in your own algorithm: best-of-k rejection-sampling fine-tuning (RAFT / ReST-style) in a few lines.

Subclass ``Agent``, give it a config dataclass and write ``update``; sampling, scoring,
the training loop, logging, checkpoints and resume come from the base class.

    python examples/custom_agent.py
"""

from dataclasses import dataclass

import gymnasium as gym
import torch

import lmgym  # noqa: F401  registers the environments
from lmgym.agents import Agent, AgentConfig, Rollout
from lmgym.agents.base import policy_forward


@dataclass
class BestOfKConfig(AgentConfig):
    """Hyper-parameters of best-of-k fine-tuning."""

    learning_rate: float = 3e-3
    """AdamW learning rate"""


class BestOfK(Agent):
    """Each iteration: sample k completions per prompt, keep the highest-return one, maximise its likelihood."""

    config_class = BestOfKConfig
    name = "best_of_k"

    def update(self, rollout: Rollout) -> dict[str, float]:
        k = rollout.group_size
        best = rollout.returns.view(-1, k).argmax(dim=1) + torch.arange(0, len(rollout), k, device=self.device)
        batch = rollout.select(best)
        logprobs, entropy, _ = policy_forward(self.policy, batch)
        loss = -((logprobs * batch.mask).sum(1) / batch.mask.sum(1)).mean()  # mean token NLL of the winners
        self.check_finite(**{"loss/policy": loss})
        loss.backward()
        grad_norm = self.optimizer_step()
        return {"loss/policy": loss.item(), "loss/grad_norm": grad_norm}


def main(total_steps: int = 20_000, logdir: str | None = "runs/custom_agent") -> dict:
    venv = gym.make_vec("lmgym/TargetToken-v0", num_envs=64, group_size=8, device="cpu")
    agent = BestOfK(venv, logdir=logdir)
    before = agent.evaluate()
    agent.learn(total_steps)
    after = agent.evaluate()
    optimum = venv.optimal_return
    print(f"return {before['return']:.3f} -> {after['return']:.3f} "
          f"({after['return'] / optimum:.0%} of the exact optimum {optimum:.3f})")
    return {"before": before, "after": after, "optimum": optimum}


if __name__ == "__main__":
    main()
