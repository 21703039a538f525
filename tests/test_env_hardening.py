"""Regression tests for issue 10 (environment core): each test failed before its fix."""

import copy

import numpy as np
import pytest
import torch

from lmgym import EpisodeError, RewardError, TextGenEnv, TextGenVectorEnv
from lmgym.models import word_tokenizer

pytestmark = pytest.mark.compat  # also run on the oldest declared torch and transformers (.ci/run)

WORDS = ["a", "b", "c", "d", "e", "f"]
PROMPTS = ["a b c", "b", "c d", "e f a", "d"]
LONGEST_PROMPT = 3


def length_reward(prompts, completions):
    return [0.3 * len(c.split()) - 0.1 * p.count("a") for p, c in zip(prompts, completions)]


def build(kind: str, tok, context: int):
    """A tiny model of the given architecture, seeded, with a context of ``context`` positions."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, MistralConfig,
                              MistralForCausalLM)

    v = len(tok)
    torch.manual_seed(0)
    if kind == "gpt2":  # learned positions: position `context` does not exist
        cfg = GPT2Config(vocab_size=v, n_positions=context, n_embd=32, n_layer=2, n_head=2,
                         bos_token_id=0, eos_token_id=0, initializer_range=0.3)
        return GPT2LMHeadModel(cfg).eval()
    common = dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, eos_token_id=0,
                  pad_token_id=0, bos_token_id=None)
    if kind == "mistral":  # every layer slides over the last 4 tokens
        return MistralForCausalLM(MistralConfig(sliding_window=4, **common)).eval()
    if kind == "gemma2":  # alternating sliding (window 3) and full layers
        return Gemma2ForCausalLM(Gemma2Config(sliding_window=3, head_dim=16, **common)).eval()
    raise ValueError(kind)


@torch.no_grad()
def reference_logprob(model64, ids: list[int], action: int) -> float:
    """log pi_ref(action | ids) from one float64 forward over the whole prefix, without any cache."""
    logits = model64(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
    return float(torch.log_softmax(logits, dim=-1)[action])


def run_against_reference(venv, model64, steps: int, seed: int, partial_resets: bool):
    """Step with random actions (and random partial resets); check every live row's reward against float64."""
    beta = venv.kl_coef
    gen = np.random.default_rng(seed)
    obs, _ = venv.reset(seed=seed)
    pending = np.zeros(venv.num_envs, dtype=bool)
    checked_after_restart = 0
    restarted = np.zeros(venv.num_envs, dtype=bool)
    for t in range(steps):
        if partial_resets and t % 4 == 3:
            mask = gen.random(venv.num_envs) < 0.5
            mask[pending] = True  # finished rows may be restarted by the user as well
            obs, _ = venv.reset(options={"reset_mask": mask})
            pending[mask] = False
            restarted |= mask
        ids = obs["input_ids"].numpy()
        am = obs["attention_mask"].numpy().astype(bool)
        actions = gen.integers(0, len(WORDS) + 1, size=venv.num_envs)
        actions[gen.random(venv.num_envs) < 0.7] = gen.integers(1, len(WORDS) + 1)  # mostly not EOS
        logprobs = -gen.random(venv.num_envs) * 3
        obs, rewards, term, trunc, info = venv.step(actions, logprobs=logprobs)
        for i in range(venv.num_envs):
            if pending[i]:
                assert float(rewards[i]) == 0.0
                restarted[i] = True
                continue
            ref = reference_logprob(model64, ids[i][am[i]].tolist(), int(actions[i]))
            assert float(info["ref_logprob"][i]) == pytest.approx(ref, abs=2e-5)
            expected = -beta * (logprobs[i] - ref)
            if term[i] or trunc[i]:
                expected += info["score"][i]
            assert float(rewards[i]) == pytest.approx(expected, abs=2e-5)
            checked_after_restart += bool(restarted[i])
        pending = (term | trunc).numpy()
    assert checked_after_restart > 10  # the restarted rows were really exercised


