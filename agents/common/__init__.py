"""What every agent shares: the ``Agent`` base class and its training loop, rollouts, the policy forward and
log-probs, building the policy (and LoRA), config checks, checkpoints, evaluation, logging and the KL
estimators."""

from lmgym.agents.common.base import Agent, AgentConfig, Callback, TrainingError, ValueHead
from lmgym.agents.common.checkpoint import CheckpointError, latest_checkpoint
from lmgym.agents.common.config import ConfigError, OneOf, Range, check_config
from lmgym.agents.common.forward import policy_forward
from lmgym.agents.common.rollout import Rollout, masked_mean, masked_whiten

__all__ = ["Agent", "AgentConfig", "Callback", "TrainingError", "ValueHead", "CheckpointError", "latest_checkpoint",
           "ConfigError", "OneOf", "Range", "check_config", "policy_forward", "Rollout", "masked_mean",
           "masked_whiten"]
