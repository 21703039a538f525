"""Causal LMs: loading any Hugging Face model and tokenizer (``loading``), stepping a batch with a KV cache and
sampling continuations (``cached_lm``), editing the cache per row (``kv_cache``), padding (``padding``), the
sampling transforms (``sampling``), and what the installed transformers calls things (``hf_api``)."""

from lmgym.models.cached_lm import CachedLM, sample_continuations, token_logprobs
from lmgym.models.loading import (is_sharded, is_sharded_module, load_model, load_tokenizer, resolve_device,
                                  resolve_dtype, tiny_model, word_tokenizer)
from lmgym.models.padding import left_pad, right_pad, to_left_padded
from lmgym.models.sampling import Sampling

__all__ = ["load_model", "load_tokenizer", "tiny_model", "word_tokenizer", "resolve_device", "resolve_dtype",
           "is_sharded", "is_sharded_module", "CachedLM", "sample_continuations", "token_logprobs", "left_pad",
           "right_pad", "to_left_padded", "Sampling"]
