"""KL estimators and placements, GSPO ratios and the dapo loss against float64 hand computations with plain loops."""

import dataclasses
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from lmgym.agents import GRPO, PPO, RLOO, Reinforce
from lmgym.agents.grpo import aggregate_loss, grpo_token_loss
from lmgym.agents.common.kl import kl_estimate, kl_penalty_loss, penalised_returns, penalised_rewards

ESTIMATORS = ("k1", "k2", "k3")
COMBOS = [(e, p) for e in ESTIMATORS for p in ("reward", "loss")]


def hand_k(lp: float, ref: float, estimator: str) -> float:
    """Schulman's estimators from their definitions: r = pi_ref / pi."""
    r = math.exp(ref - lp)
    return {"k1": -math.log(r), "k2": 0.5 * math.log(r) ** 2, "k3": r - 1 - math.log(r)}[estimator]


def hand_dk(lp: float, ref: float, estimator: str) -> float:
    """d k / d log pi, by hand."""
    return {"k1": 1.0, "k2": lp - ref, "k3": 1.0 - math.exp(ref - lp)}[estimator]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimators_by_hand(estimator):
    gen = np.random.default_rng(0)
    lp, ref = gen.normal(-1.5, 1.0, size=20), gen.normal(-1.5, 1.0, size=20)
    got = kl_estimate(torch.tensor(lp), torch.tensor(ref), estimator).numpy()
    np.testing.assert_allclose(got, [hand_k(a, b, estimator) for a, b in zip(lp, ref)], rtol=1e-12, atol=1e-12)


def test_expected_estimates_and_loss_gradients_match_the_documented_kls():
    """Over a whole categorical distribution: E_pi[k1] = E_pi[k3] = KL(pi || ref) while E_pi[k2] is not; and the
    expected gradient of the loss term, on-policy, is 0 (k1), grad KL(pi || ref) (k2), grad KL(ref || pi) (k3)."""
    gen = np.random.default_rng(1)
    logits = torch.tensor(gen.normal(size=6), requires_grad=True)
    ref = torch.log_softmax(torch.tensor(gen.normal(size=6)), 0)
    logpi = torch.log_softmax(logits, 0).detach()
    p, q = logpi.detach().exp().numpy(), ref.exp().numpy()
    reverse = sum(p[a] * math.log(p[a] / q[a]) for a in range(6))
    for estimator in ("k1", "k3"):
        expected = sum(p[a] * hand_k(float(logpi[a]), float(ref[a]), estimator) for a in range(6))
        assert expected == pytest.approx(reverse, abs=1e-12)
    assert sum(p[a] * hand_k(float(logpi[a]), float(ref[a]), "k2") for a in range(6)) != pytest.approx(reverse)

    def grad_of(fn):
        (g,) = torch.autograd.grad(fn(), logits)
        return g.numpy()

    logpi_fn = lambda: torch.log_softmax(logits, 0)  # noqa: E731
    grad_reverse = grad_of(lambda: (logpi_fn().exp() * (logpi_fn() - ref)).sum())
    grad_forward = grad_of(lambda: (ref.exp() * (ref - logpi_fn())).sum())
    p_old = torch.tensor(p)  # samples come from pi_old = pi, weights carry no gradient
    for estimator, want in (("k1", np.zeros(6)), ("k2", grad_reverse), ("k3", grad_forward)):
        got = grad_of(lambda: (p_old * kl_estimate(logpi_fn(), ref, estimator)).sum())
        np.testing.assert_allclose(got, want, atol=1e-12)
    assert not np.allclose(grad_reverse, grad_forward)
    # In the reward the estimate is a fixed number whose expectation the policy gradient moves (score function):
    # k1 gives grad KL(pi || ref), k3 grad KL(pi || ref) - grad KL(ref || pi) (the module docstring's claims).
    for estimator, want in (("k1", grad_reverse), ("k3", grad_reverse - grad_forward)):
        frozen = torch.tensor([hand_k(float(logpi[a]), float(ref[a]), estimator) for a in range(6)],
                              dtype=torch.float64)
        got = grad_of(lambda: (logpi_fn().exp() * frozen).sum())
        np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.fixture(scope="module")