@pytest.mark.parametrize("kind", ["gpt2", "mistral", "gemma2"])
@pytest.mark.parametrize("partial_resets", [False, True])
def test_restarted_rows_match_float64_reference(kind, partial_resets):
    """Items 1 and 2: learned positions with a context of exactly prompt + max_new_tokens, and sliding windows."""
    tok = word_tokenizer(WORDS)
    max_new = 5
    model = build(kind, tok, context=LONGEST_PROMPT + max_new)
    model64 = copy.deepcopy(model).double()
    venv = TextGenVectorEnv(3, model=model, tokenizer=tok, reward_fn=length_reward, prompts=PROMPTS,
                            max_new_tokens=max_new, kl_coef=0.1, device="cpu")
    run_against_reference(venv, model64, steps=30, seed=1, partial_resets=partial_resets)


def test_cache_is_compacted_over_many_restarts_with_a_sliding_window():
    """Compaction under endless partial resets keeps sliding-window caches exact (and bounded)."""
    tok = word_tokenizer(WORDS)
    model = build("gemma2", tok, context=64)
    venv = TextGenVectorEnv(2, model=model, tokenizer=tok, reward_fn=length_reward, prompts=PROMPTS,
                            max_new_tokens=3, kl_coef=0.1, device="cpu")
    run_against_reference(venv, copy.deepcopy(model).double(), steps=40, seed=3, partial_resets=True)
    assert venv.core.ref.mask.shape[1] < 2 * venv.core.max_len + 1


def test_models_whose_cache_cannot_be_edited_re_prefill(monkeypatch):
    """The fallback for cache layouts without per-column edits (recurrent or chunked layers) is exact too."""
    from lmgym.models import kv_cache

    from lmgym.utils import fast_paths

    monkeypatch.setattr(kv_cache, "editable", lambda cache, config: False)
    tok = word_tokenizer(WORDS)
    model = build("mistral", tok, context=64)
    fast_paths.forget()
    venv = TextGenVectorEnv(3, model=model, tokenizer=tok, reward_fn=length_reward, prompts=PROMPTS,
                            max_new_tokens=4, kl_coef=0.1, device="cpu")
    with pytest.warns(fast_paths.FastPathWarning, match="'cache column edits' is off: MistralForCausalLM's KV cache"):
        run_against_reference(venv, copy.deepcopy(model).double(), steps=20, seed=2, partial_resets=True)
    assert venv.core.ref._editable is False


def test_ignored_action_of_a_finished_row_never_reaches_past_the_context():
    """Item 1: a GPT-2 whose context is exactly prompt + max_new_tokens, the longest-prompt row truncated."""
    tok = word_tokenizer(WORDS)
    model = build("gpt2", tok, context=LONGEST_PROMPT + 5)
    model64 = copy.deepcopy(model).double()
    venv = TextGenVectorEnv(2, model=model, tokenizer=tok, reward_fn=length_reward, prompts=PROMPTS,
                            max_new_tokens=5, kl_coef=0.1, device="cpu")
    obs, _ = venv.reset(seed=0, options={"prompts": ["a b c", "b"]})
    script = [[1, 2], [2, 0], [3, 1], [4, 2], [5, 3], [6, 4], [1, 5]]  # row 0 truncates at step 5
    for t, actions in enumerate(script):
        before = obs["input_ids"][1][obs["attention_mask"][1].bool()].tolist()
        obs, rewards, term, trunc, info = venv.step(np.array(actions), logprobs=np.array([-1.0, -1.0]))
        if t == 4:
            assert bool(trunc[0]) and not (term[1] or trunc[1])
        if t == 5:
            assert float(rewards[0]) == 0.0  # the autoreset step of row 0
        if t >= 3:  # row 1 restarted at step 3; its rewards stay exact next to the ignored action of row 0
            ref = reference_logprob(model64, before, actions[1])
            assert float(info["ref_logprob"][1]) == pytest.approx(ref, abs=2e-5)


