"""Built-in tasks and their registration with Gymnasium (``import lmgym`` runs :func:`register_all`)."""

from __future__ import annotations

import gymnasium as gym

from lmgym.tasks.diagnostic import DOCS as _DIAGNOSTIC_DOCS

__all__ = ["register_all", "DIAGNOSTIC_IDS"]

DIAGNOSTIC_IDS = {
    "lmgym/TargetToken-v0": "target",
    "lmgym/Copy-v0": "copy",
    "lmgym/Reverse-v0": "reverse",
    "lmgym/Sort-v0": "sort",
}


def register_all() -> None:
    """Register every lmgym environment id (idempotent)."""
    if "lmgym/TextGen-v0" not in gym.registry:
        gym.register("lmgym/TextGen-v0", entry_point="lmgym.env:TextGenEnv",
                     vector_entry_point="lmgym.vector:TextGenVectorEnv")
    for env_id, task in DIAGNOSTIC_IDS.items():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point="lmgym.tasks.diagnostic:make_env",
                         vector_entry_point="lmgym.tasks.diagnostic:make_vec_env", kwargs={"task": task})


def describe(env_id: str) -> str:
    """The documentation of a registered lmgym task."""
    if env_id in DIAGNOSTIC_IDS:
        return _DIAGNOSTIC_DOCS[DIAGNOSTIC_IDS[env_id]]
    if env_id == "lmgym/TextGen-v0":
        from lmgym.env import TextGenEnv

        return TextGenEnv.__doc__
    raise KeyError(f"unknown lmgym task {env_id!r}")
