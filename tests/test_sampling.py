"""Temperature, top-k and top-p: the sampled distribution, its log-probs, and a reference treated the same way."""

import math
import gymnasium as gym
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from lmgym.agents import GRPO
from lmgym.models import sample_continuations
from lmgym.models.sampling import Sampling

from conftest import PROMPTS, WORDS

SETTINGS = [Sampling(temperature=0.7), Sampling(top_k=5), Sampling(top_p=0.9),
            Sampling(temperature=0.7, top_k=5, top_p=0.9)]
IDS = ["T0.7", "k5", "p0.9", "T0.7-k5-p0.9"]


def hf_kept(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The tokens Hugging Face's own warpers keep (an independent implementation of the truncation)."""
    z = logits.double() / s.temperature
    if s.top_k:
        z = TopKLogitsWarper(s.top_k)(None, z)
    if s.top_p < 1:
        z = TopPLogitsWarper(s.top_p)(None, z)
    return torch.isfinite(z)


@pytest.mark.parametrize("s", SETTINGS, ids=IDS)
def test_truncation_and_log_probs_match_an_independent_reference(s):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 40, generator=g) * 3
    logq, kept = s.log_probs(logits)
    expected_kept = hf_kept(logits, s)
    if kept is None:
        assert expected_kept.all()
    else:
        assert torch.equal(kept, expected_kept)
    z = logits.double() / s.temperature
    norm = torch.logsumexp(z.masked_fill(~expected_kept, float("-inf")), dim=-1, keepdim=True)
    torch.testing.assert_close(logq.double()[expected_kept], (z - norm)[expected_kept], atol=1e-5, rtol=0)
    assert torch.isfinite(logq).all()  # tokens outside the set too: a finite penalty, never -inf


def test_sampler_draws_from_the_transformed_distribution():
    s = Sampling(temperature=0.7, top_k=5, top_p=0.9)
    logits = torch.tensor([[2.0, 1.5, 1.4, 1.0, 0.2, 0.1, -1.0, 0.15]])
    logq, kept = s.log_probs(logits)
    q = logq.exp().masked_fill(~kept, 0.0)[0]
    n = 40_000
    tokens, lp = s.sample(logits.expand(n, -1), torch.Generator().manual_seed(1))
    freq = torch.bincount(tokens, minlength=8).double() / n
    assert freq[~kept[0]].sum() == 0
    se = (q.double() * (1 - q.double()) / n).sqrt()
    assert ((freq - q.double()).abs() <= 4 * se + 1e-12).all()
    torch.testing.assert_close(lp, logq[0, tokens])


@pytest.mark.parametrize("kwargs,match", [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                          ({"top_k": -1}, "top_k"), ({"temperature": 0.0}, "temperature"),
                                          ({"temperature": -1.0}, "temperature")])
def test_bad_sampling_settings_are_clear_errors(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)
    model, tok = tiny
    venv = gym.make_vec("lmgym/TextGen-v0", num_envs=4, group_size=2, model=model, tokenizer=tok,
                        reward_fn=lambda p, c: [0.0] * len(c), prompts=PROMPTS, max_new_tokens=4)
    with pytest.raises(ValueError, match=match):
        GRPO(venv, **kwargs)


@torch.no_grad()
def slow_transformed_ref_logprob(model64, ids, action, s: Sampling) -> float:
    """log q_ref(action | ids): a float64 forward over the whole prefix, truncation by Hugging Face's warpers."""
    logits = model64(input_ids=torch.tensor([list(ids)])).logits[0, -1]
    kept = hf_kept(logits[None], s)[0]
    z = logits / s.temperature
    return float(z[action] - torch.logsumexp(z[kept], dim=0))


def test_environment_scores_the_reference_under_the_agents_sampling(tiny, tiny64):
    model, tok = tiny
    s = Sampling(temperature=0.7, top_k=5, top_p=0.9)
    venv = gym.make_vec("lmgym/TextGen-v0", num_envs=4, model=model, tokenizer=tok, reward_fn=lambda p, c: [0.0] * 4,
                        prompts=PROMPTS, max_new_tokens=5, kl_coef=0.1)
    venv.sampling = s
    venv.reset(seed=0, options={"prompts": PROMPTS})
    prompt_ids = [venv.core.row_prompts[i].ids for i in range(4)]
    tokens = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 1, 2, 3], [5, 5, 5, 5, 5]])
    submitted = venv.score_sequences(tokens)
    venv.reset(seed=0, options={"prompts": PROMPTS})
    stepped = torch.stack([venv.step(tokens[:, t])[4]["ref_logprob"] for t in range(5)], dim=1)
    for i in range(4):
        for t in range(5):
            prefix = prompt_ids[i] + tokens[i, :t].tolist()
            expected = slow_transformed_ref_logprob(tiny64, prefix, int(tokens[i, t]), s)
            assert abs(float(submitted.ref_logprobs[i, t]) - expected) < 1e-4
            assert abs(float(stepped[i, t]) - expected) < 1e-4


