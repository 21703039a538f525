"""Speed benchmarks, each a ratio against a baseline measured in the same run.

``environment_rollout`` times, for the same model, batch and lengths:

(a) the baseline: ``model.generate`` (sampling, KV cache) plus one reference-model
    forward over the result to get the reference log-probs;
(b) an lmgym rollout through the submission path: the policy samples whole
    continuations (KV-cached), then ``score_sequences`` returns every per-token reward;
(c) an lmgym rollout through per-token ``step``: a KV-cached sampling loop that
    calls ``env.step(actions, logprobs)`` for each token.

It reports median seconds per rollout and the ratios b/a and c/a.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from lmgym.models import resolve_device, sample_continuations, tiny_model, to_left_padded
from lmgym.vector import TextGenVectorEnv

__all__ = ["bench_model", "environment_rollout"]


def bench_model(size: str = "4M", seed: int = 0):
    """A randomly initialised Llama-style model of about 4M or 100M parameters, and its tokenizer."""
    shapes = {"4M": dict(vocab=2048, hidden_size=256, num_layers=4, num_heads=4),
              "100M": dict(vocab=32000, hidden_size=768, num_layers=10, num_heads=12)}
    if size not in shapes:
        raise ValueError(f"size must be one of {sorted(shapes)}, got {size!r}")
    s = shapes[size]
    return tiny_model(s["vocab"], hidden_size=s["hidden_size"], num_layers=s["num_layers"],
                      num_heads=s["num_heads"], max_positions=256, seed=seed)


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def environment_rollout(size: str = "4M", batch: int = 64, new_tokens: int = 32, prompt_tokens: int = 16,
                        device="auto", repeats: int = 3, seed: int = 0) -> dict:
    """Time the three rollouts described in the module docstring; returns seconds and ratios."""
    dev = resolve_device(device)
    ref, tok = bench_model(size, seed)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ref = ref.to(dev, dtype)
    policy = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(seed)
    # Prompts of varied length; token 0 is EOS, so prompts avoid it.
    prompts = [torch.randint(1, len(tok), (int(n),), generator=g).tolist()
               for n in torch.randint(prompt_tokens // 2, prompt_tokens + 1, (batch,), generator=g)]
    # Episodes run to full length in every path, so each does the same work.
    never = [len(tok) - 1]
    env = TextGenVectorEnv(batch, model=ref, tokenizer=tok, reward_fn=lambda p, c: [float(len(x)) for x in c],
                           prompts=prompts, max_new_tokens=new_tokens, stop_token_ids=never, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)

    def baseline():
        obs = env.observation()
        ids, mask = to_left_padded(obs["input_ids"], obs["attention_mask"])
        out = policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, pad_token_id=0, top_k=0, top_p=1.0)
        full_mask = torch.cat([mask, torch.ones_like(out[:, ids.shape[1]:])], dim=1)
        logits = ref(input_ids=out, attention_mask=full_mask).logits[:, ids.shape[1] - 1:-1].float()
        lp = logits.gather(-1, out[:, ids.shape[1]:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
        return lp.sum()

    def submission():
        obs = env.observation()
        ids, mask = to_left_padded(obs["input_ids"], obs["attention_mask"])
        tokens, logprobs = sample_continuations(policy, ids, mask, new_tokens, stop_token_ids=never,
                                                pad_token_id=0, generator=gen)
        return env.score_sequences(tokens, logprobs).rewards.sum()

    def stepping():
        obs = env.observation()
        ids, mask = to_left_padded(obs["input_ids"], obs["attention_mask"])
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = policy(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache, lengths, total = out.past_key_values, mask.sum(1), 0.0
        for t in range(new_tokens):
            logp = torch.log_softmax(out.logits[:, -1].float(), -1)
            action = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
            _, reward, *_ = env.step(action, logp.gather(1, action[:, None]).squeeze(1))
            total = total + reward.sum()
            if t + 1 < new_tokens:
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                out = policy(input_ids=action[:, None], attention_mask=mask, position_ids=lengths[:, None],
                             past_key_values=cache, use_cache=True)
                cache, lengths = out.past_key_values, lengths + 1
        env.step(torch.zeros(batch, dtype=torch.long, device=dev))  # the NEXT_STEP autoreset to new prompts
        return total

    env.reset(seed=seed)
    results = {"device": str(dev), "model_parameters": sum(p.numel() for p in ref.parameters()), "batch": batch,
               "new_tokens": new_tokens}
    results["a_generate_plus_ref_s"] = _time(baseline, repeats, dev)
    results["b_submission_s"] = _time(submission, repeats, dev)
    env.reset(seed=seed)
    results["c_per_token_step_s"] = _time(stepping, repeats, dev)
    results["ratio_b_over_a"] = results["b_submission_s"] / results["a_generate_plus_ref_s"]
    results["ratio_c_over_a"] = results["c_per_token_step_s"] / results["a_generate_plus_ref_s"]
    return results
