"""The zoo builds deterministically, caches, detects damaged entries and rebuilds them."""

import json
import warnings

import pytest
import torch

from lmgym import zoo

STEPS = 8


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_gives_identical_weights():
    a = zoo.build("arithmetic", steps=STEPS, progress=False)
    first = state(zoo.load("arithmetic", steps=STEPS, progress=False)[0])
    zoo.build("arithmetic", steps=STEPS, progress=False)  # rebuild from scratch, same seed
    second = state(zoo.load("arithmetic", steps=STEPS, progress=False)[0])
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = state(zoo.load("arithmetic", seed=1, steps=STEPS, progress=False)[0])
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert a == zoo.entry_path("arithmetic", steps=STEPS)


def test_loading_from_cache_does_not_retrain(monkeypatch):
    zoo.load("reviews", steps=STEPS, progress=False)

    def no_training(*args, **kwargs):
        raise AssertionError("the zoo retrained a cached model")

    monkeypatch.setattr(zoo, "train_lm", no_training)
    model, tok = zoo.load("reviews", steps=STEPS, progress=False)
    assert model.config.vocab_size == len(tok)


def test_truncated_file_is_detected_and_rebuilt():
    path = zoo.build("assistant", steps=STEPS, progress=False)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    assert not zoo.verify(path)
    with pytest.warns(UserWarning, match="damaged"):
        model, _ = zoo.load("assistant", steps=STEPS, progress=False)
    assert zoo.verify(path) and weights.read_bytes() == data


def test_partial_build_without_manifest_is_not_loaded():
    path = zoo.build("reviews", steps=STEPS, progress=False)
    (path / "manifest.json").unlink()
    assert not zoo.is_built("reviews", steps=STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zoo.load("reviews", steps=STEPS, progress=False)
    assert zoo.is_built("reviews", steps=STEPS)


def test_model_card_and_home(monkeypatch, tmp_path):
    zoo.build("reviews", steps=STEPS, progress=False)
    card = zoo.card("reviews", steps=STEPS)
    assert card["parameters"] > 100_000 and card["held_out_perplexity"] > 1
    text = (zoo.entry_path("reviews", steps=STEPS) / "README.md").read_text()
    assert "held_out_perplexity" in text and "reviews" in text
    manifest = json.loads((zoo.entry_path("reviews", steps=STEPS) / "manifest.json").read_text())
    assert "model.safetensors" in manifest["files"]
    monkeypatch.delenv("LMGYM_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert zoo.home() == tmp_path / "lmgym"
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.entry_path("nope")
