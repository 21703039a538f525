"""A2C: n-step returns, losses and the whole update's gradient against float64 loops; learning to the optimum."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from exact import GradientRecorder, assert_gradients_match, episodes, exact_return, float64_copies, \
    unpadded_forward64

from lmgym.agents import A2C
from lmgym.agents.a2c import a2c_losses, n_step_returns


def diagnostic_env(num_envs=64, group_size=1):
    return gym.make_vec("lmgym/TargetToken-v0", num_envs=num_envs, group_size=group_size, device="cpu")


def slow_n_step(rewards, values, lengths, gamma, n):
    out = np.zeros_like(rewards, dtype=np.float64)
    for i, length in enumerate(lengths):
        for t in range(length):
            total = sum(gamma ** k * rewards[i, t + k] for k in range(n) if t + k < length)
            if t + n < length:
                total += gamma ** n * values[i, t + n]
            out[i, t] = total
    return out


@pytest.mark.parametrize("gamma, n", [(1.0, 1), (0.9, 2), (1.0, 3), (0.95, 10)])
def test_n_step_returns_match_slow_loop(gamma, n):
    gen = np.random.default_rng(0)
    rewards, values = gen.normal(size=(5, 7)), gen.normal(size=(5, 7))
    lengths = [7, 3, 1, 5, 6]
    mask = np.array([[t < k for t in range(7)] for k in lengths], dtype=np.float64)
    got = n_step_returns(torch.tensor(rewards * mask), torch.tensor(values * mask), torch.tensor(mask), gamma, n)
    np.testing.assert_allclose(got.numpy(), slow_n_step(rewards, values, lengths, gamma, n), atol=1e-12)


def test_a2c_losses_and_their_gradients_by_hand():
    logprobs = torch.tensor([[-0.5, -1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    values = torch.tensor([[0.3, -0.2, 9.0]], dtype=torch.float64, requires_grad=True)
    entropy = torch.tensor([[1.0, 0.5, 7.0]], dtype=torch.float64)
    adv, ret = torch.tensor([[2.0, -1.0, 5.0]], dtype=torch.float64), torch.tensor([[1.0, 0.0, 3.0]],
                                                                                   dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)  # the third token is padding
    pol, val, ent = a2c_losses(logprobs, values, entropy, adv, ret, mask)
    assert pol.item() == pytest.approx(-(2.0 * -0.5 + -1.0 * -1.0) / 2)
    assert val.item() == pytest.approx(0.5 * ((0.3 - 1.0) ** 2 + (-0.2 - 0.0) ** 2) / 2)
    assert ent.item() == pytest.approx(0.75)
    (pol + 0.5 * val).backward()
    # d/dlogp_t = -A_t / n; d/dV_t = 0.5 * (V_t - G_t) / n, zero on padding
    np.testing.assert_allclose(logprobs.grad.numpy(), [[-2.0 / 2, 1.0 / 2, 0.0]])
    np.testing.assert_allclose(values.grad.numpy(), [[0.5 * (0.3 - 1.0) / 2, 0.5 * (-0.2) / 2, 0.0]])


@pytest.mark.parametrize("advantage, accumulation", [("gae", 1), ("n_step", 2)])
def test_a2c_update_gradient_matches_a_float64_reference(advantage, accumulation):
    """The agent's whole update against episodes replayed one at a time in float64, with plain-loop returns."""
    cfg = dict(gamma=0.9, gae_lambda=0.8, n_steps=2, vf_coef=0.7, ent_coef=0.1, advantage=advantage,
               gradient_accumulation_steps=accumulation)
    agent = A2C(diagnostic_env(num_envs=8), **cfg)
    with torch.no_grad():  # a critic that is not zero, so the bootstrap terms matter
        agent.value_head.linear.weight.normal_(0, 0.5)
        agent.value_head.linear.bias.fill_(0.1)
    rollout = agent.collect()
    copies = float64_copies(agent)
    recorder = GradientRecorder(agent)
    agent.update(rollout)

    policy64, head64 = copies["policy"], copies["value_head"]
    forwards = [unpadded_forward64(policy64, p, c) for p, c, _ in episodes(rollout)]
    total_tokens = sum(len(c) for _, c, _ in episodes(rollout))
    loss = 0.0
    for (prompt, completion, rewards), (logprobs, hidden) in zip(episodes(rollout), forwards):
        values = head64.linear(hidden).squeeze(-1)
        v = values.detach().tolist()
        n = len(completion)
        for t in range(n):
            if advantage == "gae":
                adv = sum((0.9 * 0.8) ** (k - t) * (rewards[k] + 0.9 * (v[k + 1] if k + 1 < n else 0.0) - v[k])
                          for k in range(t, n))
            else:
                g = sum(0.9 ** k * rewards[t + k] for k in range(2) if t + k < n)
                g += 0.9 ** 2 * v[t + 2] if t + 2 < n else 0.0
                adv = g - v[t]
            target = adv + v[t]
            state_logits = policy64(input_ids=torch.tensor([prompt + completion[:t]])).logits[0, -1]
            probs = torch.softmax(state_logits, -1)
            entropy = -(probs * torch.log(probs)).sum()
            loss = loss + (-adv * logprobs[t] + 0.7 * 0.5 * (values[t] - target) ** 2 - 0.1 * entropy) / total_tokens
    loss.backward()
    assert len(recorder.grads) == 1  # one gradient step per rollout
    assert_gradients_match(recorder.grads[0], copies)


def test_a2c_reaches_90_percent_of_the_exact_optimum():
    torch.manual_seed(0)
    venv = diagnostic_env()
    agent = A2C(venv, learning_rate=3e-3, seed=1)
    start = exact_return(agent.policy, venv)
    agent.learn(15_000, progress=False)
    end = exact_return(agent.policy, venv)
    assert start / venv.optimal_return < 0.5
    assert end / venv.optimal_return >= 0.9, f"A2C reached {end / venv.optimal_return:.1%} of the optimum"


def test_a2c_logs_and_resumes_exactly(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def fresh(logdir=None):
        return A2C(diagnostic_env(num_envs=16), logdir=logdir, learning_rate=1e-2, ent_coef=0.01)

    straight = fresh(tmp_path / "logs")
    straight.learn(4 * 16 * 6, progress=False)
    tags = set(EventAccumulator(str(tmp_path / "logs")).Reload().Tags()["scalars"])
    assert {"loss/policy", "loss/value", "objective/entropy", "val/explained_variance", "objective/kl"} <= tags
    first = fresh()
    first.learn(2 * 16 * 6, progress=False)
    first.save(tmp_path / "ckpt")
    resumed = fresh().load(tmp_path / "ckpt")
    resumed.learn(4 * 16 * 6, progress=False)
    for name, module in straight.trainable_modules().items():
        other = resumed.trainable_modules()[name].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(value, other[key]), key


def test_a2c_bad_settings():
    with pytest.raises(ValueError, match=r"advantage must be one of \['gae', 'n_step'\]"):
        A2C(diagnostic_env(num_envs=8), advantage="td")
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        A2C(diagnostic_env(num_envs=8), n_steps=0)
    with pytest.raises(ValueError, match="one gradient step per rollout"):
        A2C(diagnostic_env(num_envs=8), update_epochs=4)
