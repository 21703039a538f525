"""The MDP contract: rewards match the formula on every path (single, vector, submission, slow reference)."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import lmgym
from lmgym import TextGenEnv, TextGenVectorEnv
from lmgym.tasks import DIAGNOSTIC_IDS

from conftest import PROMPTS, count_good, slow_ref_logprob

BETA = 0.1


def make_single(tiny, **kw):
    model, tok = tiny
    kw.setdefault("max_new_tokens", 6)
    return TextGenEnv(model, count_good, PROMPTS, tokenizer=tok, kl_coef=BETA, **kw)


def make_vector(tiny, n=4, **kw):
    model, tok = tiny
    kw.setdefault("max_new_tokens", 6)
    return TextGenVectorEnv(n, model=model, tokenizer=tok, reward_fn=count_good, prompts=PROMPTS, kl_coef=BETA,
                            device="cpu", **kw)


@pytest.mark.parametrize("env_id", ["lmgym/TextGen-v0", *DIAGNOSTIC_IDS])
def test_check_env_passes(env_id, tiny):
    kwargs = {}
    if env_id == "lmgym/TextGen-v0":
        kwargs = dict(model=tiny[0], tokenizer=tiny[1], reward_fn=count_good, prompts=PROMPTS)
    env = gym.make(env_id, **kwargs)
    gym_check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(gym.make(env_id, **kwargs).unwrapped, warn=False)


def play_single(env, seed, actions, logprobs):
    """Step one episode with given actions; returns rewards, infos and the states each action was taken in."""
    obs, _ = env.reset(seed=seed)
    rewards, infos, states = [], [], []
    for a, lp in zip(actions, logprobs):
        states.append(obs["input_ids"][obs["attention_mask"] == 1].tolist())
        obs, r, term, trunc, info = env.step(a, logprob=lp)
        rewards.append(r)
        infos.append(info)
        if term or trunc:
            break
    return rewards, infos, states


def test_single_env_rewards_match_slow_float64_reference(tiny, tiny64):
    env = make_single(tiny)
    gen = np.random.default_rng(3)
    for episode in range(6):
        actions = gen.integers(0, env.action_space.n, size=6)
        logprobs = -gen.uniform(0.5, 3.0, size=6)
        rewards, infos, states = play_single(env, episode, actions, logprobs)
        kls = []
        for t, (state, a) in enumerate(zip(states, actions)):
            ref = slow_ref_logprob(tiny64, state, int(a))
            kls.append(logprobs[t] - ref)
            expected = -BETA * kls[-1] + (infos[t]["score"] if t == len(states) - 1 else 0.0)
            assert rewards[t] == pytest.approx(expected, abs=1e-5)
            assert infos[t]["ref_logprob"] == pytest.approx(ref, abs=1e-5)
        # Score from the reward function on the decoded text, and the episode identity.
        final = infos[-1]
        assert final["score"] == pytest.approx(count_good([final["prompt"]], [final["completion"]])[0])
        assert sum(rewards) == pytest.approx(final["score"] - BETA * sum(kls), abs=1e-5)
        assert final["episode_kl"] == pytest.approx(sum(kls), abs=1e-5)


def test_vector_step_and_submission_match_single_env(tiny):
    n, horizon = 4, 6
    venv = make_vector(tiny, n)
    single = make_single(tiny)
    gen = np.random.default_rng(7)
    tokens = gen.integers(1, venv.single_action_space.n, size=(n, horizon))
    tokens[1, 2] = 0  # one episode that stops early on EOS
    logprobs = -gen.uniform(0.5, 3.0, size=(n, horizon)).astype(np.float32)

    # Per-token stepping: record each row until its episode ends.
    obs, _ = venv.reset(seed=11)
    prompts = venv.prompts
    step_rewards = np.zeros((n, horizon))
    ended = np.zeros(n, dtype=bool)
    scores = np.full(n, np.nan)
    for t in range(horizon):
        obs, r, term, trunc, info = venv.step(tokens[:, t], logprobs[:, t])
        live = ~ended
        step_rewards[live, t] = r.numpy()[live]
        done = (term | trunc).numpy()
        if done.any():
            scores[done & live] = info["score"][done & live]
        ended |= done
    assert ended.all()

    # Submission path from the same seed: identical prompts, identical rewards.
    venv.reset(seed=11)
    assert venv.prompts == prompts
    res = venv.score_sequences(torch.as_tensor(tokens), torch.as_tensor(logprobs))
    np.testing.assert_allclose(res.rewards.numpy(), step_rewards, atol=1e-5)
    np.testing.assert_allclose(res.scores.numpy(), scores)
    assert res.lengths.tolist() == [6, 3, 6, 6]
    assert res.terminated[1, 2] and not res.truncated[1].any() and res.truncated[0, 5]
    # Each episode's reward sum is score - beta * sum(KL).
    np.testing.assert_allclose(res.rewards.sum(1).numpy(), (res.scores - BETA * res.kl.sum(1)).numpy(), atol=1e-5)

    # The single env on each row's prompt gives the same per-token rewards.
    for i in range(n):
        single.reset(options={"prompt": prompts[i]})
        for t in range(int(res.lengths[i])):
            _, r, term, trunc, _ = single.step(int(tokens[i, t]), logprob=float(logprobs[i, t]))
            assert r == pytest.approx(step_rewards[i, t], abs=1e-5)
        assert term or trunc


def test_autoreset_and_cache_stay_exact_over_many_episodes(tiny, tiny64):
    """Many resets at different times (row restarts, cache compaction): every ref log-prob stays exact."""
    venv = make_vector(tiny, 3, max_new_tokens=4)
    obs, _ = venv.reset(seed=0)
    gen = np.random.default_rng(0)
    pending = np.zeros(3, dtype=bool)
    restarts = 0
    for _ in range(60):  # far beyond 2 x the longest sequence, so the cache is compacted several times
        actions = gen.choice([0, 1, 2, 3, 5], size=3)  # EOS (0) often
        states = [ids[m == 1].tolist() for ids, m in zip(obs["input_ids"], obs["attention_mask"])]
        obs, r, term, trunc, info = venv.step(actions)
        for i in range(3):
            if pending[i]:  # NEXT_STEP autoreset: this call reset the row
                assert r[i] == 0 and not term[i] and not trunc[i]
                assert obs["attention_mask"][i].sum() == len(venv.core.row_prompts[i].ids)
                restarts += 1
            else:
                ref = slow_ref_logprob(tiny64, states[i], int(actions[i]))
                assert float(info["ref_logprob"][i]) == pytest.approx(ref, abs=1e-5)
                # Without the policy's log-prob, the per-token reward is beta * log pi_ref.
                extra = info["score"][i] if info.get("_score", np.zeros(3, bool))[i] else 0.0
                assert float(r[i]) == pytest.approx(BETA * ref + extra, abs=1e-5)
        pending = (term | trunc).numpy()
    assert restarts >= 10


def test_bound_policy_gives_exact_kl(tiny):
    model, _ = tiny
    venv = make_vector(tiny, 2)
    calls = []

    def policy(obs, actions):  # a uniform policy, whose log-prob we know by hand
        calls.append(obs["input_ids"].shape)
        return torch.full((actions.shape[0],), -np.log(model.config.vocab_size))

    venv.bind_policy(policy)
    venv.reset(seed=0)
    _, r, _, _, info = venv.step(np.array([1, 2]))
    expected_kl = -np.log(model.config.vocab_size) - info["ref_logprob"].numpy()
    np.testing.assert_allclose(info["kl"].numpy(), expected_kl, atol=1e-6)
    np.testing.assert_allclose(r.numpy(), -BETA * expected_kl, atol=1e-6)
    assert calls == [(2, venv.core.max_len)]


def test_kl_coef_zero_leaves_only_the_score(tiny):
    venv = make_vector(tiny, 2, kl_coef=0.0) if False else TextGenVectorEnv(
        2, model=tiny[0], tokenizer=tiny[1], reward_fn=count_good, prompts=PROMPTS, kl_coef=0.0, device="cpu",
        max_new_tokens=3)
    venv.reset(seed=0)
    res = venv.score_sequences(torch.tensor([[9, 9, 9], [1, 0, 0]]), torch.full((2, 3), -1.0))
    np.testing.assert_allclose(res.rewards.sum(1).numpy(), res.scores.numpy())
    assert res.rewards[0, :2].abs().max() == 0


def test_groups_share_prompts_across_autoresets(tiny):
    venv = make_vector(tiny, 6, group_size=3, max_new_tokens=2)
    venv.reset(seed=5)
    for _ in range(9):
        p = venv.prompts
        assert p[0] == p[1] == p[2] and p[3] == p[4] == p[5]
        venv.step(np.full(6, 2))  # all rows end together (truncation at 2 tokens)


def test_reward_callable_called_once_per_batch_of_finished_episodes(tiny):
    calls = []

    def reward(prompts, completions):
        calls.append(len(completions))
        return [0.0] * len(completions)

    venv = TextGenVectorEnv(4, model=tiny[0], tokenizer=tiny[1], reward_fn=reward, prompts=PROMPTS,
                            max_new_tokens=3, device="cpu")
    venv.reset(seed=0)
    for _ in range(3):
        venv.step(np.full(4, 2))
    assert calls == [4]
    venv.reset(seed=0)
    venv.score_sequences(np.full((4, 3), 2))
    assert calls == [4, 4]


def test_seeding_is_reproducible(tiny):
    a, b = make_vector(tiny, 4), make_vector(tiny, 4)
    a.reset(seed=42)
    b.reset(seed=42)
    assert a.prompts == b.prompts
    env = make_single(tiny)
    first = [env.reset(seed=s)[1]["prompt"] for s in range(5)]
    assert first == [env.reset(seed=s)[1]["prompt"] for s in range(5)]


def test_token_id_prompts_and_iterables(tiny):
    model, tok = tiny
    stream = iter(["the cat", "the dog", "good day"])
    venv = TextGenVectorEnv(1, model=model, tokenizer=tok, reward_fn=count_good, prompts=stream,
                            max_prompt_tokens=4, max_new_tokens=2, device="cpu")
    venv.reset()
    assert venv.prompts == ["the cat"]
    env = TextGenEnv(model, count_good, [[1, 2, 3]], tokenizer=tok, max_new_tokens=2)
    obs, info = env.reset()
    assert obs["input_ids"][:3].tolist() == [1, 2, 3] and info["prompt"] == tok.decode([1, 2, 3])


def test_make_vec_returns_the_torch_vector_env(tiny):
    venv = gym.make_vec("lmgym/Copy-v0", num_envs=4, device="cpu")
    assert isinstance(venv, TextGenVectorEnv)
    assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    obs, _ = venv.reset(seed=0)
    assert isinstance(obs["input_ids"], torch.Tensor) and obs["input_ids"].shape == (4, 7)
    _, r, term, trunc, _ = venv.step(torch.ones(4, dtype=torch.long))
    assert r.dtype == torch.float32 and term.dtype == torch.bool and trunc.shape == (4,)
    venv2 = gym.make_vec("lmgym/TextGen-v0", num_envs=2, model=tiny[0], tokenizer=tiny[1], reward_fn=count_good,
                         prompts=PROMPTS, kl_coef=0.2, device="cpu")
    assert venv2.kl_coef == 0.2 and lmgym.TextGenVectorEnv is type(venv2)


from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.compat  # also run on the oldest declared torch and transformers (.ci/run)


@settings(max_examples=15, deadline=None)
@given(rows=st.lists(st.lists(st.integers(0, 12), min_size=5, max_size=5), min_size=3, max_size=3),
       seed=st.integers(0, 1000))
def test_submission_equals_stepping_for_any_tokens(tiny, rows, seed):
    """Property: for any tokens (EOS anywhere), submitting equals stepping token by token."""
    venv = make_vector(tiny, 3, max_new_tokens=5)
    tokens = np.array(rows)
    logprobs = -np.linspace(0.5, 2.5, 15, dtype=np.float32).reshape(3, 5)
    venv.reset(seed=seed)
    res = venv.score_sequences(tokens, logprobs)
    venv.reset(seed=seed)
    stepped = np.zeros((3, 5))
    ended = np.zeros(3, dtype=bool)
    for t in range(5):
        _, r, term, trunc, _ = venv.step(tokens[:, t], logprobs[:, t])
        stepped[~ended, t] = r.numpy()[~ended]
        ended |= (term | trunc).numpy()
    np.testing.assert_allclose(res.rewards.numpy(), stepped, atol=1e-5)
