"""lmgym/Guess-v0 and lmgym/Echo-v0: their exact optimum against brute-force enumeration written from the rules,
Gymnasium's and SB3's environment checkers, and SB3's PPO training through the existing bridge."""

import copy
import itertools
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import lmgym  # noqa: F401

pytestmark = pytest.mark.compat


@torch.no_grad()
def ref_logprobs(model, ids):
    """log pi_ref(.|ids) in float64 (the environment's own model runs in float32: figures agree to ~1e-8)."""
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], dim=-1).numpy()


def soft_value(lp, q, beta):
    z = lp + np.asarray(q) / beta
    top = z.max()
    return beta * (top + math.log(np.exp(z - top).sum()))


def brute_force_guess(env, beta, max_turns=3):
    """The optimum from Guess's rules alone: the targets consistent with a history are found by replaying it."""
    tok = env.tokenizer
    model = copy.deepcopy(env.reference_model).double()
    vocab = len(tok)
    word = tok.convert_ids_to_tokens
    targets = ["1", "2", "3"]

    def reply(target, guess):
        if guess not in targets:
            return "what"
        return "lower" if int(target) < int(guess) else "higher"

    def consistent(history):  # history: [(guess, reply), ...]
        return [t for t in targets if all(g != t and reply(t, g) == r for g, r in history)]

    def value(ids, history):
        turn = len(history) + 1
        lp = ref_logprobs(model, ids)
        alive = consistent(history)
        q = []
        for a in range(vocab):
            guess = word(a) if a != 0 else "<eos>"
            total = 0.0
            for t in alive:
                if guess == t:
                    total += (max_turns - turn + 1) / max_turns
                elif turn < max_turns:
                    r = reply(t, guess)
                    total += value(ids + [a, tok.convert_tokens_to_ids(r)], history + [(guess, r)])
            q.append(total / len(alive))
        return soft_value(lp, q, beta)

    return value(tok.encode("guess"), [])


def brute_force_echo(env, beta, max_turns=3):
    """Echo's optimum from its rules: enumerate the environment's word sequences and average over the consistent."""
    tok = env.tokenizer
    model = copy.deepcopy(env.reference_model).double()
    words = ["a", "b", "c"]
    sequences = list(itertools.product(words, repeat=max_turns - 1))

    def value(ids, prompt, heard_so_far):
        turn = len(heard_so_far) + 1
        lp = ref_logprobs(model, ids)
        alive = [s for s in sequences if list(s[:len(heard_so_far)]) == heard_so_far]
        q = []
        for a in range(len(tok)):
            total = 0.0
            last = prompt if turn == 1 else heard_so_far[-1]
            for s in alive:
                reward = (tok.convert_ids_to_tokens(a) == last) / max_turns
                if turn == max_turns:
                    total += reward
                else:
                    nxt = s[turn - 1]
                    total += reward + value(ids + [a, tok.convert_tokens_to_ids(nxt)], prompt, heard_so_far + [nxt])
            q.append(total / len(alive))
        return soft_value(lp, q, beta)

    return np.mean([value(tok.encode(p), p, []) for p in words])


@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_guess_optimum_matches_brute_force(beta):
    env = gym.make("lmgym/Guess-v0", kl_coef=beta)
    assert env.unwrapped.optimal_return == pytest.approx(brute_force_guess(env.unwrapped, beta), abs=1e-6)


def test_echo_optimum_matches_brute_force():
    env = gym.make("lmgym/Echo-v0", kl_coef=0.05)
    assert env.unwrapped.optimal_return == pytest.approx(brute_force_echo(env.unwrapped, 0.05), abs=1e-6)


def test_the_optimum_is_above_what_simple_policies_get():
    """Sanity of the optimum's scale: with beta -> 0 it is the best deterministic strategy's score (7/9 for
    Guess: guess 2, then the number the answer points to), far above guessing 1, 2, 3 in order (2/3)."""
    env = gym.make("lmgym/Guess-v0", kl_coef=1e-4)
    assert env.unwrapped.optimal_return == pytest.approx(7 / 9, abs=2e-3)


@pytest.mark.parametrize("env_id", ["lmgym/Guess-v0", "lmgym/Echo-v0"])
def test_gymnasium_and_sb3_check_env_pass(env_id):
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    gym_check(gym.make(env_id).unwrapped)
    sb3_check(gym.make(env_id), warn=True)


def test_observations_mark_the_policy_tokens_and_the_replies_are_forced():
    env = gym.make("lmgym/Guess-v0")
    obs, _ = env.reset(seed=0)
    tok = env.unwrapped.tokenizer
    target = env.unwrapped.core.interaction.rows[0].target
    wrong = "1" if target != "1" else "3"
    obs, reward, term, trunc, info = env.step(tok.convert_tokens_to_ids(wrong), logprob=-1.0)
    assert not (term or trunc) and info["turn"] == 1 and info["turn_reward"] == 0.0
    assert obs["policy_mask"].tolist()[:3] == [0, 1, 0]
    answer = tok.convert_ids_to_tokens(int(obs["input_ids"][2]))
    assert answer == ("lower" if int(target) < int(wrong) else "higher")
    obs, reward, term, trunc, info = env.step(tok.convert_tokens_to_ids(target), logprob=-1.0)
    assert term and info["score"] == pytest.approx(2 / 3) and info["turns"] == 2 and info["truncation"] == ""
    assert reward == pytest.approx(2 / 3 - env.unwrapped.kl_coef * info["kl"], abs=1e-6)


@pytest.mark.slow  # 24 s
def test_sb3_ppo_trains_on_guess_through_the_bridge():
    """SB3's PPO with lmgym's transformer policy, through LMGymVecEnv, improves on the multi-turn task (the
    policy bound to the environment, so the KL term is exact)."""
    import copy

    from stable_baselines3 import PPO

    from lmgym.agents.sb3 import LMGymVecEnv, LMPolicy, evaluate_return, lm_policy_kwargs

    venv = gym.make_vec("lmgym/Guess-v0", num_envs=16, device="cpu")
    env = LMGymVecEnv(venv, seed=0)
    model = PPO(LMPolicy, env, n_steps=32, batch_size=128, learning_rate=3e-3, seed=0, device="cpu",
                policy_kwargs=lm_policy_kwargs(copy.deepcopy(venv.reference_model), env=env))
    single = gym.make("lmgym/Guess-v0")
    before = evaluate_return(model, single, 200)
    model.learn(8000)
    after = evaluate_return(model, single, 200)
    assert after["score"] > before["score"] + 0.2 and after["return"] > before["return"] + 0.1, (before, after)