def test_step_infos_of_autoreset_rows_are_zero_and_masked(tiny):
    """Item 3: on an autoreset step the ignored action's log-probs and KL are 0 and masked out."""
    model, tok = tiny
    venv = TextGenVectorEnv(3, model=model, tokenizer=tok, reward_fn=length_reward, prompts=["the cat", "a"],
                            max_new_tokens=3, kl_coef=0.1, device="cpu")
    gen = np.random.default_rng(0)
    venv.reset(seed=0)
    running_kl = np.zeros(3)
    pending = np.zeros(3, dtype=bool)
    finished = 0
    for _ in range(25):
        actions = gen.integers(0, len(tok), size=3)
        logprobs = -gen.random(3) * 2
        _, _, term, trunc, info = venv.step(actions, logprobs=logprobs)
        for key in ("kl", "logprob", "ref_logprob"):
            np.testing.assert_array_equal(info["_" + key].numpy(), ~pending)
            assert np.all(info[key].numpy()[pending] == 0.0)
        running_kl += info["kl"].numpy()
        done = (term | trunc).numpy()
        for i in np.flatnonzero(done):
            assert info["episode_kl"][i] == pytest.approx(running_kl[i], abs=1e-5)
            running_kl[i] = 0.0
            finished += 1
        pending = done
    assert finished >= 10


def test_optimum_scores_the_prompt_text_episodes_see(tiny):
    """Item 4: a prompt that does not survive decode(encode(text)) and a reward that reads the prompt."""
    model, tok = tiny
    prompts = ["the  cat", "dog"]  # the double space is lost by a decode round trip
    assert tok.decode(tok("the  cat")["input_ids"]) != "the  cat"

    def prompt_length(prompts, completions):  # the same for every completion: the optimum is its mean
        return [len(p) / 10 for p in prompts]

    env = TextGenEnv(model, prompt_length, prompts, tokenizer=tok, max_new_tokens=2, kl_coef=0.3)
    assert env.optimal_return == pytest.approx((0.8 + 0.3) / 2, abs=1e-9)
    env.reset(options={"prompt": "the  cat"})
    _, _, _, _, info = env.step(0)
    assert info["score"] == pytest.approx(0.8)


@pytest.mark.parametrize("bad", [float("nan"), 5.0, float("inf"), float("-inf")])
def test_handed_over_logprobs_must_be_log_probabilities(tiny, bad):
    """Item 5: NaN, +inf, -inf or positive log-probs are refused, in step and in score_sequences."""
    model, tok = tiny
    env = TextGenEnv(model, length_reward, ["the cat"], tokenizer=tok, max_new_tokens=2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="not a log-probability"):
        env.step(3, logprob=bad)
    venv = TextGenVectorEnv(2, model=model, tokenizer=tok, reward_fn=length_reward, prompts=["the cat"],
                            max_new_tokens=2, device="cpu")
    venv.reset(seed=0)
    with pytest.raises(ValueError, match="not a log-probability"):
        venv.score_sequences(np.array([[3, 4], [3, 4]]), logprobs=np.array([[-1.0, bad], [-1.0, -1.0]]))
    venv.bind_policy(lambda obs, actions: torch.full((2,), bad))
    with pytest.raises(ValueError, match="bound policy's log-probs contain"):
        venv.step(np.array([3, 4]))


def test_logprobs_after_an_episode_end_are_ignored(tiny):
    """Padding after a stop token (any value) does not reach the rewards; a rounding of +1e-7 passes."""
    model, tok = tiny
    venv = TextGenVectorEnv(2, model=model, tokenizer=tok, reward_fn=length_reward, prompts=["the cat"],
                            max_new_tokens=3, device="cpu")
    venv.reset(seed=0)
    out = venv.score_sequences(np.array([[3, 0, 5], [3, 4, 5]]),
                               logprobs=np.array([[1e-7, -1.0, float("nan")], [-1.0, -1.0, -2.0]]))
    assert torch.isfinite(out.rewards).all() and out.rewards[0, 2] == 0 and out.kl[0, 2] == 0


