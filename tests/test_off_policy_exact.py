"""The exact-enumeration gradients of the off-policy verdict against autograd of the enumerated objective."""

import copy

import gymnasium as gym
import pytest
import torch

from lmgym.agents.common.off_policy import CORRECTIONS
from lmgym.bench.off_policy_exact import Enumeration, expected_gradient, relative_bias, true_gradient


@pytest.fixture(scope="module")
def setup():
    venv = gym.make_vec("lmgym/TargetToken-v0", num_envs=1, device="cpu")
    reference = copy.deepcopy(venv.reference_model).double().eval()
    torch.manual_seed(0)
    policy = copy.deepcopy(reference).requires_grad_(True)
    with torch.no_grad():  # a policy some way from the reference, so the KL and its gradient are not 0
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    behaviour = copy.deepcopy(policy)
    with torch.no_grad():
        for p in behaviour.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return Enumeration(venv), policy, behaviour, reference


def test_the_enumeration_is_every_completion(setup):
    enum = setup[0]
    for _, _, tokens, mask, scores in enum.prompts:
        assert len(tokens) == sum(3 ** k for k in range(6)) + 3 ** 6 == 1093
        assert len({tuple(row[m > 0].tolist()) for row, m in zip(tokens, mask)}) == 1093
    with torch.no_grad():
        probabilities = enum.logprobs(setup[1], 0).sum(1).exp().sum()
    assert abs(float(probabilities) - 1.0) < 1e-12  # the completions' probabilities sum to 1


@pytest.mark.parametrize("form", ["ppo", "grpo"])
@pytest.mark.parametrize("correction", CORRECTIONS)
def test_on_policy_every_correction_is_the_true_gradient(setup, form, correction):
    enum, policy, _, reference = setup
    truth = true_gradient(enum, policy, reference)
    estimate = expected_gradient(enum, policy, copy.deepcopy(policy), reference, form=form, correction=correction)
    bias, cosine = relative_bias(estimate, truth)
    # 1e-5, not float64's 1e-15: Llama's RMSNorm computes in float32 inside a float64 model, so every gradient
    # carries float32 rounding (sum_a pi(a|s) grad log pi(a|s), exactly 0 in theory, comes out at 3e-7 here)
    assert bias < 1e-5 and cosine > 1 - 1e-9, (bias, cosine)


def test_off_policy_the_uncorrected_gradient_is_biased_and_sequence_is_closer_than_none(setup):
    enum, policy, behaviour, reference = setup
    truth = true_gradient(enum, policy, reference)
    none, _ = relative_bias(expected_gradient(enum, policy, behaviour, reference, form="grpo", correction="none"),
                            truth)
    assert none > 0.05
