"""The environments' action mask: bound, checked, read by SB3's bridge and sb3-contrib's MaskablePPO."""

import copy
import math

import numpy as np
import pytest
import torch

from lmgym import EpisodeError, TextGenEnv, TextGenVectorEnv
from lmgym.agents.sb3 import LMGymVecEnv, bind_sb3_model
from lmgym.envs.masking import NucleusMask

from conftest import count_good
from test_nlpo import UNTIED_PROMPTS, reference_nucleus

TOP_P = 0.6


def vector_env(tiny, n=4, **kw):
    model, tok = tiny
    return TextGenVectorEnv(n, model=model, tokenizer=tok, reward_fn=count_good, prompts=UNTIED_PROMPTS,
                            max_new_tokens=5, kl_coef=0.1, device="cpu", **kw)


def masking_model(tiny):
    """A model unlike the reference (so masked and unmasked behaviour differ): the tiny LM with a sharper head."""
    model = copy.deepcopy(tiny[0])
    with torch.no_grad():
        model.lm_head.weight.mul_(3)
    return model


@torch.no_grad()
def hand_masks(model64, observation) -> np.ndarray:
    """The nucleus at each observed state, from a float64 forward over the real tokens only."""
    out = []
    for ids, mask in zip(np.asarray(observation["input_ids"]), np.asarray(observation["attention_mask"])):
        tokens = torch.tensor([ids[mask.astype(bool)].tolist()])
        probs = torch.softmax(model64(input_ids=tokens).logits[0, -1], -1).tolist()
        keep = reference_nucleus(probs, TOP_P) | {0}
        out.append([i in keep for i in range(len(probs))])
    return np.array(out)


def test_vector_env_reports_the_bound_mask(tiny):
    venv = vector_env(tiny)
    with pytest.raises(EpisodeError, match="reset"):
        venv.action_masks()
    obs, _ = venv.reset(seed=0)
    everything = venv.action_masks()
    assert everything.dtype == torch.bool and everything.shape == (4, 13) and bool(everything.all())

    model = masking_model(tiny)
    venv.set_action_mask_fn(NucleusMask(model, top_p=TOP_P, never_mask=venv.stop_token_ids))
    model64 = copy.deepcopy(model).double()
    for _ in range(3):  # the mask follows the state as tokens are appended
        expected = hand_masks(model64, {k: v.numpy() for k, v in obs.items()})
        masks = venv.action_masks()
        assert np.array_equal(masks.numpy(), expected)
        assert not expected.all()  # the nucleus excludes tokens here
        obs, *_ = venv.step(masks.float().argmax(1))  # any allowed token

    venv.set_action_mask_fn(None)
    assert bool(venv.action_masks().all())

    numpy_env = vector_env(tiny, output="numpy")
    numpy_env.reset(seed=0)
    numpy_env.set_action_mask_fn(lambda o: torch.ones(4, 13, dtype=torch.bool))
    assert isinstance(numpy_env.action_masks(), np.ndarray)

    single = TextGenEnv(tiny[0], count_good, UNTIED_PROMPTS, tokenizer=tiny[1], max_new_tokens=5)
    obs, _ = single.reset(seed=0)
    single.set_action_mask_fn(NucleusMask(model, top_p=TOP_P, never_mask=[0]))
    mask = single.action_masks()
    assert mask.shape == (13,) and mask.dtype == bool
    assert np.array_equal(mask, hand_masks(model64, {k: v[None] for k, v in obs.items()})[0])


def test_bad_mask_functions_are_reported(tiny):
    venv = vector_env(tiny)
    venv.reset(seed=0)
    with pytest.raises(TypeError, match="callable"):
        venv.set_action_mask_fn("top_p")
    cases = [(lambda o: torch.ones(4, 12, dtype=torch.bool), "shape"),
             (lambda o: torch.full((4, 13), 0.5), "booleans"),
             (lambda o: torch.zeros(4, 13, dtype=torch.bool), "allows no token"),
             ]
    for fn, message in cases:
        venv.set_action_mask_fn(fn)
        with pytest.raises(ValueError, match=message):
            venv.action_masks()
    venv.set_action_mask_fn(lambda o: np.ones((4, 13), dtype=np.int64))  # 0/1 integers are accepted
    assert bool(venv.action_masks().all())


def test_bridge_hands_maskable_ppo_the_mask(tiny):
    sb3_contrib = pytest.importorskip("sb3_contrib")
    from sb3_contrib.common.maskable.utils import get_action_masks

    venv = vector_env(tiny, n=4)
    env = LMGymVecEnv(venv, seed=0)
    model = masking_model(tiny)
    env.set_action_mask_fn(NucleusMask(model, top_p=TOP_P, never_mask=venv.stop_token_ids))
    env.reset()
    masks = get_action_masks(env)  # what MaskablePPO reads each step
    assert masks.shape == (4, 13) and masks.dtype == bool
    assert np.array_equal(masks, env.action_masks()) and not masks.all()

    agent = sb3_contrib.MaskablePPO("MultiInputPolicy", env, n_steps=16, batch_size=32, n_epochs=1, seed=0)
    bind_sb3_model(env, agent)  # the KL term sees the masked policy
    agent.learn(64)
    buffer = agent.rollout_buffer  # the last rollout, flattened over (env, step)
    actions = buffer.actions.reshape(-1).astype(int)
    stored = buffer.action_masks.astype(bool)
    assert np.array_equal(stored, hand_masks(copy.deepcopy(model).double(), buffer.observations))
    assert stored[np.arange(len(actions)), actions].all()  # every action taken was allowed
    assert not stored.all()

    # The bound log-prob is that of the policy restricted to the mask and renormalised.
    obs = venv.observation()
    allowed = venv.action_masks()
    actions = allowed.float().argmax(1)
    bound = venv.core.policy_fn(obs, actions)
    with torch.no_grad():
        obs_t, _ = agent.policy.obs_to_tensor({k: v.numpy() for k, v in obs.items()})
        probs = agent.policy.get_distribution(obs_t).distribution.probs.double()
    for i, a in enumerate(actions.tolist()):
        expected = math.log(probs[i, a] / probs[i][allowed[i]].sum())
        assert float(bound[i]) == pytest.approx(expected, abs=1e-5)
