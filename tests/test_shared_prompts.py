"""The update forward (lmgym.agents.common.forward) encodes each distinct prompt once and skips the positions after an
episode's end: the log-probs, entropies, hidden states and gradients must equal those of encoding each completion
on its own, computed here one completion at a time in float64, and be 0 after the end."""

import pytest
import torch

from lmgym.utils import fast_paths
from lmgym.models import hf_api
from lmgym.agents.common.base import Rollout
from lmgym.agents.common import forward
from lmgym.agents.common.forward import bucket_count, policy_forward, shares_prompts

pytestmark = pytest.mark.compat  # also run on the oldest declared torch and transformers (.ci/run)


def model_of(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=23, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=64)
    if kind == "gpt2":
        config = tf.GPT2Config(vocab_size=23, n_positions=64, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0)
        return tf.GPT2LMHeadModel(config)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=1, **common))
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=1, **common))


def grouped_rollout(group_size: int = 3, seed: int = 0) -> Rollout:
    """3 prompts of different lengths (left-padded to 6), each continued group_size times with 5 tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = [6, 2, 4]
    query_ids = torch.zeros(len(lengths), 6, dtype=torch.long)
    query_mask = torch.zeros_like(query_ids)
    for row, n in enumerate(lengths):
        query_ids[row, 6 - n:] = torch.randint(1, 23, (n,), generator=g)
        query_mask[row, 6 - n:] = 1
    n = len(lengths) * group_size
    tokens = torch.randint(1, 23, (n, 5), generator=g)
    episode_lengths = torch.randint(1, 6, (n,), generator=g)  # episodes end anywhere within the 5 steps
    mask = (torch.arange(5) < episode_lengths[:, None]).float()
    zeros = torch.zeros(n, 5)
    return Rollout(query_ids=query_ids.repeat_interleave(group_size, 0),
                   query_mask=query_mask.repeat_interleave(group_size, 0), tokens=tokens, mask=mask,
                   logprobs=zeros, ref_logprobs=zeros, rewards=zeros, scores=torch.zeros(n), kl=zeros,
                   lengths=episode_lengths, group_size=group_size)


def one_at_a_time(model, rollout: Rollout, upstream: torch.Tensor):
    """The reference: each completion alone up to its episode's end, its prompt's padding cut off, float64,
    plain autograd; zeros after the end."""
    logprobs, entropies, hiddens = torch.zeros(3, len(rollout), 5, dtype=torch.float64)
    hiddens = torch.zeros(len(rollout), 5, 16, dtype=torch.float64)
    total = 0
    for i in range(len(rollout)):
        prompt = rollout.query_ids[i][rollout.query_mask[i].bool()]
        k = int(rollout.lengths[i])
        ids = torch.cat([prompt, rollout.tokens[i, :k]])[None]
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        at = slice(len(prompt) - 1, ids.shape[1] - 1)  # the positions that predict the continuation
        logq = torch.log_softmax(out.logits[0, at].double(), dim=-1)
        lp = logq.gather(-1, rollout.tokens[i, :k, None]).squeeze(-1)
        total = total + (lp * upstream[i, :k]).sum()
        logprobs[i, :k] = lp.detach()
        entropies[i, :k] = -(logq.exp() * logq).sum(-1).detach()
        hiddens[i, :k] = out.hidden_states[-1][0, at].detach()
    total.backward()
    return logprobs, entropies, hiddens


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("chunk_size", [0, 4])
@pytest.mark.parametrize("few_trainable", [0.1, 1.0])  # one bucket (every weight trains) / forced length buckets
def test_shared_prompt_forward_equals_each_completion_alone(kind, chunk_size, few_trainable, monkeypatch):
    monkeypatch.setattr(forward, "FEW_TRAINABLE", few_trainable)
    rollout = grouped_rollout()
    model = model_of(kind).double()
    reference = model_of(kind).double()
    assert shares_prompts(model, rollout)
    upstream = torch.randn(len(rollout), 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    logprobs, entropy, hidden = policy_forward(model, rollout, hidden=True, chunk_size=chunk_size)
    (logprobs * upstream).sum().backward()
    ref_logprobs, ref_entropy, ref_hidden = one_at_a_time(reference, rollout, upstream)

    # the model runs in float64; the log-softmax in float32 (as in training), hence two tolerances
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-12, rtol=0)
    torch.testing.assert_close(logprobs.double(), ref_logprobs, atol=2e-6, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=2e-6, rtol=0)
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("trains", ["adapters", "nothing"])
def test_the_prompt_is_encoded_once_per_group_and_no_position_after_the_end(trains):
    """The forward sees each distinct prompt once, then the continuations in length buckets: counted positions.
    Buckets serve forwards without gradients and policies training few of their weights."""
    rollout = grouped_rollout(group_size=4)
    model = model_of("llama")
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    if trains == "adapters":  # the output layer only: a small share of the weights, like LoRA's adapters
        model.requires_grad_(False).lm_head.requires_grad_(True)
        assert sum(p.numel() for p in model.lm_head.parameters()) <= 0.1 * sum(p.numel() for p in model.parameters())
        policy_forward(model, rollout)
    else:
        with torch.no_grad():
            policy_forward(model, rollout)
    prompt_width, new = rollout.query_ids.shape[1], rollout.tokens.shape[1]
    widths = sorted(rollout.lengths.tolist(), reverse=True)[::3]  # 12 rows in 4 buckets of 3, longest first
    assert seen == [(3, prompt_width - 1)] + [(3, w) for w in widths]  # 3 prompts, then the continuations
    assert sum(w for w in widths) * 3 < 12 * new  # fewer positions than all rows at full width


def test_no_sharing_without_groups_or_under_gradient_checkpointing():
    rollout = grouped_rollout(group_size=1)
    model = model_of("llama")
    assert not shares_prompts(model, rollout)
    hf_api.enable_activation_checkpointing(model)  # by the name the installed transformers uses
    fast_paths.forget()
    with pytest.warns(fast_paths.FastPathWarning, match="'prompt sharing' is off: activation checkpointing is on"):
        assert not shares_prompts(model, grouped_rollout())


def test_a_fully_trained_policy_runs_one_bucket_cut_to_the_longest_row():
    rollout = grouped_rollout(group_size=4)
    rollout.mask[:, -1] = 0  # no episode reaches the last step
    model = model_of("llama")
    assert bucket_count(model) == 1
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    policy_forward(model, rollout)
    assert seen == [(3, rollout.query_ids.shape[1] - 1), (12, rollout.tokens.shape[1] - 1)]
