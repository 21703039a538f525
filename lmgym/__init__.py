"""lmgym: language-model text generation as a Gymnasium reinforcement-learning problem.

``import lmgym`` registers the environments: ``gym.make("lmgym/TextGen-v0", model=..., reward_fn=...,
prompts=...)`` for your own model and reward, and diagnostic tasks with an exactly known optimum
(``lmgym/TargetToken-v0``, ``lmgym/Copy-v0``, ``lmgym/Reverse-v0``, ``lmgym/Sort-v0``).
``gym.make_vec(id, num_envs=N)`` gives the batched :class:`TextGenVectorEnv`.
"""

from lmgym import _moved
from lmgym.envs import EpisodeError, SequenceResult, TextGenEnv, TextGenVectorEnv
from lmgym.models import load_model, tiny_model
from lmgym.rewards import RewardError, RewardFunction
from lmgym.tasks import register_all

__version__ = "0.1.0"
__all__ = ["TextGenEnv", "TextGenVectorEnv", "SequenceResult", "EpisodeError", "RewardError", "RewardFunction",
           "load_model", "tiny_model", "__version__"]

_moved.install()  # the module paths of lmgym 0.1 keep importing, with a DeprecationWarning
register_all()
