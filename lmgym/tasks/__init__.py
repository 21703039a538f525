"""Built-in tasks and their registration with Gymnasium (``import lmgym`` runs :func:`register_all`)."""

from __future__ import annotations

import gymnasium as gym

__all__ = ["register_all", "describe", "DIAGNOSTIC_IDS", "MULTI_TURN_IDS", "LANGUAGE_IDS", "DEFAULT_ZOO_MODELS"]

DIAGNOSTIC_IDS = {
    "lmgym/TargetToken-v0": "target",
    "lmgym/Copy-v0": "copy",
    "lmgym/Reverse-v0": "reverse",
    "lmgym/Sort-v0": "sort",
}
MULTI_TURN_IDS = {
    "lmgym/Guess-v0": "guess",
    "lmgym/Echo-v0": "echo",
}
LANGUAGE_IDS = {
    "lmgym/Sentiment-v0": "sentiment",
    "lmgym/Arithmetic-v0": "arithmetic",
    "lmgym/Preference-v0": "preference",
    "lmgym/ChatArithmetic-v0": "chat_arithmetic",
    "lmgym/ChatCalculator-v0": "chat_calculator",
}
DEFAULT_ZOO_MODELS = {"lmgym/Sentiment-v0": ["reviews"], "lmgym/Arithmetic-v0": ["arithmetic"],
                      "lmgym/Preference-v0": ["assistant", "assistant-rm"],
                      "lmgym/ChatArithmetic-v0": ["smollm2-135m-instruct"],
                      "lmgym/ChatCalculator-v0": ["smollm2-135m-instruct"]}
"""The zoo entries each language task builds on first use."""


# ``gym.make`` then returns the environment itself: it enforces the reset/step order on its own, and
# without Gymnasium's wrappers around it ``gym.make(id).step(action, logprob=...)`` reaches it (a
# wrapper's ``step`` takes the action alone). ``gym.make(id, disable_env_checker=False)`` adds the
# passive checker back.
_BARE = dict(order_enforce=False, disable_env_checker=True)


def register_all() -> None:
    """Register every lmgym environment id (idempotent)."""
    if "lmgym/TextGen-v0" not in gym.registry:
        gym.register("lmgym/TextGen-v0", entry_point="lmgym.envs.env:TextGenEnv",
                     vector_entry_point="lmgym.envs.vector:TextGenVectorEnv", **_BARE)
    for ids, module in ((DIAGNOSTIC_IDS, "diagnostic"), (MULTI_TURN_IDS, "conversation"), (LANGUAGE_IDS, "language")):
        for env_id, task in ids.items():
            if env_id not in gym.registry:
                gym.register(env_id, entry_point=f"lmgym.tasks.{module}:make_env",
                             vector_entry_point=f"lmgym.tasks.{module}:make_vec_env", kwargs={"task": task},
                             **_BARE)


def describe(env_id: str) -> str:
    """The documentation of a registered lmgym task."""
    if env_id in DIAGNOSTIC_IDS:
        from lmgym.tasks.diagnostic import DOCS

        return DOCS[DIAGNOSTIC_IDS[env_id]]
    if env_id in MULTI_TURN_IDS:
        from lmgym.tasks.conversation import DOCS

        return DOCS[MULTI_TURN_IDS[env_id]]
    if env_id in LANGUAGE_IDS:
        from lmgym.tasks.language import DOCS

        return DOCS[LANGUAGE_IDS[env_id]]
    if env_id == "lmgym/TextGen-v0":
        from lmgym.envs.env import TextGenEnv

        return TextGenEnv.__doc__
    raise KeyError(f"unknown lmgym task {env_id!r}")
