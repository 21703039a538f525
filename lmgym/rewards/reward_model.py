"""Learned reward models: a language-model backbone with a scalar head, trained on preferences (Bradley-Terry).

``r(x, y)`` is a linear head on the backbone's last hidden state at the last real
token of prompt + completion. Training minimises the Bradley-Terry loss over
preference pairs, ``-log sigmoid(r(x, y_w) - r(x, y_l) - margin)``; pairs come from a
JSONL file (``{"prompt", "chosen", "rejected"}`` per line, the common convention) or
from rankings of K completions (``{"prompt", "completions", "ranking"}`` best first, or
``"scores"``), which expand into all K-choose-2 pairs kept in one batch, as
InstructGPT does. After training, a bias makes the mean reward over the distinct
training (prompt, completion) pairs zero (each counted once, however many pairs it is in).
A trained model saves as safetensors + config and is itself a reward source:
``LearnedReward(model)(prompts, completions) -> scores``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lmgym.utils import checks
from lmgym.utils.folders import written_atomically
from lmgym.utils.jsonl import read_records
from lmgym.models import right_pad

__all__ = ["PreferenceGroup", "RewardModel", "LearnedReward", "bradley_terry_loss", "read_preferences",
           "groups_from_rankings", "train_reward_model", "pairwise_accuracy", "sample_preferences"]


@dataclass
class PreferenceGroup:
    """The preference pairs of one prompt: each pair is ``(chosen, rejected)``."""

    prompt: str
    pairs: list[tuple[str, str]]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float | torch.Tensor = 0.0):
    """Mean of ``-log sigmoid(r_chosen - r_rejected - margin)``."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


# ----------------------------------------------------------------------------- data
def groups_from_rankings(prompt: str, ranked: list[str]) -> PreferenceGroup:
    """All K-choose-2 pairs of completions ranked best first, except a completion paired with itself (a ranking of
    sampled completions can hold one twice: such a pair states no preference, yet would count in the mean loss
    and as a wrong prediction in the accuracy)."""
    return PreferenceGroup(prompt, [(ranked[i], ranked[j]) for i, j in itertools.combinations(range(len(ranked)), 2)
                                    if ranked[i] != ranked[j]])


def _check_text(value, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if field != "prompt" and not value.strip():
        raise ValueError(f"{where}: {field!r} is an empty completion; every completion needs text to score")
    return value


def _record_to_group(record: dict, where: str) -> PreferenceGroup:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "prompt" not in record:
        raise ValueError(f"{where}: missing field 'prompt'")
    prompt = _check_text(record["prompt"], "prompt", where)
    if "chosen" in record or "rejected" in record:
        for name in ("chosen", "rejected"):
            if name not in record:
                raise ValueError(f"{where}: missing field {name!r} (a pair needs 'prompt', 'chosen' and 'rejected')")
        chosen, rejected = (_check_text(record["chosen"], "chosen", where),
                            _check_text(record["rejected"], "rejected", where))
        return PreferenceGroup(prompt, [(chosen, rejected)] if chosen != rejected else [])
    if "completions" not in record:
        raise ValueError(f"{where}: missing field 'chosen'/'rejected' or 'completions'")
    raw = record["completions"]
    if not isinstance(raw, list) or len(raw) < 2:
        raise ValueError(f"{where}: 'completions' must be a list of at least two strings, got "
                         f"{type(raw).__name__ if not isinstance(raw, list) else f'{len(raw)} entries'}")
    completions = [_check_text(c, "completions", where) for c in raw]
    if "ranking" in record:
        order = record["ranking"]
        # type(i) is int: a bool is an int subclass (true is not an index) and 0.0 is not one either
        if not isinstance(order, list) or any(type(i) is not int for i in order):
            raise ValueError(f"{where}: 'ranking' must be a list of completion indices (integers), best first; "
                             f"got {order!r}")
        if sorted(order) != list(range(len(completions))):
            raise ValueError(f"{where}: 'ranking' must be a permutation of 0..{len(completions) - 1}")
        return groups_from_rankings(prompt, [completions[i] for i in order])
    if "scores" in record:
        scores = record["scores"]
        if not isinstance(scores, list) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                or not math.isfinite(v) for v in scores):
            raise ValueError(f"{where}: 'scores' must be a list of finite numbers (higher is better), got {scores!r}")
        if len(scores) != len(completions):
            raise ValueError(f"{where}: 'scores' has {len(scores)} entries for {len(completions)} completions")
        pairs = [(completions[i], completions[j]) if scores[i] > scores[j] else (completions[j], completions[i])
                 for i, j in itertools.combinations(range(len(completions)), 2)
                 if scores[i] != scores[j] and completions[i] != completions[j]]
        return PreferenceGroup(prompt, pairs)
    raise ValueError(f"{where}: 'completions' needs a 'ranking' (best first) or 'scores'")


