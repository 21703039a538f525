"""A memory-saving way to get token log-probs: chunks of positions through the output layer, recomputed in backward.

The plain update forward materialises float32 logits over the whole vocabulary for every
position, ``N x T x V`` floats, and autograd keeps them (and the softmax) for the backward
pass: at a 50k vocabulary, 32 completions of 256 tokens that is 1.6 GB per copy. Here the
model returns only its last hidden states; the output layer, the (transformed) log-softmax
and the gather of the chosen token run ``chunk_size`` positions at a time under activation
checkpointing, so only the hidden states and one ``(chunk, V)`` block are alive at once and
the blocks are recomputed during backward. Results equal the plain path up to float rounding.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from lmgym.sampling import Sampling

__all__ = ["chunked_token_logprobs", "check_plain_output_head", "accepts_logits_to_keep"]


def accepts_logits_to_keep(model) -> bool:
    """Whether the (underlying, for a LoRA policy) model's forward takes ``logits_to_keep``."""
    import inspect

    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "get_base_model"):
        model = inner.get_base_model()
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _chunk(hidden: torch.Tensor, tokens: torch.Tensor, head, sampling: Sampling, entropy_grad: bool):
    logits = head(hidden)
    logq, kept = sampling.log_probs(logits)
    logprobs = logq.gather(-1, tokens[:, None]).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        if kept is None:
            entropy = -(logq.exp() * logq).sum(-1)
        else:
            entropy = -(logq.masked_fill(~kept, float("-inf")).exp() * logq.masked_fill(~kept, 0.0)).sum(-1)
    return logprobs, entropy


def chunked_token_logprobs(hidden: torch.Tensor, tokens: torch.Tensor, head, sampling: Sampling, chunk_size: int,
                           entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log q(tokens), entropy)``, both ``(N, T)``, from last hidden states ``(N, T, H)`` and the output layer.

    The entropy carries gradients only with ``entropy_grad=True``.
    """
    n, t = tokens.shape
    flat_hidden, flat_tokens = hidden.reshape(n * t, -1), tokens.reshape(-1)
    logprobs, entropy = [], []
    for start in range(0, n * t, chunk_size):
        args = (flat_hidden[start:start + chunk_size], flat_tokens[start:start + chunk_size], head, sampling,
                entropy_grad)
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            lp, ent = _chunk(*args)
        logprobs.append(lp)
        entropy.append(ent)
    return torch.cat(logprobs).view(n, t), torch.cat(entropy).view(n, t)


@torch.no_grad()
def check_plain_output_head(model) -> None:
    """Raise ``ValueError`` unless the model's logits are its output layer applied to its last hidden state.

    Models that scale or soft-cap their logits after the output layer would get wrong
    log-probs from the chunked path; they must use the plain one.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError("logprob_chunk_size needs a model with an output layer (get_output_embeddings()); "
                         "set logprob_chunk_size=0")
    ids = torch.arange(1, 5, device=next(model.parameters()).device)[None] % model.config.vocab_size
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    via_head = head(out.hidden_states[-1]).float()
    if not torch.allclose(via_head, out.logits.float(), atol=1e-4, rtol=1e-4):
        raise ValueError(f"{type(model).__name__}'s logits are not its output layer applied to the last hidden "
                         "state (scaled or soft-capped logits?): set logprob_chunk_size=0")
