"""The exact enumeration of the per-turn credit verdict: every history of the multi-turn diagnostic tasks, checked
against the environment's own episodes, and the unbiased credit forms against autograd of the enumerated J."""

import copy
import itertools

import gymnasium as gym
import pytest
import torch

import lmgym  # noqa: F401
from lmgym.agents.common.turns import per_token, turn_returns
from lmgym.bench.turn_credit_exact import (SCHEMES, Histories, expected_advantages, expected_gradient, group_form,
                                           relative_bias, true_gradient)

TASKS = ["lmgym/Guess-v0", "lmgym/Echo-v0"]
# Llama's RMSNorm computes in float32 inside a float64 model, so every gradient carries float32 rounding (see
# tests/test_off_policy_exact.py): "equal" means a relative error under 1e-5.
EQUAL = 1e-5


def perturbed(model, seed, scale=0.3):
    torch.manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():  # a policy some way from the reference, so the KL and its gradient are not 0
        for p in out.parameters():
            p.add_(torch.randn_like(p) * scale)
    return out.requires_grad_(True)


@pytest.fixture(scope="module", params=TASKS)
def setup(request):
    venv = gym.make_vec(request.param, num_envs=1, device="cpu", max_turns=2)
    reference = copy.deepcopy(venv.reference_model).double().eval()
    policy = perturbed(reference, 0)
    hist = Histories(venv)
    return request.param, hist, policy, reference, true_gradient(hist, policy, reference)


def test_every_history_is_listed_once_and_their_probabilities_sum_to_one(setup):
    task, hist, policy, _, _ = setup
    # Guess: 3 targets x (the right first guess, or 7 other tokens x a reply x 8 second tokens);
    # Echo: 3 prompts, each 3 hidden words x 4 first tokens x 4 second tokens
    assert [len(p.tokens) for p in hist.prompts] == ([3 * (1 + 7 * 8)] if task == "lmgym/Guess-v0" else [48] * 3)
    for k, p in enumerate(hist.prompts):
        with torch.no_grad():  # a history listed twice (or missed) would move the sum off 1
            total = (p.prior * hist.logprobs(policy, k).sum(1).exp()).sum()
        assert abs(float(total) - 1.0) < 1e-12


def test_a_few_histories_by_hand():
    guess = Histories(gym.make_vec("lmgym/Guess-v0", num_envs=1, device="cpu", max_turns=2))
    tok = guess.core.tokenizer.convert_tokens_to_ids
    p = guess.prompts[0]
    rows = {tuple(t[m > 0].tolist()): [] for t, m in zip(p.tokens, p.mask)}
    for t, m, r in zip(p.tokens, p.mask, p.task_rewards):
        rows[tuple(t[m > 0].tolist())].append((t.tolist(), r.tolist()))
    # "2" first: right for target 2 (score (2 - 1 + 1) / 2 = 1), the only one-token history of a prompt
    assert rows[(tok("2"),)] == [([tok("2"), 0, 0], [1.0, 0.0, 0.0])]
    # "1", then "2": target 2 answers "higher" and the second guess scores 1/2; target 3 answers "higher" too and
    # scores 0; target 1 ended the episode at the first guess
    assert sorted(rows[(tok("1"), tok("2"))], key=lambda x: x[1]) == [
        ([tok("1"), tok("higher"), tok("2")], [0.0, 0.0, 0.0]), ([tok("1"), tok("higher"), tok("2")], [0.0, 0.0, 0.5])]
    echo = Histories(gym.make_vec("lmgym/Echo-v0", num_envs=1, device="cpu", max_turns=2))
    tok = echo.core.tokenizer.convert_tokens_to_ids
    a = next(p for p in echo.prompts if p.ids == [tok("a")])
    # prompt "a", the speaker says "b": "a" then "b" echoes both times, 1/2 each
    i = next(i for i, t in enumerate(a.tokens.tolist()) if t == [tok("a"), tok("b"), tok("b")])
    assert a.task_rewards[i].tolist() == [0.5, 0.0, 0.5] and a.mask[i].tolist() == [1.0, 0.0, 1.0]
    assert a.turn_index[i].tolist() == [0, -1, 1]


@pytest.mark.parametrize("task", TASKS)
def test_the_environments_episodes_are_enumerated_histories(task):
    """Every episode an agent plays through the environment is one of the enumerated histories: same tokens,
    policy mask, turns and task rewards (the hidden state is unseen, so one of the histories with its tokens)."""
    from lmgym.agents import RLOO

    venv = gym.make_vec(task, num_envs=32, group_size=4, device="cpu", max_turns=2)
    hist = Histories(venv)
    rollout = RLOO(venv, seed=0).collect()
    by_prompt = {tuple(p.ids): p for p in hist.prompts}
    for row in range(len(rollout)):
        prompt = by_prompt[tuple(rollout.query_ids[row][rollout.query_mask[row] > 0].tolist())]
        k = int(rollout.lengths[row])
        tokens = rollout.tokens[row, :k].tolist()
        found = [i for i, t in enumerate(prompt.tokens.tolist()) if t[:k] == tokens and prompt.mask[i, k:].sum() == 0]
        assert found, tokens
        assert any(prompt.mask[i, :k].tolist() == rollout.mask[row, :k].tolist()
                   and prompt.turn_index[i, :k].tolist() == rollout.turn_index[row, :k].tolist()
                   and torch.allclose(prompt.task_rewards[i, :k].float(), rollout.task_rewards[row, :k])
                   for i in found), tokens


