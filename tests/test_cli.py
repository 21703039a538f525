"""The lmgym command: list, reward-model train."""

import json

import numpy as np

from lmgym.zoo import corpora
from lmgym.cli import main
from lmgym.models import tiny_model
from lmgym.rewards.reward_model import RewardModel
from lmgym.zoo.entries import train_tokenizer


def test_list_shows_every_task(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for env_id in ["lmgym/TextGen-v0", "lmgym/Copy-v0", "lmgym/Sentiment-v0", "lmgym/Preference-v0"]:
        assert env_id in out


def test_reward_model_train_command(tmp_path, capsys):
    tok = train_tokenizer(corpora.assistant_corpus(500, np.random.default_rng(0)))
    model, tok = tiny_model(tokenizer=tok, hidden_size=16, num_layers=1, num_heads=2)
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    rows = [{"prompt": "user : hi ? assistant :", "chosen": "sure , keep it simple .", "rejected": "no , um ."}] * 8
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = ["reward-model", "train", "--data", str(tmp_path / "pairs.jsonl"), "--backbone", str(tmp_path / "lm"),
            "--out", str(tmp_path / "rm"), "--epochs", "3", "--learning-rate", "1e-2"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "rm" / "training_metrics.json").read_text())
    assert metrics["train_accuracy"] == 1.0
    rm = RewardModel.load(tmp_path / "rm")
    good, bad = rm.score(["user : hi ? assistant :"] * 2, ["sure , keep it simple .", "no , um ."])
    assert good > bad
    assert main(args) == 2  # never overwrites a saved model silently
    assert "already exists" in capsys.readouterr().err
