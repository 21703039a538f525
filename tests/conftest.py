"""Shared fixtures: tiny models built offline from a config, and an independent slow reference."""

import numpy as np
import pytest
import torch

import lmgym  # noqa: F401  (registers the environments)
from lmgym.models import tiny_model

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "good", "bad", "very", "day"]


@pytest.fixture(scope="session")
def tiny():
    """A tiny random Llama LM (vocabulary: EOS + 12 words) and its tokenizer."""
    return tiny_model(WORDS, hidden_size=32, num_layers=2, num_heads=4, max_positions=64, seed=1, init_std=0.3)


@pytest.fixture(autouse=True)
def tiny_stays_unchanged(request):
    """The session's ``tiny`` model is shared: a test that trains or converts it would silently change the
    reference of every later test, so fail the test that did it."""
    if "tiny" not in request.fixturenames:
        yield
        return
    model = request.getfixturevalue("tiny")[0]
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    yield
    after = model.state_dict()
    changed = [k for k, v in before.items() if v.dtype != after[k].dtype or not torch.equal(v, after[k])]
    assert not changed, f"this test changed the shared session model `tiny` ({changed[:3]}...): deep-copy it first"


def count_good(prompts, completions):
    """A reward: how many times 'good' appears, minus 0.1 per word."""
    return [c.split().count("good") - 0.1 * len(c.split()) for c in completions]


PROMPTS = ["the cat", "the dog ran", "a", "very very good day on the mat"]


@torch.no_grad()
def slow_ref_logprob(model, ids, action) -> float:
    """log pi_ref(action | ids) from a full float64 forward over the whole prefix, no cache."""
    m = model.double() if next(model.parameters()).dtype != torch.float64 else model
    logits = m(input_ids=torch.tensor([list(ids)])).logits[0, -1]
    return float(torch.log_softmax(logits, dim=-1)[action])


@pytest.fixture(scope="session")
def tiny64(tiny):
    """A float64 copy of the tiny model, the independent reference for log-probs."""
    import copy

    return copy.deepcopy(tiny[0]).double()


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.fixture(scope="session", autouse=True)
def lmgym_home(tmp_path_factory):
    """Keep the zoo cache of the test session in a temporary folder, never the user's cache."""
    import os

    path = tmp_path_factory.mktemp("lmgym-home")
    old = os.environ.get("LMGYM_HOME")
    os.environ["LMGYM_HOME"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LMGYM_HOME", None)
    else:
        os.environ["LMGYM_HOME"] = old


ZOO_STEPS = 30
"""Training steps of the reduced zoo builds the tests use (the real ones take about a minute each)."""


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_SPECIALS = ["<eos>", "<|im_start|>", "<|im_end|>"]


def char_chat_model(chars, *, hidden_size: int, num_heads: int, max_positions: int, init_std: float = 0.02):
    """A tiny random Llama with a character-level tokenizer over ``chars`` whose ChatML markers are special
    tokens, and ``<|im_end|>`` as its end of turn (as the SmolLM2 zoo entry)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(CHAT_SPECIALS + sorted(set(chars)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>", unk_token="<eos>",
                                  additional_special_tokens=CHAT_SPECIALS[1:])
    tok.chat_template = CHATML
    model, tok = tiny_model(tokenizer=tok, hidden_size=hidden_size, num_layers=1, num_heads=num_heads,
                            max_positions=max_positions, seed=0, init_std=init_std)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    return model, tok