def rollout():
    venv = gym.make_vec("lmgym/TargetToken-v0", num_envs=8, group_size=4, device="cpu", kl_coef=0.3)
    agent = GRPO(venv, seed=2)
    with torch.no_grad():  # move the policy off the reference so log ratios are not all 0
        for p in agent.policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return agent.collect()


def hand_rewards(r, estimator, placement, beta):
    """Per-token rewards from the rollout's tensors, one token at a time in float64."""
    out = np.zeros(r.tokens.shape)
    for i in range(len(r)):
        n = int(r.lengths[i])
        for t in range(n):
            if placement == "reward":
                out[i, t] -= beta * hand_k(float(r.logprobs[i, t]), float(r.ref_logprobs[i, t]), estimator)
        out[i, n - 1] += float(r.scores[i])
    return out


@pytest.mark.parametrize("estimator, placement", COMBOS)
def test_penalised_rewards_and_returns_by_hand(rollout, estimator, placement):
    beta = 0.3
    want = hand_rewards(rollout, estimator, placement, beta)
    got = penalised_rewards(rollout, estimator, placement, beta)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5)
    np.testing.assert_allclose(penalised_returns(rollout, estimator, placement, beta).double().numpy(),
                               want.sum(1), atol=1e-5)
    if (estimator, placement) == ("k1", "reward"):
        assert got is rollout.rewards  # exactly the environment's reward
    assert float(rollout.kl.abs().max()) > 0.01  # the policy differs from the reference: the KL matters here


def test_kl_penalty_loss_and_gradient_by_hand():
    gen = np.random.default_rng(3)
    lp_np, ref_np = gen.normal(-1.0, 0.7, size=(3, 4)), gen.normal(-1.0, 0.7, size=(3, 4))
    lengths = [4, 1, 3]
    mask = torch.tensor([[t < n for t in range(4)] for n in lengths], dtype=torch.float64)
    count = sum(lengths)
    for estimator in ESTIMATORS:
        for per in ("token", "sequence"):
            lp = torch.tensor(lp_np, requires_grad=True)
            loss = kl_penalty_loss(lp, torch.tensor(ref_np), mask, estimator, per)
            loss.backward()
            value, grad = 0.0, np.zeros((3, 4))
            weight = 1 / count if per == "token" else 1 / 3
            for i, n in enumerate(lengths):
                for t in range(n):
                    value += weight * hand_k(lp_np[i, t], ref_np[i, t], estimator)
                    grad[i, t] = weight * hand_dk(lp_np[i, t], ref_np[i, t], estimator)
            assert loss.item() == pytest.approx(value, abs=1e-12)
            np.testing.assert_allclose(lp.grad.numpy(), grad, atol=1e-12)


