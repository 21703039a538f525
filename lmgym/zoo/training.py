"""Training the zoo's language models offline: a word- or character-level tokenizer, next-token training of a
small Llama-style LM (AdamW, cosine schedule) and its held-out perplexity. The source of these functions is part
of each entry's recipe (:func:`lmgym.zoo.recipe`): editing one rebuilds the entries it trains."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["EOS", "UNK", "train_tokenizer", "train_lm", "perplexity"]

EOS, UNK = "<eos>", "<unk>"


def train_tokenizer(lines: list[str], kind: str = "words"):
    """Train a word- or character-level tokenizer on ``lines``; returns a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token=UNK))
    if kind == "words":
        core.pre_tokenizer = pre_tokenizers.Whitespace()
    elif kind == "chars":
        core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        core.decoder = decoders.Fuse()
    else:
        raise ValueError(f"tokenizer kind must be 'words' or 'chars', got {kind!r}")
    core.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=[EOS, UNK]))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS, unk_token=UNK)


def _batches(ids: list[list[int]], batch_size: int, steps: int, rng: np.random.Generator, pad: int):
    for _ in range(steps):
        rows = [ids[i] for i in rng.integers(len(ids), size=batch_size)]
        width = max(len(r) for r in rows)
        x = torch.full((batch_size, width), pad, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, :len(r)] = torch.as_tensor(r)
            labels[i, :len(r)] = torch.as_tensor(r)
        yield x, (labels != -100).long(), labels


def _encode(tokenizer, lines: list[str]) -> list[list[int]]:
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(lines)["input_ids"]]


def train_lm(model, tokenizer, lines: list[str], *, steps: int, batch_size: int, learning_rate: float, seed: int,
             desc: str = "training", progress: bool = True):
    """Next-token training of ``model`` on ``lines`` (each ending in EOS), AdamW with a cosine schedule."""
    from tqdm.auto import tqdm

    ids = _encode(tokenizer, lines)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    bar = tqdm(_batches(ids, batch_size, steps, rng, tokenizer.pad_token_id), total=steps, desc=desc,
               disable=not progress, dynamic_ncols=True)
    for x, mask, labels in bar:
        loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


@torch.no_grad()
def perplexity(model, tokenizer, lines: list[str], batch_size: int = 64) -> float:
    """exp(mean next-token loss) over ``lines`` (each ending in EOS)."""
    ids = _encode(tokenizer, lines)
    total, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        rows = ids[i:i + batch_size]
        width = max(len(r) for r in rows)
        x = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(x)
        for j, r in enumerate(rows):
            x[j, :len(r)] = torch.as_tensor(r)
            mask[j, :len(r)] = 1
        logits = model(input_ids=x, attention_mask=mask).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).squeeze(-1)
        total -= float((lp * mask[:, 1:]).sum())
        count += int(mask[:, 1:].sum())
    return math.exp(total / count)

