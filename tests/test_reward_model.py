"""Bradley-Terry reward models: the loss, learning clean preferences, centring, save/load, bad data."""

import json
import math

import numpy as np
import pytest
import torch

from lmgym import corpora
from lmgym.models import tiny_model
from lmgym.reward_model import (LearnedReward, RewardModel, bradley_terry_loss, groups_from_rankings,
                                read_preferences, train_reward_model)
from lmgym.zoo import train_tokenizer


def test_loss_matches_hand_computation():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected)
    with_margin = -math.log(1 / (1 + math.exp(-(1.0 - 0.5)))) / 2 - math.log(1 / (1 + math.exp(-(-1.0 - 0.5)))) / 2
    assert bradley_terry_loss(chosen, rejected, 0.5).item() == pytest.approx(with_margin)


def test_rankings_expand_to_all_pairs():
    group = groups_from_rankings("p", ["best", "mid", "worst"])
    assert group.pairs == [("best", "mid"), ("best", "worst"), ("mid", "worst")]
    [g] = read_preferences([{"prompt": "p", "completions": ["a", "b", "c"], "scores": [0.1, 0.5, 0.1]}])
    assert sorted(g.pairs) == [("b", "a"), ("b", "c")]  # the tie gives no pair


def synthetic_preferences(n, seed):
    """Clean pairs: the labeller's preferred reply of two random replies to the same prompt."""
    rng = np.random.default_rng(seed)
    records = []
    for line_a, line_b in zip(corpora.assistant_corpus(n, rng), corpora.assistant_corpus(n, rng)):
        prompt, a = line_a.split(" assistant : ")[0] + " assistant :", line_a.split(" assistant : ")[1]
        b = line_b.split(" assistant : ")[1]
        sa, sb = corpora.polite_concise_labeller([prompt] * 2, [a, b])
        if abs(sa - sb) > 0.5:
            records.append({"prompt": prompt, "chosen": a if sa > sb else b, "rejected": b if sa > sb else a})
    return records


@pytest.fixture(scope="module")
def trained():
    tok = train_tokenizer(corpora.assistant_corpus(2000, np.random.default_rng(0)))
    model, tok = tiny_model(tokenizer=tok, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    torch.manual_seed(0)
    rm = RewardModel(model.base_model, tok)
    train, held = read_preferences(synthetic_preferences(1500, 1)), read_preferences(synthetic_preferences(300, 2))
    metrics = train_reward_model(rm, train, eval_groups=held, epochs=3, learning_rate=3e-3, batch_pairs=32,
                                 progress=False)
    return rm, train, metrics, tok, model


def test_learns_clean_preferences_to_90_percent_held_out(trained):
    _, _, metrics, _, _ = trained
    assert metrics["eval_accuracy"] >= 0.9, metrics


def test_centring_makes_the_mean_training_reward_zero(trained):
    rm, train, _, _, _ = trained
    texts = [(g.prompt, c) for g in train for pair in g.pairs for c in pair]
    scores = rm.score([p for p, _ in texts], [c for _, c in texts])
    assert abs(scores.mean()) < 1e-4


def test_save_and_load_give_identical_scores(trained, tmp_path):
    rm, train, _, _, _ = trained
    prompts = [g.prompt for g in train[:20]]
    replies = [g.pairs[0][0] for g in train[:20]]
    rm.save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm")
    np.testing.assert_array_equal(loaded.score(prompts, replies), rm.score(prompts, replies))
    np.testing.assert_array_equal(LearnedReward(loaded)(prompts, replies), rm.score(prompts, replies))
    with pytest.raises(FileExistsError):
        rm.save(tmp_path / "rm")


def test_backbone_from_a_locally_saved_model_path(trained, tmp_path):
    _, _, _, tok, model = trained
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    rm = RewardModel.from_pretrained_lm(str(tmp_path / "lm"))
    out = rm.score(["user : hi ? assistant :"], ["sure , keep it simple ."])
    assert out.shape == (1,) and np.isfinite(out).all()


def test_bad_preference_data_is_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path.write_text(good + "\n" + "{not json\n")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        read_preferences(path)
    path.write_text(good + "\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match="line 2: missing field 'rejected'"):
        read_preferences(path)
    path.write_text(json.dumps({"prompt": "p", "chosen": "", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match="line 1: 'chosen' is an empty completion"):
        read_preferences(path)
    path.write_text(json.dumps({"chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match="missing field 'prompt'"):
        read_preferences(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_preferences(tmp_path / "nope.jsonl")


def test_missing_or_mismatched_reward_model_files(trained, tmp_path):
    rm = trained[0]
    with pytest.raises(FileNotFoundError, match="not a saved reward model"):
        RewardModel.load(tmp_path / "nowhere")
    rm.save(tmp_path / "rm")
    meta = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    meta["hidden_size"] = 999
    (tmp_path / "rm" / "reward_model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not belong together"):
        RewardModel.load(tmp_path / "rm")