def hand_grpo_loss(lp, old, ref, adv, lengths, *, eps_low, eps_high, beta, estimator, kl_in_loss, level, loss_type,
                   horizon):
    """GRPO / GSPO loss of one batch, from the definitions, token by token in float64."""
    token_losses = []  # per sequence, its tokens' losses
    for i, n in enumerate(lengths):
        seq_ratio = math.exp(sum(lp[i][t] - old[i][t] for t in range(n)) / n)
        row = []
        for t in range(n):
            rho = seq_ratio if level == "sequence" else math.exp(lp[i][t] - old[i][t])
            clipped = min(max(rho, 1 - eps_low), 1 + eps_high)
            loss = -min(rho * adv[i], clipped * adv[i])
            if kl_in_loss:
                loss += beta * hand_k(lp[i][t], ref[i][t], estimator)
            row.append(loss)
        token_losses.append(row)
    if loss_type == "grpo":
        return sum(sum(row) / len(row) for row in token_losses) / len(lengths)
    total = sum(sum(row) for row in token_losses)
    if loss_type in ("bnpo", "dapo"):
        return total / sum(lengths)
    return total / (len(lengths) * horizon)  # dr_grpo


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("estimator, placement", COMBOS)
def test_grpo_and_gspo_losses_and_gradients_by_hand(level, loss_type, estimator, placement):
    gen = np.random.default_rng(4)
    shape, lengths, horizon = (4, 5), [5, 2, 4, 1], 5
    old = gen.normal(-1.2, 0.5, size=shape)
    lp_np = old + gen.normal(0, 0.25, size=shape)  # ratios on both sides of the clip range
    ref = gen.normal(-1.2, 0.5, size=shape)
    adv = np.array([1.3, -0.7, 0.4, -1.1])
    mask = torch.tensor([[t < n for t in range(shape[1])] for n in lengths], dtype=torch.float64)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.4, estimator=estimator, kl_in_loss=placement == "loss",
              level=level, loss_type=loss_type, horizon=horizon)

    lp = torch.tensor(lp_np, requires_grad=True)
    token_loss, ratio, _ = grpo_token_loss(lp, torch.tensor(old), torch.tensor(ref), torch.tensor(adv), mask,
                                           epsilon_low=0.2, epsilon_high=0.28, beta=0.4, kl_estimator=estimator,
                                           kl_in_loss=placement == "loss", importance_sampling_level=level)
    assert ratio.shape == ((4, 1) if level == "sequence" else shape)
    loss = aggregate_loss(token_loss, mask, loss_type, horizon)
    loss.backward()
    assert loss.item() == pytest.approx(hand_grpo_loss(lp_np, old, ref, adv, lengths, **kw), abs=1e-12)

    # The gradient: central differences of the hand computation (plain loops, float64).
    h, grad = 1e-6, np.zeros(shape)
    for i, n in enumerate(lengths):
        for t in range(n):
            up, down = lp_np.copy(), lp_np.copy()
            up[i, t] += h
            down[i, t] -= h
            grad[i, t] = (hand_grpo_loss(up, old, ref, adv, lengths, **kw)
                          - hand_grpo_loss(down, old, ref, adv, lengths, **kw)) / (2 * h)
    np.testing.assert_allclose(lp.grad.numpy(), grad, atol=1e-7)


