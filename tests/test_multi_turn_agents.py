"""Agents on multi-turn episodes: the environment's tokens count for nothing.

For every agent that collects episodes, one update on a multi-turn rollout is run twice: once as it is, and
once with absurd numbers on the environment's tokens, in the rollout (sampling and reference log-probs, KL)
and in everything the update's forward computes there (log-probs, entropies, hidden states, hence values).
The losses and the weights after the update must be the same. Then the collector's contract: the rollout's
mask is the policy's tokens, its returns are turn rewards + score - beta * KL, and GAE steps over policy
tokens only (checked against a slow loop over the compacted steps).
"""

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch

import lmgym  # noqa: F401
from lmgym.agents import AGENTS

pytestmark = pytest.mark.compat  # also run on the oldest declared torch and transformers (.ci/run)

ONLINE = ["ppo", "a2c", "grpo", "reinforce", "rloo", "rft", "online-dpo", "nlpo"]
GROUPED = {"grpo", "rloo", "rft", "online-dpo"}
# Absurd but finite, and inconsistent with each other (so no difference of two of them cancels): a masked loss
# multiplies them by 0, which an infinity would turn into NaN even in a correct update.
FORWARD_SHIFT, ROLLOUT = -20.0, {"logprobs": -3.0, "ref_logprobs": -25.0, "kl": 1e3}


def make(name, **overrides):
    venv = gym.make_vec("lmgym/Echo-v0" if name != "rft" else "lmgym/Guess-v0", num_envs=8,
                        group_size=4 if name in GROUPED else 1, device="cpu")
    kwargs = dict(seed=0, learning_rate=1e-2, **overrides)
    if name in ("ppo", "nlpo", "grpo", "reinforce", "rloo", "rft"):
        kwargs.update(num_minibatches=2)
    if name == "nlpo":
        kwargs.update(mask_top_p=0.9)
    return AGENTS[name](venv, **kwargs)


def env_positions(batch):
    steps = batch.tokens.shape[1]
    positions = torch.arange(1, steps + 1)
    last = ((batch.mask > 0) * positions).amax(1)  # an episode ends on a policy token
    return (positions[None] <= last[:, None]) & (batch.mask == 0)


def corrupt_forward(module):
    """Wrap ``policy_forward`` in ``module`` so its outputs on the environment's tokens are absurd."""
    original = module.policy_forward

    def absurd(model, batch, **kwargs):
        logprobs, entropy, hidden = original(model, batch, **kwargs)
        env = env_positions(batch)
        logprobs = torch.where(env, logprobs + FORWARD_SHIFT, logprobs)
        entropy = torch.where(env, entropy + 1e3, entropy)
        if hidden is not None:  # the values read there become absurd too
            hidden = torch.where(env[..., None], hidden * 100 + 100, hidden)
        return logprobs, entropy, hidden

    return original, absurd


def corrupted(rollout):
    out = copy.copy(rollout)
    env = env_positions(rollout)
    for name, value in ROLLOUT.items():
        setattr(out, name, torch.where(env, torch.full_like(getattr(rollout, name), value), getattr(rollout, name)))
    return out


VARIANTS = [(name, {}) for name in ONLINE] + [
    ("ppo", {"turn_level": True}), ("ppo", {"kl_placement": "loss", "kl_estimator": "k3"}),
    ("grpo", {"turn_level": True}), ("grpo", {"loss_type": "bnpo"}), ("grpo", {"loss_type": "dr_grpo"}),
    ("grpo", {"loss_type": "dapo", "kl_placement": "reward"}), ("grpo", {"leave_one_out": True, "turn_level": True}),
    ("grpo", {"importance_sampling_level": "sequence"}), ("reinforce", {"turn_level": True}),
    ("rloo", {"turn_level": True, "kl_placement": "loss"}), ("a2c", {"advantage": "n_step", "n_steps": 2}),
    ("grpo", {"turn_level": True, "turn_baseline_level": "episode"}),
    ("rloo", {"turn_level": True, "turn_baseline_level": "episode"}),
]


@pytest.mark.parametrize("name, options", VARIANTS, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}"
                                                         for n, o in VARIANTS])
