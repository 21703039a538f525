"""Engine generation (lmgym.agents.scale.vllm): weight sync, exact re-scoring, the truncated importance weights.

A stub engine stands in for vLLM: it holds its own copy of the model, samples from it with noise on its
log-probs (a sampler that differs from the policy, as bf16 kernels do), and records weight pushes.
"""

from __future__ import annotations

import copy

import gymnasium as gym
import pytest
import torch

from lmgym.agents import GRPO
from lmgym.agents.scale.vllm import VLLMEngine, truncated_importance_weights, use_engine


class StubEngine:
    """Samples with its own model copy (plain ancestral sampling, full recompute: no KV cache shared with lmgym)."""

    def __init__(self, model, logprob_error: float = 0.05):
        self.model = copy.deepcopy(model).float().eval()
        self.error = logprob_error
        self.pushes = []

    def load_weights(self, weights):
        weights = dict(weights)
        self.pushes.append(weights)
        self.model.load_state_dict(weights, strict=False)

    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens, temperature, top_k, top_p, stop_token_ids, seeds):
        out = []
        for prompt, seed in zip(prompts, seeds):
            g = torch.Generator().manual_seed(seed)
            ids, tokens, lps = list(prompt), [], []
            for _ in range(max_new_tokens):
                logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1] / temperature
                logp = torch.log_softmax(logits, -1)
                tok = int(torch.multinomial(logp.exp(), 1, generator=g))
                tokens.append(tok)
                lps.append(float(logp[tok]) + self.error * (1 if tok % 2 else -1))  # the engine's numerics differ
                ids.append(tok)
                if tok in stop_token_ids:
                    break
            out.append((tokens, lps))
        return out


def make_agent(**overrides):
    env = gym.make_vec("lmgym/TargetToken-v0", num_envs=8, group_size=4, device="cpu")
    return GRPO(env, seed=1, learning_rate=3e-2, **overrides)


def test_weights_are_pushed_before_each_rollout_after_an_update_and_only_then():
    agent = make_agent()
    engine = StubEngine(agent.env.reference_model)
    sampler = use_engine(agent, engine)
    agent.collect()
    agent.collect()  # no update in between: nothing to push
    assert len(engine.pushes) == 1
    agent.learn(10**9, callbacks=[lambda a, m: a.iteration < 2], progress=False)
    assert sampler.pushes == len(engine.pushes) == 2  # the first rollout had the start's weights; the second after update 1
    agent.collect()  # after the second update
    assert len(engine.pushes) == 3
    for name, p in agent.policy.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], p), name


def test_engine_tokens_are_rescored_exactly_and_the_ratio_uses_the_policys_logprobs(tiny64):
    agent = make_agent()
    engine = StubEngine(agent.env.reference_model, logprob_error=0.05)
    use_engine(agent, engine, importance_sampling_cap=1.02)
    rollout = agent.collect()
    obs = {"input_ids": rollout.query_ids, "attention_mask": rollout.query_mask}
    # the environment's rewards are those of its own submission path for the same tokens and log-probs
    env2 = gym.make_vec("lmgym/TargetToken-v0", num_envs=8, group_size=4, device="cpu")
    env2.reset(options={"prompts": [ids[m.bool()].tolist() for ids, m in zip(obs["input_ids"], obs["attention_mask"])]})
    again = env2.score_sequences(rollout.tokens, rollout.logprobs)
    assert torch.equal(again.rewards, rollout.rewards) and torch.equal(again.scores, rollout.scores)
    # pi_old is the policy's own log-prob, from an independent float64 forward over the whole prefix
    policy64 = copy.deepcopy(agent.policy).double()
    for i in range(len(rollout)):
        prompt = obs["input_ids"][i][obs["attention_mask"][i].bool()].tolist()
        for t in range(int(rollout.lengths[i])):
            ids = prompt + rollout.tokens[i, :t].tolist()
            with torch.no_grad():
                logits = policy64(input_ids=torch.tensor([ids])).logits[0, -1]
            expected = float(torch.log_softmax(logits, -1)[rollout.tokens[i, t]])
            assert abs(float(rollout.logprobs[i, t]) - expected) < 1e-4
            # the truncated importance weight min(pi_old / mu, cap) of this token, by hand
            mu = expected + 0.05 * (1 if int(rollout.tokens[i, t]) % 2 else -1)
            w = min(float(torch.exp(torch.tensor(expected - mu, dtype=torch.float64))), 1.02)
            assert abs(float(rollout.sampling_weights[i, t]) - w) < 1e-4
    assert float(rollout.sampling_weights.max()) <= 1.02 + 1e-6


def test_grpo_weighs_each_tokens_loss_by_its_importance_weight():
    """With every weight w the gradient of the surrogate scales by w (KL off, one step from the same weights)."""
    grads = []
    for scale in (1.0, 0.5):
        agent = make_agent(beta=0.0)
        rollout = agent.collect()
        rollout.sampling_weights = torch.full_like(rollout.mask, scale)
        agent.optimizer_step = lambda: 0.0  # keep the gradient
        agent.update(rollout)
        grads.append(torch.cat([p.grad.flatten() for p in agent.policy.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[1], 0.5 * grads[0], atol=1e-7, rtol=1e-4)


def test_truncated_importance_weights_by_hand():
    pi = torch.tensor([[-1.0, -2.0, -0.5]])
    mu = torch.tensor([[-1.5, -1.0, -0.5]])
    w = truncated_importance_weights(pi, mu, cap=1.5, mask=torch.tensor([[1, 1, 0]]))
    assert torch.allclose(w, torch.tensor([[1.5, 0.36787944, 1.0]]))  # min(e^0.5, 1.5), e^-1, outside the mask


def _vllm_missing() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (vLLM generation is GPU only)"
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "needs vLLM: pip install lmgym[vllm]"
    return None


@pytest.mark.skipif(_vllm_missing() is not None, reason=_vllm_missing() or "")
def test_vllm_engine_generates_rollouts_that_train(tmp_path):
    env = gym.make_vec("lmgym/TargetToken-v0", num_envs=16, group_size=4, device="cuda")
    env.reference_model.save_pretrained(tmp_path / "model")
    env.tokenizer.save_pretrained(tmp_path / "model")
    agent = GRPO(env, seed=0)
    use_engine(agent, VLLMEngine(str(tmp_path / "model"), gpu_memory_utilization=0.2, enforce_eager=True))
    agent.learn(10**9, callbacks=[lambda a, m: a.iteration < 2], progress=False)
    rollout = agent.collect()
    assert rollout.sampling_weights is not None and bool(torch.isfinite(rollout.rewards).all())
    # the engine samples from (nearly) the policy: importance weights near 1
    assert float((rollout.sampling_weights * rollout.mask).sum() / rollout.mask.sum()) > 0.9


def test_weights_loaded_without_an_optimizer_step_are_pushed_too(tmp_path):
    """Loading a checkpoint's weights alone (resume=False) changes the policy without an AdamW step: the engine
    must not go on sampling from the weights it had."""
    trained = make_agent()
    trained.learn(10**9, callbacks=[lambda a, m: a.iteration < 1], progress=False)
    trained.save(tmp_path / "ckpt")
    agent = make_agent()
    engine = StubEngine(agent.env.reference_model)
    use_engine(agent, engine)
    agent.collect()
    agent.load(tmp_path / "ckpt", resume=False)
    agent.collect()
    assert len(engine.pushes) == 2
    for name, p in agent.policy.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], p), name
