"""Old module paths of lmgym 0.1 (before the packages by concept) keep importing, with a DeprecationWarning.

``import lmgym.core`` gives the module now at ``lmgym.envs.core`` (the same object, so patching one patches
the other) and warns once, naming the new path. Installed by ``import lmgym``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "lmgym.core": "lmgym.envs.core", "lmgym.env": "lmgym.envs.env", "lmgym.vector": "lmgym.envs.vector",
    "lmgym.masking": "lmgym.envs.masking", "lmgym.prompts": "lmgym.envs.prompts", "lmgym.chat": "lmgym.envs.chat",
    "lmgym.optimum": "lmgym.envs.optimum", "lmgym.sampling": "lmgym.models.sampling",
    "lmgym.kv_cache": "lmgym.models.kv_cache", "lmgym.smollm": "lmgym.zoo.smollm", "lmgym.corpora": "lmgym.zoo.corpora",
    "lmgym.reward_model": "lmgym.rewards.reward_model", "lmgym.throughput": "lmgym.bench.throughput",
    **{f"lmgym.{m}": f"lmgym.utils.{m}" for m in ("cpu", "heap", "lock", "folders", "checksums", "jsonl", "checks")},
    **{f"lmgym.agents.{m}": f"lmgym.agents.common.{m}"
       for m in ("base", "checkpoint", "config", "forward", "kl", "logprobs", "policy", "lora", "rollout")},
    **{f"lmgym.agents.{m}": f"lmgym.agents.scale.{m}" for m in ("distributed", "sharding", "vllm")},
}
"""old module path -> where it lives now (``lmgym.models``, ``lmgym.zoo``, ``lmgym.rewards`` and ``lmgym.bench``
are packages now, exporting the names the modules of those paths had)"""


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} has moved to {MOVED[spec.name]}; import it from there (the old path will be "
                      "removed)", DeprecationWarning, stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module) -> None:
        pass  # the module at its new path is already executed


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
