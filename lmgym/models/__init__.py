"""Causal LMs: loading any Hugging Face model and tokenizer, stepping a batch with a KV cache (and editing the
cache per row), the sampling transforms, and what the installed transformers calls things (``hf_api``)."""

from lmgym.models.loading import (CachedLM, is_sharded, is_sharded_module, left_pad, load_model, load_tokenizer,
                                  resolve_device, resolve_dtype, right_pad, sample_continuations, tiny_model,
                                  to_left_padded, token_logprobs, word_tokenizer)
from lmgym.models.sampling import Sampling

__all__ = ["load_model", "load_tokenizer", "tiny_model", "word_tokenizer", "resolve_device", "resolve_dtype",
           "is_sharded", "is_sharded_module", "CachedLM", "sample_continuations", "token_logprobs", "left_pad",
           "right_pad", "to_left_padded", "Sampling"]