@pytest.mark.parametrize("beta", [np.float32(0.05), np.int64(0), torch.tensor(0.05), np.array(0.05), 3])
def test_kl_coef_takes_any_real_number_type(tiny, beta):
    """Item 6: numpy and 0-d torch scalars are kl_coefs; the reward uses them as floats."""
    model, tok = tiny
    venv = TextGenVectorEnv(2, model=model, tokenizer=tok, reward_fn=length_reward, prompts=["the cat"],
                            max_new_tokens=2, kl_coef=beta, device="cpu")
    assert type(venv.kl_coef) is float and venv.kl_coef == pytest.approx(float(beta))
    venv.kl_coef = beta  # what an adaptive KL controller does
    venv.reset(seed=0)
    _, rewards, _, _, info = venv.step(np.array([3, 4]), logprobs=np.array([-1.0, -2.0]))
    expected = -float(beta) * (np.array([-1.0, -2.0]) - info["ref_logprob"].numpy())
    np.testing.assert_allclose(rewards.numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("beta, err", [(True, TypeError), (1e300, ValueError), (2e6, ValueError),
                                       (float("nan"), ValueError), (-0.1, ValueError), ("0.1", TypeError),
                                       (torch.tensor([0.1, 0.2]), TypeError)])
def test_kl_coef_refused(tiny, beta, err):
    model, tok = tiny
    with pytest.raises(err, match="kl_coef must be"):
        TextGenVectorEnv(2, model=model, tokenizer=tok, reward_fn=length_reward, prompts=["the cat"],
                         kl_coef=beta, device="cpu")


@pytest.mark.parametrize("value, match", [
    (None, "returned None; return one number"), ([None], "returned None for completion 0"),
    (np.array([None]), "returned None for completion 0"), ([1e308], "beyond float32's range"),
    ([-4e38], "beyond float32's range")])
def test_reward_values_none_or_beyond_float32(tiny, value, match):
    """Item 6: a reward returning None says so; a score float32 cannot hold is refused, not turned into inf."""
    model, tok = tiny
    env = TextGenEnv(model, lambda p, c: value, ["the cat"], tokenizer=tok, max_new_tokens=1)
    env.reset(seed=0)
    with pytest.raises(RewardError, match=match):
        env.step(3)


def test_bytes_prompts_are_refused_and_numpy_prompts_are_lists(tiny):
    """Item 7: bytes are not read as byte values; a numpy array of strings (or of ids) is a list of prompts."""
    model, tok = tiny
    with pytest.raises(TypeError, match="prompt #0 is bytes.*decode it"):
        TextGenEnv(model, length_reward, [b"the cat"], tokenizer=tok)
    with pytest.raises(TypeError, match="integer token ids"):
        TextGenEnv(model, length_reward, [[1, 2.5]], tokenizer=tok)
    env = TextGenEnv(model, length_reward, np.array(["the cat", "dog ran far"]), tokenizer=tok, max_new_tokens=2)
    texts = {env.reset(seed=s)[1]["prompt"] for s in range(20)}
    assert texts == {"the cat", "dog ran far"}
    assert env.optimal_return is not None  # a known, finite list
    ids = np.array([tok("the cat")["input_ids"], tok("dog ran")["input_ids"]])
    venv = TextGenVectorEnv(2, model=model, tokenizer=tok, reward_fn=length_reward, prompts=ids, device="cpu")
    obs, info = venv.reset(seed=0, options={"prompts": np.array(["the cat", "dog ran"])})
    assert list(info["prompt"]) == ["the cat", "dog ran"]
    with pytest.raises(TypeError, match="bytes"):
        venv.reset(options={"prompts": [b"the cat", b"dog"]})


def _no_pad_no_eos_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(["x"] + WORDS)}, unk_token="x"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core)


def test_loading_errors_name_the_file_and_the_fix(tiny, tmp_path):
    """Item 8: a folder without tokenizer files, a truncated weight file."""
    from lmgym.models import load_model

    model, tok = tiny
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no tokenizer files.*save_pretrained"):
        load_model(tmp_path)
    tok.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=f"model weights in '{tmp_path}'.*truncated or corrupt"):
        load_model(tmp_path)


