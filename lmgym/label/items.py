"""What a labeller ranks: a prompt and its K candidate completions, read from a JSONL or sampled from a model.

Each item has a stable id, the hash of its prompt and completions, so a restarted
server recognises the items already ranked in the output file even when the
candidates file was reordered, and never confuses two items that share a prompt
but offer different completions.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lmgym.utils.jsonl import read_lines, read_records

__all__ = ["LabelItem", "item_id", "read_candidates", "read_prompts", "sample_candidates"]

MAX_COMPLETIONS = 9
"""The page ranks at most this many candidates per prompt (keys 1-9 pick them)."""


@dataclass(frozen=True)
class LabelItem:
    """One prompt and the completions a labeller ranks."""

    id: str
    prompt: str
    completions: tuple[str, ...]


def item_id(prompt: str, completions) -> str:
    """A short stable id: the SHA-256 of the prompt and completions (JSON-encoded, so no separator is ambiguous)."""
    digest = hashlib.sha256(json.dumps([prompt, list(completions)], ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:16]


def _make_item(prompt, completions, where: str, given_id=None) -> LabelItem:
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        raise ValueError(f"{where}: 'completions' must be a list of strings")
    if not 2 <= len(completions) <= MAX_COMPLETIONS:
        raise ValueError(f"{where}: {len(completions)} completions; ranking needs between 2 and "
                         f"{MAX_COMPLETIONS} per prompt")
    for c in completions:
        if not c.strip():
            raise ValueError(f"{where}: an empty completion; the reward model needs text to score, so remove it")
    if given_id is not None and (not isinstance(given_id, str) or not given_id.strip() or len(given_id) > 200):
        raise ValueError(f"{where}: 'id' must be a non-empty string of at most 200 characters")
    return LabelItem(given_id if given_id is not None else item_id(prompt, completions), prompt, tuple(completions))


def read_candidates(path: str | os.PathLike) -> list[LabelItem]:
    """Items from a JSONL of ``{"prompt", "completions": [...], "id"?}`` lines; errors name the line."""
    items, seen = [], {}  # seen: id -> (item, where it was read)
    for record, where in read_records(path, "candidates file"):
        if not isinstance(record, dict) or "prompt" not in record or "completions" not in record:
            raise ValueError(f"{where}: expected an object with 'prompt' and 'completions'")
        item = _make_item(record["prompt"], record["completions"], where, record.get("id"))
        if item.id in seen:
            first, first_where = seen[item.id]
            if first == item:
                continue  # the same prompt and completions twice: rank them once
            raise ValueError(f"{where}: id {item.id!r} is already used on {first_where.rsplit(', ', 1)[1]}; ids "
                             "must be unique")
        seen[item.id] = (item, where)
        items.append(item)
    if not items:
        raise ValueError(f"{path} holds no candidates")
    return items


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per non-empty line) or a JSONL of ``{"prompt": ...}`` lines."""
    path = Path(path)
    if path.suffix != ".jsonl":
        lines = read_lines(path, "prompts file")
    else:
        lines = []
        for record, where in read_records(path, "prompts file"):
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{where}: expected an object with a string 'prompt'")
            lines.append(record["prompt"])
    if not lines:
        raise ValueError(f"{path} holds no prompts")
    return lines


def sample_candidates(model, tokenizer, prompts: list[str], k: int, *, max_new_tokens: int = 32, seed: int = 0,
                      temperature: float = 1.0, batch_size: int = 64) -> list[LabelItem]:
    """``k`` completions per prompt sampled with lmgym's seeded KV-cached sampler.

    The same model, prompts, seed and device give the same candidates, hence the same
    item ids, which is what lets a restarted ``lmgym label --model ...`` resume.
    Empty completions are dropped; a prompt left with fewer than two is dropped too.
    """
    import torch

    from lmgym.models import left_pad, sample_continuations

    if not isinstance(k, int) or not 2 <= k <= MAX_COMPLETIONS:
        raise ValueError(f"k={k!r}: ranking needs between 2 and {MAX_COMPLETIONS} completions per prompt")
    device = next(model.parameters()).device
    stop = [t for t in (tokenizer.eos_token_id,) if t is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    generator = torch.Generator(device=device).manual_seed(seed)
    expanded = [p for p in prompts for _ in range(k)]
    texts = []
    for i in range(0, len(expanded), batch_size):
        chunk = tokenizer(expanded[i:i + batch_size])["input_ids"]
        ids, mask = left_pad(chunk, pad, device)
        tokens, _ = sample_continuations(model, ids, mask, max_new_tokens, stop_token_ids=stop, pad_token_id=pad,
                                         temperature=temperature, generator=generator)
        texts += tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)
    items, seen = [], set()
    for j, prompt in enumerate(prompts):
        completions = [t for t in texts[j * k:(j + 1) * k] if t.strip()]
        if len(completions) < 2:
            continue
        item = LabelItem(item_id(prompt, completions), prompt, tuple(completions))
        if item.id not in seen:
            seen.add(item.id)
            items.append(item)
    if not items:
        raise ValueError("the model produced fewer than two non-empty completions for every prompt; "
                         "raise --max-new-tokens or check the model's stop token")
    return items
