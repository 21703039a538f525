"""The exact optimum of the KL-regularised objective, by soft dynamic programming over the token tree.

For a prompt x the best achievable expected return of the MDP in DESIGN.md is the
soft value of the root, computed backwards over every continuation::

    V(s) = beta * log sum_a pi_ref(a|s) * exp(Q(s, a) / beta)
    Q(s, a) = R(x, y)           if a is a stop token (y = the tokens before it)
            = V(s + a)          otherwise,
    V(s) = R(x, y)              once max_new_tokens tokens were generated (truncation)

(with beta = 0 the log-sum-exp becomes a max over tokens pi_ref allows). The
policy that attains it is ``pi*(a|s) = pi_ref(a|s) exp((Q(s,a) - V(s)) / beta)``.
Only small vocabularies and horizons are feasible: the tree has
``(vocab - stops) ** max_new_tokens`` leaves per prompt.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

__all__ = ["soft_optimal_values", "MAX_LEAVES"]

MAX_LEAVES = 2_000_000
"""The most leaves (summed over prompts) the exact optimum will enumerate."""


def _all_strings(alphabet: list[int], length: int) -> np.ndarray:
    """Every string of ``length`` symbols over ``alphabet``, in lexicographic (base-m) order, ``(m**length, length)``."""
    if length == 0:
        return np.zeros((1, 0), dtype=np.int64)
    return np.array(list(itertools.product(alphabet, repeat=length)), dtype=np.int64)


@torch.no_grad()
def _ref_logprobs_along(model, prompt: list[int], strings: np.ndarray, batch: int = 4096) -> np.ndarray:
    """log pi_ref(. | prompt + s[:t]) for every string s and t = 0..len(s): ``(n, len+1, vocab)`` float64."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(strings), batch):
        chunk = torch.as_tensor(strings[i:i + batch], device=device)
        ids = torch.cat([torch.as_tensor(prompt, device=device).expand(len(chunk), -1), chunk], dim=1)
        logits = model(input_ids=ids).logits[:, len(prompt) - 1:].double()
        out.append(torch.log_softmax(logits, dim=-1).cpu().numpy())
    return np.concatenate(out)


def soft_optimal_values(model, prompts: list[list[int]], score, *, max_new_tokens: int, stop_token_ids,
                        kl_coef: float) -> np.ndarray:
    """Exact optimal expected return ``V*(x)`` of each prompt.

    Args:
        model: the reference LM pi_ref.
        prompts: token-id prompts.
        score: ``score(k, completion_ids_list) -> array`` giving R(x_k, y) for many y of prompt
            ``k`` (its index in ``prompts``), so the caller can score with the prompt text it holds.
        max_new_tokens: the horizon.
        stop_token_ids: tokens that end an episode.
        kl_coef: beta.

    Returns:
        ``(len(prompts),)`` float64 array.
    """
    vocab = int(model.config.vocab_size)
    stops = sorted(set(int(t) for t in stop_token_ids))
    alphabet = [a for a in range(vocab) if a not in stops]
    m, horizon = len(alphabet), max_new_tokens
    leaves = len(prompts) * m ** horizon
    if leaves > MAX_LEAVES:
        raise ValueError(f"the exact optimum needs {leaves:,} leaves ({len(prompts)} prompts x {m}^{horizon}), more "
                         f"than {MAX_LEAVES:,}; it is meant for tiny diagnostic tasks")
    # Positions of each alphabet symbol and of the stops in the vocabulary, for indexing log-probs.
    alpha_idx, stop_idx = np.array(alphabet), np.array(stops, dtype=np.int64)
    longest = _all_strings(alphabet, horizon - 1)  # every non-terminal state is a prefix of one of these
    values = []
    for k, prompt in enumerate(prompts):
        logp = _ref_logprobs_along(model, prompt, longest)  # (m**(H-1), H, vocab)
        # R for every completion of length 0..H (reached by a stop, or by truncation at H).
        rewards = [np.asarray(score(k, [list(s) for s in _all_strings(alphabet, t)]), dtype=np.float64)
                   for t in range(horizon + 1)]
        v = rewards[horizon]  # states at depth H: truncated
        for t in range(horizon - 1, -1, -1):
            # States at depth t are the prefixes of length t; the longest strings list each
            # of them m**(H-1-t) times in a contiguous block, so take every block's first row.
            step = m ** (horizon - 1 - t)
            lp = logp[::step, t]  # (m**t, vocab)
            q_next = v.reshape(m ** t, m)  # child values, alphabet order
            q_stop = np.repeat(rewards[t][:, None], len(stops), axis=1)
            q = np.concatenate([q_next, q_stop], axis=1)
            lp = np.concatenate([lp[:, alpha_idx], lp[:, stop_idx]], axis=1)
            if kl_coef > 0:
                z = lp + q / kl_coef
                top = z.max(axis=1, keepdims=True)
                v = kl_coef * (top[:, 0] + np.log(np.exp(z - top).sum(axis=1)))
            else:
                v = np.where(np.isfinite(lp), q, -np.inf).max(axis=1)
        values.append(float(v[0]))
    return np.array(values)
