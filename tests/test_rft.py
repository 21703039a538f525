"""Rejection-sampling fine-tuning: selection and gradient against plain loops; learning to the optimum; resume."""

import gymnasium as gym
import pytest
import torch
from exact import GradientRecorder, assert_gradients_match, episodes, exact_return, float64_copies, \
    unpadded_forward64

from lmgym.agents import AGENTS, RFT
from lmgym.agents.rft import select_best


def diagnostic_env(num_envs=64, group_size=8):
    return gym.make_vec("lmgym/TargetToken-v0", num_envs=num_envs, group_size=group_size, device="cpu")


def test_select_best_by_hand():
    values = torch.tensor([0.1, 0.9, 0.5, 0.3, -1.0, 2.0, 0.0, 1.0])
    assert select_best(values, 4, 1).tolist() == [1, 5]
    assert select_best(values, 4, 2).tolist() == [1, 2, 5, 7]
    assert select_best(values, 2, 1).tolist() == [1, 2, 5, 7]
    assert select_best(values, 4, 1, threshold=0.5).tolist() == [1, 2, 5, 7]
    assert select_best(values, 4, 1, threshold=5.0).tolist() == []


def perturbed_agent(**config):
    """An agent whose policy differs from pi_ref, so every completion's return (score - beta * KL) is distinct."""
    agent = RFT(diagnostic_env(num_envs=16, group_size=4), **config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in agent.policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return agent


@pytest.mark.parametrize("keep_top", [1, 2])
def test_rft_gradient_matches_a_float64_reference(keep_top):
    """Kept completions chosen by plain loops; their mean token NLL replayed one episode at a time in float64."""
    agent = perturbed_agent(keep_top=keep_top)
    rollout = agent.collect()
    copies = float64_copies(agent)
    recorder = GradientRecorder(agent)
    agent.update(rollout)

    eps = episodes(rollout)
    returns = [sum(rewards) for _, _, rewards in eps]
    kept = []
    for g in range(0, len(eps), 4):
        kept += sorted(range(g, g + 4), key=lambda i: returns[i], reverse=True)[:keep_top]
    tokens = sum(len(eps[i][1]) for i in kept)
    nll = sum(-unpadded_forward64(copies["policy"], eps[i][0], eps[i][1])[0].sum() for i in kept) / tokens
    nll.backward()
    assert len(recorder.grads) == 1
    assert_gradients_match(recorder.grads[0], copies)


def test_rft_minibatch_gradients_match_a_float64_reference():
    """With several minibatches each step's gradient is the mean token NLL of its own kept completions."""
    agent = perturbed_agent(keep_top=2, num_minibatches=2)
    rollout = agent.collect()
    copies = float64_copies(agent)
    recorder = GradientRecorder(agent)
    order = []
    real_select = rollout.select

    def spy(idx):
        order.append(idx.tolist())
        return real_select(idx)

    rollout.select = spy
    agent.update(rollout)
    eps = episodes(rollout)
    returns = [sum(rewards) for _, _, rewards in eps]
    best = {i for g in range(0, len(eps), 4) for i in sorted(range(g, g + 4), key=lambda i: returns[i])[-2:]}
    assert len(order) == 2 and sorted(order[0] + order[1]) == sorted(best)
    for step, idx in enumerate(order):
        for p in copies["policy"].parameters():
            p.grad = None
        tokens = sum(len(eps[i][1]) for i in idx)
        nll = sum(-unpadded_forward64(copies["policy"], eps[i][0], eps[i][1])[0].sum() for i in idx) / tokens
        nll.backward()
        assert_gradients_match(recorder.grads[step], copies)


def test_rft_reaches_90_percent_of_the_exact_optimum():
    torch.manual_seed(0)
    venv = diagnostic_env()
    agent = AGENTS["rft"](venv, learning_rate=3e-3, seed=1)
    start = exact_return(agent.policy, venv)
    agent.learn(30_000, progress=False)
    end = exact_return(agent.policy, venv)
    assert start / venv.optimal_return < 0.5
    assert end / venv.optimal_return >= 0.9, f"RFT reached {end / venv.optimal_return:.1%} of the optimum"


def test_rft_threshold_keeps_nothing_without_a_step_and_resumes_exactly(tmp_path):
    agent = RFT(diagnostic_env(num_envs=16, group_size=1), threshold=10.0)
    before = {k: v.clone() for k, v in agent.policy.state_dict().items()}
    metrics = agent.update(agent.collect())
    assert metrics == {"rft/kept_fraction": 0.0}
    assert all(torch.equal(v, agent.policy.state_dict()[k]) for k, v in before.items())

    def fresh():
        return RFT(diagnostic_env(num_envs=16, group_size=4), learning_rate=1e-2, update_epochs=2)

    straight = fresh()
    straight.learn(4 * 16 * 6, progress=False)
    first = fresh()
    first.learn(2 * 16 * 6, progress=False)
    first.save(tmp_path / "ckpt")
    resumed = fresh().load(tmp_path / "ckpt")
    resumed.learn(4 * 16 * 6, progress=False)
    for key, value in straight.policy.state_dict().items():
        assert torch.equal(value, resumed.policy.state_dict()[key]), key


def test_rft_bad_settings():
    with pytest.raises(ValueError, match="group_size > keep_top"):
        RFT(diagnostic_env(num_envs=8, group_size=1))
    with pytest.raises(ValueError, match="group_size > keep_top"):
        RFT(diagnostic_env(num_envs=8, group_size=2), keep_top=2)
    with pytest.raises(ValueError, match=r"rank_by must be one of \['return', 'score'\]"):
        RFT(diagnostic_env(num_envs=8, group_size=2), rank_by="kl")
    with pytest.raises(ValueError, match="keep_top must be >= 1"):
        RFT(diagnostic_env(num_envs=8, group_size=2), keep_top=0)
