"""Stable-Baselines3 against lmgym: plain policies, the VecEnv bridge, and the transformer policy."""

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.callbacks import CheckpointCallback, EvalCallback
from stable_baselines3.common.vec_env import VecMonitor

from lmgym.agents.sb3 import LMGymVecEnv, LMPolicy, bind_sb3_model, evaluate_return, lm_policy_kwargs
from lmgym.tasks.diagnostic import TargetCount, reference_model

from conftest import slow_ref_logprob


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
    model = PPO(LMPolicy, env, policy_kwargs=lm_policy_kwargs(lm, env=env), n_steps=32, batch_size=128,
                learning_rate=3e-3, seed=0)
    after_init = model.policy.lm.state_dict()
    assert all(torch.equal(before[k], after_init[k]) for k in before)  # no orthogonal re-initialisation
    assert venv.core.policy_fn is not None  # bound: the KL term uses the policy's own log-probs
    start = evaluate_return(model, gym.make("lmgym/TargetToken-v0"), 100)
    model.learn(6000)
    end = evaluate_return(model, gym.make("lmgym/TargetToken-v0"), 100)
    assert end["score"] > start["score"] + 0.3, (start, end)
    assert end["return"] > start["return"] + 0.15, (start, end)


def test_lm_policy_model_saves_loads_and_works_with_sb3_callbacks(tmp_path):
    venv = gym.make_vec("lmgym/TargetToken-v0", num_envs=4, device="cpu")
    env = VecMonitor(LMGymVecEnv(venv, seed=0))
    model = PPO(LMPolicy, env, policy_kwargs=lm_policy_kwargs(copy.deepcopy(venv.reference_model), env=env),
                n_steps=8, batch_size=32, seed=0)
    eval_env = VecMonitor(LMGymVecEnv(gym.make_vec("lmgym/TargetToken-v0", num_envs=2, device="cpu"), seed=1))
    callbacks = [CheckpointCallback(save_freq=8, save_path=str(tmp_path / "checkpoints")),
                 EvalCallback(eval_env, eval_freq=8, n_eval_episodes=4, best_model_save_path=str(tmp_path / "best"))]
    model.learn(64, callback=callbacks)  # the policy has run forward with output_hidden_states by now
    assert (tmp_path / "checkpoints" / "rl_model_64_steps.zip").is_file()
    assert (tmp_path / "best" / "best_model.zip").is_file()
    model.save(tmp_path / "model.zip")
    with pytest.warns(UserWarning, match="bind the loaded model again"):
        loaded = PPO.load(tmp_path / "model.zip", env=env)
    obs = env.reset()
    probs = [m.policy.get_distribution(m.policy.obs_to_tensor(obs)[0]).distribution.probs for m in (model, loaded)]
    torch.testing.assert_close(probs[0], probs[1], rtol=0, atol=0)  # the trained weights, not a fresh model
    assert loaded.policy.lm is not model.policy.lm
    venv.bind_policy(None)
    bind_sb3_model(env, loaded)
    venv.reset(seed=0)
    *_, info = venv.step(np.array([1, 2, 3, 0]))
    torch.testing.assert_close(info["logprob"], probs[1][torch.arange(4), torch.tensor([1, 2, 3, 0])].log())


def single_prompt_target_env():
    """TargetToken on the prompt "b" alone, so every deterministic policy has one episode to compute by hand."""
    model, tok = reference_model()
    return gym.make("lmgym/TextGen-v0", model=model, tokenizer=tok, reward_fn=TargetCount("a", 6), prompts=["b"],
                    max_new_tokens=6, kl_coef=0.05)


def hand_greedy_return(model, env) -> float:
    """score + beta * sum log pi_ref(a_t|s_t) of the greedy episode, log pi_ref from a float64 forward."""
    ref64 = copy.deepcopy(env.unwrapped.reference_model).double()
    obs, _ = env.unwrapped.reset(seed=0)
    ref_sum, done = 0.0, False
    while not done:
        ids = obs["input_ids"][obs["attention_mask"] == 1].tolist()
        action = int(model.predict(obs, deterministic=True)[0])
        ref_sum += slow_ref_logprob(ref64, ids, action)
        obs, _, term, trunc, info = env.unwrapped.step(action)
        done = term or trunc
    return info["score"] + env.unwrapped.kl_coef * ref_sum


