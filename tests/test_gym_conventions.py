"""The Gymnasium and Stable-Baselines3 conventions users rely on: make_vec_env, vector wrappers, time limits."""

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.env_util import make_vec_env

from lmgym.tasks import DIAGNOSTIC_IDS, LANGUAGE_IDS, MULTI_TURN_IDS

from conftest import PROMPTS, ZOO_STEPS, count_good

pytestmark = pytest.mark.compat  # also run on the oldest declared torch and transformers (.ci/run)


def task_kwargs(env_id, tiny):
    """What an id needs beyond its defaults here: TextGen-v0 has no model of its own; language tasks build
    their zoo model at the reduced test size."""
    if env_id == "lmgym/TextGen-v0":
        return dict(model=tiny[0], tokenizer=tiny[1], reward_fn=count_good, prompts=PROMPTS, max_new_tokens=4)
    if env_id in LANGUAGE_IDS:
        return dict(zoo_steps=ZOO_STEPS)
    return {}


# Every diagnostic id, and one language id: the language tasks share one entry point and differ only in
# their zoo model, which takes long to build (the language-task tests check each one's env).
COVERED = ["lmgym/TextGen-v0", *DIAGNOSTIC_IDS, *MULTI_TURN_IDS, "lmgym/Arithmetic-v0"]


def test_every_registered_entry_point_is_covered():
    lmgym_ids = [k for k in gym.registry if k.startswith("lmgym/")]
    assert set(lmgym_ids) == {"lmgym/TextGen-v0", *DIAGNOSTIC_IDS, *MULTI_TURN_IDS, *LANGUAGE_IDS}
    entry_points = {gym.spec(k).entry_point for k in lmgym_ids}
    assert entry_points == {gym.spec(k).entry_point for k in COVERED}


@pytest.mark.parametrize("env_id", COVERED)
def test_sb3_make_vec_env_builds_and_steps_every_id(env_id, tiny):
    # SB3 first asks for render_mode="rgb_array" and falls back to no render mode on a TypeError.
    venv = make_vec_env(env_id, n_envs=2, seed=0, env_kwargs=task_kwargs(env_id, tiny))
    obs = venv.reset()
    assert obs["input_ids"].shape[0] == 2
    ended = 0
    for _ in range(12):
        obs, rewards, dones, infos = venv.step(np.array([venv.action_space.sample() for _ in range(2)]))
        assert rewards.shape == (2,) and np.isfinite(rewards).all()
        ended += sum("episode" in i for i in infos)  # SB3's Monitor saw whole episodes
    assert ended >= 1
    assert venv.get_attr("render_mode") == [None, None]


def test_unsupported_render_mode_is_refused_clearly():
    with pytest.raises(TypeError, match="render_mode='rgb_array' is not supported; use None or 'ansi'"):
        gym.make("lmgym/TargetToken-v0", render_mode="rgb_array")
    with pytest.raises(ValueError):  # the value is what is wrong, so it is a ValueError too
        gym.make("lmgym/TargetToken-v0", render_mode="human")
    env = gym.make("lmgym/TargetToken-v0", render_mode="ansi")
    env.reset(seed=0)
    env.unwrapped.step(1)
    assert env.render().endswith("| a")


