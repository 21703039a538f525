"""The MDP of DESIGN.md: the batched core (episode state, reference scoring, rewards), its two views (the
single-episode ``gymnasium.Env`` and the batched ``VectorEnv``), action masks, prompts and chat rendering,
and the exact optimum of small tasks."""

from lmgym.envs.chat import default_stop_token_ids, is_chat_messages, render_chat
from lmgym.envs.core import EpisodeError, SequenceResult, TextGenCore
from lmgym.envs.env import TextGenEnv, UnsupportedRenderMode, observation_space
from lmgym.envs.masking import NucleusMask, nucleus_mask
from lmgym.envs.optimum import soft_optimal_values
from lmgym.envs.prompts import Prompt, PromptSource
from lmgym.envs.vector import TextGenVectorEnv
from lmgym.envs.view import CoreView

__all__ = ["TextGenEnv", "TextGenVectorEnv", "TextGenCore", "CoreView", "SequenceResult", "EpisodeError",
           "UnsupportedRenderMode", "observation_space", "NucleusMask", "nucleus_mask", "Prompt", "PromptSource",
           "is_chat_messages", "render_chat", "default_stop_token_ids", "soft_optimal_values"]
