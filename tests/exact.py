"""Exact expected return of a policy on a diagnostic task, by enumerating every episode (float64).

The independent reference the learning tests score agents with: no sampling noise, so
"reached 90% of the optimum" means the policy itself, not a lucky evaluation batch.
"""

import itertools

import numpy as np
import torch


@torch.no_grad()
def next_token_logprobs(model, prompt: list[int], prefixes: list[tuple]) -> np.ndarray:
    """log pi(. | prompt + prefix) for each prefix, one batched forward (all prefixes have one length), float64."""
    ids = torch.tensor([list(prompt) + list(p) for p in prefixes], device=next(model.parameters()).device)
    return torch.log_softmax(model(input_ids=ids).logits[:, -1].double(), dim=-1).cpu().numpy()


@torch.no_grad()
def exact_return(policy, venv) -> float:
    """``E_x E_{y ~ pi}[R(x, y) - beta * sum_t (log pi - log pi_ref)(y_t | x, y_<t)]`` over the task's prompt list.

    Backward over the token tree: a state's value is the policy-weighted sum over next tokens of
    the KL penalty plus either the score (a stop token) or the child's value; at the horizon the
    episode is truncated and its value is the score.
    """
    core, beta, horizon = venv.core, venv.kl_coef, venv.max_new_tokens
    stops = set(venv.stop_token_ids)
    vocab = int(venv.reference_model.config.vocab_size)
    alphabet = [a for a in range(vocab) if a not in stops]
    was_training = policy.training
    policy.eval()
    total = 0.0
    for prompt in core.prompts.items:
        ids = list(prompt.ids)

        def score(prefixes):
            completions = [list(p) for p in prefixes]
            texts = venv.tokenizer.batch_decode(completions, skip_special_tokens=True)
            return np.asarray(core.reward_fn([prompt.text] * len(completions), texts, [ids] * len(completions),
                                             completions), dtype=np.float64)

        value = {}
        for depth in range(horizon, -1, -1):
            prefixes = list(itertools.product(alphabet, repeat=depth))
            scores = score(prefixes)
            if depth == horizon:
                value.update(zip(prefixes, scores))
                continue
            pol = next_token_logprobs(policy, ids, prefixes)
            ref = next_token_logprobs(venv.reference_model, ids, prefixes)
            for i, prefix in enumerate(prefixes):
                v = 0.0
                for a in range(vocab):
                    after = scores[i] if a in stops else value[prefix + (a,)]
                    v += np.exp(pol[i, a]) * (after - beta * (pol[i, a] - ref[i, a]))
                value[prefix] = v
        total += value[()]
    policy.train(was_training)
    return total / len(core.prompts.items)


def unpadded_forward64(model64, prompt: list[int], completion: list[int]):
    """One float64 forward of one episode without padding: ``(log pi(y_t | x, y_<t) (T,), last hidden (T, H))``,
    with gradients; the independent reference for the agents' batched, padded forwards."""
    ids = torch.tensor([list(prompt) + list(completion)])
    out = model64(input_ids=ids, output_hidden_states=True)
    start = len(prompt) - 1
    logits = out.logits[0, start:start + len(completion)].double()
    logprobs = torch.log_softmax(logits, dim=-1)[torch.arange(len(completion)), torch.tensor(completion)]
    return logprobs, out.hidden_states[-1][0, start:start + len(completion)]


def episodes(rollout):
    """Each episode of a rollout as plain lists: (prompt ids, completion ids up to the end, per-token rewards)."""
    out = []
    for i in range(len(rollout)):
        prompt = rollout.query_ids[i][rollout.query_mask[i].bool()].tolist()
        n = int(rollout.lengths[i])
        out.append((prompt, rollout.tokens[i, :n].tolist(), rollout.rewards[i, :n].double().tolist()))
    return out


class GradientRecorder:
    """Stands in for ``agent.optimizer_step``: records the gradients of one update and leaves the weights alone."""

    def __init__(self, agent):
        self.agent, self.grads = agent, []
        agent.optimizer_step = self

    def __call__(self) -> float:
        self.grads.append({name: p.grad.detach().double().clone() for name, p in self.named_parameters()})
        for p in self.agent.parameters():
            p.grad = None
        return 0.0

    def named_parameters(self):
        for module_name, module in self.agent.trainable_modules().items():
            for name, p in module.named_parameters():
                if p.grad is not None:
                    yield f"{module_name}.{name}", p


def float64_copies(agent) -> dict:
    """Float64 copies of the agent's trainable modules, by name, requiring gradients."""
    import copy

    return {name: copy.deepcopy(module).double().requires_grad_(True) for name, module in
            agent.trainable_modules().items()}


def assert_gradients_match(recorded: dict, copies: dict, rtol=2e-4, atol=1e-6) -> None:
    """The agent's gradients equal the float64 reference's, parameter by parameter."""
    checked = 0
    for module_name, module in copies.items():
        for name, p in module.named_parameters():
            key = f"{module_name}.{name}"
            expected = p.grad if p.grad is not None else torch.zeros_like(p)
            got = recorded.get(key, torch.zeros_like(expected))
            scale = expected.abs().max().item()
            assert torch.allclose(got, expected, rtol=rtol, atol=atol + rtol * scale), \
                f"{key}: max difference {(got - expected).abs().max().item():.3g} (scale {scale:.3g})"
            checked += 1
    assert checked > 0