def mean_episode_kl(tiny, s: Sampling | None, *, batches: int = 25, untransformed_reference: bool = False):
    model, tok = tiny
    venv = gym.make_vec("lmgym/TextGen-v0", num_envs=32, group_size=2, model=model, tokenizer=tok,
                        reward_fn=lambda p, c: [0.0] * len(c), prompts=PROMPTS, max_new_tokens=8)
    agent = GRPO(venv, seed=0, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)  # policy == reference
    if untransformed_reference:  # what lmgym did before: the reference left untempered and untruncated
        venv.sampling = Sampling()
    kl = torch.cat([agent.collect().kl.sum(1) for _ in range(batches)]).double()
    return float(kl.mean()), float(kl.std() / kl.numel() ** 0.5)


@pytest.mark.parametrize("s", SETTINGS, ids=IDS)
def test_policy_equal_to_reference_has_zero_kl(tiny, s):
    mean, se = mean_episode_kl(tiny, s)
    print(f"{s}: mean episode KL {mean:.3e} +- {se:.1e} (800 episodes)")
    # Zero within three standard errors, plus float32 rounding between the KV-cached sampling
    # forward and the reference's scoring forward.
    assert abs(mean) <= 3 * se + 1e-5


def test_an_untransformed_reference_would_show_a_kl(tiny):
    mean, se = mean_episode_kl(tiny, Sampling(temperature=0.7, top_k=5, top_p=0.9), batches=4,
                               untransformed_reference=True)
    assert mean > 10 * se + 0.05


def test_sample_continuations_reports_the_sampled_distributions_log_probs(tiny, tiny64):
    model, tok = tiny
    s = Sampling(temperature=0.7, top_k=5, top_p=0.9)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    tokens, logprobs = sample_continuations(model, ids, torch.ones_like(ids), 4, stop_token_ids=[0], pad_token_id=0,
                                            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                            generator=torch.Generator().manual_seed(0))
    for i in range(2):
        for t in range(tokens.shape[1]):
            if t and tokens[i, t - 1] == 0:
                break
            prefix = ids[i].tolist() + tokens[i, :t].tolist()
            expected = slow_transformed_ref_logprob(tiny64, prefix, int(tokens[i, t]), s)
            assert abs(float(logprobs[i, t]) - expected) < 1e-4


def test_exact_optimum_is_refused_under_a_sampling_transformation():
    venv = gym.make_vec("lmgym/TargetToken-v0", num_envs=4, group_size=2)
    assert venv.optimal_return > 0
    GRPO(venv, temperature=0.7)
    with pytest.raises(ValueError, match="optimum"):
        venv.optimal_return


def test_a_uniform_draw_of_exactly_zero_cannot_pick_a_token_outside_the_kept_set(monkeypatch):
    """torch.rand returns 0 with probability 2**-24 per entry; -log(-log 0) is -inf, and when that hits the only kept
    token (top_k=1, or a one-token mask) every score is -inf and argmax fell back to token 0, which top-k had dropped."""
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0]])
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.zeros(shape))
    for sampler, allowed in ((Sampling(top_k=1), None), (Sampling(), torch.tensor([[False, False, True, False]]))):
        token, logprob = sampler.sample(logits, allowed=allowed)
        assert token.tolist() == [2]
        assert logprob.item() == pytest.approx(0.0)


def test_allowed_tokens_are_a_hard_constraint_even_when_the_truncation_keeps_none_of_them():
    """NLPO's nucleus and the agent's own top-k can disagree: the sampler then draws from the allowed tokens
    alone, weighted by q, with a finite log-prob, and the update forward scores it the same way."""
    from lmgym.agents.common.forward import _token_stats

    logits = torch.tensor([[3.0, 1.0, 0.0, 2.0], [3.0, 1.0, 0.0, 2.0]])
    allowed = torch.tensor([[False, True, True, False], [True, True, False, False]])
    sampling = Sampling(top_k=1)
    counts = torch.zeros(4)
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        tokens, logprobs = sampling.sample(logits, generator=g, allowed=allowed)
        assert bool(allowed[0, tokens[0]]) and int(tokens[1]) == 0  # row 1: top-1 and allowed overlap in token 0
        assert torch.isfinite(logprobs).all()
        counts[tokens[0]] += 1
    # row 0 by hand: q over {1, 2} proportional to e^1, e^0
    expected = torch.tensor([math.e / (math.e + 1), 1 / (math.e + 1)])
    assert abs(counts[1] / 2000 - expected[0]) < 0.03
    lp, _ = _token_stats(logits[:, None], torch.tensor([[1], [0]]), sampling, False, allowed[:, None])
    torch.testing.assert_close(lp[:, 0], torch.log(torch.tensor([expected[0], 1.0])))
