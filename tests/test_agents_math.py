"""The algorithms' pieces against independent references: slow loops and hand computations."""

import math

import numpy as np
import pytest
import torch

from lmgym.agents.grpo import aggregate_loss, group_advantages, k3_kl
from lmgym.agents.ppo import AdaptiveKLController, gae, ppo_losses
from lmgym.agents.reinforce import leave_one_out_baseline


def slow_gae(rewards, values, lengths, gamma, lam):
    """GAE one episode at a time, straight from the definition, in float64."""
    out = np.zeros_like(rewards, dtype=np.float64)
    for i, n in enumerate(lengths):
        for t in range(n):
            total = 0.0
            for k in range(t, n):
                v_next = values[i, k + 1] if k + 1 < n else 0.0
                delta = rewards[i, k] + gamma * v_next - values[i, k]
                total += (gamma * lam) ** (k - t) * delta
            out[i, t] = total
    return out


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_slow_loop(gamma, lam):
    gen = np.random.default_rng(0)
    rewards, values = gen.normal(size=(5, 7)), gen.normal(size=(5, 7))
    lengths = [7, 3, 1, 5, 6]
    mask = np.array([[t < n for t in range(7)] for n in lengths], dtype=np.float64)
    got = gae(torch.tensor(rewards * mask), torch.tensor(values * mask), torch.tensor(mask), gamma, lam)
    np.testing.assert_allclose(got.numpy(), slow_gae(rewards, values, lengths, gamma, lam), atol=1e-10)


