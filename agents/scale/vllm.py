"""Rollouts sampled by a generation engine (vLLM) in the training process, scored exactly by the environment.

``use_engine(agent, VLLMEngine(model_path))`` replaces the agent's KV-cached sampler by an engine that
shares the GPU with it (colocated, as TRL's ``vllm_mode="colocate"``). Per iteration:

1. **Weight sync.** Before a rollout, if the policy changed since the last push (an update ran),
   its weights are pushed to the engine (:meth:`EngineSampler.sync`), so the engine samples from
   the current policy up to the engine's numerics.
2. **Sampling.** The engine continues each prompt (its own batching, paged KV cache, kernels) and
   returns the tokens and their log-probs under *its* distribution, ``log mu(y_t)``.
3. **Exact scores.** The tokens go through the environment's normal submission path
   (``score_sequences``), like any agent's: the reference forward, KL and task score are those of
   these exact tokens, so the per-token rewards are exactly what stepping would give.
4. **The ratio's denominator from the policy itself.** One forward of the policy over the batch gives
   ``log pi_old(y_t)``, used for the KL (handed to the environment) and as ``pi_old`` in the clipped
   ratio ``pi_theta / pi_old``: the ratio measures how far the update moved the policy, not the
   engine's numerical differences from it.

The sampling / training mismatch: the tokens were drawn from ``mu`` (the engine: bfloat16 kernels,
another attention implementation, possibly stale weights), not from ``pi_old``. Policy-gradient
estimates assume samples from ``pi_old``; the correction is the importance weight
``pi_old(y_t) / mu(y_t)`` per token, truncated at a cap C to bound its variance (truncated importance
sampling, as TRL's ``vllm_importance_sampling_cap``; Ionides 2008, Espeholt et al. 2018):

    w_t = min(exp(log pi_old(y_t) - log mu(y_t)), C)

GRPO multiplies each token's loss by ``w_t`` (``Rollout.sampling_weights``; 1 with the agent's own
sampler). Truncation keeps the estimator's variance bounded at the price of a bias towards ``mu``
where ``pi_old / mu > C``. The log-probs the engine reports must be those of the distribution it
samples from (vLLM: ``logprobs_mode="processed_logprobs"`` so temperature / top-k / top-p apply).

Seeds: request r of an iteration gets seed ``hash(config.seed, iteration, global row r)``, so a run's
samples do not depend on how many processes share the batch.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import torch

from lmgym.models import right_pad

__all__ = ["GenerationEngine", "VLLMEngine", "EngineSampler", "use_engine", "truncated_importance_weights"]


class GenerationEngine(Protocol):
    """What lmgym needs from an inference engine."""

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_k: int,
                 top_p: float, stop_token_ids: list[int], seeds: list[int]) -> list[tuple[list[int], list[float]]]:
        """For each prompt (token ids), the sampled continuation (ending with its stop token, or
        ``max_new_tokens`` long) and the log-prob of each of its tokens under the sampling distribution."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights by these (Hugging Face parameter names)."""


