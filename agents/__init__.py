"""lmgym's agents: PPO, NLPO, A2C, GRPO, REINFORCE, RLOO, rejection-sampling fine-tuning, DPO and online DPO
behind one ``Agent`` interface.

Each trains on a :class:`lmgym.TextGenVectorEnv` (``gym.make_vec("lmgym/...", num_envs=N)``)::

    agent = PPO(venv, learning_rate=3e-4, logdir="runs/ppo")
    agent.learn(total_steps=50_000)
"""

from lmgym.agents.a2c import A2C, A2CConfig
from lmgym.agents.common.base import Agent, AgentConfig, Callback, Rollout, TrainingError
from lmgym.agents.common.checkpoint import CheckpointError, latest_checkpoint
from lmgym.agents.common.config import ConfigError
from lmgym.agents.dpo import DPO, DPOConfig, OnlineDPO, OnlineDPOConfig
from lmgym.agents.grpo import GRPO, GRPOConfig
from lmgym.agents.nlpo import NLPO, NLPOConfig
from lmgym.agents.ppo import PPO, PPOConfig
from lmgym.agents.reinforce import RLOO, Reinforce, ReinforceConfig, RLOOConfig
from lmgym.agents.rft import RFT, RFTConfig

AGENTS = {"ppo": PPO, "grpo": GRPO, "reinforce": Reinforce, "rloo": RLOO, "a2c": A2C, "rft": RFT, "dpo": DPO,
          "online-dpo": OnlineDPO, "nlpo": NLPO}
"""The built-in agents by name."""

__all__ = ["Agent", "AgentConfig", "Callback", "Rollout", "TrainingError", "CheckpointError", "ConfigError",
           "latest_checkpoint", "PPO", "PPOConfig", "GRPO", "GRPOConfig", "Reinforce", "ReinforceConfig", "RLOO",
           "RLOOConfig", "A2C", "A2CConfig", "RFT", "RFTConfig", "DPO", "DPOConfig", "OnlineDPO", "OnlineDPOConfig",
           "NLPO", "NLPOConfig", "AGENTS"]
