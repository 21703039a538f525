"""lmgym train and lmgym bench end to end on a diagnostic task with a tiny budget."""

import json

import pytest
from PIL import Image

from lmgym.cli import main

TINY = ["--steps", "400"]


def test_train_end_to_end_and_resume(tmp_path, capsys):
    args = ["train", "--task", "lmgym/TargetToken-v0", "--agent", "reinforce", "--seed", "1", "--device", "cpu",
            "--logdir", str(tmp_path), "--agent.learning_rate", "3e-3"]
    assert main(args + TINY) == 0
    out = capsys.readouterr().out
    assert "score" in out and "of the exact optimum" in out and "tokens/s" in out and "peak memory" in out
    run_dir = tmp_path / "TargetToken-v0" / "reinforce" / "seed1"
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert checkpoints and (checkpoints[-1] / "policy.safetensors").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    # A second run never overwrites the first one's logs.
    assert main(args + TINY) == 0
    assert (tmp_path / "TargetToken-v0" / "reinforce" / "seed1-2").is_dir()
    # Resume continues the same run to a larger budget.
    assert main(args + ["--steps", "800", "--resume", str(checkpoints[-1])]) == 0
    # Resuming a checkpoint of another task is refused.
    bad = ["train", "--task", "lmgym/Copy-v0", "--agent", "reinforce", "--device", "cpu", "--logdir", str(tmp_path),
           "--resume", str(checkpoints[-1])] + TINY
    assert main(bad) == 2
    assert "another task" in capsys.readouterr().err


def test_bench_writes_every_artefact_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench"
    args = ["bench", "--tasks", "lmgym/TargetToken-v0", "--agents", "reinforce", "rloo", "--seeds", "0", "1",
            "--out", str(out), "--device", "cpu"] + TINY
    assert main(args) == 0
    report = json.loads((out / "results.json").read_text())
    assert {(r["agent"], r["seed"]) for r in report["runs"]} == {(a, s) for a in ("reinforce", "rloo") for s in (0, 1)}
    table = report["table"]["lmgym/TargetToken-v0"]
    assert set(table) == {"reinforce", "rloo"} and table["rloo"]["fraction_of_optimum"][0] > 0
    assert "| reinforce |" in (out / "results.md").read_text()
    for png in ("curves.png", "frontier.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 100
    assert (out / "tensorboard" / "TargetToken-v0" / "rloo" / "seed1").is_dir()

    # An interrupted grid resumes: finished runs are not redone.
    (out / "runs" / "TargetToken-v0__rloo__seed1.json").unlink()
    import lmgym.bench.grid

    calls = []
    real_run = lmgym.bench.grid.run
    monkeypatch.setattr(lmgym.bench.grid, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    assert main(args) == 0
    assert calls == [("lmgym/TargetToken-v0", "rloo")]


def test_train_with_stable_baselines3(tmp_path, capsys):
    args = ["train", "--task", "lmgym/TargetToken-v0", "--agent", "sb3-ppo", "--device", "cpu", "--logdir",
            str(tmp_path), "--steps", "300", "--agent.n_steps", "16"]
    assert main(args) == 0
    assert "sb3-ppo on lmgym/TargetToken-v0" in capsys.readouterr().out


def test_bench_refuses_a_folder_with_another_grid(tmp_path, capsys):
    out = tmp_path / "bench"
    base = ["bench", "--tasks", "lmgym/TargetToken-v0", "--seeds", "0", "--out", str(out), "--device", "cpu"] + TINY
    assert main(base + ["--agents", "reinforce"]) == 0
    assert main(base + ["--agents", "rloo"]) == 2
    assert "different grid" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["train", "--task", "lmgym/Nope-v0", "--agent", "ppo"], "unknown task 'lmgym/Nope-v0'"),
    (["train", "--task", "lmgym/Copy-v0", "--agent", "dqn"], "unknown agent 'dqn'"),
    (["train", "--task", "lmgym/Copy-v0", "--agent", "ppo", "--agent.learnig_rate", "1"],
     "did you mean 'learning_rate'"),
    (["bench", "--agents", "pp0", "--tasks", "lmgym/Copy-v0"], "did you mean 'ppo'"),
])
def test_bad_input_is_named(args, message, capsys):
    assert main(args + TINY) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux's clear_refs")
def test_each_run_reports_its_own_peak_memory():
    """Cells of one grid run in one process: each reports the peak RSS during its own run, not the process's
    largest so far (a memory-hungry earlier cell would otherwise set every later cell's figure)."""
    import numpy as np
    import torch

    import lmgym.bench.grid as bench

    block = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    earlier_peak = bench._peak_memory_mib(torch.device("cpu"))
    del block
    result = bench.run("lmgym/TargetToken-v0", "reinforce", steps=200, device="cpu", progress=False)
    assert result["peak_memory_mib"] < earlier_peak - 200  # the 400 MiB block was freed before the run
    assert result["memory_kind"] == "process peak RSS during the run"
