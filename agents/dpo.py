"""DPO: Direct Preference Optimization (Rafailov et al. 2023), offline from a preference file and online.

DPO optimises the KL-regularised objective of the environment, ``E[R(x, y)] - beta * KL(pi || pi_ref)``,
without a reward model or RL: under a Bradley-Terry preference model
``P(y_1 > y_2 | x) = sigmoid(R(x, y_1) - R(x, y_2))`` the objective's optimum
``pi*(y|x) = pi_ref(y|x) exp(R(x, y) / beta) / Z(x)`` is also the minimiser of a classification
loss on preference pairs. With the implicit reward of a completion
``h(y) = sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]`` (its sequence log-ratio),
a pair (chosen y_w, rejected y_l) that is right with probability ``q`` costs:

- ``"sigmoid"`` (DPO; with ``q = 1 - label_smoothing`` the conservative cDPO of Mitchell 2023)::

      -q * log sigmoid(beta * (h(y_w) - h(y_l))) - (1 - q) * log sigmoid(-beta * (h(y_w) - h(y_l)))

- ``"ipo"`` (IPO, Azar et al. 2024; ``q = 1`` is the paper's loss)::

      q * (h(y_w) - h(y_l) - 1 / (2 beta))^2 + (1 - q) * (h(y_w) - h(y_l) + 1 / (2 beta))^2

Both are the expected loss when the pair's label is drawn with probability ``q``.
``beta`` defaults to the environment's ``kl_coef``, so DPO targets the same optimum as the RL agents.

Two agents share this loss:

- :class:`DPO` (offline) reads the preference JSONL that ``lmgym reward-model train`` reads
  (``{"prompt", "chosen", "rejected"}`` pairs, or ``{"prompt", "completions", "ranking" | "scores"}``
  rankings, whose K-choose-2 pairs stay in one batch). Each iteration takes the next
  ``batch_pairs`` pairs (whole prompts) of a seeded shuffle of the data, computes pi_ref's
  log-probs with the environment's reference model, and takes a gradient step. The
  environment only supplies pi_ref, the tokenizer, stop tokens and evaluation. ``learn(total_steps)``
  counts the completion tokens trained on (chosen and rejected), as the RL agents count generated ones.
  A completion is the episode it would be in the environment: it ends at a stop token written
  in its text (``"<eos>"`` alone is the empty completion, which the file format otherwise
  refuses), or else with the first stop token appended, unless it has ``max_new_tokens`` tokens
  or more (then it was truncated, as the environment would have).
- :class:`OnlineDPO` (iterative / online DPO, Xu et al. 2023; Guo et al. 2024) samples
  ``group_size`` completions per prompt from the current policy, forms every pair of a
  prompt's completions and labels it from the task score: ``"bradley_terry"`` (default) gives
  the pair the target probability ``q = sigmoid(R(y_w) - R(y_l))``, the expectation of a label drawn
  from the task's own Bradley-Terry model, so the fixed point is exactly the environment's
  KL-regularised optimum; ``"ranking"`` makes the higher-scored completion win outright
  (``q = 1 - label_smoothing``, ties dropped), which keeps pushing towards the best-scored completion.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F

from lmgym.agents.common.base import Agent, AgentConfig, Rollout, policy_forward
from lmgym.agents.common.config import OneOf, Range
from lmgym.models import left_pad, right_pad

__all__ = ["DPOLossConfig", "DPOConfig", "OnlineDPOConfig", "DPO", "OnlineDPO", "PreferenceBatch", "dpo_loss",
           "sequence_logratios"]

LOSS_TYPES = ("sigmoid", "ipo")
ONLINE_LABELS = ("bradley_terry", "ranking")


@dataclass
class DPOLossConfig(AgentConfig):
    """Hyper-parameters of the DPO loss, shared by offline and online DPO."""

    learning_rate: float = 1e-4
    """AdamW learning rate"""
    beta: Annotated[float | None, Range(gt=0)] = None
    """the KL coefficient the loss assumes (None: the environment's kl_coef)"""
    loss_type: Annotated[str, OneOf(*LOSS_TYPES)] = "sigmoid"
    """sigmoid (DPO) or ipo (IPO)"""
    label_smoothing: Annotated[float, Range(ge=0, lt=0.5)] = 0.0
    """probability that a pair's label is flipped (conservative DPO), in [0, 0.5)"""


@dataclass
class DPOConfig(DPOLossConfig):
    """Offline DPO hyper-parameters."""

    preferences: str | None = None
    """the preference JSONL to train on (pairs or rankings, as `lmgym reward-model train` reads)"""
    batch_pairs: Annotated[int, Range(ge=1)] = 64
    """preference pairs per iteration (a prompt's pairs stay together)"""


@dataclass
class OnlineDPOConfig(DPOLossConfig):
    """Online DPO hyper-parameters (group_size completions per prompt come from the environment)."""

    labels: Annotated[str, OneOf(*ONLINE_LABELS)] = "bradley_terry"
    """pair labels from the task score: bradley_terry (soft, sigmoid(R_w - R_l)) or ranking (higher score wins)"""


def dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float,
             loss_type: str = "sigmoid", target: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The per-pair DPO / IPO loss of the module docstring; ``target`` is q, the probability that chosen wins."""
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return -(target * F.logsigmoid(beta * h) + (1 - target) * F.logsigmoid(-beta * h))
    if loss_type == "ipo":
        return target * (h - 1 / (2 * beta)) ** 2 + (1 - target) * (h + 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def sequence_logratios(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``h(y) = sum_t mask * (log pi - log pi_ref)`` per sequence ``(S,)``."""
    return ((logprobs - ref_logprobs) * mask).sum(1)


@dataclass
class PreferenceBatch:
    """Preference pairs over S distinct sequences (prompt + completion), grouped by prompt.

    Sequence tensors are ``(S, P)`` / ``(S, T)`` like a :class:`Rollout`'s, so
    :func:`policy_forward` reads them; pairs index into the sequences.
    """

    query_ids: torch.Tensor
    """left-padded prompts ``(S, P)``"""
    query_mask: torch.Tensor
    """1 for prompt tokens"""
    tokens: torch.Tensor
    """right-padded completions ``(S, T)``"""
    mask: torch.Tensor
    """1.0 for completion tokens (up to and including the stop token)"""
    ref_logprobs: torch.Tensor
    """log pi_ref of each completion token"""
    sequence_group: torch.Tensor
    """the prompt group of each sequence ``(S,)``"""
    chosen: torch.Tensor
    """index of each pair's chosen sequence ``(M,)``"""
    rejected: torch.Tensor
    """index of each pair's rejected sequence ``(M,)``"""
    target: torch.Tensor
    """probability that the chosen sequence is the better one ``(M,)``"""
    pair_group: torch.Tensor
    """the prompt group of each pair ``(M,)``"""

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens per sequence (what :meth:`Agent.learn` counts as steps)."""
        return self.mask.sum(1).long()

    @property
    def num_groups(self) -> int:
        return int(self.sequence_group.max()) + 1

    def __len__(self) -> int:
        return len(self.chosen)

    def sequences(self, rows: torch.Tensor) -> "_SequenceView":
        """The sequence tensors of ``rows``, in the shape :func:`policy_forward` reads."""
        return _SequenceView(self.query_ids[rows], self.query_mask[rows], self.tokens[rows], self.mask[rows])


@dataclass
class _SequenceView:
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    group_size: int = 2
    """a pair's two sequences share their prompt, so policy_forward encodes each distinct prompt once"""


class _DPOBase(Agent):
    """What offline and online DPO share: beta, and the gradient steps on a :class:`PreferenceBatch`."""

    def setup(self) -> None:
        cfg = self.config
        self.beta = self.env.kl_coef if cfg.beta is None else float(cfg.beta)
        if not self.beta > 0:
            raise ValueError(f"DPO needs beta > 0 (the KL coefficient its loss assumes), got {self.beta!r}; set "
                             "beta, or make the environment with kl_coef > 0")

    def preference_update(self, batch: PreferenceBatch) -> dict[str, float]:
        """``update_epochs`` passes of ``num_minibatches`` gradient steps over the batch's prompt groups."""
        cfg = self.config
        stats = {key: [] for key in ("loss/policy", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                     "rewards/accuracies", "logps/chosen", "logps/rejected")}
        grad_norms = []
        groups = batch.num_groups
        for _ in range(cfg.update_epochs):
            order = torch.randperm(groups, generator=self.generator, device=self.device)
            for minibatch in order.tensor_split(min(cfg.num_minibatches, groups)):
                pairs_in_minibatch = int(torch.isin(batch.pair_group, minibatch).sum())
                for micro in minibatch.tensor_split(min(cfg.gradient_accumulation_steps, len(minibatch))):
                    pairs = torch.nonzero(torch.isin(batch.pair_group, micro)).squeeze(1)
                    if len(pairs) == 0:
                        continue
                    rows = torch.nonzero(torch.isin(batch.sequence_group, micro)).squeeze(1)
                    # where each sequence of the micro-batch sits in it, to look pairs up
                    local = torch.full((len(batch.sequence_group),), -1, dtype=torch.long, device=self.device)
                    local[rows] = torch.arange(len(rows), device=self.device)
                    with self.autocast():
                        logprobs, _, _ = policy_forward(self.policy, batch.sequences(rows), sampling=self.sampling,
                                                        chunk_size=cfg.logprob_chunk_size)
                    mask = batch.mask[rows]
                    h = sequence_logratios(logprobs, batch.ref_logprobs[rows], mask)
                    chosen, rejected = local[batch.chosen[pairs]], local[batch.rejected[pairs]]
                    losses = dpo_loss(h[chosen], h[rejected], beta=self.beta, loss_type=cfg.loss_type,
                                      target=batch.target[pairs])
                    self.check_finite(**{"loss/policy": losses})
                    (losses.sum() / pairs_in_minibatch).backward()
                    with torch.no_grad():
                        logps = (logprobs * mask).sum(1)
                        for key, value in (("loss/policy", losses), ("rewards/chosen", self.beta * h[chosen]),
                                           ("rewards/rejected", self.beta * h[rejected]),
                                           ("rewards/margins", self.beta * (h[chosen] - h[rejected])),
                                           ("rewards/accuracies", (h[chosen] > h[rejected]).float()),
                                           ("logps/chosen", logps[chosen]), ("logps/rejected", logps[rejected])):
                            stats[key].append(value.detach())
                grad_norms.append(self.optimizer_step())
        metrics = {key: float(torch.cat(values).mean()) for key, values in stats.items()}
        metrics["loss/grad_norm"] = float(np.mean(grad_norms))
        return metrics


class DPO(_DPOBase):
    """Offline DPO from a preference JSONL (``preferences=PATH``); see the module docstring."""

    config_class = DPOConfig
    name = "dpo"

    def setup(self) -> None:
        super().setup()
        cfg = self.config
        self.data_epoch, self.data_cursor = 0, 0  # position in the seeded shuffle of the data
        if self.weights_only:  # an export: the run's preference file is not needed (it may have moved)
            self.groups = None
            return
        if cfg.preferences is None:
            raise ValueError("DPO trains on preference pairs: pass preferences=PATH of a JSONL file (lmgym train "
                             "--agent dpo --agent.preferences FILE.jsonl), or use online DPO (online-dpo), which "
                             "ranks the environment's own samples")
        if self.sampling.truncates:
            raise ValueError("offline DPO scores fixed completions, which top_k / top_p truncation could give zero "
                             "probability: leave top_k=0 and top_p=1")
        self.groups = self.encode_preferences(cfg.preferences)

    # ------------------------------------------------------------------ data
    def encode_preferences(self, path: str | os.PathLike) -> list[dict]:
        """Read the preference file and tokenize it once: per prompt, its ids, its distinct completions' ids
        and its pairs as indices into them."""
        from lmgym.rewards.reward_model import read_preferences

        path = Path(path)
        if path.is_file() and not path.read_text(encoding="utf-8").strip():
            raise ValueError(f"the preference file {path} is empty; DPO needs at least one pair "
                             '({"prompt", "chosen", "rejected"} or {"prompt", "completions", "ranking"} per line)')
        context = getattr(self.policy.config, "max_position_embeddings", None)
        tokenizer = self.env.tokenizer
        encoded = []
        for number, group in enumerate(read_preferences(path)):
            where = f"{path}: prompt #{number} ({group.prompt[:40]!r})"
            prompt_ids = list(self.env.core.prompts.encode(group.prompt, where=where).ids)
            episode = {text: tuple(self.episode_tokens(list(tokenizer(text, add_special_tokens=False)["input_ids"])))
                       for text in dict.fromkeys(text for pair in group.pairs for text in pair)}
            # A ranking that holds one completion twice (samples of a policy repeat) pairs it with itself (and two
            # texts can tokenize to one episode): such a pair states no preference, and its loss, log 2,
            # has no gradient, so it would only shrink the mean over pairs and count as a wrong answer in
            # rewards/accuracies. Only pairs of two different episodes are kept.
            pairs = [(episode[c], episode[r]) for c, r in group.pairs if episode[c] != episode[r]]
            if not pairs:
                continue
            completions = list(dict.fromkeys(sequence for pair in pairs for sequence in pair))
            needed = len(prompt_ids) + max(len(c) for c in completions)
            if context is not None and needed > context:
                raise ValueError(f"{where}: its {len(prompt_ids)} prompt tokens and its longest completion need "
                                 f"{needed} positions, more than the policy's context of {context}; shorten the "
                                 "prompt or the completions in the preference file")
            index = {sequence: i for i, sequence in enumerate(completions)}
            encoded.append({"prompt": prompt_ids, "completions": [list(c) for c in completions],
                            "pairs": [(index[c], index[r]) for c, r in pairs]})
        if not encoded:
            raise ValueError(f"every pair in {path} compares a completion with itself; DPO needs pairs of two "
                             "different completions")
        return encoded

    def episode_tokens(self, ids: list[int]) -> list[int]:
        """A completion's tokens as the environment's episode: up to its first stop token if it has one, else with
        the first stop token appended, unless it has ``max_new_tokens`` tokens or more (a truncated episode)."""
        stops = self.env.stop_token_ids
        for position, token in enumerate(ids):
            if token in stops:
                return ids[:position + 1]
        return ids + [stops[0]] if len(ids) < self.env.max_new_tokens else ids

    def _shuffled(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.config.seed, epoch]).permutation(len(self.groups))

    def training_batch(self) -> PreferenceBatch:
        """The next ``batch_pairs`` pairs (whole prompts) of the shuffled data, with pi_ref's log-probs."""
        chosen_groups, pairs = [], 0
        while pairs < self.config.batch_pairs:
            if self.data_cursor == len(self.groups):
                self.data_epoch, self.data_cursor = self.data_epoch + 1, 0
                if chosen_groups:  # a batch never mixes two passes over the data
                    break
            group = self.groups[self._shuffled(self.data_epoch)[self.data_cursor]]
            self.data_cursor += 1
            chosen_groups.append(group)
            pairs += len(group["pairs"])
        return self.to_batch(chosen_groups)

    @torch.no_grad()
    def to_batch(self, groups: list[dict]) -> PreferenceBatch:
        prompts, completions, sequence_group, chosen, rejected, pair_group = [], [], [], [], [], []
        for g, group in enumerate(groups):
            offset = len(completions)
            for ids in group["completions"]:
                prompts.append(group["prompt"])
                completions.append(ids)
                sequence_group.append(g)
            for c, r in group["pairs"]:
                chosen.append(offset + c)
                rejected.append(offset + r)
                pair_group.append(g)
        device, pad = self.device, self.env.tokenizer.pad_token_id
        query_ids, query_mask = left_pad(prompts, pad, device)
        tokens, mask = right_pad(completions, pad, device)
        mask = mask.float()
        as_long = lambda values: torch.as_tensor(values, dtype=torch.long, device=device)  # noqa: E731
        with self.autocast():
            # pi_ref under the same sampling transformation (temperature) as the policy, as the environment scores it
            ref_logprobs, _, _ = policy_forward(self.env.reference_model,
                                                _SequenceView(query_ids, query_mask, tokens, mask),
                                                sampling=self.sampling)
        target = torch.full((len(chosen),), 1.0 - self.config.label_smoothing, device=device)
        return PreferenceBatch(query_ids=query_ids, query_mask=query_mask, tokens=tokens, mask=mask,
                               ref_logprobs=ref_logprobs * mask, sequence_group=as_long(sequence_group),
                               chosen=as_long(chosen), rejected=as_long(rejected), target=target,
                               pair_group=as_long(pair_group))

    # ------------------------------------------------------------------ training
    def update(self, batch: PreferenceBatch) -> dict[str, float]:
        return self.preference_update(batch)

    def rollout_metrics(self, batch: PreferenceBatch) -> dict:
        return {"charts/pairs": float(len(batch)), "charts/data_epoch": float(self.data_epoch)}

    def extra_state(self) -> dict:
        return {"data_epoch": self.data_epoch, "data_cursor": self.data_cursor}

    def check_extra_state(self, state: dict) -> None:
        if set(state) != {"data_epoch", "data_cursor"}:
            raise ValueError(f"expected the keys data_cursor and data_epoch, found {sorted(state)}")
        for key, value in state.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be an int >= 0, got {value!r}")
        if self.groups is not None and state["data_cursor"] > len(self.groups):
            raise ValueError(f"data_cursor {state['data_cursor']} lies beyond the {len(self.groups)} prompts of "
                             f"{self.config.preferences}: the checkpoint was trained on other preference data")

    def load_extra_state(self, state: dict) -> None:
        self.data_epoch, self.data_cursor = state["data_epoch"], state["data_cursor"]