def test_deterministic_return_is_that_of_the_greedy_policy_and_below_the_optimum():
    env = single_prompt_target_env()
    model = PPO("MultiInputPolicy", env, seed=0)
    with torch.no_grad():  # pi(a|s) = e / (e + 3) ~ 0.48 in every state: the greedy policy says "a a a a a a"
        model.policy.action_net.weight.zero_()
        model.policy.action_net.bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))
    result = evaluate_return(model, env, 3, deterministic=True)
    expected = hand_greedy_return(model, env)
    assert result["score"] == 1.0
    assert result["return"] == pytest.approx(expected, abs=1e-5)
    assert result["return"] <= env.unwrapped.optimal_return
    # The same greedy policy over TargetToken's three prompts: below the exact optimum as well.
    target = gym.make("lmgym/TargetToken-v0")
    assert evaluate_return(model, target, 30, deterministic=True)["return"] <= target.unwrapped.optimal_return
    # The stochastic policy's return counts its own log-probs, and is below the optimum too.
    assert evaluate_return(model, env, 50)["return"] < env.unwrapped.optimal_return


def test_dqn_deterministic_and_epsilon_greedy_log_probs():
    env = single_prompt_target_env()
    model = DQN("MultiInputPolicy", env, seed=0, learning_starts=0)
    assert evaluate_return(model, env, 2, deterministic=True)["return"] == pytest.approx(
        hand_greedy_return(model, env), abs=1e-5)
    model.exploration_rate = 0.3
    bind_sb3_model(env, model)
    obs, _ = env.unwrapped.reset(seed=0)
    q = model.q_net(model.policy.obs_to_tensor(obs)[0])[0]
    greedy = int(q.argmax())
    for action in (greedy, (greedy + 1) % 4):
        obs, _ = env.unwrapped.reset(seed=0)
        info = env.unwrapped.step(action)[-1]
        expected = np.log(0.3 / 4 + 0.7 * (action == greedy))
        assert info["logprob"] == pytest.approx(expected, abs=1e-6)
    assert evaluate_return(model, env, 5)["episodes"] == 5


def test_bridge_over_a_numpy_output_vector_env():
    torch_env, numpy_env = (LMGymVecEnv(gym.make_vec("lmgym/TargetToken-v0", num_envs=4, device="cpu", output=o),
                                        seed=0) for o in ("torch", "numpy"))
    np.testing.assert_array_equal(torch_env.reset()["input_ids"], numpy_env.reset()["input_ids"])
    for a in np.random.default_rng(0).integers(0, 4, size=(10, 4)):
        (obs_t, r_t, d_t, _), (obs_n, r_n, d_n, _) = torch_env.step(a), numpy_env.step(a)
        np.testing.assert_array_equal(obs_t["input_ids"], obs_n["input_ids"])
        np.testing.assert_array_equal(r_t, r_n)
        np.testing.assert_array_equal(d_t, d_n)


def _tensorboard_tags(folder) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_bench_sb3_runs_log_under_lmgym_tag_names(tmp_path):
    """sb3-ppo and lmgym's PPO write the shared metrics under the same TensorBoard tags, so runs overlay."""
    from lmgym.bench.grid import run

    run("lmgym/TargetToken-v0", "sb3-ppo", steps=160, device="cpu", logdir=tmp_path / "sb3", progress=False,
        eval_batches=1, overrides={"n_steps": 4, "batch_size": 32, "num_envs": 8})
    run("lmgym/TargetToken-v0", "ppo", steps=160, device="cpu", logdir=tmp_path / "ppo", progress=False,
        eval_batches=1, overrides={"num_envs": 8})
    sb3_tags, lmgym_tags = _tensorboard_tags(tmp_path / "sb3"), _tensorboard_tags(tmp_path / "ppo")
    shared = {"objective/scores", "objective/kl", "objective/return", "objective/kl_coef", "objective/entropy",
              "loss/policy", "loss/value", "policy/clipfrac", "policy/approxkl", "val/explained_variance",
              "charts/learning_rate", "charts/episode_length", "time/tokens_per_s"}
    assert shared <= lmgym_tags
    assert shared <= sb3_tags, shared - sb3_tags
    assert not {"train/policy_gradient_loss", "rollout/ep_rew_mean"} & sb3_tags  # mapped, not duplicated
    assert [p.name for p in (tmp_path / "sb3").iterdir() if p.is_dir()] == []  # one run folder, as lmgym's


@pytest.mark.slow
def test_readme_sb3_snippet_trains_as_written(tmp_path, monkeypatch):
    """docs/sb3.md's code block, run verbatim, reaches 90% of the exact optimum with both policies."""
    import pathlib
    import re

    monkeypatch.chdir(tmp_path)  # the snippet saves a file
    page = (pathlib.Path(__file__).parent.parent / "docs" / "sb3.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    namespace = {}
    exec(code, namespace)  # as written: the block imports what it needs
    optimum = namespace["venv"].optimal_return
    for name in ("mlp", "lm"):
        result = evaluate_return(namespace[name], gym.make("lmgym/TargetToken-v0"), 400)
        assert result["return"] / optimum >= 0.9, (name, result)
    assert (tmp_path / "lm_ppo.zip").is_file()
