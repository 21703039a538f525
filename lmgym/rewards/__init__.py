"""Reward sources: any callable ``fn(prompts, completions) -> scores`` checked and batched
(``RewardFunction``), and Bradley-Terry reward models trained on preferences (``reward_model``)."""

from lmgym.rewards.functions import MAX_ABS_SCORE, RewardError, RewardFunction
from lmgym.rewards.reward_model import (LearnedReward, PreferenceGroup, RewardModel, bradley_terry_loss,
                                        groups_from_rankings, pairwise_accuracy, read_preferences,
                                        sample_preferences, train_reward_model)

__all__ = ["RewardFunction", "RewardError", "MAX_ABS_SCORE", "RewardModel", "LearnedReward", "PreferenceGroup",
           "bradley_terry_loss", "read_preferences", "groups_from_rankings", "train_reward_model",
           "pairwise_accuracy", "sample_preferences"]