class OnlineDPO(_DPOBase):
    """Online DPO: pairs of the policy's own samples, labelled by the task score; see the module docstring."""

    config_class = OnlineDPOConfig
    name = "online-dpo"

    def setup(self) -> None:
        super().setup()
        cfg = self.config
        if self.env.group_size < 2:
            raise ValueError("online DPO compares completions of one prompt: make the environment with "
                             "group_size >= 2, e.g. gym.make_vec(id, num_envs=64, group_size=4)")
        if cfg.labels == "bradley_terry" and cfg.label_smoothing:
            raise ValueError("label_smoothing applies to hard labels (labels='ranking'); Bradley-Terry labels "
                             "already carry the probability that each pair is ordered right")

    def pairs(self, rollout: Rollout) -> PreferenceBatch:
        """Every pair of each prompt's completions, the higher-scored one as chosen, with its target probability."""
        k = rollout.group_size
        first, second = torch.triu_indices(k, k, offset=1, device=self.device)
        offsets = torch.arange(0, len(rollout), k, device=self.device)[:, None]
        a, b = (first + offsets).reshape(-1), (second + offsets).reshape(-1)
        score_a, score_b = rollout.scores[a], rollout.scores[b]
        chosen, rejected = torch.where(score_a >= score_b, a, b), torch.where(score_a >= score_b, b, a)
        margin = rollout.scores[chosen] - rollout.scores[rejected]
        if self.config.labels == "bradley_terry":
            target = torch.sigmoid(margin)
        else:
            keep = margin > 0
            chosen, rejected = chosen[keep], rejected[keep]
            target = torch.full((len(chosen),), 1.0 - self.config.label_smoothing, device=self.device)
        groups = torch.arange(len(rollout), device=self.device) // k
        return PreferenceBatch(query_ids=rollout.query_ids, query_mask=rollout.query_mask, tokens=rollout.tokens,
                               mask=rollout.mask, ref_logprobs=rollout.ref_logprobs, sequence_group=groups,
                               chosen=chosen, rejected=rejected, target=target, pair_group=groups[chosen])

    def update(self, rollout: Rollout) -> dict[str, float]:
        # 1. Pairs of each prompt's completions, labelled from the task scores.
        self.check_finite(scores=rollout.scores)
        batch = self.pairs(rollout)
        if len(batch) == 0:  # every group tied (ranking labels): nothing to learn from
            return {"charts/pairs": 0.0}
        # 2. DPO steps on them; pi_ref's log-probs are the environment's.
        metrics = self.preference_update(batch)
        metrics["charts/pairs"] = float(len(batch))
        return metrics
