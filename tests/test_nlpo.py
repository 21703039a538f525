"""NLPO: sampling stays inside the masking policy's nucleus, the mask refreshes on schedule, p = 1 is PPO."""

import copy
import math

import gymnasium as gym
import pytest
import torch

from lmgym import TextGenVectorEnv
from lmgym.agents import NLPO, PPO, ConfigError
from lmgym.envs.masking import NucleusMask, nucleus_mask

from conftest import PROMPTS, count_good


def reference_nucleus(probs: list[float], top_p: float, min_tokens_to_keep: int = 1) -> set[int]:
    """Holtzman et al.'s nucleus by hand: most probable first, until the kept mass reaches top_p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        if mass >= top_p and len(kept) >= min_tokens_to_keep:
            break
        kept.add(i)
        mass += probs[i]
    return kept


def test_nucleus_mask_matches_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 13, generator=gen, dtype=torch.float64) * 2
    for top_p, min_keep in [(0.5, 1), (0.9, 1), (0.9, 4), (0.999, 1), (1e-3, 1), (1.0, 1)]:
        mask = nucleus_mask(logits, top_p, min_tokens_to_keep=min_keep, never_mask=torch.tensor([0, 5]))
        for row, m in zip(logits, mask):
            probs = [math.exp(x) for x in row.tolist()]
            probs = [p / sum(probs) for p in probs]
            expected = reference_nucleus(probs, top_p, min_keep) | {0, 5}
            assert set(torch.nonzero(m).flatten().tolist()) == expected, (top_p, min_keep)
    assert nucleus_mask(logits, 1.0).all()


@pytest.mark.parametrize("top_p,min_keep", [(0.3, 2), (0.3, 1), (0.5, 2), (0.1, 4), (0.7, 2)])
def test_a_tied_nucleus_is_the_smallest_set_with_its_minimum(top_p, min_keep):
    """Issue 23 item 16: with tied probabilities and min_tokens_to_keep > 1 the top-p set and the minimum's own
    top-k broke the tie differently and their union was larger than either (3 tokens kept for 2)."""
    for logits in (torch.zeros(3, 5), torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 1.0]])):
        probs = torch.softmax(logits[0].double(), -1).tolist()
        size = len(reference_nucleus(probs, top_p, min_keep))  # a tie makes the set, not its size, ambiguous
        mask = nucleus_mask(logits, top_p, min_tokens_to_keep=min_keep)
        assert mask.sum(-1).tolist() == [size] * len(logits), (logits, top_p, min_keep)


# "a" is not in the tiny vocabulary: it encodes to EOS, whose zero embedding gives every token the same
# probability, and the nucleus of a tie depends on how ties are ordered. The other prompts have no ties.
UNTIED_PROMPTS = [p for p in PROMPTS if p != "a"]


def tiny_venv(tiny, num_envs=32, max_new_tokens=6):
    model, tok = tiny
    return TextGenVectorEnv(num_envs, model=model, tokenizer=tok, reward_fn=count_good, prompts=UNTIED_PROMPTS,
                            max_new_tokens=max_new_tokens, kl_coef=0.1, device="cpu")


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_no_token_outside_the_masking_policys_nucleus_is_ever_sampled(tiny, temperature):
    top_p = 0.7
    agent = NLPO(tiny_venv(tiny), mask_top_p=top_p, seed=3, temperature=temperature)
    # A masking policy that disagrees with the policy, so the policy's own samples would often leave its nucleus.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        head = agent.masking_policy.lm_head.weight
        head.copy_(3 * torch.randn(head.shape, generator=gen) * head.abs().mean())
    mask64, policy64 = copy.deepcopy(agent.masking_policy).double(), copy.deepcopy(agent.policy).double()
    never = set(agent.never_mask.tolist())
    assert never == {0}  # the tokenizer's EOS: stop and special token at once

    sampled, outside_mass, masked_states = 0, 0.0, 0
    for _ in range(5):
        rollout = agent.collect()
        # The update recomputes the same masked distribution: the PPO ratio starts at exactly 1.
        with torch.no_grad():
            update_logprobs = agent.forward(rollout)[0]
        assert torch.allclose(update_logprobs * rollout.mask, rollout.logprobs * rollout.mask, atol=1e-5)
        for i in range(len(rollout)):
            prompt = rollout.query_ids[i][rollout.query_mask[i].bool()].tolist()
            n = int(rollout.lengths[i])
            ids = torch.tensor([prompt + rollout.tokens[i, :n].tolist()])
            with torch.no_grad():
                # both at the agent's sampling temperature
                mask_probs = torch.softmax(mask64(input_ids=ids).logits[0, len(prompt) - 1:-1] / temperature, -1)
                pol_logp = torch.log_softmax(policy64(input_ids=ids).logits[0, len(prompt) - 1:-1] / temperature, -1)
            for t in range(n):
                nucleus = reference_nucleus(mask_probs[t].tolist(), top_p) | never
                token = int(rollout.tokens[i, t])
                assert token in nucleus, f"token {token} sampled outside the nucleus {sorted(nucleus)}"
                # The log-prob handed to the environment is that of the renormalised masked distribution.
                inside = torch.tensor(sorted(nucleus))
                expected = pol_logp[t, token] - torch.logsumexp(pol_logp[t, inside], 0)
                assert float(rollout.logprobs[i, t]) == pytest.approx(float(expected), abs=1e-4)
                sampled += 1
                masked_states += len(nucleus) < mask_probs.shape[-1]
                outside_mass += 1 - float(pol_logp[t, inside].exp().sum())
    assert sampled > 300 and masked_states > 0.9 * sampled
    # Unmasked, the policy would have left the nucleus this many times in expectation: the check has teeth.
    assert outside_mass > 100


def param_snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_masking_policy_refreshes_on_schedule(tiny):
    agent = NLPO(tiny_venv(tiny, num_envs=16), mask_update_every=3, learning_rate=1e-2, seed=0)
    assert same(param_snapshot(agent.masking_policy), param_snapshot(agent.policy))
    last_refresh = param_snapshot(agent.policy)
    refreshed = []
    for iteration in range(1, 8):
        agent.learn(agent.global_step + 1, progress=False, callbacks=[lambda a, m: refreshed.append(
            m["nlpo/mask_refreshed"])])  # exactly one more iteration
        assert agent.iteration == iteration
        policy, masking = param_snapshot(agent.policy), param_snapshot(agent.masking_policy)
        if iteration % 3 == 0:
            assert same(masking, policy), f"not refreshed at iteration {iteration}"
            last_refresh = policy
        else:
            assert same(masking, last_refresh), f"changed between refreshes at iteration {iteration}"
            assert not same(masking, policy)  # stale: the policy has moved on
    assert refreshed == [0, 0, 1, 0, 0, 1, 0]


def test_top_p_one_reduces_to_ppo_exactly(tiny):
    def run(cls, **extra):
        torch.manual_seed(7)
        agent = cls(tiny_venv(tiny, num_envs=16), learning_rate=1e-2, seed=2, num_minibatches=2, **extra)
        agent.learn(1, progress=False)  # one iteration
        assert agent.iteration == 1
        return {f"{m}.{k}": v.detach().clone() for m, mod in agent.trainable_modules().items()
                for k, v in mod.state_dict().items() if m != "masking_policy"}

    ppo, nlpo = run(PPO), run(NLPO, mask_top_p=1.0)
    assert ppo.keys() == nlpo.keys()
    for k in ppo:
        assert torch.equal(ppo[k], nlpo[k]), k
    # and a nucleus below 1 changes the update
    masked = run(NLPO, mask_top_p=0.5)
    assert not all(torch.equal(ppo[k], masked[k]) for k in ppo)


def test_nlpo_reaches_90_percent_of_the_exact_optimum():
    torch.manual_seed(0)
    venv = gym.make_vec("lmgym/TargetToken-v0", num_envs=64, device="cpu")
    agent = NLPO(venv, learning_rate=3e-3, seed=1)  # the budget and learning rate of the PPO test
    start = agent.evaluate()["return"]
    agent.learn(15_000, progress=False)
    end = agent.evaluate(num_batches=8)["return"]
    optimum = venv.optimal_return
    assert start / optimum < 0.5
    assert end / optimum >= 0.9, f"NLPO reached {end / optimum:.1%} of the optimum"


def test_interrupted_and_resumed_run_keeps_the_masking_policy(tiny, tmp_path):
    def fresh():
        torch.manual_seed(123)
        return NLPO(tiny_venv(tiny, num_envs=16), learning_rate=1e-2, mask_top_p=0.8, mask_update_every=2)

    straight = fresh()
    straight.learn(16 * 6 * 4, progress=False)
    first = fresh()
    initial = param_snapshot(first.masking_policy)
    first.learn(16 * 6 * 2, progress=False)
    assert not same(param_snapshot(first.masking_policy), initial)  # refreshed before the checkpoint
    first.save(tmp_path / "ckpt")
    resumed = fresh().load(tmp_path / "ckpt")
    resumed.learn(16 * 6 * 4, progress=False)
    assert resumed.iteration == straight.iteration
    for a, b in [(straight.policy, resumed.policy), (straight.masking_policy, resumed.masking_policy)]:
        assert same(param_snapshot(a), param_snapshot(b))


@pytest.mark.parametrize("top_p", [0, -0.1, 1.5, float("nan"), "0.9"])
def test_top_p_outside_the_unit_interval_is_refused(tiny, top_p):
    with pytest.raises(ConfigError, match="mask_top_p"):
        NLPO(tiny_venv(tiny, num_envs=4), mask_top_p=top_p)
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\]"):
        NucleusMask(tiny[0], top_p=top_p)
    with pytest.raises(ValueError, match="top_p"):
        nucleus_mask(torch.zeros(2, 3), top_p)