def test_tokenizer_without_pad_or_eos_works_with_stop_token_ids(tiny):
    """Item 8: the advice given (pass stop_token_ids) is enough; the first stop token pads observations."""
    model, _ = tiny
    tok = _no_pad_no_eos_tokenizer()
    no_eos = copy.deepcopy(model)
    no_eos.generation_config.eos_token_id = None  # else its generation config's EOS is the default stop token
    with pytest.raises(ValueError, match="no EOS token.*pass stop_token_ids"):
        TextGenEnv(no_eos, length_reward, ["a b"], tokenizer=tok)
    assert TextGenEnv(model, length_reward, ["a b"], tokenizer=tok).stop_token_ids == [0]
    env = TextGenEnv(model, length_reward, ["a b"], tokenizer=tok, stop_token_ids=[0], max_new_tokens=3)
    obs, _ = env.reset(seed=0)
    assert obs["input_ids"][2:].tolist() == [0] * (len(obs["input_ids"]) - 2)
    _, reward, term, _, info = env.step(2)
    _, reward, term, _, info = env.step(0)
    assert term and info["completion"] == "b"


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(stop_token_ids=5), TypeError, r"stop_token_ids must be a list of token ids, e.g. \[5\]"),
    (dict(stop_token_ids=[True]), TypeError, "stop_token_ids entries must be an int"),
    (dict(tokenizer=5), TypeError, "tokenizer must be a Hugging Face tokenizer"),
    (dict(trust_remote_code="yes"), TypeError, "trust_remote_code must be True or False"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens must be an int"),
    (dict(max_new_tokens=np.int64(0)), ValueError, "max_new_tokens must be an int >= 1"),
])
def test_bad_environment_arguments(tiny, kwargs, err, match):
    model, tok = tiny
    kwargs = {"tokenizer": tok, **kwargs}
    with pytest.raises(err, match=match):
        TextGenEnv(model, length_reward, ["the cat"], **kwargs)


def test_bad_vector_and_task_arguments(tiny):
    import gymnasium as gym

    model, tok = tiny
    with pytest.raises(TypeError, match="num_envs must be an int, got True"):
        TextGenVectorEnv(True, model=model, tokenizer=tok, reward_fn=length_reward, prompts=["a"], device="cpu")
    with pytest.raises(TypeError, match="reference_seed must be an int"):
        gym.make("lmgym/TargetToken-v0", reference_seed="x")
    with pytest.raises(TypeError, match="uniform_reference must be True or False, got 'no'"):
        gym.make("lmgym/TargetToken-v0", uniform_reference="no")
    venv = gym.make_vec("lmgym/TargetToken-v0", num_envs=np.int64(2), uniform_reference=np.bool_(True),
                        device="cpu")
    assert venv.num_envs == 2


@pytest.mark.parametrize("action, err, match", [
    (float("inf"), TypeError, "integer token ids"), (float("nan"), TypeError, "integer token ids"),
    (2 ** 63, ValueError, "token id 9223372036854775808, outside"),
    (np.uint64(2 ** 63), ValueError, "token id 9223372036854775808, outside"),
    (2 ** 70, ValueError, "outside the action space"), (True, TypeError, "integer token ids"),
    (1e30, ValueError, "outside the action space")])
def test_actions_that_cannot_be_token_ids(tiny, action, err, match):
    model, tok = tiny
    env = TextGenEnv(model, length_reward, ["the cat"], tokenizer=tok, render_mode="ansi")
    with pytest.raises(EpisodeError, match="call reset"):
        env.render()
    env.reset(seed=0)
    with pytest.raises(err, match=match):
        env.step(action)
    assert env.step(3)[0]["attention_mask"].sum() == 3  # the env is still usable