def test_dapo_micro_batch_shares_sum_to_the_minibatch_token_mean():
    loss = torch.tensor([[1.0, 3.0, 5.0], [2.0, 7.0, 7.0], [8.0, 7.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    whole = (1 + 3 + 5 + 2 + 8) / 5
    shares = [aggregate_loss(loss[s], mask[s], "dapo", 3, num_tokens=mask.sum()).item() for s in (slice(0, 1),
                                                                                                   slice(1, 3))]
    assert sum(shares) == pytest.approx(whole)
    assert aggregate_loss(loss, mask, "dapo", 3).item() == pytest.approx(whole)
    # bnpo averages the micro-batches' own token means instead
    bnpo = [aggregate_loss(loss[s], mask[s], "bnpo", 3).item() for s in (slice(0, 1), slice(1, 3))]
    assert np.mean(bnpo) == pytest.approx((9 / 3 + 10 / 2) / 2)
    assert np.mean(bnpo) != pytest.approx(whole)


def weights(agent):
    return {k: v.detach().clone() for k, v in agent.policy.state_dict().items()}


def diagnostic(group_size, kl_coef=0.3, num_envs=16):
    return gym.make_vec("lmgym/TargetToken-v0", num_envs=num_envs, group_size=group_size, device="cpu",
                        kl_coef=kl_coef)


AGENT_CASES = [(PPO, 1), (Reinforce, 1), (RLOO, 4), (GRPO, 4)]


def one_iteration(cls, group_size, kl_coef, **kw):
    agent = cls(diagnostic(group_size, kl_coef), learning_rate=3e-3, seed=5, **kw)
    agent.learn(1, progress=False)  # one iteration
    assert agent.iteration == 1
    return weights(agent)


@pytest.mark.parametrize("cls, group_size", AGENT_CASES)
def test_without_kl_every_placement_and_estimator_gives_the_same_update(cls, group_size):
    reference = one_iteration(cls, group_size, 0.0)
    for estimator, placement in COMBOS:
        got = one_iteration(cls, group_size, 0.0, kl_estimator=estimator, kl_placement=placement)
        for name, value in reference.items():
            assert torch.equal(value, got[name]), (estimator, placement, name)
    # ... while with a KL coefficient the choices differ (the comparison above can fail).
    a = one_iteration(cls, group_size, 0.3, kl_estimator="k2", kl_placement="reward")
    b = one_iteration(cls, group_size, 0.3, kl_estimator="k2", kl_placement="loss")
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cls, group_size", AGENT_CASES)
@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_kl_in_the_reward_is_the_hand_computed_per_token_penalty(rollout, cls, group_size, estimator):
    """An update with k2 / k3 in the reward equals the update of an agent that sees the score alone, whose rollout
    carries the hand-computed penalised rewards (k1 in the reward with those rewards: exactly what it uses)."""
    beta = 0.3  # the rollout's environment's kl_coef
    hand = torch.tensor(hand_rewards(rollout, estimator, "reward", beta), dtype=rollout.rewards.dtype)
    if cls is GRPO:  # a sequence-level agent: the score it normalises is the penalised return
        plain = dataclasses.replace(rollout, scores=hand.sum(1))
        plain_kw = {"kl_placement": "loss", "beta": 0.0}
    else:
        plain = dataclasses.replace(rollout, rewards=hand)
        plain_kw = {"kl_estimator": "k1", "kl_placement": "reward"}

    def gradient(r, **kw):
        """The gradient of the update's single step (compared before Adam, which would amplify rounding)."""
        agent = cls(diagnostic(group_size, beta, num_envs=8), seed=5, update_epochs=1, num_minibatches=1, **kw)
        grads, step = [], agent.optimizer_step

        def capture():
            grads.append(torch.cat([p.grad.flatten() for p in agent.parameters() if p.grad is not None]))
            return step()

        agent.optimizer_step = capture
        agent.update(r)
        assert len(grads) == 1
        return grads[0]

    got = gradient(rollout, kl_estimator=estimator, kl_placement="reward")
    want = gradient(plain, **plain_kw)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    k1 = gradient(rollout, kl_estimator="k1", kl_placement="reward")
    assert not torch.allclose(got, k1, atol=1e-5, rtol=1e-3)


def test_dapo_update_does_not_depend_on_gradient_accumulation():
    def run(loss_type, steps):
        agent = GRPO(diagnostic(4, num_envs=16), learning_rate=3e-3, seed=6, loss_type=loss_type,
                     gradient_accumulation_steps=steps)
        agent.learn(1, progress=False)
        return weights(agent)

    one, two = run("dapo", 1), run("dapo", 2)
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=1e-6, rtol=1e-5)
    b1, b2 = run("bnpo", 1), run("bnpo", 2)
    assert any(not torch.allclose(b1[k], b2[k], atol=1e-6) for k in b1)  # bnpo's micro-batch means differ


def test_bad_kl_settings_are_refused():
    from lmgym.agents import ConfigError

    with pytest.raises(ConfigError, match="kl_estimator"):
        PPO(diagnostic(1), kl_estimator="k4")
    with pytest.raises(ConfigError, match="kl_placement"):
        Reinforce(diagnostic(1), kl_placement="advantage")
    with pytest.raises(ConfigError, match="importance_sampling_level"):
        GRPO(diagnostic(4), importance_sampling_level="batch")


def test_gspo_on_policy_first_step_equals_token_level_grpo():
    """At pi = pi_old the sequence ratio's gradient is A * mean_t grad log pi, the token ratios' mean: the first
    step of GSPO equals GRPO's (loss_type grpo); later epochs, off-policy, differ."""
    def gradients(level):
        agent = GRPO(diagnostic(4, num_envs=8), seed=7, importance_sampling_level=level, update_epochs=2,
                     num_minibatches=1)
        grads, step = [], agent.optimizer_step

        def capture():
            grads.append(torch.cat([p.grad.flatten() for p in agent.parameters() if p.grad is not None]))
            return step()

        agent.optimizer_step = capture
        agent.learn(1, progress=False)
        return grads

    token, sequence = gradients("token"), gradients("sequence")
    torch.testing.assert_close(token[0], sequence[0], atol=1e-6, rtol=1e-4)
    assert not torch.allclose(token[1], sequence[1], atol=1e-6, rtol=1e-3)
