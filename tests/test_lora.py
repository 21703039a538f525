"""LoRA through PEFT (reference = the same model with adapters disabled), the chunked log-prob path, and
gradient checkpointing."""

import copy
import sys

import gymnasium as gym
import pytest
import torch

from lmgym.agents import GRPO, PPO
from lmgym.agents.common.base import Rollout, policy_forward
from lmgym.agents.common.logprobs import check_plain_output_head
from lmgym.models import tiny_model
from lmgym.models.sampling import Sampling

from conftest import PROMPTS, WORDS

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj", "lm_head"]}


def count_good(prompts, completions):
    return [c.split().count("good") - 0.1 * len(c.split()) for c in completions]


def fresh_model():
    return tiny_model(WORDS, hidden_size=32, num_layers=2, num_heads=4, max_positions=64, seed=1, init_std=0.3)


def make_env(model, tok, num_envs=8, **kwargs):
    return gym.make_vec("lmgym/TextGen-v0", num_envs=num_envs, group_size=4, model=model, tokenizer=tok,
                        reward_fn=count_good, prompts=PROMPTS, max_new_tokens=6, **kwargs)


# ---------------------------------------------------------------------------- chunked log-probs


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.7, top_k=5, top_p=0.9)],
                         ids=["plain", "T0.7-k5-p0.9"])
def test_chunked_logprobs_equal_the_full_path_with_gradients(sampling):
    model, tok = fresh_model()
    model.train()
    venv = make_env(model, tok)
    rollout = GRPO(venv, seed=0).collect()
    weights = torch.randn(rollout.tokens.shape, generator=torch.Generator().manual_seed(0))
    results = []
    for chunk in (0, 5):
        model.zero_grad()
        logprobs, entropy, hidden = policy_forward(model, rollout, sampling=sampling, chunk_size=chunk, hidden=True,
                                                   entropy_grad=True)
        ((logprobs * weights).sum() + entropy.sum()).backward()
        results.append((logprobs.detach(), entropy.detach(), hidden.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp0, ent0, h0, g0), (lp1, ent1, h1, g1) = results
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent1, ent0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h1, h0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4)


def test_chunked_agent_trains_like_the_plain_one():
    params = []
    for chunk in (0, 4):
        model, tok = fresh_model()
        agent = PPO(make_env(model, tok), seed=0, learning_rate=1e-3, logprob_chunk_size=chunk, ent_coef=0.01)
        agent.learn(100, progress=False)
        params.append(torch.cat([p.detach().flatten() for p in agent.policy.parameters()]))
    torch.testing.assert_close(params[1], params[0], atol=1e-4, rtol=1e-4)


