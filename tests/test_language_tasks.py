"""The built-in language tasks: valid Gymnasium/SB3 environments whose rewards do what their docs say."""

import gymnasium as gym
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from lmgym.tasks import LANGUAGE_IDS, describe
from lmgym.tasks.language import ArithmeticReward, VaderSentiment

from conftest import ZOO_STEPS


# ChatArithmetic's and ChatCalculator's default model needs the optional `smollm` extra (93 MB): its checks run on a tiny chat
# model in test_chat_arithmetic.py, and on the real model under `-m smollm`.
@pytest.mark.parametrize("env_id", [i for i in LANGUAGE_IDS if i not in ("lmgym/ChatArithmetic-v0", "lmgym/ChatCalculator-v0")])
def test_language_tasks_pass_check_env(env_id):
    env = gym.make(env_id, zoo_steps=ZOO_STEPS)
    gym_check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(gym.make(env_id, zoo_steps=ZOO_STEPS).unwrapped, warn=False)
    for section in ("## Description", "## Action Space", "## Observation Space", "## Rewards", "## Episode End",
                    "## Arguments"):
        assert section in describe(env_id)


def test_sentiment_reward_is_vader_compound_of_the_completion():
    scores = VaderSentiment()(["the movie was"] * 3, ["great and wonderful .", "terrible and boring .", ""])
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0


def test_arithmetic_reward_exact_and_partial_credit():
    prompts = ["12+7=", "40+45=", "9-3=", "6*7=", "12+7="]
    completions = ["19", "86", "6", "42", "x"]
    assert ArithmeticReward()(prompts, completions) == [1.0, 0.0, 1.0, 1.0, 0.0]
    # 85 vs 86: the tens digit matches -> 1/2; "x" is not a number -> 0
    assert ArithmeticReward(partial_credit=True)(prompts, completions) == [1.0, 0.5, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="not an arithmetic problem"):
        ArithmeticReward()(["hello"], ["1"])


def test_arithmetic_reward_reads_only_whole_signed_numbers():
    """A sampled completion may hold several minus signs ("---30" crashed the bench with int())."""
    prompts = ["10-40="] * 5
    assert ArithmeticReward()(prompts, ["-30", "---30", "-", "3-0", "--"]) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert ArithmeticReward(partial_credit=True)(prompts, ["---30", "-"]) == [0.0, 0.0]
    # str.isdigit() also accepts superscripts, which int() refuses: such a prompt is simply not a problem
    with pytest.raises(ValueError, match="not an arithmetic problem"):
        ArithmeticReward()(["\u00b2+1="], ["3"])


def test_arithmetic_env_scores_the_decoded_answer():
    env = gym.make("lmgym/Arithmetic-v0", zoo_steps=ZOO_STEPS)
    obs, info = env.reset(options={"prompt": "12+7="})
    tok = env.unwrapped.tokenizer
    for ch in "19":
        env.step(tok.convert_tokens_to_ids(ch))
    *_, term, trunc, info = env.step(tok.eos_token_id)
    assert term and info["completion"] == "19" and info["score"] == 1.0


def test_preference_reward_prefers_polite_concise_replies():
    venv = gym.make_vec("lmgym/Preference-v0", num_envs=2, zoo_steps=ZOO_STEPS, device="cpu")
    reward = venv.core.reward_fn
    prompt = "user : can you help me with my code ? assistant :"
    good = "sure , keep it simple ."
    bad = "no , um , well , basically , you know , figure it out yourself ."
    scores = reward([prompt, prompt], [good, bad], [[], []], [[], []])
    assert scores[0] > scores[1]


def test_task_overrides_and_bad_arguments(tiny):
    env = gym.make("lmgym/Sentiment-v0", model=tiny[0], tokenizer=tiny[1], prompts=["the cat"],
                   reward_fn=lambda p, c: [1.0] * len(c), zoo_steps=ZOO_STEPS)
    env.reset(seed=0)
    ref = env.unwrapped.reference_model
    assert ref is not tiny[0] and all(torch.equal(a, b) for a, b in zip(ref.parameters(), tiny[0].parameters()))
    assert all(p.requires_grad for p in tiny[0].parameters())  # the caller's model is not frozen
    with pytest.raises(TypeError, match="did you mean 'partial_credit'"):
        gym.make("lmgym/Arithmetic-v0", partial_credt=True, zoo_steps=ZOO_STEPS)
    with pytest.raises(ValueError, match="operations must be"):
        gym.make("lmgym/Arithmetic-v0", operations="/", zoo_steps=ZOO_STEPS)
