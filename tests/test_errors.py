"""Every failure a user can cause gets a clear error that names the problem."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from lmgym import EpisodeError, RewardError, TextGenEnv, TextGenVectorEnv

from conftest import PROMPTS, count_good


def env_with(tiny, reward_fn=count_good, prompts=PROMPTS, **kw):
    return TextGenEnv(tiny[0], reward_fn, prompts, tokenizer=tiny[1], max_new_tokens=2, **kw)


def finish_episode(env, action=3):
    env.reset(seed=0)
    for _ in range(2):
        _, _, term, trunc, _ = env.step(action)
    return term or trunc


@pytest.mark.parametrize("action, err, match", [
    (13, ValueError, "outside the action space"),
    (-1, ValueError, "outside the action space"),
    (1.5, TypeError, "integer token ids"),
    ("cat", TypeError, "integer token id"),
    ([1, 2], ValueError, "shape"),
])
def test_bad_actions(tiny, action, err, match):
    env = env_with(tiny)
    env.reset(seed=0)
    with pytest.raises(err, match=match):
        env.step(action)


def test_vector_bad_actions(tiny):
    venv = TextGenVectorEnv(2, model=tiny[0], tokenizer=tiny[1], reward_fn=count_good, prompts=PROMPTS, device="cpu")
    with pytest.raises(EpisodeError, match="reset"):
        venv.step(np.array([1, 2]))
    venv.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        venv.step(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="token id 99"):
        venv.step(torch.tensor([1, 99]))
    with pytest.raises(ValueError, match=r"logprobs must have shape \(2,\)"):
        venv.step(np.array([1, 2]), logprobs=[0.1])


def test_step_after_episode_end_without_reset(tiny):
    env = env_with(tiny)
    assert finish_episode(env)
    with pytest.raises(EpisodeError, match="call reset"):
        env.step(1)
    with pytest.raises(EpisodeError, match="call reset"):
        env_with(tiny).step(1)


def test_score_sequences_misuse(tiny):
    venv = TextGenVectorEnv(2, model=tiny[0], tokenizer=tiny[1], reward_fn=count_good, prompts=PROMPTS,
                            max_new_tokens=4, device="cpu")
    venv.reset(seed=0)
    with pytest.raises(ValueError, match="no stop token"):
        venv.score_sequences(np.array([[1, 2], [1, 0]]))
    with pytest.raises(ValueError, match="max_new_tokens=4"):
        venv.score_sequences(np.ones((2, 5), dtype=np.int64))
    venv.step(np.array([1, 1]))
    with pytest.raises(EpisodeError, match="every episode at its start"):
        venv.score_sequences(np.ones((2, 4), dtype=np.int64))


def test_empty_and_bad_prompts(tiny):
    with pytest.raises(ValueError, match="prompts is empty"):
        env_with(tiny, prompts=[])
    with pytest.raises(TypeError, match="wrap a single prompt in a list"):
        env_with(tiny, prompts="the cat")
    with pytest.raises(ValueError, match="empty after tokenization"):
        env_with(tiny, prompts=["the", ""])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        env_with(tiny, prompts=[[1, 500]])
    with pytest.raises(ValueError, match="pass max_prompt_tokens"):
        env_with(tiny, prompts=iter(["the"]))
    env = env_with(tiny, prompts=iter(["the"]), max_prompt_tokens=3)
    env.reset()
    with pytest.raises(RuntimeError, match="ran out after 1 prompts"):
        env.reset()


def test_prompt_longer_than_the_model_context(tiny):
    long_prompt = " ".join(["the"] * 63)
    with pytest.raises(ValueError, match="model's context is 64"):
        env_with(tiny, prompts=[long_prompt])
    env = env_with(tiny, prompts=iter([" ".join(["cat"] * 9)]), max_prompt_tokens=8)
    with pytest.raises(ValueError, match="more than max_prompt_tokens=8"):
        env.reset()


def test_reward_callable_that_raises_is_named(tiny):
    def my_broken_reward(prompts, completions):
        raise KeyError("boom")

    env = env_with(tiny, reward_fn=my_broken_reward)
    with pytest.raises(RewardError, match="my_broken_reward.*raised KeyError"):
        finish_episode(env)


@pytest.mark.parametrize("value, match", [
    (float("nan"), "must be finite"), (float("inf"), "must be finite"), ("abc", "not a sequence of numbers")])
def test_reward_callable_bad_values(tiny, value, match):
    env = env_with(tiny, reward_fn=lambda p, c: [value] * len(c))
    with pytest.raises(RewardError, match=match):
        finish_episode(env)


def test_reward_callable_wrong_count(tiny):
    env = env_with(tiny, reward_fn=lambda p, c: [1.0, 2.0])
    with pytest.raises(RewardError, match="returned 2 scores for 1 completions"):
        finish_episode(env)
    with pytest.raises(TypeError, match="reward_fn must be callable"):
        env_with(tiny, reward_fn=3)


def test_unknown_task_and_kwargs(tiny):
    with pytest.raises(gym.error.Error, match="NoSuchTask"):
        gym.make("lmgym/NoSuchTask-v0")
    with pytest.raises(TypeError, match="did you mean 'kl_coef'"):
        gym.make("lmgym/Copy-v0", kl_coeff=0.1)
    with pytest.raises(TypeError, match="fixed by this diagnostic task"):
        gym.make("lmgym/Copy-v0", reward_fn=count_good)
    with pytest.raises(TypeError, match="kl_coeff"):
        gym.make("lmgym/TextGen-v0", model=tiny[0], tokenizer=tiny[1], reward_fn=count_good, prompts=PROMPTS,
                 kl_coeff=0.1)
    with pytest.raises(ValueError, match="kl_coef must be a finite number"):
        env_with(tiny, kl_coef=-1)
    with pytest.raises(ValueError, match="group_size"):
        TextGenVectorEnv(4, model=tiny[0], tokenizer=tiny[1], reward_fn=count_good, prompts=PROMPTS, group_size=3)
    with pytest.raises(ValueError, match="unknown reset options"):
        env_with(tiny).reset(options={"prompts": ["x"]})


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextGenEnv(str(tmp_path / "no-such-model"), count_good, PROMPTS)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match="could not load a causal LM"):
        TextGenEnv(str(empty), count_good, PROMPTS)


def test_model_saved_locally_loads_by_path(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    env = TextGenEnv(str(tmp_path / "m"), count_good, PROMPTS, max_new_tokens=2)
    env.reset(seed=0)
    _, r, *_ , info = env.step(3)
    assert np.isfinite(r) and "ref_logprob" in info


def test_three_messages_that_now_say_what_is_wrong(tmp_path):
    """Issue 23 item 14: a model folder whose weights do not fit its config (transformers' ignore_mismatched_sizes
    error, no path); lora_alpha nan (reported as non-finite log-probs an iteration later); a checkpoint's
    state.json given for the checkpoint ('no state.json')."""
    import json

    import gymnasium as gym

    from lmgym.agents import GRPO, CheckpointError
    from lmgym.agents.common.lora import make_peft_config
    from lmgym.models import load_model, tiny_model

    model, tok = tiny_model(10)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "vocab_size": 20}))
    with pytest.raises(OSError, match=f"the weights in '{tmp_path / 'm'}' do not fit the shapes its config.json"):
        load_model(tmp_path / "m")
    agent = GRPO(gym.make_vec("lmgym/TargetToken-v0", num_envs=8, group_size=4, device="cpu"),
                 logdir=tmp_path / "run")
    agent.learn(16, progress=False)
    with pytest.raises(CheckpointError, match="state.json is a file of the checkpoint .*: pass that folder"):
        agent.load(agent.last_checkpoint / "state.json")
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match=r"peft_config\['lora_alpha'\] \(--lora-alpha\) must be a finite number"):
        make_peft_config({"r": 4, "lora_alpha": float("nan")})
    with pytest.raises(ValueError, match=r"peft_config\['r'\] \(--lora-r\) must be an int >= 1"):
        make_peft_config({"r": 0})
