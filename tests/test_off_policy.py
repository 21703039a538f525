"""Off-policy corrections against float64 hand computations, and in the agents (issue 24, item 2)."""

import math

import gymnasium as gym
import pytest
import torch

from lmgym.agents import A2C, GRPO, PPO, Reinforce
from lmgym.agents.common.config import ConfigError
from lmgym.agents.common.off_policy import CORRECTIONS, correction_weights
from lmgym.agents.grpo import aggregate_loss, grpo_token_loss
from lmgym.agents.ppo import ppo_losses

CAP, BAND = 1.5, (0.7, 1.4)


def batch(seed=0, n=4, t=5):
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 1, 4][:n]
    mask = torch.tensor([[float(j < k) for j in range(t)] for k in lengths], dtype=torch.float64)
    behaviour = -torch.rand(n, t, generator=gen, dtype=torch.float64) * 2 - 0.1
    proximal = behaviour + torch.randn(n, t, generator=gen, dtype=torch.float64) * 0.4
    proximal[0] += 0.5  # the first sequence's ratio far outside the band and above the cap
    current = proximal + torch.randn(n, t, generator=gen, dtype=torch.float64) * 0.3
    advantages = torch.randn(n, generator=gen, dtype=torch.float64)
    return current * mask, proximal * mask, behaviour * mask, advantages, mask, lengths


def hand_weights(proximal, behaviour, lengths, correction):
    """w_t of each correction, one token at a time with Python floats."""
    out = []
    for i, n in enumerate(lengths):
        rhos = [math.exp(float(proximal[i, t]) - float(behaviour[i, t])) for t in range(n)]
        product = math.prod(rhos)
        row = []
        for t in range(proximal.shape[1]):
            if t >= n:
                row.append(0.0)
            elif correction == "none":
                row.append(1.0)
            elif correction == "tis_token":
                row.append(min(rhos[t], CAP))
            elif correction == "tis_sequence":
                row.append(min(product, CAP))
            elif correction == "mis_token":
                row.append(rhos[t] if BAND[0] <= rhos[t] <= BAND[1] else 0.0)
            elif correction == "mis_sequence":
                row.append(product if BAND[0] <= product <= BAND[1] else 0.0)
            else:  # decoupled
                row.append(rhos[t])
        out.append(row)
    return out