def _roundtrips():
    import pickle

    import cloudpickle

    return [("pickle", lambda e: pickle.loads(pickle.dumps(e))), ("deepcopy", copy.deepcopy),
            ("cloudpickle", lambda e: cloudpickle.loads(cloudpickle.dumps(e)))]


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "cloudpickle"])
def test_environments_survive_pickling_and_copying(how):
    """Item 12: a copy carries on exactly where the original was, independently of it."""
    import gymnasium as gym

    roundtrip = dict(_roundtrips())[how]
    env = gym.make("lmgym/TargetToken-v0")
    env.reset(seed=0)
    env.step(1)
    twin = roundtrip(env)
    for action in [2, 1, 3, 1, 1]:
        a, b = env.step(action), twin.step(action)
        assert a[1:4] == b[1:4] and np.array_equal(a[0]["input_ids"], b[0]["input_ids"])
        if a[2] or a[3]:
            break
    venv = gym.make_vec("lmgym/Copy-v0", num_envs=3, device="cpu")
    venv.reset(seed=0)
    venv.step(np.array([1, 0, 2]))
    vtwin = roundtrip(venv)
    gen = np.random.default_rng(0)
    for _ in range(8):  # through autoresets and partial cache restarts
        actions = gen.integers(0, 4, size=3)
        out, twin_out = venv.step(actions), vtwin.step(actions)
        torch.testing.assert_close(out[1], twin_out[1])
        torch.testing.assert_close(out[0]["input_ids"], twin_out[0]["input_ids"])
    assert vtwin.core.ref.cache is not venv.core.ref.cache


def test_sb3_subprocess_vec_env_over_a_built_env():
    """Item 12: SB3's SubprocVecEnv pickles the env factory (forkserver); the env steps in the subprocess."""
    import gymnasium as gym
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    env = gym.make("lmgym/TargetToken-v0")
    local = DummyVecEnv([lambda: copy.deepcopy(env)])
    remote = SubprocVecEnv([lambda: env], start_method="forkserver")
    try:
        local.seed(3)
        remote.seed(3)
        np.testing.assert_array_equal(local.reset()["input_ids"], remote.reset()["input_ids"])
        for action in [1, 1, 2, 1, 3, 1, 1, 2]:
            _, r_local, d_local, _ = local.step(np.array([action]))
            _, r_remote, d_remote, _ = remote.step(np.array([action]))
            np.testing.assert_allclose(r_remote, r_local, rtol=1e-6)
            assert d_remote.tolist() == d_local.tolist()
    finally:
        remote.close()


def test_per_token_steps_are_refused_on_a_reference_sharded_by_fsdp(tiny, tmp_path):
    """Rows restart at their own episode's end, so processes sharing a sharded reference would fall out of
    lockstep and hang: step() says so in one line (whole continuations through score_sequences stay fine)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    model, tok = tiny
    env = TextGenVectorEnv(model=model, tokenizer=tok, prompts=["a b"], num_envs=2,
                           reward_fn=lambda p, c: [0.0] * len(c), max_new_tokens=3)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        fully_shard(env.reference_model)  # in place, as the agents shard a LoRA policy's base
        env.reset(seed=0)
        with pytest.raises(EpisodeError, match="lockstep"):
            env.step(torch.zeros(2, dtype=torch.long))
    finally:
        dist.destroy_process_group()


class FailsOnce:
    """A reward that raises the first time it is called, then scores every completion 1."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, completions):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("the scorer's server is down")
        return [1.0] * len(completions)


@pytest.mark.parametrize("view", ["single", "vector"])
def test_a_step_whose_reward_raises_leaves_the_episode_as_it_was(tiny, view):
    """Issue 23 item 7: the raising step half-applied (the token and its KL were kept), so stepping again counted
    that step's KL twice in info['episode_kl']. Now the failed step changes nothing: the same step again gives
    exactly what it would have given had the reward not failed."""
    model, tok = tiny
    kwargs = dict(tokenizer=tok, max_new_tokens=3, kl_coef=0.1)
    if view == "single":
        env, ref = (TextGenEnv(model, r, ["the cat"], **kwargs) for r in (FailsOnce(), lambda p, c: [1.0] * len(c)))
        steps = [(1, -0.5), (2, -1.0), (3, -0.25)]

        def step(e, a, lp):
            _, reward, term, trunc, info = e.step(a, logprob=lp)
            return reward, term or trunc, info
    else:
        env, ref = (TextGenVectorEnv(2, model=model, reward_fn=r, prompts=["the cat"], device="cpu", **kwargs)
                    for r in (FailsOnce(), lambda p, c: [1.0] * len(c)))
        steps = [([1, 4], [-0.5, -0.1]), ([2, 5], [-1.0, -0.2]), ([3, 6], [-0.25, -0.3])]

        def step(e, a, lp):
            _, reward, term, trunc, info = e.step(np.array(a), logprobs=np.array(lp))
            return np.asarray(reward).tolist(), bool(np.asarray(term | trunc).all()), info
    env.reset(seed=0)
    ref.reset(seed=0)
    for action, lp in steps[:-1]:
        assert step(env, action, lp)[:2] == step(ref, action, lp)[:2]
    before = env.unwrapped.core.observation() if view == "single" else env.core.observation()
    with pytest.raises(RewardError, match="down"):
        step(env, *steps[-1])
    after = env.unwrapped.core.observation() if view == "single" else env.core.observation()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing of the failed step is kept
    got, want = step(env, *steps[-1]), step(ref, *steps[-1])
    assert got[:2] == want[:2] and got[1]
    assert np.allclose(np.asarray(got[2]["episode_kl"], dtype=float), np.asarray(want[2]["episode_kl"], dtype=float))