def truncated_importance_weights(policy_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, cap: float,
                                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """``min(pi_old / mu, cap)`` per token (1 outside ``mask``)."""
    w = torch.exp(policy_logprobs - engine_logprobs).clamp(max=cap)
    return w if mask is None else torch.where(mask.bool(), w, torch.ones_like(w))


class EngineSampler:
    """The agent's sampler when an engine generates: sync, generate, re-score with the policy (see the module doc)."""

    def __init__(self, agent, engine: GenerationEngine, importance_sampling_cap: float = 2.0):
        if importance_sampling_cap <= 0:
            raise ValueError(f"importance_sampling_cap must be > 0, got {importance_sampling_cap!r}")
        if getattr(agent, "sharded", False):
            raise ValueError("an engine generates with the full weights; it cannot follow an FSDP-sharded policy")
        self.agent, self.engine, self.cap = agent, engine, float(importance_sampling_cap)
        self.synced_version: tuple | None = None
        self.pushes = 0

    def policy_version(self) -> tuple:
        """Changes whenever a weight of the policy changed: an optimizer step (AdamW's step counts), and also a
        checkpoint's weights loaded alone (``load(..., resume=False)``) or a user's own edit, which no optimizer
        counter sees: those write the tensors in place, which bumps their version counters (or replace them,
        which makes new objects). Both are needed: the fused AdamW kernel writes without bumping the counters.
        """
        policy = self.agent.policy
        steps = sum(int(s["step"]) for s in self.agent.optimizer.state.values() if "step" in s)
        return steps, tuple((id(t), t._version) for t in (*policy.parameters(), *policy.buffers()))

    def sync(self) -> bool:
        """Push the policy's weights to the engine if an update changed them since the last push."""
        version = self.policy_version()
        if version == self.synced_version:
            return False
        policy = self.agent.policy
        with torch.no_grad():
            self.engine.load_weights((name, p.detach()) for name, p in policy.state_dict().items())
        self.synced_version = version
        self.pushes += 1
        return True

    @torch.no_grad()
    def __call__(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        agent, env = self.agent, self.agent.env
        self.sync()
        # one copy to the host, then per row (a per-row masked select on the GPU waits for it each time)
        prompts = [ids[m].tolist() for ids, m in zip(query_ids.cpu(), query_mask.cpu().bool())]
        rank, world = agent.distributed.rank, agent.distributed.world_size
        first_row = rank * len(prompts)
        seeds = [hash((agent.config.seed, agent.iteration, first_row + i)) & 0x7FFFFFFF for i in range(len(prompts))]
        s = agent.sampling
        outputs = self.engine.generate(prompts, max_new_tokens=env.max_new_tokens, temperature=s.temperature,
                                       top_k=s.top_k, top_p=s.top_p, stop_token_ids=list(env.stop_token_ids),
                                       seeds=seeds)
        for i, (row, lps) in enumerate(outputs):
            if len(row) != len(lps) or not 1 <= len(row) <= env.max_new_tokens:
                raise ValueError(f"the engine returned {len(row)} tokens and {len(lps)} log-probs for prompt {i}; "
                                 f"it must return 1..max_new_tokens={env.max_new_tokens} of each")
        width = max(len(tokens) for tokens, _ in outputs)
        if world > 1:  # every process submits the same width, so the gathered rollout needs no padding
            width = int(agent.distributed.all_reduce(torch.tensor([width], device=agent.device),
                                                     torch.distributed.ReduceOp.MAX))
        # built on the host and copied once each, not row by row
        tokens, mask = right_pad([row for row, _ in outputs], env.tokenizer.pad_token_id, agent.device, width=width)
        engine_lp, _ = right_pad([lps for _, lps in outputs], 0.0, agent.device, width=width, dtype=torch.float32)
        mask = mask.float()
        # log pi_old from the policy itself (the ratio's denominator and the environment's KL)
        from lmgym.agents.common.base import Rollout, policy_forward

        probe = Rollout(query_ids=query_ids, query_mask=query_mask, tokens=tokens, mask=mask, logprobs=engine_lp,
                        ref_logprobs=engine_lp, rewards=engine_lp, scores=engine_lp[:, 0], kl=engine_lp,
                        lengths=mask.sum(1).long())
        with agent.policy_active(), agent.autocast():
            policy_lp, _, _ = policy_forward(agent.policy, probe, sampling=agent.sampling)
        policy_lp = policy_lp.float() * mask
        agent.pending_sampling_weights = truncated_importance_weights(policy_lp, engine_lp, self.cap, mask)
        return tokens, policy_lp


def use_engine(agent, engine: GenerationEngine, *, importance_sampling_cap: float = 2.0) -> EngineSampler:
    """Make ``agent`` sample its rollouts with ``engine`` (see the module docstring); returns the sampler."""
    if getattr(agent.env, "multi_turn", False):
        raise ValueError("an engine samples whole continuations; a multi-turn environment is sampled turn by turn "
                         "with the policy's KV cache (lmgym.agents.common.turn_rollout), so use_engine does not "
                         "apply to it")
    if agent.config.async_collect or agent.config.off_policy_correction != "none":
        from lmgym.agents.common.config import ConfigError

        raise ConfigError("an engine sampler reads the policy while it samples and weighs its tokens itself (truncated "
                          "IS, Rollout.sampling_weights): set async_collect=False and off_policy_correction='none'")
    sampler = EngineSampler(agent, engine, importance_sampling_cap)
    agent.sample = sampler
    return sampler


class VLLMEngine:
    """A vLLM ``LLM`` in this process (colocated with training); ``pip install lmgym[vllm]``, CUDA only.

    Args:
        model: the policy's starting weights as a Hugging Face folder or hub name (what vLLM loads first).
        gpu_memory_utilization: the share of the GPU vLLM may take for weights and KV cache; the rest is
            the trainer's (colocation: leave room for the policy, its gradients and AdamW moments).
        **llm_kwargs: more ``vllm.LLM`` arguments (``dtype``, ``max_model_len``, ``enforce_eager``...).
    """

    def __init__(self, model: str, *, gpu_memory_utilization: float = 0.3, **llm_kwargs):
        try:
            import vllm
        except ImportError:
            raise ImportError("vLLM generation needs the vllm package on a CUDA machine: pip install lmgym[vllm]") \
                from None
        import os

        # the engine must live in this process so its weights can be replaced in place
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        self._vllm = vllm
        self.llm = vllm.LLM(model=model, gpu_memory_utilization=gpu_memory_utilization, **llm_kwargs)

    def _model(self):
        engine = self.llm.llm_engine
        paths = (("model_executor", "driver_worker", "worker", "model_runner", "model"),
                 ("model_executor", "driver_worker", "model_runner", "model"))
        for path in paths:
            obj = engine
            try:
                for name in path:
                    obj = getattr(obj, name)
                return obj
            except AttributeError:
                continue
        raise RuntimeError("cannot reach the model inside this vLLM version's engine to load weights into it; "
                           "use a vLLM version with an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)")

    def load_weights(self, weights) -> None:
        self._model().load_weights(weights)
        self.llm.reset_prefix_cache()  # cached prompt KV came from the old weights

    def generate(self, prompts, *, max_new_tokens, temperature, top_k, top_p, stop_token_ids, seeds):
        params = [self._vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k or -1,
                                            top_p=top_p, stop_token_ids=stop_token_ids, seed=seed, logprobs=0,
                                            skip_special_tokens=False, include_stop_str_in_output=True)
                  for seed in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results = []
        for out in outs:
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            lps = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
            results.append((ids, lps))
        return results