@pytest.mark.parametrize("correction", CORRECTIONS)
def test_weights_by_hand(correction):
    _, proximal, behaviour, _, mask, lengths = batch()
    got = correction_weights(proximal, behaviour, mask, correction, cap=CAP, band=BAND)
    expected = torch.tensor(hand_weights(proximal, behaviour, lengths, correction), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if correction.startswith("mis"):
        assert (got[mask > 0] == 0).any() and (got[mask > 0] > 0).any()  # the band drops some, keeps some


def hand_surrogate(current, old, weights, advantages, lengths, low, high):
    """Per-sequence mean of -w * min(r A, clip(r) A), and its gradient with respect to log pi_theta, by hand."""
    loss, grad = 0.0, [[0.0] * current.shape[1] for _ in lengths]
    for i, n in enumerate(lengths):
        a = float(advantages[i])
        for t in range(n):
            r = math.exp(float(current.detach()[i, t]) - float(old[i, t]))
            w = weights[i][t]
            unclipped, clipped = r * a, min(max(r, 1 - low), 1 + high) * a
            loss += -w * min(unclipped, clipped) / n / len(lengths)
            # the gradient flows through r only where the unclipped term is the minimum (or the clip is inactive)
            if unclipped <= clipped:
                grad[i][t] = -w * r * a / n / len(lengths)
    return loss, grad


@pytest.mark.parametrize("correction", CORRECTIONS)
def test_grpo_loss_and_gradient_by_hand(correction):
    current, proximal, behaviour, advantages, mask, lengths = batch(1)
    old = behaviour if correction == "none" else proximal  # "none" takes pi_old to be the sampler
    weights = correction_weights(proximal, behaviour, mask, correction, cap=CAP, band=BAND)
    current = current.clone().requires_grad_(True)
    token_loss, _, _ = grpo_token_loss(current, old, torch.zeros_like(current), advantages, mask, epsilon_low=0.2,
                                       epsilon_high=0.28, beta=0.0, kl_in_loss=False,
                                       is_weights=None if correction == "none" else weights)
    loss = aggregate_loss(token_loss, mask, "grpo", current.shape[1])
    loss.backward()
    hand_w = hand_weights(proximal, behaviour, lengths, correction)
    expected_loss, expected_grad = hand_surrogate(current.detach(), old, hand_w, advantages, lengths, 0.2, 0.28)
    assert abs(float(loss.detach()) - expected_loss) < 1e-12
    torch.testing.assert_close(current.grad * mask, torch.tensor(expected_grad, dtype=torch.float64), rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("correction", CORRECTIONS)
def test_ppo_loss_and_gradient_by_hand(correction):
    current, proximal, behaviour, advantages, mask, lengths = batch(2)
    old = behaviour if correction == "none" else proximal
    weights = correction_weights(proximal, behaviour, mask, correction, cap=CAP, band=BAND)
    token_adv = advantages[:, None].expand_as(mask) * mask
    current = current.clone().requires_grad_(True)
    zeros = torch.zeros_like(mask)
    policy_loss, _, _, _ = ppo_losses(current, old, token_adv, zeros, zeros, zeros, mask, 0.2, 0.0,
                                      is_weights=None if correction == "none" else weights)
    policy_loss.backward()
    hand_w = hand_weights(proximal, behaviour, lengths, correction)
    tokens = sum(lengths)
    expected_loss, expected_grad = 0.0, [[0.0] * mask.shape[1] for _ in lengths]
    for i, n in enumerate(lengths):  # PPO: a mean over all tokens of max(-A r, -A clip(r))
        a = float(advantages[i])
        for t in range(n):
            r = math.exp(float(current.detach()[i, t]) - float(old[i, t]))
            unclipped, clipped = -a * r, -a * min(max(r, 0.8), 1.2)
            expected_loss += hand_w[i][t] * max(unclipped, clipped) / tokens
            if unclipped >= clipped:
                expected_grad[i][t] = -hand_w[i][t] * a * r / tokens
    assert abs(float(policy_loss.detach()) - expected_loss) < 1e-12
    torch.testing.assert_close(current.grad * mask, torch.tensor(expected_grad, dtype=torch.float64), rtol=1e-10,
                               atol=1e-12)


def make_env(dtype="float32"):
    return gym.make_vec("lmgym/TargetToken-v0", num_envs=16, group_size=4, device="cpu", dtype=dtype)


@pytest.mark.parametrize("agent_cls", [PPO, GRPO, Reinforce])
@pytest.mark.parametrize("correction", [c for c in CORRECTIONS if c != "none"])
def test_corrections_vanish_on_policy(agent_cls, correction):
    """Sampler == trainer (float32, no lag): pi_prox = mu up to rounding, so every correction is the plain update.

    Compared on the first optimizer step's gradients: AdamW divides each gradient by its own magnitude, so on an
    element whose gradient is ~1e-9 a rounding-level difference would move the weights by a visible share of the
    learning rate, which says nothing about the correction."""
    grads = []
    for choice in ("none", correction):
        torch.manual_seed(0)
        agent = agent_cls(make_env(), seed=0, learning_rate=1e-2, off_policy_correction=choice)
        first_step, step = {}, agent.optimizer.step

        def recording_step(*args, **kwargs):
            if not first_step:
                first_step.update({n: p.grad.clone() for n, p in agent.policy.named_parameters() if p.grad is not None})
            return step(*args, **kwargs)

        agent.optimizer.step = recording_step
        rollout = agent.collect()
        metrics = agent.update(rollout)
        assert metrics["off_policy/lag"] == 0.0
        if choice != "none":
            assert float(metrics["off_policy/log_rho_abs_max"]) < 1e-5
            assert rollout.is_weights is not None and rollout.proximal_logprobs is not None
        assert first_step
        grads.append(first_step)
    scale = max(float(g.abs().max()) for g in grads[0].values())
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=1e-4, atol=1e-5 * scale)


def test_bf16_sampler_mismatch_is_measured_and_weighted():
    """A bfloat16 reference: the sampler runs in bfloat16, the trainer in float32; the correction sees the gap."""
    agent = GRPO(make_env("bfloat16"), seed=0, off_policy_correction="tis_token")
    rollout = agent.collect()
    metrics = agent.update(rollout)
    gap = (rollout.proximal_logprobs - rollout.logprobs)[rollout.mask > 0].abs()
    assert float(gap.max()) > 1e-4  # the precision gap is real ...
    assert float(rollout.kl[rollout.mask > 0].abs().max()) < 1e-5  # ... and the environment's KL does not see it
    assert 0 < metrics["off_policy/weight_mean"] <= CAP + 1


def test_agent_without_correction_refuses_one():
    with pytest.raises(ConfigError, match="A2C has no off-policy correction"):
        A2C(make_env(), off_policy_correction="tis_token")


@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize("per_token", [False, True])
def test_reinforce_loss_and_gradient_by_hand(correction, per_token):
    from lmgym.agents.reinforce import policy_gradient_loss

    current, proximal, behaviour, advantages, mask, lengths = batch(3)
    weights = mask if correction == "none" else correction_weights(proximal, behaviour, mask, correction, cap=CAP,
                                                                   band=BAND)
    adv = advantages[:, None] * torch.arange(1, 6, dtype=torch.float64) / 3 if per_token else advantages
    current = current.clone().requires_grad_(True)
    loss = policy_gradient_loss(current, adv, weights)
    loss.backward()
    hand_w = hand_weights(proximal, behaviour, lengths, correction)
    expected_loss, expected_grad = 0.0, [[0.0] * mask.shape[1] for _ in lengths]
    for i, n in enumerate(lengths):  # -(1/N) sum_i sum_t w_t A log pi(y_t): its gradient is -w_t A / N
        for t in range(n):
            a = float(adv[i, t]) if per_token else float(adv[i])
            expected_loss += -hand_w[i][t] * a * float(current.detach()[i, t]) / len(lengths)
            expected_grad[i][t] = -hand_w[i][t] * a / len(lengths)
    assert abs(float(loss.detach()) - expected_loss) < 1e-12
    torch.testing.assert_close(current.grad * mask, torch.tensor(expected_grad, dtype=torch.float64), rtol=1e-10,
                               atol=1e-12)
