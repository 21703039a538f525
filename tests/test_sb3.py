"""Stable-Baselines3 against lmgym: plain policies, the VecEnv bridge, and the transformer policy."""

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.vec_env import VecMonitor

from lmgym.agents.sb3 import LMGymVecEnv, LMPolicy, evaluate_return


def bridge(num_envs=16, seed=0, task="lmgym/TargetToken-v0"):
    return LMGymVecEnv(gym.make_vec(task, num_envs=num_envs, device="cpu"), seed=seed)


def test_plain_sb3_ppo_reaches_80_percent_of_the_optimum():
    env = VecMonitor(bridge())
    optimum = env.venv.venv.optimal_return
    # Without a bound policy the reward is kl_coef * log pi_ref: ent_coef = kl_coef recovers the objective.
    model = PPO("MultiInputPolicy", env, ent_coef=0.05, n_steps=64, batch_size=256, learning_rate=1e-3, seed=0)
    start = evaluate_return(model, gym.make("lmgym/TargetToken-v0"), 100)["return"]
    model.learn(12_000)
    end = evaluate_return(model, gym.make("lmgym/TargetToken-v0"), 200)["return"]
    assert start / optimum < 0.5
    assert end / optimum >= 0.8, f"reached {end / optimum:.1%}"
    assert len(model.ep_info_buffer) > 0  # VecMonitor's episode statistics reach SB3's logger


def test_a2c_and_a_single_env_train_out_of_the_box():
    model = A2C("MultiInputPolicy", gym.make("lmgym/Copy-v0"), ent_coef=0.05, seed=0)
    model.learn(200)
    model = PPO("MultiInputPolicy", gym.make("lmgym/Sort-v0"), n_steps=64, batch_size=32, seed=0)
    model.learn(128)


def test_bridge_terminal_observation_is_the_real_last_observation():
    env = bridge(num_envs=4)
    obs = env.reset()
    gen = np.random.default_rng(0)
    seen_end = 0
    for _ in range(30):
        actions = gen.integers(0, 4, size=4)
        prev = obs
        obs, rewards, dones, infos = env.step(actions)
        assert rewards.dtype == np.float32 and dones.dtype == bool and len(infos) == 4
        for i in np.flatnonzero(dones):
            last = infos[i]["terminal_observation"]
            n = int(prev["attention_mask"][i].sum())
            # The last observation is the previous state plus the action just taken.
            assert last["attention_mask"].sum() == n + 1
            assert last["input_ids"][n] == actions[i]
            np.testing.assert_array_equal(last["input_ids"][:n], prev["input_ids"][i][:n])
            assert infos[i]["TimeLimit.truncated"] == (actions[i] != 0)
            # The returned observation is the first of the next episode: the prompt alone.
            assert obs["attention_mask"][i].sum() == 1
            seen_end += 1
    assert seen_end >= 4


def test_partial_reset_restarts_only_masked_envs():
    venv = gym.make_vec("lmgym/TargetToken-v0", num_envs=3, device="cpu")
    venv.reset(seed=0)
    venv.step(np.array([1, 2, 3]))
    obs, _ = venv.reset(options={"reset_mask": np.array([True, False, False])})
    assert obs["attention_mask"].sum(1).tolist() == [1, 2, 2]
    with pytest.raises(ValueError, match="reset_mask must have 3"):
        venv.reset(options={"reset_mask": [True]})


def test_transformer_policy_keeps_weights_and_improves_the_score():
    venv = gym.make_vec("lmgym/TargetToken-v0", num_envs=16, device="cpu")
    lm = copy.deepcopy(venv.reference_model)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    env = LMGymVecEnv(venv, seed=0)
    model = PPO(LMPolicy, env, policy_kwargs=dict(model=lm, env=env), n_steps=32, batch_size=128,
                learning_rate=3e-3, seed=0)
    after_init = model.policy.lm.state_dict()
    assert all(torch.equal(before[k], after_init[k]) for k in before)  # no orthogonal re-initialisation
    assert venv.core.policy_fn is not None  # bound: the KL term uses the policy's own log-probs
    start = evaluate_return(model, gym.make("lmgym/TargetToken-v0"), 100)
    model.learn(6000)
    end = evaluate_return(model, gym.make("lmgym/TargetToken-v0"), 100)
    assert end["score"] > start["score"] + 0.3, (start, end)
    assert end["return"] > start["return"] + 0.15, (start, end)
