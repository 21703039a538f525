"""The default models of the built-in tasks: trained offline on text lmgym generates (``corpora``), or
dequantised from SmolLM2's GGUF file (``smollm``); cached, verified, and shipped built (``shipped/``).

    model, tokenizer = lmgym.zoo.load("reviews")      # the shipped entry, or built on first use
"""

from lmgym.zoo.entries import (SHIPPED, SHIPPED_ENTRIES, ZOO, ZooSpec, build, card, clean, entry_path, home,
                               is_built, load, load_path, perplexity, problem, recipe, ship, shipped_path,
                               train_lm, train_tokenizer, verify)

__all__ = ["ZooSpec", "ZOO", "SHIPPED", "SHIPPED_ENTRIES", "home", "entry_path", "recipe", "build", "load",
           "load_path", "shipped_path", "is_built", "verify", "problem", "clean", "card", "ship", "train_tokenizer",
           "train_lm", "perplexity"]
