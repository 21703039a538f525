"""Every fast path is on for the architectures lmgym tests, and one that cannot run says so, once.

Also the transformers API by either name: the KV cache keyword (``cache`` from 5.24, ``past_key_values``
before) and activation checkpointing, asked of the model, with no deprecation warning from lmgym's calls.
"""

import logging
import warnings

import gymnasium as gym
import pytest
import torch

from lmgym.utils import fast_paths
from lmgym.models import hf_api
from lmgym.agents import GRPO
from lmgym.agents.common.forward import _PromptCache, policy_forward, shares_prompts
from lmgym.models import CachedLM, sample_continuations, word_tokenizer

from conftest import PROMPTS, WORDS, count_good

pytestmark = pytest.mark.compat  # also run on the oldest declared torch and transformers (.ci/run)

ARCHITECTURES = ["gpt2", "llama", "qwen2"]


def model_of(kind: str, vocab_size: int):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=16, n_layer=2,
                                                n_head=2, eos_token_id=0, pad_token_id=0)).eval()
    common = dict(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64, eos_token_id=0,
                  pad_token_id=0, bos_token_id=None)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common)).eval()
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)).eval()


class Heard:
    """Every Python warning and every transformers log record while it is open."""

    def __enter__(self):
        self._warnings = warnings.catch_warnings(record=True)
        self.warnings = self._warnings.__enter__()
        warnings.simplefilter("always")
        self.records = []
        handler = logging.Handler()
        handler.emit = self.records.append
        self._handler, self._logger = handler, logging.getLogger("transformers")
        self._logger.addHandler(handler)
        # transformers says most deprecations once per process (an lru_cache): clear it so they are heard here
        if hasattr(logging.Logger, "warning_once"):
            logging.Logger.warning_once.cache_clear()
        fast_paths.forget()
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self._handler)
        self._warnings.__exit__(*exc)

    def texts(self) -> list[str]:
        return [str(w.message) for w in self.warnings] + [r.getMessage() for r in self.records]


