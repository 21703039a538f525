"""The update's fast path (selective log-probs with a hand-written backward, logits only for the continuation,
fused AdamW) against independent float64 references."""

import copy
import math

import gymnasium as gym
import pytest
import torch

from lmgym.agents import GRPO
from lmgym.agents.common import logprobs as logprobs_module
from lmgym.agents.common.base import policy_forward
from lmgym.agents.common.logprobs import selective_logprobs
from lmgym.models.sampling import Sampling

from conftest import PROMPTS, count_good

pytestmark = pytest.mark.compat  # also run on the oldest declared torch and transformers (.ci/run)


@pytest.mark.parametrize("block_elements", [7, 2**21])  # several blocks (some rows split over none) / one block
def test_selective_logprobs_values_and_gradient_match_float64_autograd(monkeypatch, block_elements):
    monkeypatch.setattr(logprobs_module, "BLOCK_ELEMENTS", block_elements)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 11, generator=g)).requires_grad_()
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    upstream = torch.randn(2, 5, generator=g)

    lp, ent = selective_logprobs(logits.clone(), tokens)
    (lp * upstream).sum().backward()

    ref_logits = logits.detach().double().requires_grad_()
    logq = torch.log_softmax(ref_logits, dim=-1)
    ref_lp = logq.gather(-1, tokens[..., None]).squeeze(-1)
    ref_ent = -(logq.exp() * logq).sum(-1)
    (ref_lp * upstream.double()).sum().backward()

    torch.testing.assert_close(lp.double(), ref_lp.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, atol=1e-6, rtol=0)
    assert not ent.requires_grad


def test_selective_logprobs_refuses_a_second_backward():
    logits = torch.randn(3, 4, 6, requires_grad=True)
    lp, _ = selective_logprobs(logits * 1.0, torch.zeros(3, 4, dtype=torch.long))
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through it once"):
        lp.sum().backward()


def gpt2(vocab: int = 13):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_policy_forward_matches_a_float64_full_logits_forward(temperature):
    """Log-probs, entropy and parameter gradients equal those of a float64 forward over every position."""
    from lmgym.agents.common.base import Rollout

    model = gpt2()
    g = torch.Generator().manual_seed(1)
    query = torch.randint(1, 13, (3, 4), generator=g)
    query_mask = torch.ones_like(query)
    query_mask[0, :2] = 0  # left padding
    tokens = torch.randint(0, 13, (3, 5), generator=g)
    zeros = torch.zeros(3, 5)
    batch = Rollout(query_ids=query, query_mask=query_mask, tokens=tokens, mask=zeros + 1, logprobs=zeros,
                    ref_logprobs=zeros, rewards=zeros, scores=zeros[:, 0], kl=zeros, lengths=torch.full((3,), 5))
    upstream = torch.randn(3, 5, generator=g)

    lp, ent, _ = policy_forward(model, batch, sampling=Sampling(temperature))
    (lp * upstream).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = copy.deepcopy(model).double()
    ref.zero_grad(set_to_none=True)
    ids = torch.cat([query, tokens], 1)
    mask = torch.cat([query_mask, torch.ones_like(tokens)], 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, 3:-1] / temperature
    logq = torch.log_softmax(logits, -1)
    ref_lp = logq.gather(-1, tokens[..., None]).squeeze(-1)
    (ref_lp * upstream.double()).sum().backward()

    torch.testing.assert_close(lp.double(), ref_lp.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), -(logq.exp() * logq).sum(-1).detach(), atol=1e-5, rtol=0)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name].double(), p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_grpo_optimizer_is_fused_adamw_and_steps_as_adamw_by_hand(tiny):
    model, tok = tiny
    env = gym.make_vec("lmgym/TextGen-v0", num_envs=4, group_size=2, model=model, tokenizer=tok,
                       reward_fn=count_good, prompts=PROMPTS, max_new_tokens=4, device="cpu")
    lr, eps, wd = 1e-2, 1e-8, 0.1
    agent = GRPO(env, seed=0, learning_rate=lr, weight_decay=wd, max_grad_norm=1e6)
    assert agent.optimizer.param_groups[0]["fused"] is True
    params = [p for p in agent.parameters() if p.requires_grad]
    before = [p.detach().double().clone() for p in params]
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    for p, grad in zip(params, grads):
        p.grad = grad.clone()
    agent.optimizer_step()
    b1, b2 = 0.9, 0.999
    for p, w, grad in zip(params, before, grads):
        grad = grad.double()
        m, v = (1 - b1) * grad, (1 - b2) * grad * grad  # first step from zero moments
        expected = w * (1 - lr * wd) - lr * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
        torch.testing.assert_close(p.detach().double(), expected, atol=1e-6, rtol=0)
    assert math.isfinite(agent.optimizer.param_groups[0]["lr"])
