"""The asynchronous collector (issue 24, item 1): lag 0 is the synchronous loop, lag k is exactly k, resume is exact."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from lmgym.agents import GRPO, NLPO, PPO, Reinforce
from lmgym.agents.common.config import ConfigError

STEPS = 3 * 16 * 3  # about 3 iterations of 16 TargetToken episodes


def make(cls, task="lmgym/TargetToken-v0", **overrides):
    torch.manual_seed(123)  # whatever the global RNG holds, the run depends only on the seed
    venv = gym.make_vec(task, num_envs=16, group_size=4, device="cpu")
    return cls(venv, seed=0, learning_rate=1e-2, **overrides)


def weights(agent):
    return {f"{m}.{k}": v.clone() for m, module in agent.trainable_modules().items()
            for k, v in module.state_dict().items()}


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.parametrize("cls,task,extra", [(GRPO, "lmgym/TargetToken-v0", {}), (PPO, "lmgym/TargetToken-v0", {}),
                                            (Reinforce, "lmgym/Guess-v0", {}),
                                            (NLPO, "lmgym/TargetToken-v0", {"mask_top_p": 0.9,
                                                                            "mask_update_every": 1})])
def test_max_lag_0_is_the_synchronous_loop(cls, task, extra):
    three = [lambda agent, metrics: agent.iteration < 3]  # stop after exactly 3 iterations
    sync = make(cls, task, **extra).learn(10**6, progress=False, callbacks=three)
    pipelined = make(cls, task, async_collect=True, max_lag=0, **extra).learn(10**6, progress=False,
                                                                            callbacks=three)
    assert sync.iteration == pipelined.iteration == 3
    assert_same_weights(sync, pipelined)


@pytest.mark.parametrize("cls,extra", [(GRPO, {}), (NLPO, {"mask_top_p": 0.9, "mask_update_every": 1})])
def test_lag_is_exact_and_the_run_reproducible(cls, extra):
    lags = []
    agent = make(cls, async_collect=True, max_lag=2, **extra)
    agent.learn(6 * 16 * 3, progress=False, callbacks=[lambda a, m: lags.append(m["off_policy/lag"])])
    assert lags[:4] == [0.0, 1.0, 2.0, 2.0]  # the pipeline fills, then every rollout is exactly 2 updates old
    again = make(cls, async_collect=True, max_lag=2, **extra).learn(6 * 16 * 3, progress=False)
    assert_same_weights(agent, again)


def test_what_was_sampled_ahead_is_redone_never_lost_or_counted_twice():
    """Prompts do not depend on the policy: after learn() the environment must stand exactly where the synchronous
    loop's does, the rollouts the thread sampled ahead rewound."""
    sync = make(GRPO).learn(STEPS, progress=False)
    pipelined = make(GRPO, async_collect=True, max_lag=2).learn(STEPS, progress=False)
    assert pipelined._collector is None
    assert pipelined.episodes == sync.episodes and pipelined.iteration == sync.iteration
    assert pipelined.env.core.rng.bit_generator.state == sync.env.core.rng.bit_generator.state
    assert pipelined.env.prompts == sync.env.prompts
    # learning on continues from there, and a second learn() call works the same way
    pipelined.learn(2 * STEPS, progress=False)
    assert pipelined.episodes == 16 * pipelined.iteration


def test_resume_is_exact_with_the_collector(tmp_path):
    settings = dict(async_collect=True, max_lag=1, checkpoint_every=2)
    straight = make(GRPO, **settings).learn(6 * 16 * 3, progress=False)
    first = make(GRPO, logdir=tmp_path / "run", **settings)
    first.learn(2 * 16 * 3, progress=False)
    assert first.iteration >= 2
    torch.manual_seed(999)
    resumed = make(GRPO, **settings).load(tmp_path / "run" / "checkpoints" / "iter-000002")
    resumed.learn(6 * 16 * 3, progress=False)
    assert resumed.iteration == straight.iteration and resumed.global_step == straight.global_step
    assert_same_weights(straight, resumed)


def test_evaluation_pauses_the_collector():
    agent = make(GRPO, async_collect=True, max_lag=1)
    seen = []

    def evaluate(a, metrics):
        seen.append(a.evaluate(num_batches=1)["episodes"])

    agent.learn(STEPS, progress=False, callbacks=[evaluate])
    assert seen and all(n == 16 for n in seen)
    assert agent.episodes == 16 * agent.iteration


