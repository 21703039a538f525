"""The exact optimum of each diagnostic task against brute-force enumeration of every sequence."""

import itertools
import math

import gymnasium as gym
import numpy as np
import pytest

from lmgym.tasks import DIAGNOSTIC_IDS

from conftest import slow_ref_logprob


def brute_force_optimum(env) -> float:
    """beta * log E_{y ~ pi_ref}[exp(R(y) / beta)], averaged over prompts, by listing every complete sequence."""
    core = env.unwrapped.core
    model64 = core.model.double()
    beta, horizon, stops = core.kl_coef, core.max_new_tokens, core.stop_token_ids
    alphabet = [a for a in range(core.vocab_size) if a not in stops]
    memo = {}

    def ref_logprob(ids, action):
        if tuple(ids) not in memo:
            memo[tuple(ids)] = [slow_ref_logprob(model64, ids, a) for a in range(core.vocab_size)]
        return memo[tuple(ids)][action]

    values = []
    for prompt in core.prompts.items:
        terms = []  # (log p(y), R(y)) for every complete sequence y
        for k in range(horizon + 1):
            for body in itertools.product(alphabet, repeat=k):
                ends = [None] if k == horizon else stops  # truncated at the horizon, else a stop token
                for stop in ends:
                    seq = list(body) + ([] if stop is None else [stop])
                    logp = sum(ref_logprob(prompt.ids + seq[:t], seq[t]) for t in range(len(seq)))
                    text = core.tokenizer.decode(list(body))
                    score = core.reward_fn([prompt.text], [text], [prompt.ids], [list(body)])[0]
                    terms.append((logp, score))
        if beta == 0:
            values.append(max(r for _, r in terms))
        else:
            values.append(beta * math.log(sum(math.exp(lp + r / beta) for lp, r in terms)))
    core.model.float()
    return float(np.mean(values))


@pytest.mark.parametrize("env_id", list(DIAGNOSTIC_IDS))
@pytest.mark.parametrize("kl_coef", [0.05, 0.5, 0.0])
def test_optimum_matches_brute_force(env_id, kl_coef):
    env = gym.make(env_id, prompt_length=2, kl_coef=kl_coef, reference_seed=3)
    if env_id == "lmgym/TargetToken-v0":
        env = gym.make(env_id, kl_coef=kl_coef, reference_seed=3, max_new_tokens=4)
    assert env.unwrapped.optimal_return == pytest.approx(brute_force_optimum(env), abs=1e-6)


def test_optimum_is_above_the_reference_policy_and_below_the_best_score():
    """Sanity by construction: E_ref[R] <= V* <= max R, with V* -> max R as beta -> 0."""
    low = gym.make("lmgym/Copy-v0", prompt_length=2, kl_coef=10.0).unwrapped.optimal_return
    mid = gym.make("lmgym/Copy-v0", prompt_length=2, kl_coef=0.05).unwrapped.optimal_return
    top = gym.make("lmgym/Copy-v0", prompt_length=2, kl_coef=0.0).unwrapped.optimal_return
    assert 0 < low < mid < top == pytest.approx(1.0)


def test_optimum_refuses_a_stream_and_a_huge_tree(tiny):
    from lmgym import TextGenEnv

    model, tok = tiny
    env = TextGenEnv(model, lambda p, c: [0.0] * len(c), iter(["the cat"]), tokenizer=tok, max_prompt_tokens=4)
    with pytest.raises(ValueError, match="known list of prompts"):
        env.optimal_return
    env = TextGenEnv(model, lambda p, c: [0.0] * len(c), ["the cat"], tokenizer=tok, max_new_tokens=12)
    with pytest.raises(ValueError, match="leaves"):
        env.optimal_return
