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

from lmgym.models.sampling import Sampling

__all__ = ["chunked_token_logprobs", "check_plain_output_head", "selective_logprobs"]

BLOCK_ELEMENTS = 2**21
"""size of the full-vocabulary temporaries of :func:`selective_logprobs` (8 MB in float32: small enough for the
allocator to reuse them instead of mapping fresh pages for each, which costs more than the arithmetic)"""


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


class _SelectiveLogProbs(torch.autograd.Function):
    """``log softmax(logits)[token]`` with a hand-written backward, and the entropy as a by-product.

    Autograd through ``gather - logsumexp`` keeps several full-vocabulary temporaries (the
    logsumexp's exponentials, the gather's zero-filled gradient, their sum); here the forward
    works through small blocks of positions for the logsumexp and the entropy, and the backward
    writes ``d log p(token) / d logits = onehot(token) - softmax(logits)``, times the incoming
    gradient, over the saved logits themselves: nothing else reads them once the graph is
    traversed, so no second full-vocabulary tensor is made. A second backward through the same
    graph (``retain_graph=True``) is therefore refused.
    """

    @staticmethod
    def forward(ctx, logits, tokens):
        lse = torch.empty(logits.shape[0], dtype=logits.dtype, device=logits.device)
        entropy = torch.empty_like(lse)
        rows = max(1, BLOCK_ELEMENTS // logits.shape[1])
        for start in range(0, logits.shape[0], rows):
            block = logits[start:start + rows]
            # logsumexp as torch computes it (max + log sum exp(z - max)), keeping the exponentials for
            # the entropy H = logsumexp(z) - sum_v p_v z_v, with p_v = exp(z_v - max) / sum
            top = block.amax(dim=-1, keepdim=True)
            exps = (block - top).exp_()
            total = exps.sum(dim=-1)
            block_lse = top.squeeze(-1) + total.log()
            lse[start:start + rows] = block_lse
            entropy[start:start + rows] = block_lse - torch.linalg.vecdot(exps, block) / total
        logprobs = logits.gather(-1, tokens[:, None]).squeeze(-1) - lse
        ctx.save_for_backward(logits, tokens, lse)
        ctx.mark_non_differentiable(entropy)
        ctx.consumed = False
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        if ctx.consumed:
            raise RuntimeError("selective_logprobs' backward reuses its logits' memory: backward through it once")
        ctx.consumed = True
        logits, tokens, lse = ctx.saved_tensors
        grad = logits.detach().sub_(lse[:, None]).exp_().mul_(-grad_logprobs[:, None])  # in place, see above
        grad.scatter_add_(-1, tokens[:, None], grad_logprobs[:, None])
        return grad, None


def selective_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log softmax(logits)[tokens], entropy)`` for float logits ``(..., V)`` and tokens ``(...)``.

    The same values as ``token_logprobs`` and ``logsumexp(z) - sum softmax(z) * z``, with less
    memory and time: the log-probs carry gradients (written by a hand-made backward), the
    entropy is a detached statistic.
    """
    shape = tokens.shape
    logprobs, entropy = _SelectiveLogProbs.apply(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
    return logprobs.view(shape), entropy.view(shape)