def test_collector_refusals():
    class OwnBatches(Reinforce):
        def training_batch(self):
            raise AssertionError("never called")

    with pytest.raises(ConfigError, match="OwnBatches trains on batches of its own"):
        make(OwnBatches, async_collect=True)
    agent = make(GRPO, async_collect=True, max_lag=1)
    assert agent.sampler_policy is not agent.policy  # the thread samples with weights of its own


class Broken(GRPO):
    def sample(self, query_ids, query_mask):
        from lmgym.agents.common.update import TrainingError

        raise TrainingError("sampler broke")


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_a_failure_in_the_sampler_reaches_the_training_loop_as_itself(backend):
    from lmgym.agents.common.update import TrainingError

    agent = make(Broken, async_collect=True, max_lag=1, async_backend=backend)
    with pytest.raises(TrainingError, match="sampler broke"):  # the same exception, one line, from either backend
        agent.learn(STEPS, progress=False)
    assert agent._collector is None


def test_settings_the_collector_cannot_honour_are_refused_in_one_line():
    agent = make(GRPO, async_collect=True, max_lag=1)
    agent.sample = lambda *args: None  # an engine sampler installed on the instance reads the live policy
    with pytest.raises(ConfigError, match="sample\\(\\) was replaced on the instance"):
        agent.learn(STEPS, progress=False)
    late = make(GRPO)
    late.config.async_collect = True  # its sampler and generators were set up for the synchronous loop
    with pytest.raises(ConfigError, match="changed after the agent was built"):
        late.learn(STEPS, progress=False)
    with pytest.raises(ConfigError, match="adaptive KL controller"):
        make(PPO, async_collect=True, async_backend="thread", adaptive_kl=True)
    make(PPO, async_collect=True, async_backend="process", adaptive_kl=True)  # its own environment: allowed


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_weights_loaded_before_learning_are_the_ones_sampled(backend, tmp_path):
    """A weights-only load changes the policy at iteration 0: the collector must sample with it, as collect() does."""
    donor = make(GRPO).learn(STEPS, progress=False)
    donor.save(tmp_path / "trained")
    three = [lambda agent, metrics: agent.iteration < 3]
    sync = make(GRPO).load(tmp_path / "trained", resume=False).learn(10**6, progress=False, callbacks=three)
    pipelined = make(GRPO, async_collect=True, max_lag=0, async_backend=backend).load(
        tmp_path / "trained", resume=False).learn(10**6, progress=False, callbacks=three)
    assert_same_weights(sync, pipelined)


def test_rollout_policy_versions_are_recorded():
    agent = make(GRPO, async_collect=True, max_lag=1)
    versions = []
    original = agent.update

    def spy(rollout):
        versions.append((agent.iteration, rollout.policy_version))
        return original(rollout)

    agent.update = spy
    agent.learn(STEPS, progress=False)
    assert versions[0] == (0, 0)
    assert all(v == it - 1 for it, v in versions[1:])
    assert np.all(np.diff([v for _, v in versions]) >= 0)


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_both_backends_stop_and_resume_like_the_synchronous_loop(backend):
    """max_lag 0 with a stop in the middle (an evaluation, then more training): still the synchronous run."""
    def run(**settings):
        agent = make(GRPO, **settings)
        agent.learn(10**6, progress=False, callbacks=[lambda a, m: a.iteration < 2])
        agent.evaluate(num_batches=1)
        agent.learn(10**6, progress=False, callbacks=[lambda a, m: a.iteration < 4])
        return agent

    sync, pipelined = run(), run(async_collect=True, max_lag=0, async_backend=backend)
    assert sync.iteration == pipelined.iteration == 4
    assert_same_weights(sync, pipelined)
    assert pipelined.env.core.rng.bit_generator.state == sync.env.core.rng.bit_generator.state


def test_the_process_backend_is_refused_off_the_cpu():
    from types import SimpleNamespace

    from lmgym.agents.common.collector import collector_backend

    stub = SimpleNamespace(config=SimpleNamespace(async_backend="process"), device=torch.device("cuda"))
    with pytest.raises(ConfigError, match="cannot use cuda"):
        collector_backend(stub)