def read_preferences(source) -> list[PreferenceGroup]:
    """Read preference groups from a JSONL path or a list of records; errors name the line."""
    if isinstance(source, (str, os.PathLike)):
        records = read_records(source, "preference data")
    else:
        records = [(r, f"record {i}") for i, r in enumerate(source)]
    groups = [_record_to_group(r, where) for r, where in records]
    groups = [g for g in groups if g.pairs]
    if not groups:
        where = f"{source}" if isinstance(source, (str, os.PathLike)) else "the preference data"
        raise ValueError(f"{where} holds no pairs of two different completions (a completion paired with itself, "
                         "or a tie, states no preference)")
    return groups


# ----------------------------------------------------------------------------- the model
class RewardModel(nn.Module):
    """A transformer backbone with a linear scalar head read at the last real token.

    Args:
        backbone: a Hugging Face base model (``AutoModel``; e.g. ``causal_lm.base_model``).
        tokenizer: its tokenizer.
    """

    def __init__(self, backbone, tokenizer):
        super().__init__()
        self.backbone, self.tokenizer = backbone, tokenizer
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (backbone.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_pretrained_lm(cls, model, tokenizer=None, *, trust_remote_code: bool = False):
        """A reward model whose backbone is a causal LM's trunk (a path, a hub name or a model object)."""
        from lmgym.models import load_model

        lm, tok = load_model(model, device="cpu", dtype="float32", tokenizer=tokenizer,
                             trust_remote_code=trust_remote_code)
        return cls(lm.base_model, tok)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def encode(self, prompts: list[str], completions: list[str]):
        """Right-padded ids and mask of prompt + completion (tokenized apart, as the environment sees them)."""
        p_ids = self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        c_ids = self.tokenizer(list(completions), add_special_tokens=False)["input_ids"]
        rows = [p + c for p, c in zip(p_ids, c_ids)]
        limit = getattr(self.backbone.config, "max_position_embeddings", None)
        longest = max(range(len(rows)), key=lambda i: len(rows[i]), default=None)
        if limit and longest is not None and len(rows[longest]) > limit:
            raise ValueError(f"prompt + completion {longest} of this batch is {len(rows[longest])} tokens, beyond the "
                             f"reward model's context of {limit} positions ({prompts[longest][:40]!r}...); shorten "
                             "the prompts or completions, or use a backbone with a longer context")
        return right_pad(rows, self.tokenizer.pad_token_id, self.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """r(x, y) of each row, read at its last real token; rows may be padded on either side."""
        mask = attention_mask.long()
        # Positions count real tokens only, so a left-padded row sees the positions it would see alone
        # (models with learned absolute positions depend on it; rotary ones do not).
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
        # The last real token is the last column where the mask is 1, wherever the padding is.
        columns = torch.arange(mask.shape[1], device=mask.device)
        last = torch.where(mask.bool(), columns, -1).max(1).values
        if bool((last < 0).any()):
            raise ValueError("a row of attention_mask has no real token; every row needs prompt + completion tokens")
        return self.head(hidden[torch.arange(len(last), device=hidden.device), last].float()).squeeze(-1)

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str], batch_size: int = 64) -> np.ndarray:
        """r(x, y) for each pair, in eval mode."""
        was_training = self.training
        self.eval()
        out = [self(*self.encode(prompts[i:i + batch_size], completions[i:i + batch_size])).cpu()
               for i in range(0, len(prompts), batch_size)]
        self.train(was_training)
        return torch.cat(out).double().numpy()

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write backbone (save_pretrained), head (safetensors), tokenizer and ``reward_model.json``."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
            raise FileExistsError(f"{path} already exists and is not an empty folder; pass overwrite=True or "
                                  "another path")
        with written_atomically(path, overwrite=overwrite) as tmp:  # overwrite replaces the folder whole
            self.backbone.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                      tmp / "reward_head.safetensors")
            (tmp / "reward_model.json").write_text(json.dumps({"format": 1, "hidden_size": self.head.in_features}))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device="cpu", trust_remote_code: bool = False) -> "RewardModel":
        """Load a reward model written by :meth:`save`; a missing or mismatched file is a clear error."""
        from transformers import AutoModel

        from lmgym.models import load_tokenizer

        path = Path(path)
        meta_file, head_file = path / "reward_model.json", path / "reward_head.safetensors"
        if not meta_file.is_file() or not head_file.is_file():
            raise FileNotFoundError(f"{path} is not a saved reward model (reward_model.json and "
                                    "reward_head.safetensors are expected; save one with RewardModel.save)")
        try:
            meta = json.loads(meta_file.read_text())
        except ValueError as err:
            raise ValueError(f"{meta_file} is not valid JSON ({err}); save the reward model again") from err
        hidden = meta.get("hidden_size") if isinstance(meta, dict) else None
        if isinstance(hidden, bool) or not isinstance(hidden, int):
            raise ValueError(f"{meta_file} must be a JSON object with an integer hidden_size (as RewardModel.save "
                             f"writes), got {meta!r:.80}; save the reward model again")
        try:
            backbone = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise OSError(f"could not load the reward model's backbone from {path}: {err}") from err
        if backbone.config.hidden_size != meta["hidden_size"]:
            raise ValueError(f"{path}: reward_model.json says hidden size {meta['hidden_size']} but the backbone's "
                             f"config has {backbone.config.hidden_size}; the files do not belong together")
        model = cls(backbone, load_tokenizer(path, trust_remote_code=trust_remote_code))
        try:
            head = load_file(head_file)
            model.head.load_state_dict(head)
        except Exception as err:
            raise ValueError(f"{head_file} does not match the backbone's config ({err})") from err
        return model.to(device).eval()


