"""lmgym's agents: PPO, GRPO, REINFORCE and RLOO behind one ``Agent`` interface.

Each trains on a :class:`lmgym.TextGenVectorEnv` (``gym.make_vec("lmgym/...", num_envs=N)``)::

    agent = PPO(venv, learning_rate=3e-4, logdir="runs/ppo")
    agent.learn(total_steps=50_000)
"""

from lmgym.agents.base import Agent, AgentConfig, Callback, Rollout, TrainingError
from lmgym.agents.checkpoint import CheckpointError, latest_checkpoint
from lmgym.agents.config import ConfigError
from lmgym.agents.grpo import GRPO, GRPOConfig
from lmgym.agents.ppo import PPO, PPOConfig
from lmgym.agents.reinforce import RLOO, Reinforce, ReinforceConfig, RLOOConfig

AGENTS = {"ppo": PPO, "grpo": GRPO, "reinforce": Reinforce, "rloo": RLOO}
"""The built-in agents by name."""

__all__ = ["Agent", "AgentConfig", "Callback", "Rollout", "TrainingError", "CheckpointError", "ConfigError",
           "latest_checkpoint", "PPO", "PPOConfig",
           "GRPO", "GRPOConfig", "Reinforce", "ReinforceConfig", "RLOO", "RLOOConfig", "AGENTS"]