def agent_of(kind: str, **config):
    tok = word_tokenizer(WORDS)
    env = gym.make_vec("lmgym/TextGen-v0", num_envs=8, group_size=4, model=model_of(kind, len(tok)), tokenizer=tok,
                       reward_fn=count_good, prompts=PROMPTS, max_new_tokens=6)
    return GRPO(env, seed=0, learning_rate=1e-2, **config)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_a_grpo_iteration_takes_every_fast_path_and_warns_nothing(kind, lora):
    if lora:
        pytest.importorskip("peft")
    config = {"peft_config": {"r": 2, "target_modules": "all-linear"}} if lora else {}
    with Heard() as heard:
        agent = agent_of(kind, **config)
        agent.learn(2 * 8 * 6, progress=False)  # two iterations: sampling, reference scoring, update
    assert fast_paths.fallbacks() == {}
    # peft's own get_peft_model reads a renamed attribute; lmgym's calls must not
    ours = [t for t in heard.texts() if ("deprecat" in t.lower() or "lmgym fast path" in t)
            and "is_gradient_checkpointing" not in t]
    assert ours == []
    assert agent.optimizer.defaults["fused"] is True
    assert agent.env.core.ref._editable


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_the_update_forward_shares_prompts_and_splits_its_cache_by_rows(kind):
    from test_shared_prompts import grouped_rollout

    model = model_of(kind, 23)
    rollout = grouped_rollout()
    assert hf_api.cache_keyword(model) in ("cache", "past_key_values")
    assert hf_api.accepts_logits_to_keep(model)
    assert shares_prompts(model, rollout)
    ids = torch.cat([rollout.query_ids, rollout.tokens], dim=1)
    mask = torch.cat([rollout.query_mask, torch.ones_like(rollout.tokens)], dim=1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        assert _PromptCache(model, ids, mask, positions, rollout.query_ids.shape[1] - 1).splittable


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_the_environments_cache_is_edited_per_column(kind):
    model = model_of(kind, 23)
    lm = CachedLM(model, max_sequence_length=32)
    lm.start([[1, 2, 3], [4, 5]])
    assert lm._editable and lm._keep_last


def test_the_installed_transformers_is_called_by_its_own_cache_name():
    """The keyword lmgym passes is the one the installed version's models declare (no renamed-argument shim)."""
    import inspect

    import transformers as tf

    declared = inspect.signature(tf.LlamaForCausalLM.forward).parameters
    assert hf_api.cache_keyword(model_of("llama", 23)) == ("cache" if "cache" in declared else "past_key_values")


# ---------------------------------------------------------------------------- models of either API


class _Old(torch.nn.Module):
    """A causal LM with the pre-5.24 keyword, wrapping a real one: proves lmgym passes the name it declares."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.seen = inner, inner.config, []

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0, output_hidden_states=None):
        self.seen.append(past_key_values is not None)
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, logits_to_keep=logits_to_keep, output_hidden_states=output_hidden_states,
                         **hf_api.cache_kwargs(self.inner, past_key_values))
        return _OldOutput(logits=out.logits, past_key_values=hf_api.cache_of(out), hidden_states=out.hidden_states)


class _OldOutput(dict):
    """An output that names its cache ``past_key_values`` (as every output did before 5.24)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _NoKeep(_Old):
    """A model whose forward takes no ``logits_to_keep`` (as some remote-code models)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                output_hidden_states=None):
        return super().forward(input_ids, attention_mask, position_ids, past_key_values, use_cache, 0,
                               output_hidden_states)


def test_a_model_with_the_old_cache_keyword_gets_its_cache_by_that_name():
    model = model_of("llama", 23)
    old = _Old(model)
    assert hf_api.cache_keyword(old) == "past_key_values"
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        tokens, logprobs = sample_continuations(old, ids, mask, 5, stop_token_ids=[], pad_token_id=0,
                                                generator=torch.Generator().manual_seed(0))
        again, again_lp = sample_continuations(model, ids, mask, 5, stop_token_ids=[], pad_token_id=0,
                                               generator=torch.Generator().manual_seed(0))
    assert any(old.seen)  # the cache went in, under the old name
    assert torch.equal(tokens, again)
    torch.testing.assert_close(logprobs, again_lp)


def test_a_model_without_logits_to_keep_falls_back_once_with_a_warning_and_the_same_numbers():
    from test_shared_prompts import grouped_rollout

    model = model_of("gpt2", 23)
    rollout = grouped_rollout()
    fast_paths.forget()
    with pytest.warns(fast_paths.FastPathWarning, match="'prompt sharing' is off: _NoKeep.forward takes no "
                                                         "logits_to_keep"):
        slow = policy_forward(_NoKeep(model), rollout)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fast_paths.FastPathWarning)  # said once: not again
        policy_forward(_NoKeep(model), rollout)
    assert fast_paths.fallbacks()[("prompt sharing", "_NoKeep.forward takes no logits_to_keep")] == 2
    fast = policy_forward(model, rollout)
    for a, b in zip(slow[:2], fast[:2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_activation_checkpointing_is_read_by_either_name():
    class New:
        is_activation_checkpointing = True

    class Old:
        is_gradient_checkpointing = True

    class Off:
        is_activation_checkpointing = False

    assert hf_api.is_activation_checkpointing(New())
    assert hf_api.is_activation_checkpointing(Old())
    assert not hf_api.is_activation_checkpointing(Off())


def test_an_unknown_fast_path_is_refused():
    with pytest.raises(KeyError, match="unknown fast path"):
        fast_paths.fall_back("warp drive", "none")


def test_the_installed_torch_and_transformers_lie_in_the_declared_range():
    """What CI tests is what pyproject.toml declares: each leg's versions must be inside the range."""
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    declared = {r.name: r.specifier for r in map(Requirement, project["dependencies"])}
    for name in ("torch", "transformers"):
        installed = version(name).split("+")[0]
        assert declared[name].contains(installed), f"{name} {installed} is outside the declared {declared[name]}"


@pytest.mark.smollm
def test_smollm2_takes_every_fast_path_in_a_grpo_iteration():
    """The real pretrained model (the smollm extra): one GRPO iteration on ChatArithmetic, no fall-back, no
    deprecation from lmgym's calls."""
    with Heard() as heard:
        env = gym.make_vec("lmgym/ChatArithmetic-v0", num_envs=4, group_size=2, max_new_tokens=4, dtype="float32")
        agent = GRPO(env, seed=0, learning_rate=1e-5)
        agent.learn(4 * 4, progress=False)
        assert agent.env.core.ref._editable and agent.optimizer.defaults["fused"] is True
    assert fast_paths.fallbacks() == {}
    assert [t for t in heard.texts() if "deprecat" in t.lower() or "lmgym fast path" in t] == []


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_a_prefill_encodes_each_repeated_prompt_once_and_matches_a_float64_forward(kind):
    model = model_of(kind, 23)
    prompts = [[1, 2, 3], [4, 5], [1, 2, 3], [4, 5], [1, 2, 3], [6]]
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    with Heard():
        lm = CachedLM(model, max_sequence_length=32)
        lm.start(prompts)
        lm.restart_rows(torch.tensor([0, 5]), [[7, 8], [7, 8]])
        nxt = lm.append(torch.tensor([9, 9, 10, 10, 11, 9]))
    hook.remove()
    assert seen[:2] == [3, 1] and fast_paths.fallbacks() == {}  # 3 distinct prompts, then 1 for two rows
    reference = copy_double(model)
    rows = [[7, 8, 9], [4, 5, 9], [1, 2, 3, 10], [4, 5, 10], [1, 2, 3, 11], [7, 8, 9]]
    for r, row in enumerate(rows):  # each row alone, unpadded, in float64: an independent reference
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([row])).logits[0, -1]
        torch.testing.assert_close(nxt[r].double(), torch.log_softmax(logits, -1), atol=1e-5, rtol=0)


def copy_double(model):
    import copy

    return copy.deepcopy(model).double()