class LearnedReward:
    """A reward model used as a reward source: ``LearnedReward(rm)(prompts, completions) -> scores``."""

    def __init__(self, model: RewardModel, batch_size: int = 64):
        self.model, self.batch_size = model, batch_size

    def __call__(self, prompts, completions):
        return self.model.score(list(prompts), list(completions), self.batch_size)


# ----------------------------------------------------------------------------- training
def _pair_batches(groups: list[PreferenceGroup], batch_pairs: int, rng: np.random.Generator):
    """Batches of about ``batch_pairs`` pairs; all pairs of a prompt stay in one batch."""
    batch, size = [], 0
    for i in rng.permutation(len(groups)):
        batch.append(groups[i])
        size += len(groups[i].pairs)
        if size >= batch_pairs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _flatten(groups: list[PreferenceGroup]):
    prompts, chosen, rejected = [], [], []
    for g in groups:
        for c, r in g.pairs:
            prompts.append(g.prompt)
            chosen.append(c)
            rejected.append(r)
    return prompts, chosen, rejected


def _distinct_completions(groups: list[PreferenceGroup]) -> tuple[list[str], list[str]]:
    """Every distinct (prompt, completion) of the preference data, once each, in first-seen order."""
    seen = dict.fromkeys((g.prompt, c) for g in groups for pair in g.pairs for c in pair)
    return [p for p, _ in seen], [c for _, c in seen]


def pairwise_accuracy(model: RewardModel, groups: list[PreferenceGroup]) -> float:
    """Fraction of pairs where r(chosen) > r(rejected)."""
    prompts, chosen, rejected = _flatten(groups)
    return float(np.mean(model.score(prompts, chosen) > model.score(prompts, rejected)))


def _check_training(*, epochs, learning_rate, batch_pairs, margin, max_steps) -> None:
    """The settings of :func:`train_reward_model`, checked before a step is taken (each error names its option)."""
    checks.integer(epochs, "epochs (--epochs)", low=1)
    checks.integer(batch_pairs, "batch_pairs (--batch-pairs)", low=1)
    checks.real(learning_rate, "learning_rate (--learning-rate)", low=0.0, high=1.0)
    if learning_rate == 0:
        raise ValueError("learning_rate (--learning-rate) must be > 0, got 0")
    checks.real(margin, "margin (--margin)")
    if max_steps is not None:
        checks.integer(max_steps, "max_steps", low=1)