def test_a_reward_that_edits_its_arguments_or_returns_bfloat16_is_scored_right(tiny):
    """Issue 23 item 11: a reward clearing the completions it was given was reported as "returned 4 scores for 0
    completions"; a bfloat16 tensor gave a raw "Got unsupported ScalarType BFloat16"."""
    model, tok = tiny

    def clears(prompts, completions):
        scores = [float(len(c)) for c in completions]
        completions.clear()
        prompts.clear()
        return scores

    def bf16(prompts, completions):
        return torch.tensor([0.5] * len(completions), dtype=torch.bfloat16)

    for fn, expected in ((clears, None), (bf16, 0.5)):
        venv = TextGenVectorEnv(4, model=model, tokenizer=tok, reward_fn=fn, prompts=["the cat"], max_new_tokens=2,
                                device="cpu")
        venv.reset(seed=0)
        result = venv.score_sequences(torch.tensor([[1, 0]] * 4))
        want = [float(len(c)) for c in result.completions] if expected is None else [expected] * 4
        assert result.scores.tolist() == want and result.completions[0] is not None


def test_wrong_shapes_and_types_of_actions_say_what_is_wrong(tiny):
    """Issue 23 item 13: numpy's reshape / float / dimension errors reached the user instead."""
    model, tok = tiny
    env = TextGenEnv(model, length_reward, ["the cat"], tokenizer=tok, max_new_tokens=4)
    env.reset(seed=0)
    for action in (np.array([1, 2]), np.array([], np.int64)):
        with pytest.raises(ValueError, match=r"action must be one token id, got an array of shape \("):
            env.step(action)
    with pytest.raises(TypeError, match=r"logprob must be a number, log pi\(action\|state\), got 'abc'"):
        env.step(1, logprob="abc")
    venv = TextGenVectorEnv(2, model=model, tokenizer=tok, reward_fn=length_reward, prompts=["the cat"],
                            max_new_tokens=4, device="cpu")
    venv.reset(seed=0)
    with pytest.raises(TypeError, match="logprobs must be numbers"):
        venv.step(np.array([1, 1]), logprobs=["a", "b"])
    with pytest.raises(ValueError, match="row 0 has no stop token in its 3 tokens"):  # the list was "not 2-D"
        venv.score_sequences([[1, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="tokens must be 2 rows of equal length"):
        venv.score_sequences([[1, 1], [1]])
    assert venv.score_sequences([[1, 0], [1, 0]]).lengths.tolist() == [2, 2]  # a list of lists is accepted


@pytest.mark.parametrize("value,err,match", [(-3, ValueError, "max_prompt_tokens must be an int >= 1, got -3"),
                                             (1.5, TypeError, "max_prompt_tokens must be an int, got 1.5")])
def test_a_max_prompt_tokens_that_is_not_a_count_is_refused(tiny, value, err, match):
    """Issue 23 item 13: -3 was reported as the prompts being too long, 1.5 accepted."""
    model, tok = tiny
    with pytest.raises(err, match=match):
        TextGenEnv(model, length_reward, ["the cat"], tokenizer=tok, max_prompt_tokens=value)