def test_the_broadcast_return_with_a_constant_baseline_is_the_true_gradient(setup):
    """The policy-gradient theorem on the enumeration: E[(G_0 - c) sum_t grad log pi(y_t)] = grad J (autograd)."""
    _, hist, policy, reference, truth = setup
    surrogate = 0.0
    for k, p in enumerate(hist.prompts):
        logp = hist.logprobs(policy, k)
        with torch.no_grad():
            ref = hist.logprobs(reference, k)
            probability = p.prior * logp.sum(1).exp()
            episode_return = (p.task_rewards - hist.beta * (logp - ref) * p.mask).sum(1)
        surrogate = surrogate + p.weight * (probability * (episode_return - 0.3) * logp.sum(1)).sum()
    estimate = torch.autograd.grad(surrogate, [q for q in policy.parameters()])
    bias, cosine = relative_bias(estimate, truth)
    assert bias < EQUAL and cosine > 1 - 1e-9


@pytest.mark.parametrize("scheme", SCHEMES)
def test_leave_one_out_and_the_exact_critic_are_unbiased(setup, scheme):
    task, hist, policy, reference, truth = setup
    for n in (2, None) if task == "lmgym/Guess-v0" else (2, 3, None):
        bias, _ = relative_bias(expected_gradient(hist, policy, reference, form="rloo", scheme=scheme,
                                                  group_size=n), truth)
        assert bias < EQUAL, (scheme, n, bias)
    bias, _ = relative_bias(expected_gradient(hist, policy, reference, form="ppo", scheme="per-turn"), truth)
    assert bias < EQUAL


@pytest.mark.parametrize("scheme", ["broadcast", "per-turn"])
def test_the_group_mean_with_itself_in_it_shrinks_the_gradient_by_n_minus_1_over_n(setup, scheme):
    """Dr. GRPO's baseline holds the episode's own return: E[g] = (n - 1) / n grad J, exactly, for a baseline of
    the episode returns; at n = infinity it is grad J."""
    _, hist, policy, reference, truth = setup
    g = expected_gradient(hist, policy, reference, form="dr_grpo", scheme=scheme, group_size=2)
    bias, cosine = relative_bias([x * 2 for x in g], truth)
    assert bias < EQUAL and cosine > 1 - 1e-9
    bias, _ = relative_bias(expected_gradient(hist, policy, reference, form="dr_grpo", scheme=scheme), truth)
    assert bias < EQUAL


def test_per_turn_group_statistics_bend_the_gradient_on_guess(setup):
    """Normalising each turn over the group's episodes that have it weighs the turns by different factors
    (E[1 - 1/n_k], 1/std_k), which turns the expected gradient away from grad J where the turns' groups differ
    (Guess: a right first guess ends the episode)."""
    task, hist, policy, reference, truth = setup
    if task != "lmgym/Guess-v0":
        pytest.skip("every Echo episode has both turns")
    _, cosine = relative_bias(expected_gradient(hist, policy, reference, form="dr_grpo", scheme="per-turn group",
                                                group_size=2), truth)
    assert cosine < 1 - 1e-5
    _, cosine = relative_bias(expected_gradient(hist, policy, reference, form="grpo", scheme="per-turn group"), truth)
    assert cosine < 0.999


@pytest.mark.parametrize("form, scheme", [("grpo", "per-turn group"), ("rloo", "per-turn"), ("grpo", "broadcast")])
def test_the_expectation_over_the_others_against_a_slow_loop(form, scheme):
    gen = torch.Generator().manual_seed(0)
    m, n = 5, 3
    returns = torch.randn(m, 2, generator=gen, dtype=torch.float64)
    present = torch.tensor([[True, True], [True, False], [True, True], [True, False], [True, True]])
    returns = returns * present
    probability = torch.rand(m, generator=gen, dtype=torch.float64)
    probability /= probability.sum()
    advantage = group_form(form, scheme)
    got = expected_advantages(advantage, returns, present, probability, n, chunk_groups=7)
    for h in range(m):
        expected = torch.zeros(2, dtype=torch.float64)
        for others in itertools.product(range(m), repeat=n - 1):
            members = [h, *others]
            a = advantage(returns[members], present[members], n)[0]
            expected += float(probability[list(others)].prod()) * a
        torch.testing.assert_close(got[h], expected, rtol=1e-12, atol=1e-12)


def test_token_gae_and_turn_gae_are_the_same_on_one_token_turns(setup):
    """On these tasks a turn is one token, so PPO's turn_level changes nothing: GAE over tokens = GAE over turns."""
    from lmgym.agents.ppo import gae, turn_gae

    _, hist, _, _, _ = setup
    gen = torch.Generator().manual_seed(1)
    for p in hist.prompts:
        rewards = torch.randn(p.mask.shape, generator=gen, dtype=torch.float64) * p.mask
        values = torch.randn(p.mask.shape, generator=gen, dtype=torch.float64) * p.mask
        tokens = gae(rewards, values, p.mask, 1.0, 0.95)
        turns = per_token(turn_gae(p.view, rewards, values, 1.0, 0.95)[0], p.view)
        torch.testing.assert_close(tokens, turns, rtol=0, atol=1e-12)
        returns, present = turn_returns(p.view, rewards)
        assert bool(present[:, 0].all())