def test_ppo_losses_by_hand():
    # Two tokens: one ratio inside the clip range, one outside.
    new = torch.tensor([[math.log(1.1), math.log(1.5)]])
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, 2.0]])
    new_v, old_v, ret = torch.tensor([[0.5, 1.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    mask = torch.ones(1, 2)
    pol, val, clipfrac, approx_kl = ppo_losses(new, old, adv, new_v, old_v, ret, mask, 0.2, 0.2)
    # token 1: max(-1*1.1, -1*1.1) = -1.1; token 2: max(-2*1.5, -2*1.2) = -2.4
    assert pol.item() == pytest.approx((-1.1 - 2.4) / 2)
    # values clipped to +-0.2 around 0: token 1 max((0.5-1)^2, (0.2-1)^2) = 0.64; token 2 max(0, 0.64) = 0.64
    assert val.item() == pytest.approx(0.5 * 0.64)
    assert clipfrac.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(((0.1 - math.log(1.1)) + (0.5 - math.log(1.5))) / 2)
    # Padding is ignored.
    pol2, *_ = ppo_losses(new, old, adv, new_v, old_v, ret, torch.tensor([[1.0, 0.0]]), 0.2, 0.2)
    assert pol2.item() == pytest.approx(-1.1)


def test_grpo_advantages_and_k3_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv = group_advantages(scores, 3, scale=True, eps=0.0)
    # group 1: mean 2, unbiased std 1 -> (-1, 0, 1); group 2: all equal -> 0 (0/0 guarded by eps in practice)
    np.testing.assert_allclose(adv[:3].numpy(), [-1.0, 0.0, 1.0], atol=1e-6)
    adv = group_advantages(scores, 3, scale=True, eps=1e-4)
    np.testing.assert_allclose(adv[3:].numpy(), [0.0, 0.0, 0.0])
    np.testing.assert_allclose(group_advantages(scores, 3, scale=False).numpy(), [-1, 0, 1, 0, 0, 0])
    # k3: pi = 0.5, pi_ref = 0.25 -> d = log 0.5 -> exp(d) - d - 1 = 0.5 + log 2 - 1
    got = k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert got.item() == pytest.approx(0.5 + math.log(2) - 1)
    assert k3_kl(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0


def test_grpo_loss_aggregations_by_hand():
    loss = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(loss, mask, "grpo", 3).item() == pytest.approx((2.0 + 2.0) / 2)
    assert aggregate_loss(loss, mask, "bnpo", 3).item() == pytest.approx(6.0 / 3)
    assert aggregate_loss(loss, mask, "dr_grpo", 3).item() == pytest.approx(6.0 / (2 * 3))


def test_rloo_baseline_is_the_mean_of_the_others():
    returns = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, 8.0])
    got = leave_one_out_baseline(returns, 3)
    expected = [np.mean([2, 6]), np.mean([1, 6]), np.mean([1, 2]), np.mean([4, 8]), np.mean([0, 8]), np.mean([0, 4])]
    np.testing.assert_allclose(got.numpy(), expected)


def test_adaptive_kl_controller_moves_beta_towards_target():
    ctl = AdaptiveKLController(target=6.0, horizon=10000)
    beta = ctl.update(0.1, 12.0, 1000)
    assert beta == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at +0.2
    assert ctl.update(beta, 5.4, 1000) == pytest.approx(beta * (1 - 0.1 * 0.1))


@pytest.mark.parametrize("group_size", [2, 3])
def test_group_mean_advantages_shrink_the_score_gradient_by_g_minus_1_over_g_and_leave_one_out_does_not(group_size):
    """Issue 23 item 17, by exact enumeration over every group of G actions of a 3-armed softmax bandit: the expected
    gradient of sum_i A_i log pi(a_i) with A = R - mean_group(R) (scale_rewards=False) is (G-1)/G of the gradient
    of E[R], so an in-loss KL of weight beta weighs G/(G-1) beta against the score; leave_one_out rescales it
    back to exactly the gradient of E[R]."""
    import itertools

    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    reward = torch.tensor([1.0, 0.0, 2.5], dtype=torch.float64)
    logp = torch.log_softmax(theta, 0)
    true_grad, = torch.autograd.grad((logp.exp() * reward).sum(), theta, retain_graph=True)
    for loo, factor in ((False, (group_size - 1) / group_size), (True, 1.0)):
        expected = torch.zeros(3, dtype=torch.float64)
        for actions in itertools.product(range(3), repeat=group_size):
            a = torch.tensor(actions)
            weight = logp[a].sum().exp().detach()  # probability of this group
            adv = group_advantages(reward[a], group_size, scale=False, leave_one_out=loo).detach()
            grad, = torch.autograd.grad((adv * logp[a]).sum(), theta, retain_graph=True)
            expected += weight * grad / group_size  # the loss averages over the group's completions
        torch.testing.assert_close(expected, factor * true_grad, rtol=1e-12, atol=1e-12)


def test_turn_advantages_by_hand_per_turn_and_per_episode():
    """GRPO's turn-level advantages against hand computations: per turn over the group's episodes that have the
    turn, or against the statistics of the group's episode returns G_0 (turn_baseline_level="episode")."""
    from lmgym.agents.grpo import turn_advantages

    # one group of 3: G_0 = (1, 2, 6); only episodes 0 and 2 have a second turn, G_1 = (0.5, -, 4)
    returns = torch.tensor([[1.0, 0.5], [2.0, 0.0], [6.0, 4.0]], dtype=torch.float64)
    present = torch.tensor([[True, True], [True, False], [True, True]])
    got = turn_advantages(returns, present, 3, scale=False, level="turn")
    np.testing.assert_allclose(got.numpy(), [[-2.0, -1.75], [-1.0, 0.0], [3.0, 1.75]])
    got = turn_advantages(returns, present, 3, scale=False, leave_one_out=True, level="turn")
    np.testing.assert_allclose(got.numpy(), [[1 - 4.0, 0.5 - 4.0], [2 - 3.5, 0.0], [6 - 1.5, 4.0 - 0.5]])
    std0 = float(np.std([1, 2, 6], ddof=1))
    got = turn_advantages(returns, present, 3, scale=True, eps=0.0, level="episode")
    np.testing.assert_allclose(got.numpy(), [[-2 / std0, -2.5 / std0], [-1 / std0, 0.0], [3 / std0, 1 / std0]])
    got = turn_advantages(returns, present, 3, scale=False, leave_one_out=True, level="episode")
    np.testing.assert_allclose(got.numpy(), [[1 - 4.0, 0.5 - 4.0], [2 - 3.5, 0.0], [6 - 1.5, 4.0 - 1.5]])
    # the first turn under "episode" is exactly the episode-level advantage
    np.testing.assert_allclose(turn_advantages(returns, present, 3, eps=1e-4, level="episode")[:, 0].numpy(),
                               group_advantages(returns[:, 0], 3).numpy())
