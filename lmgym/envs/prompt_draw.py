"""Which prompt each episode starts from: draws from the prompt source, shared within GRPO groups and across
the shares of a data-parallel batch, or given by the caller."""

from __future__ import annotations

import numpy as np

from lmgym.envs.chat import is_chat_messages
from lmgym.envs.prompts import Prompt, PromptSource

__all__ = ["PromptDraw"]


class PromptDraw:
    """The prompts of the next episodes of ``num_envs`` rows whose ``group_size`` consecutive rows share one.

    A row's k-th episode of a group takes the group's k-th drawn prompt, whichever row restarts first,
    so per-token stepping (rows restarting one by one) and whole-batch restarts draw the same prompts.
    """

    def __init__(self, source: PromptSource, num_envs: int, group_size: int):
        self.source, self.num_envs, self.group_size = source, num_envs, group_size
        self.episodes = np.zeros(num_envs, dtype=np.int64)  # episodes started per row
        self._group_prompts: dict[tuple[int, int], list] = {}

    def restart(self) -> None:
        """Forget the episodes counted so far (a reset of every row)."""
        self.episodes[:] = 0
        self._group_prompts.clear()

    def draw(self, rng: np.random.Generator, rows: np.ndarray, shard: tuple[int, int] = (0, 1)) -> list[Prompt]:
        """Prompts for the next episode of each of ``rows``; the G rows of a group share their k-th prompt."""
        index, count = shard
        if count > 1 and len(rows) == self.num_envs:
            chosen = self._share_of_global_draw(rng, index, count)
        elif self.group_size == 1:
            chosen = self.source.draw(rng, len(rows))
        else:
            chosen = []
            for r in rows:
                key = (int(r) // self.group_size, int(self.episodes[r]))
                entry = self._group_prompts.get(key)
                if entry is None:
                    entry = self._group_prompts[key] = [self.source.draw(rng, 1)[0], 0]
                entry[1] += 1
                if entry[1] == self.group_size:
                    del self._group_prompts[key]
                chosen.append(entry[0])
        self.episodes[rows] += 1
        return chosen

    def _share_of_global_draw(self, rng, index: int, count: int) -> list[Prompt]:
        """This share's rows of a full batch drawn for ``count`` shares, in the single environment's draw order:
        one draw of all rows without groups, one prompt per group (in row order) with them."""
        n, g = self.num_envs, self.group_size
        if g == 1:
            return self.source.draw(rng, n * count)[index * n:(index + 1) * n]
        groups = [self.source.draw(rng, 1)[0] for _ in range(n * count // g)]
        return [p for p in groups[index * n // g:(index + 1) * n // g] for _ in range(g)]

    def given(self, prompts) -> list[Prompt]:
        """The caller's prompts for every row: one per episode, or one per group (repeated over its rows)."""
        if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__") or is_chat_messages(prompts):
            prompts = [prompts]
        if len(prompts) not in (self.num_envs, self.num_envs // self.group_size):
            raise ValueError(f"options['prompts'] needs {self.num_envs} prompts (one per episode) or "
                             f"{self.num_envs // self.group_size} (one per group), got {len(prompts)}")
        encoded = [self.source.check_length(self.source.encode(p)) for p in prompts]
        if len(encoded) != self.num_envs:
            encoded = [p for p in encoded for _ in range(self.group_size)]
        self.episodes += 1
        return encoded