def test_environment_tokens_change_no_loss_and_no_gradient(name, options, monkeypatch):
    import importlib

    rollout = make(name, **options).collect()
    plain, absurd = make(name, **options), make(name, **options)  # equal weights and random streams
    assert bool(env_positions(rollout).any())  # the batch does hold environment tokens
    module = importlib.import_module(type(absurd).__module__)
    targets = [m for m in {module, importlib.import_module("lmgym.agents.ppo"),
                           importlib.import_module("lmgym.agents.common.base")} if hasattr(m, "policy_forward")]
    metrics_plain = plain.update(rollout)
    for m in targets:
        _, wrapped = corrupt_forward(m)
        monkeypatch.setattr(m, "policy_forward", wrapped)
    metrics_absurd = absurd.update(corrupted(rollout))
    for key, value in metrics_plain.items():
        assert metrics_absurd[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for (k, p), q in zip(plain.policy.state_dict().items(), absurd.policy.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)


def test_the_rollout_holds_policy_tokens_in_its_mask_and_the_episode_sums():
    agent = make("ppo")
    rollout = agent.collect()
    env = agent.env
    # every row: policy tokens alternate with the environment's one-word replies (one-token turns)
    for row in range(len(rollout)):
        k = int(rollout.lengths[row])
        mask = rollout.mask[row, :k].tolist()
        assert mask == [1.0, 0.0] * (k // 2) + [1.0] * (k % 2)
    # rewards: 0 on the environment's tokens; sums = turn rewards + score - beta * KL over policy tokens
    assert bool((rollout.rewards[env_positions(rollout)] == 0).all())
    beta = env.kl_coef
    expected = rollout.scores - beta * rollout.kl.sum(1)
    torch.testing.assert_close(rollout.returns, expected, rtol=0, atol=1e-5)
    assert rollout.steps == int(rollout.mask.sum())


def test_gae_steps_over_policy_tokens_only():
    from lmgym.agents.ppo import gae

    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 0, 0, 1, 1, 0, 1, 0, 0], [1, 1, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    rewards = torch.randn(mask.shape, generator=g) * mask
    values = torch.randn(mask.shape, generator=g)
    gamma, lam = 0.9, 0.8
    got = gae(rewards, values, mask, gamma, lam)
    for row in range(2):
        steps = [t for t in range(mask.shape[1]) if mask[row, t]]
        adv, expected = 0.0, {}
        for i in reversed(range(len(steps))):
            t = steps[i]
            next_v = float(values[row, steps[i + 1]]) if i + 1 < len(steps) else 0.0
            delta = float(rewards[row, t]) + gamma * next_v - float(values[row, t])
            adv = delta + gamma * lam * adv
            expected[t] = adv
        for t in range(mask.shape[1]):
            assert float(got[row, t]) == pytest.approx(expected.get(t, 0.0), abs=1e-6)


def test_turn_level_credit_gives_each_turn_its_own_return():
    """REINFORCE with turn_level: each token weighs by the return from its own turn on (checked by hand on a
    rollout), and its update differs from the episode-level one."""
    from lmgym.agents.common.turns import per_token, turn_returns

    agent = make("reinforce", turn_level=True, baseline="none")
    rollout = agent.collect()
    returns, present = turn_returns(rollout, rollout.rewards)
    token = per_token(returns, rollout)
    for row in range(len(rollout)):
        k = int(rollout.lengths[row])
        rewards = rollout.rewards[row, :k].tolist()
        turns = rollout.turn_index[row, :k].tolist()
        for t in range(k):
            if turns[t] < 0:
                continue
            first = turns.index(turns[t])
            assert float(token[row, t]) == pytest.approx(sum(rewards[first:]), abs=1e-6)
    other = make("reinforce", baseline="none")
    plain, level = other.update(rollout), agent.update(rollout)
    assert plain["loss/policy"] != pytest.approx(level["loss/policy"])


@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_turn_level_options_train(name):
    agent = make(name, turn_level=True)
    before = agent.evaluate(2)["return"]
    agent.learn(1000, progress=False)  # a few iterations: the options run end to end
    assert np.isfinite(agent.evaluate(2)["return"]) and before is not None


def test_multi_turn_refuses_data_parallel_launches(monkeypatch):
    from lmgym.agents.common.config import ConfigError
    from lmgym.agents.scale import distributed

    class Active:
        active, rank, world_size = True, 0, 2

    monkeypatch.setattr(distributed.DataParallel, "from_environment", staticmethod(lambda device: Active()))
    with pytest.raises(ConfigError, match="multi-turn environments train in one process"):
        make("ppo")


def test_an_agent_with_its_own_sampler_is_refused_not_silently_resampled():
    from lmgym.agents.common.config import ConfigError
    from lmgym.agents.scale.vllm import use_engine

    agent = make("grpo")
    agent.sample = lambda query_ids, query_mask: None  # e.g. an engine installed on the instance
    with pytest.raises(ConfigError, match="multi-turn episodes cannot use"):
        agent.collect()
    with pytest.raises(ValueError, match="use_engine does not apply"):
        use_engine(make("grpo"), engine=None)


def test_rloo_turn_level_against_the_episode_baseline_by_hand():
    """RLOO with turn_baseline_level="episode": a token of turn k weighs by G_k minus the mean episode return of
    the group's other episodes (a loop over rows, from the rollout's rewards)."""
    from lmgym.agents.common.base import policy_forward

    venv = gym.make_vec("lmgym/Echo-v0", num_envs=8, group_size=4, device="cpu")
    agent = AGENTS["rloo"](venv, seed=0, num_minibatches=1, turn_level=True, turn_baseline_level="episode")
    rollout = agent.collect()
    with torch.no_grad():
        logprobs, _, _ = policy_forward(agent.policy, rollout, sampling=agent.sampling)
    episode = rollout.rewards.sum(1).tolist()
    expected = 0.0
    for row in range(len(rollout)):
        group = range(row - row % 4, row - row % 4 + 4)
        baseline = np.mean([episode[j] for j in group if j != row])
        k = int(rollout.lengths[row])
        rewards, turns = rollout.rewards[row, :k].tolist(), rollout.turn_index[row, :k].tolist()
        for t in range(k):
            if turns[t] >= 0:
                from_turn = sum(rewards[turns.index(turns[t]):])
                expected -= (from_turn - baseline) * float(logprobs[row, t]) / len(rollout)
    assert agent.update(rollout)["loss/policy"] == pytest.approx(expected, rel=1e-5)