def test_a_time_limit_shorter_than_the_horizon_is_refused():
    """A TimeLimit cuts episodes before the step that adds the score: refused, pointing to max_new_tokens."""
    from gymnasium.wrappers import TimeLimit

    with pytest.raises(ValueError, match="max_new_tokens=3 instead"):
        gym.make("lmgym/TargetToken-v0", max_episode_steps=3).reset(seed=0)
    with pytest.raises(ValueError, match="TimeLimit of 2 steps"):
        TimeLimit(gym.make("lmgym/Copy-v0"), 2).reset(seed=0)
    with pytest.raises(ValueError, match="TimeLimit of 3 steps"):  # also under SB3's Monitor and DummyVecEnv
        make_vec_env("lmgym/TargetToken-v0", n_envs=1, wrapper_class=TimeLimit,
                     wrapper_kwargs=dict(max_episode_steps=3)).reset()
    with pytest.raises(TypeError, match="max_new_tokens instead"):
        gym.make_vec("lmgym/TargetToken-v0", num_envs=2, max_episode_steps=3)
    # A limit at or above the horizon never cuts an episode: allowed, and episodes end with their score.
    env = gym.make("lmgym/TargetToken-v0", max_episode_steps=6)
    env.reset(seed=0)
    done = False
    while not done:
        _, _, term, trunc, info = env.step(1)
        done = term or trunc
    assert info["score"] == 1.0
    # The shorter horizon, asked for the right way, keeps the score.
    env = gym.make("lmgym/TargetToken-v0", max_new_tokens=3)
    env.reset(seed=0)
    *_, info = [env.step(1) for _ in range(3)][-1]
    assert info["score"] == 1.0


def test_step_with_logprob_through_gym_make():
    """gym.make returns the environment itself, so the policy's log-prob can be handed over with the action."""
    env = gym.make("lmgym/TargetToken-v0")
    assert env is env.unwrapped
    env.reset(seed=0)
    _, reward, _, _, info = env.step(1, logprob=-0.25)
    beta = env.unwrapped.kl_coef
    assert reward == pytest.approx(-beta * (-0.25 - info["ref_logprob"]), abs=1e-6)
    assert info["kl"] == pytest.approx(-0.25 - info["ref_logprob"], abs=1e-6)
    # The environment still enforces the order of calls itself.
    from lmgym.envs.core import EpisodeError

    with pytest.raises(EpisodeError, match="call reset"):
        gym.make("lmgym/TargetToken-v0").step(1)
    # Gymnasium's passive checker is there for whoever asks for it.
    checked = gym.make("lmgym/TargetToken-v0", disable_env_checker=False)
    checked.reset(seed=0)
    checked.step(1)


def test_numpy_output_runs_gymnasium_vector_wrappers():
    """output="numpy": one batched env whose reset/step return numpy, so Gymnasium's vector wrappers work."""
    from gymnasium.wrappers.vector import FlattenObservation, NormalizeReward, RecordEpisodeStatistics

    n, steps = 4, 20
    actions = np.random.default_rng(0).integers(0, 4, size=(steps, n))
    reference = gym.make_vec("lmgym/TargetToken-v0", num_envs=n, device="cpu")  # torch output, the default
    venv = gym.make_vec("lmgym/TargetToken-v0", num_envs=n, device="cpu", output="numpy")
    env = NormalizeReward(FlattenObservation(RecordEpisodeStatistics(venv)), gamma=1.0)
    vocab, length = 4, venv.core.max_len
    obs, _ = env.reset(seed=0)
    reference.reset(seed=0)
    assert isinstance(obs, np.ndarray) and obs.shape == (n, length * vocab + length)  # one-hot ids + mask
    returns, raw_returns, prev_done = np.zeros(n), [], np.zeros(n, dtype=bool)
    for a in actions:
        obs, reward, term, trunc, info = env.step(a)
        _, ref_reward, ref_term, ref_trunc, _ = reference.step(a)
        assert isinstance(reward, np.ndarray) and np.isfinite(reward).all()
        np.testing.assert_array_equal(term, ref_term.numpy())
        returns = np.where(prev_done, 0.0, returns + ref_reward.numpy())  # a NEXT_STEP reset step counts nothing
        prev_done = term | trunc
        if "episode" in info:
            done = info["_episode"]
            np.testing.assert_allclose(info["episode"]["r"][done], returns[done], rtol=1e-5)
            raw_returns += list(returns[done])
    assert len(raw_returns) >= n
    with pytest.raises(ValueError, match="output must be 'torch' or 'numpy'"):
        gym.make_vec("lmgym/TargetToken-v0", num_envs=2, output="pandas")