def test_chunked_path_refuses_a_model_with_post_processed_logits():
    model, _ = fresh_model()
    model.register_forward_hook(lambda module, args, out: out.__setitem__("logits", out.logits * 0.5) or out)
    with pytest.raises(ValueError, match="logprob_chunk_size=0"):
        check_plain_output_head(model)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_update(lora):
    if lora:
        pytest.importorskip("peft")
    params = []
    for checkpointing in (False, True):
        model, tok = fresh_model()
        agent = GRPO(make_env(model, tok), seed=0, learning_rate=1e-2, gradient_checkpointing=checkpointing,
                     peft_config=LORA if lora else None)
        agent.learn(100, progress=False)
        params.append(torch.cat([p.detach().flatten() for p in agent.policy.parameters() if p.requires_grad]))
    assert agent.env.reference_model.model.gradient_checkpointing or not lora
    torch.testing.assert_close(params[1], params[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- LoRA


def test_lora_without_peft_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    model, tok = fresh_model()
    with pytest.raises(ImportError, match=r"lmgym\[lora\]"):
        GRPO(make_env(model, tok), peft_config=LORA)


def lora_agent(model, tok, **overrides):
    pytest.importorskip("peft")
    venv = make_env(model, tok)
    agent = GRPO(venv, seed=0, learning_rate=3e-2, peft_config=LORA, **overrides)
    return venv, agent


@torch.no_grad()
def scored(venv, tokens):
    venv.reset(seed=0, options={"prompts": PROMPTS[:2]})
    return venv.score_sequences(tokens).ref_logprobs


def test_lora_reference_is_the_model_with_adapters_disabled():
    model, tok = fresh_model()
    venv, agent = lora_agent(model, tok, logprob_chunk_size=7, gradient_checkpointing=True)
    separate = make_env(model, tok)  # its own frozen copy of the same model
    assert agent.policy.model.get_base_model() is venv.reference_model  # no second copy
    base = {n: p.detach().clone() for n, p in agent.policy.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in agent.policy.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    agent.learn(200, progress=False)

    tokens = torch.tensor([[1, 9, 9, 2, 3, 4]] * 4 + [[9, 0, 0, 0, 0, 0]] * 4)
    shared_ref, separate_ref = scored(venv, tokens), scored(separate, tokens)
    torch.testing.assert_close(shared_ref, separate_ref, atol=1e-6, rtol=0)
    rollout = agent.collect()
    with torch.no_grad():
        policy_lp, _, _ = policy_forward(agent.policy, rollout)
    assert (policy_lp - rollout.ref_logprobs).abs().max() > 1e-2  # the adapters do change the policy
    assert rollout.kl.abs().sum() > 0

    after = dict(agent.policy.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items())  # the reference's weights never move
    changed = sum(int((after[n] != v).sum()) for n, v in adapters.items())
    assert changed / sum(v.numel() for v in adapters.values()) > 0.9


def test_lora_adapters_are_float32_on_a_bf16_reference():
    model, tok = fresh_model()
    pytest.importorskip("peft")
    venv = make_env(model, tok, dtype="bfloat16")
    agent = GRPO(venv, seed=0, learning_rate=1e-3, peft_config=LORA)
    trainable = [p for p in agent.policy.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert next(venv.reference_model.parameters()).dtype == torch.bfloat16
    agent.learn(50, progress=False)


def test_lora_export_merged_or_adapters(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = fresh_model()
    untouched = copy.deepcopy(model)
    _, agent = lora_agent(model, tok)
    agent.learn(100, progress=False)
    ids = torch.tensor([[1, 2, 3, 9, 9]])
    with torch.no_grad():
        expected = agent.policy(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(agent.save_pretrained(tmp_path / "merged"))
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        adapters = agent.save_pretrained(tmp_path / "adapters", merge=False)
        assert (adapters / "adapter_model.safetensors").is_file()
        assert not (adapters / "model.safetensors").exists()
        loaded = PeftModel.from_pretrained(untouched, adapters)
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    # Exporting left the shared reference as it was: still the reference with adapters off.
    with torch.no_grad():
        torch.testing.assert_close(agent.env.reference_model(input_ids=ids).logits,
                                   fresh_model()[0](input_ids=ids).logits, atol=1e-6, rtol=0)


def test_lora_checkpoint_resumes(tmp_path):
    model, tok = fresh_model()
    _, agent = lora_agent(model, tok)
    agent.learn(60, progress=False)
    path = agent.save(tmp_path / "ckpt")
    # the checkpoint holds the adapters only: the base is the environment's reference, pinned by its fingerprint
    from safetensors.torch import load_file

    stored = load_file(path / "policy.safetensors")
    adapters = {k for k, v in agent.policy.named_parameters() if v.requires_grad}
    assert set(stored) == adapters and all("lora_" in k for k in stored)
    _, resumed = lora_agent(fresh_model()[0], tok)
    resumed.load(path)
    for (name, a), (_, b) in zip(agent.policy.named_parameters(), resumed.policy.named_parameters()):
        assert torch.equal(a, b), name
    agent.learn(120, progress=False)
    resumed.learn(120, progress=False)
    for (name, a), (_, b) in zip(agent.policy.named_parameters(), resumed.policy.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_lora_checkpoint_refuses_a_different_base(tmp_path):
    """A LoRA checkpoint stores only adapters: loading them onto another base model must be refused, not mixed."""
    from lmgym.agents import CheckpointError

    model, tok = fresh_model()
    _, agent = lora_agent(model, tok)
    agent.learn(30, progress=False)
    path = agent.save(tmp_path / "ckpt")
    other, _ = tiny_model(WORDS, hidden_size=32, num_layers=2, num_heads=4, max_positions=64, seed=2, init_std=0.3)
    _, elsewhere = lora_agent(other, tok)
    with pytest.raises(CheckpointError, match="reference model"):
        elsewhere.load(path)
