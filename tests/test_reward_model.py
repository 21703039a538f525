"""Bradley-Terry reward models: the loss, learning clean preferences, centring, save/load, bad data."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from lmgym.zoo import corpora
from lmgym.models import tiny_model
from lmgym.rewards.reward_model import (LearnedReward, RewardModel, bradley_terry_loss, groups_from_rankings,
                                read_preferences, train_reward_model)
from lmgym.zoo.entries import train_tokenizer


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


def test_a_completion_is_never_paired_with_itself():
    """Rankings of sampled completions repeat some: a self-pair states no preference, has no gradient, and would
    count as a wrong prediction in the accuracy."""
    assert groups_from_rankings("p", ["x", "y", "x"]).pairs == [("x", "y"), ("y", "x")]
    [g] = read_preferences([{"prompt": "p", "completions": ["x", "x", "y"], "scores": [0.9, 0.1, 0.5]}])
    assert sorted(g.pairs) == [("x", "y"), ("y", "x")]
    with pytest.raises(ValueError, match="no pairs of two different completions"):
        read_preferences([{"prompt": "p", "chosen": "x", "rejected": "x"}])


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
    texts = list(dict.fromkeys((g.prompt, c) for g in train for pair in g.pairs for c in pair))  # distinct
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


def _gpt2_backbone(tok):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(3)
    config = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=2, n_head=2, n_positions=32,
                        initializer_range=0.3)
    return GPT2Model(config).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reward_is_read_at_the_last_real_token_whatever_the_padding(tiny, arch):
    """Left- and right-padded batches give the score each example gets alone, unpadded (the slow reference)."""
    lm, tok = tiny
    backbone = lm.base_model if arch == "llama" else _gpt2_backbone(tok)
    torch.manual_seed(0)
    rm = RewardModel(backbone, tok).eval()
    with torch.no_grad():
        rm.head.weight.normal_()  # a head that reads every feature, so a wrong position shows
    prompts, completions = ["the cat", "very very good day on the", "a"], ["sat", "mat", "dog ran far far"]
    rows = [tok(p)["input_ids"] + tok(c, add_special_tokens=False)["input_ids"] for p, c in zip(prompts, completions)]
    with torch.no_grad():
        alone = [rm(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)).item() for r in rows]
        width = max(map(len, rows))
        pad = tok.pad_token_id
        left_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        left_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        left = rm(left_ids, left_mask).numpy()
        right = rm(*rm.encode(prompts, completions)).numpy()
    np.testing.assert_allclose(left, alone, atol=1e-5)
    np.testing.assert_allclose(right, alone, atol=1e-5)
    assert np.ptp(alone) > 0.1  # the rows do differ, so reading the wrong token would be caught


def test_centring_counts_each_distinct_completion_once(tiny):
    """Rankings of 5, 2 and 2 completions: the mean over the 9 distinct completions is 0 after training."""
    lm, tok = tiny
    torch.manual_seed(0)
    rm = RewardModel(copy.deepcopy(lm).base_model, tok)  # training must not change the session's shared model
    records = [{"prompt": "the cat", "completions": ["sat", "ran", "sat on mat", "far", "good day"],
                "ranking": [0, 1, 2, 3, 4]},
               {"prompt": "the dog", "completions": ["ran far", "bad"], "ranking": [1, 0]},
               {"prompt": "a", "completions": ["very good", "mat"], "ranking": [0, 1]}]
    groups = read_preferences(records)
    train_reward_model(rm, groups, epochs=1, learning_rate=1e-2, batch_pairs=4, max_steps=2, progress=False)
    distinct = [(r["prompt"], c) for r in records for c in r["completions"]]
    scores = rm.score([p for p, _ in distinct], [c for _, c in distinct])
    assert len(distinct) == 9 and abs(scores.mean()) < 1e-5
    # The mean over pairs (each completion weighted by the pairs it is in) is a different figure here.
    per_pair = [(g.prompt, c) for g in groups for pair in g.pairs for c in pair]
    assert abs(rm.score([p for p, _ in per_pair], [c for _, c in per_pair]).mean()) > 1e-3


def test_save_over_a_folder_replaces_it_whole_and_a_failed_save_keeps_the_old_one(tiny, tmp_path, monkeypatch):
    """overwrite=True used to write into the old folder: its other files stayed (here a LoRA adapter config, which
    from_pretrained then tries to apply), and a save that failed half-way left a mix of old and new files."""
    import lmgym.rewards.reward_model as reward_model

    model, tok = tiny
    first = RewardModel(copy.deepcopy(model.base_model), tok)
    with torch.no_grad():
        first.head.weight.fill_(0.5)
    folder = tmp_path / "rm"
    first.save(folder)
    (folder / "adapter_config.json").write_text("{}")  # what `lmgym export --no-merge` leaves there
    second = RewardModel(copy.deepcopy(model.base_model), tok)
    second.save(folder, overwrite=True)
    assert not (folder / "adapter_config.json").exists()
    expected = second.score(["t1"], ["t2"])
    np.testing.assert_array_equal(RewardModel.load(folder).score(["t1"], ["t2"]), expected)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(reward_model, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        first.save(folder, overwrite=True)
    np.testing.assert_array_equal(RewardModel.load(folder).score(["t1"], ["t2"]), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]  # no temporary folder left behind

    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        second.save(tmp_path / "file")


@pytest.mark.parametrize("text", ['{"format": 1, "hidden', '{"format": 1}', '[32]'])
def test_a_corrupt_reward_model_json_is_named(tiny, tmp_path, text):
    model, tok = tiny
    RewardModel(copy.deepcopy(model.base_model), tok).save(tmp_path / "rm")
    (tmp_path / "rm" / "reward_model.json").write_text(text)
    with pytest.raises(ValueError, match="reward_model.json"):
        RewardModel.load(tmp_path / "rm")


@pytest.mark.parametrize("record,message", [
    ({"completions": ["ten", "nine"], "scores": ["10", "9"]}, "'scores' must be a list of finite numbers"),
    ({"completions": ["x", "y"], "scores": [float("nan"), 1.0]}, "'scores' must be a list of finite numbers"),
    ({"completions": ["x", "y"], "scores": [True, False]}, "'scores' must be a list of finite numbers"),
    ({"completions": ["x", "y"], "scores": None}, "'scores' must be a list of finite numbers"),
    ({"completions": ["x", "y"], "ranking": [True, False]}, "'ranking' must be a list of completion indices"),
    ({"completions": ["x", "y"], "ranking": [0.0, 1.0]}, "'ranking' must be a list of completion indices"),
    ({"completions": ["x", "y"], "ranking": None}, "'ranking' must be a list of completion indices"),
    ({"completions": "ab", "ranking": [0, 1]}, "'completions' must be a list of at least two strings, got str"),
    ({"completions": None, "ranking": [0, 1]}, "'completions' must be a list of at least two strings"),
    ({"completions": ["only"], "ranking": [0]}, "'completions' must be a list of at least two strings"),
], ids=["string-scores", "nan-score", "bool-scores", "null-scores", "bool-ranking", "float-ranking", "null-ranking",
        "string-completions", "null-completions", "one-completion"])
def test_a_ranking_or_scores_record_of_the_wrong_types_is_refused_with_its_line(tmp_path, record, message):
    """Issue 23 item 5: such records were read silently (string order, NaN order, bools as indices) or raised a
    raw TypeError."""
    path = tmp_path / "ranked.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path.write_text(good + "\n" + json.dumps({"prompt": "p", **record}, allow_nan=True) + "\n")
    with pytest.raises(ValueError, match=f"ranked.jsonl, line 2: {message}".replace("(", r"\(")):
        read_preferences(path)


def test_the_command_refuses_such_a_file_in_one_line(tmp_path, capsys):
    from lmgym.cli import main

    path = tmp_path / "ranked.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completions": ["ten", "nine"], "scores": ["10", "9"]}) + "\n")
    assert main(["reward-model", "train", "--data", str(path), "--backbone", str(tmp_path / "none"),
                 "--out", str(tmp_path / "rm")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmgym: ") and "line 1: 'scores' must be" in err and "\n" not in err
    assert not (tmp_path / "rm").exists()


@pytest.mark.parametrize("option,value,message", [
    ("--epochs", "0", "epochs (--epochs) must be an int >= 1"), ("--epochs", "-1", "epochs (--epochs) must be"),
    ("--batch-pairs", "0", "batch_pairs (--batch-pairs) must be an int >= 1"),
    ("--learning-rate", "1e30", "learning_rate (--learning-rate) must be a finite number in [0.0, 1.0]"),
    ("--learning-rate", "0", "learning_rate (--learning-rate) must be > 0"),
    ("--margin", "nan", "margin (--margin) must be a finite number"), ("--margin", "inf", "margin (--margin)"),
])
def test_reward_model_training_settings_that_cannot_train_are_refused(tmp_path, capsys, option, value, message):
    """Issue 23 item 6: these saved useless models (0 steps, loss NaN; every reward 0.0) and exited 0, or raised a
    traceback that blamed the learning rate."""
    from lmgym.cli import main

    model, tok = tiny_model(["a", "b", "c"], hidden_size=16, num_layers=1, num_heads=2, max_positions=32)
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    assert main(["reward-model", "train", "--data", str(data), "--backbone", str(tmp_path / "lm"), "--out",
                 str(tmp_path / "rm"), option, value]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lmgym: ")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "rm").exists()


def test_a_pair_beyond_the_backbones_context_is_refused_not_cut(tmp_path):
    """Item 6: a 40-token prompt on a 32-position backbone trained silently on its last 32 tokens."""
    model, tok = tiny_model(["a", "b", "c"], hidden_size=16, num_layers=1, num_heads=2, max_positions=32)
    rm = RewardModel(model.base_model, tok)
    groups = read_preferences([{"prompt": " ".join(["a"] * 40), "chosen": "b", "rejected": "c"}])
    with pytest.raises(ValueError, match="41 tokens, beyond the reward model's context of 32 positions"):
        train_reward_model(rm, groups, progress=False)


def test_a_learning_rate_that_leaves_every_reward_equal_is_refused(tmp_path):
    """Item 6: lr 1 (allowed) on this data still trains; a model whose rewards all came out equal is refused."""
    model, tok = tiny_model(["a", "b", "c"], hidden_size=16, num_layers=1, num_heads=2, max_positions=32)
    rm = RewardModel(model.base_model, tok)
    with torch.no_grad():
        rm.head.weight.zero_()
    rm.head.weight.requires_grad_(False)  # a head that cannot learn: every reward stays equal
    groups = read_preferences([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(ValueError, match="gives every training completion the same reward"):
        train_reward_model(rm, groups, progress=False, learning_rate=1e-3)