def train_reward_model(model: RewardModel, train: list[PreferenceGroup], *, eval_groups=None, epochs: int = 1,
                       learning_rate: float = 1e-3, batch_pairs: int = 64, margin: float = 0.0, seed: int = 0,
                       progress: bool = True, max_steps: int | None = None) -> dict:
    """Train with the Bradley-Terry loss, then centre the rewards (mean 0 over distinct training completions).

    Args:
        model: the reward model (trained in place).
        train: preference groups; each batch holds whole groups of about ``batch_pairs`` pairs.
        eval_groups: held-out groups for pairwise accuracy.
        epochs: passes over the training pairs (``max_steps`` stops earlier).
        learning_rate: AdamW learning rate.
        margin: subtracted from r_chosen - r_rejected in the loss.
        seed: batch order.

    Returns:
        ``{"train_loss", "train_accuracy", "eval_accuracy", "mean_offset", "steps"}``.
    """
    from tqdm.auto import tqdm

    _check_training(epochs=epochs, learning_rate=learning_rate, batch_pairs=batch_pairs, margin=margin,
                    max_steps=max_steps)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    steps, losses = 0, []
    total = sum(1 for _ in _pair_batches(train, batch_pairs, np.random.default_rng(0))) * epochs
    bar = tqdm(total=min(total, max_steps or total), desc="reward model", disable=not progress,
               dynamic_ncols=True)
    for _ in range(epochs):
        for batch in _pair_batches(train, batch_pairs, rng):
            prompts, chosen, rejected = _flatten(batch)
            rewards = model(*model.encode(prompts + prompts, chosen + rejected))
            loss = bradley_terry_loss(rewards[:len(chosen)], rewards[len(chosen):], margin)
            if not torch.isfinite(loss):
                raise RuntimeError(f"the Bradley-Terry loss is not finite at step {steps}; lower the learning rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
            if max_steps is not None and steps >= max_steps:
                break
        if max_steps is not None and steps >= max_steps:
            break
    bar.close()
    model.eval()
    # Centre: the mean reward over the distinct training (prompt, completion) pairs becomes 0. Each
    # completion counts once, however many preference pairs it appears in (a completion ranked among K
    # appears in K - 1 pairs, so a mean over pairs would weigh long rankings more).
    prompts, completions = _distinct_completions(train)
    scores = np.asarray(model.score(prompts, completions), dtype=np.float64)
    if not np.isfinite(scores).all() or np.ptp(scores) == 0:
        raise ValueError(f"the trained reward model gives every training completion the same reward "
                         f"({scores[0]:g}): it learned nothing (a learning rate of {learning_rate:g} is likely too "
                         "high); nothing was saved")
    offset = float(np.mean(scores))
    with torch.no_grad():
        model.head.bias -= offset
    metrics = {"train_loss": float(np.mean(losses[-20:])), "train_accuracy": pairwise_accuracy(model, train),
               "mean_offset": offset, "steps": steps}
    if eval_groups:
        metrics["eval_accuracy"] = pairwise_accuracy(model, eval_groups)
    return metrics


@torch.no_grad()
def sample_preferences(policy, tokenizer, prompts: list[str], k: int, labeller, *, max_new_tokens: int = 24,
                       seed: int = 0, batch_size: int = 256) -> list[dict]:
    """Sample ``k`` completions per prompt from ``policy`` and label them with ``labeller(prompts, completions)``.

    Returns one record per prompt, ``{"prompt", "completions", "scores"}``, ready for
    :func:`read_preferences` (ties produce no pair). Empty completions are dropped.
    """
    from lmgym.models import left_pad, sample_continuations

    device = next(policy.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    expanded = [p for p in prompts for _ in range(k)]
    texts = []
    for i in range(0, len(expanded), batch_size):
        chunk = expanded[i:i + batch_size]
        ids, mask = left_pad(tokenizer(chunk)["input_ids"], tokenizer.pad_token_id, device)
        tokens, _ = sample_continuations(policy, ids, mask, max_new_tokens, stop_token_ids=[tokenizer.eos_token_id],
                                         pad_token_id=tokenizer.pad_token_id, generator=gen)
        texts += tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)
    scores = [float(s) for s in labeller(expanded, texts)]
    records = []
    for j, prompt in enumerate(prompts):
        keep = [(t, s) for t, s in zip(texts[j * k:(j + 1) * k], scores[j * k:(j + 1) * k]) if t.strip()]
        if len(keep) >= 2:
            records.append({"prompt": prompt, "completions": [t for t, _ in keep], "scores": [s for _, s in keep]})
    return records
