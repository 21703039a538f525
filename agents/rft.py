"""Rejection-sampling fine-tuning: best-of-K, also called RAFT or expert iteration
(Dong et al. 2023; Yuan et al. 2023; Gulcehre et al. 2023, ReST; Anthony et al. 2017).

Per iteration:

1. Sample K completions per prompt (the environment's groups, ``group_size=K``).
2. Rank them by ``rank_by``:
   - ``"return"`` (default): ``score - beta * sum_t KL_t``, the environment's return, so the KL
     to the reference enters through the ranking: a completion that drifts far from pi_ref
     must earn a higher score to be kept;
   - ``"score"``: the task score alone (no KL in the objective at all: the policy heads for
     the best completion whatever its distance from pi_ref).
3. Keep the ``keep_top`` best completions of each prompt, or, with ``threshold``, every
   completion whose ranking value is at least ``threshold``.
4. Supervised fine-tuning on the kept completions: minimise their mean token
   negative log-likelihood ``-mean_t log pi(y_t | x, y_<t)`` for ``update_epochs`` passes of
   ``num_minibatches`` optimizer steps.

The update is the gradient of the log-likelihood of the filtered samples, so the policy
moves towards the best-of-K distribution of its own samples; repeated, it climbs towards
the completions with the highest ranking value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from lmgym.agents.common.base import Agent, AgentConfig, Rollout, masked_mean, policy_forward
from lmgym.agents.common.config import OneOf, Range

__all__ = ["RFTConfig", "RFT", "select_best"]

RANK_BY = ("return", "score")


@dataclass
class RFTConfig(AgentConfig):
    """Rejection-sampling fine-tuning hyper-parameters."""

    learning_rate: float = 1e-4
    """AdamW learning rate"""
    keep_top: Annotated[int, Range(ge=1)] = 1
    """completions kept per prompt: the best ones by rank_by (needs group_size > keep_top)"""
    threshold: float | None = None
    """keep every completion whose ranking value is >= this, instead of the top keep_top per prompt"""
    rank_by: Annotated[str, OneOf(*RANK_BY)] = "return"
    """ranking value: return (score - beta * KL: the KL enters through the ranking) or score"""


def select_best(values: torch.Tensor, group_size: int, keep_top: int, threshold: float | None = None):
    """Indices of the kept completions, in increasing order: the ``keep_top`` highest ``values`` of each
    consecutive group of ``group_size``, or, with ``threshold``, every value ``>= threshold``."""
    if threshold is not None:
        return torch.nonzero(values >= threshold).squeeze(1)
    groups = values.view(-1, group_size)
    best = groups.topk(keep_top, dim=1).indices
    offsets = torch.arange(0, len(values), group_size, device=values.device)[:, None]
    return (best + offsets).reshape(-1).sort().values


class RFT(Agent):
    """Rejection-sampling fine-tuning (best-of-K / RAFT / expert iteration); see the module docstring."""

    config_class = RFTConfig
    name = "rft"

    def setup(self) -> None:
        cfg = self.config
        if cfg.threshold is None and self.env.group_size <= cfg.keep_top:
            raise ValueError(f"keeping the best {cfg.keep_top} of each prompt's completions needs more than "
                             f"{cfg.keep_top} per prompt: make the environment with group_size > keep_top, e.g. "
                             "gym.make_vec(id, num_envs=64, group_size=8), or set a threshold")

    def update(self, rollout: Rollout) -> dict[str, float]:
        cfg = self.config

        # 1. Rank each prompt's completions and keep the best (or those above the threshold).
        values = rollout.returns if cfg.rank_by == "return" else rollout.scores
        self.check_finite(**{f"{cfg.rank_by}s": values})
        kept = select_best(values, rollout.group_size, cfg.keep_top, cfg.threshold)
        metrics = {"rft/kept_fraction": len(kept) / len(rollout)}
        if len(kept) == 0:
            return metrics
        metrics[f"rft/kept_{cfg.rank_by}"] = float(values[kept].mean())

        # 2. Supervised steps on the kept completions: mean token negative log-likelihood.
        stats = {"loss/policy": [], "objective/entropy": [], "loss/grad_norm": []}
        for _ in range(cfg.update_epochs):
            order = kept[torch.randperm(len(kept), generator=self.generator, device=self.device)]
            for idx in order.tensor_split(min(cfg.num_minibatches, len(kept))):
                tokens = rollout.mask[idx].sum()
                for micro in idx.tensor_split(min(cfg.gradient_accumulation_steps, len(idx))):
                    batch = rollout.select(micro)
                    with self.autocast():
                        logprobs, entropy, _ = policy_forward(self.policy, batch, sampling=self.sampling,
                                                              chunk_size=cfg.logprob_chunk_size)
                    loss = -masked_mean(logprobs, batch.mask)
                    self.check_finite(**{"loss/policy": loss})
                    share = batch.mask.sum() / tokens  # micro-batch token means, weighted into the minibatch's
                    (loss * share).backward()
                    stats["loss/policy"].append(loss.detach() * share)
                    stats["objective/entropy"].append(masked_mean(entropy, batch.mask).detach() * share)
                stats["loss/grad_norm"].append(torch.tensor(self.optimizer_step()))
        steps = len(stats["loss/grad_norm"])
        metrics["loss/policy"] = float(torch.stack(stats["loss/policy"]).sum()) / steps
        metrics["objective/entropy"] = float(torch.stack(stats["objective/entropy"]).sum()) / steps
        metrics["loss/grad_norm"] = float(torch.stack(stats["loss/grad_norm"]).mean())
        return metrics
