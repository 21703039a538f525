"""lmgym: language-model text generation as a Gymnasium reinforcement-learning problem.

``import lmgym`` registers the environments: ``gym.make("lmgym/TextGen-v0", model=..., reward_fn=...,
prompts=...)`` for your own model and reward, and diagnostic tasks with an exactly known optimum
(``lmgym/TargetToken-v0``, ``lmgym/Copy-v0``, ``lmgym/Reverse-v0``, ``lmgym/Sort-v0``).
``gym.make_vec(id, num_envs=N)`` gives the batched :class:`TextGenVectorEnv`.
"""

from lmgym.core import EpisodeError, SequenceResult
from lmgym.env import TextGenEnv
from lmgym.models import load_model, tiny_model
from lmgym.rewards import RewardError, RewardFunction
from lmgym.tasks import register_all
from lmgym.vector import TextGenVectorEnv

__version__ = "0.1.0"
__all__ = ["TextGenEnv", "TextGenVectorEnv", "SequenceResult", "EpisodeError", "RewardError", "RewardFunction",
           "load_model", "tiny_model", "__version__"]

register_all()
