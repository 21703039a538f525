"""Longer runs, excluded from the default suite: python -m pytest -q -m slow (several minutes on 2 cores)."""

import os
import runpy

import gymnasium as gym
import pytest

pytestmark = pytest.mark.slow


def test_preference_pipeline_improves_the_raters_own_score():
    example = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "examples", "preference_pipeline.py"))
    out = example["main"]()
    assert out["reward_model"]["eval_accuracy"] >= 0.9
    before, after = out["labeller"]
    assert after > before + 0.5


def test_ppo_makes_sentiment_positive():
    from lmgym.agents import PPO

    venv = gym.make_vec("lmgym/Sentiment-v0", num_envs=64, device="cpu")
    agent = PPO(venv, learning_rate=3e-4)
    start = agent.evaluate()["score"]
    agent.learn(40_000, progress=False)
    end = agent.evaluate()["score"]
    assert end > start + 0.3, (start, end)


def test_every_agent_beats_the_reference_on_copy():
    from lmgym.bench.grid import run

    for agent in ("ppo", "grpo", "reinforce", "rloo"):
        r = run("lmgym/Copy-v0", agent, steps=60_000, progress=False)
        assert r["end"]["return"] > r["start"]["return"] + 0.2, (agent, r["start"], r["end"])
