"""The lmgym command: every user-caused failure is one line `lmgym: ...` and exit status 2; --config; --resume."""

import json
import re
import sys
import warnings

import pytest

import lmgym.bench.grid
from lmgym.agents import CheckpointError, TrainingError
from lmgym.cli import main
from lmgym.utils.lock import LockedError

TRAIN = ["train", "--task", "lmgym/TargetToken-v0", "--agent", "reinforce", "--device", "cpu"]


def one_line_error(capsys) -> str:
    """The error line, checking it is the only message on stderr besides progress bars (which end in \\r)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "|" not in line]
    assert len(lines) == 1 and lines[0].startswith("lmgym: "), err
    return lines[0]


# ----------------------------------------------------------------------------- errors become one line
@pytest.mark.parametrize("error", [
    TrainingError("objective is not finite at iteration 3"),
    CheckpointError("policy.safetensors does not match its checksum"),
    LockedError("runs/x is in use by process 123 on host"),
    FileNotFoundError("prompts.txt does not exist"),
    ValueError("num_minibatches=3 must divide the batch of 64 episodes"),
    TypeError("learning_rate must be a number,\n got 'abc'"),
    PermissionError(13, "Permission denied", "/root/runs"),
])
def test_user_errors_are_one_line_and_exit_2(error, monkeypatch, capsys, tmp_path):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(lmgym.bench.grid, "run", fail)
    assert main(TRAIN + ["--logdir", str(tmp_path)]) == 2
    line = one_line_error(capsys)
    assert " ".join(str(error).split()) in line


def test_a_bug_is_not_disguised_as_a_user_error(monkeypatch, tmp_path):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(lmgym.bench.grid, "run", bug)
    with pytest.raises(ZeroDivisionError):
        main(TRAIN + ["--logdir", str(tmp_path)])


def test_a_bad_setting_from_the_agent_is_one_line(tmp_path, capsys):
    # 3 minibatches cannot divide 64 episodes: raised by the agent during training
    assert main(TRAIN + ["--logdir", str(tmp_path), "--steps", "200", "--agent.num_minibatches", "3"]) == 2
    assert "num_minibatches" in one_line_error(capsys)


def test_stray_argument_is_one_line(capsys):
    assert main(TRAIN + ["--agent.learning_rate"]) == 2
    assert "--agent.learning_rate needs a value" in one_line_error(capsys)
    assert main(TRAIN + ["--learning_rate", "1"]) == 2
    assert "unrecognised argument '--learning_rate'" in one_line_error(capsys)


# ----------------------------------------------------------------------------- --config files
@pytest.mark.parametrize("name, text, expected", [
    ("cfg.yaml", "agent:\n  learning_rate: 0.001\n", r"cfg\.yaml: YAML config files are not supported; .*JSON.*TOML"),
    ("cfg.json", '{\n  "learning_rate": 3e-4,\n}\n', r"cfg\.json: invalid JSON at line 3, column 1"),
    ("cfg.toml", "[agent]\nlearning_rate = \n", r"cfg\.toml: invalid TOML: .*line 2"),
    ("cfg.json", "[1, 2]", r"cfg\.json: expected a table of hyper-parameters, got list"),
    ("cfg.json", '{"agent": {"learning_rate": 1}, "lr": 2}', r"besides the 'agent' table it has \['lr'\]"),
    ("cfg.ini", "learning_rate=1", r"cfg\.ini: config files must end in \.json or \.toml"),
])
def test_config_file_problems_name_the_file_and_position(name, text, expected, tmp_path, capsys):
    (tmp_path / name).write_text(text)
    assert main(TRAIN + ["--logdir", str(tmp_path), "--config", str(tmp_path / name)]) == 2
    assert re.search(expected, one_line_error(capsys))


def test_missing_config_file(tmp_path, capsys):
    assert main(TRAIN + ["--config", str(tmp_path / "nope.toml")]) == 2
    assert one_line_error(capsys) == f"lmgym: config file {tmp_path / 'nope.toml'} does not exist"


def test_toml_and_json_configs_are_applied(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(lmgym.bench.grid, "run", lambda *a, **k: seen.append(k["overrides"]) or (_ for _ in ()).throw(
        ValueError("stop here")))
    (tmp_path / "a.toml").write_text("[agent]\nlearning_rate = 0.002\nkl_coef = 0.1\n")
    (tmp_path / "b.json").write_text(json.dumps({"learning_rate": 0.004}))
    main(TRAIN + ["--logdir", str(tmp_path), "--config", str(tmp_path / "a.toml")])
    main(TRAIN + ["--logdir", str(tmp_path), "--config", str(tmp_path / "b.json")])
    assert seen == [{"learning_rate": 0.002, "kl_coef": 0.1}, {"learning_rate": 0.004}]


# ----------------------------------------------------------------------------- --resume
def test_resume_a_run_folder_takes_its_latest_checkpoint_and_refuses_a_reached_budget(tmp_path, capsys):
    args = TRAIN + ["--logdir", str(tmp_path), "--agent.learning_rate", "3e-3"]
    assert main(args + ["--steps", "300"]) == 0
    run_dir = tmp_path / "TargetToken-v0" / "reinforce" / "seed0"
    first = sorted((run_dir / "checkpoints").iterdir())
    done = json.loads((first[-1] / "state.json").read_text())["global_step"]
    capsys.readouterr()

    assert main(args + ["--steps", str(done + 300), "--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {first[-1]}, writing to {run_dir}" in out
    after = sorted((run_dir / "checkpoints").iterdir(), key=lambda p: int(p.name[5:]))
    assert len(after) == 2 and after[0] == first[-1]  # the resumed run continued in its own folder
    now = json.loads((after[-1] / "state.json").read_text())["global_step"]
    assert now >= done + 300
    assert not (tmp_path / "TargetToken-v0" / "reinforce" / "seed0-2").exists()

    # --steps is the total: at or below what the checkpoint has already trained there is nothing to do.
    for steps in (now, now - 1):
        assert main(args + ["--steps", str(steps), "--resume", str(run_dir)]) == 2
        line = one_line_error(capsys)
        assert f"already trained {now} environment steps" in line and f"--steps {now + steps}" in line
    assert len(list((run_dir / "checkpoints").iterdir())) == 2  # nothing written

    # From an earlier checkpoint the run branches into a fresh folder; the original's later checkpoint stays.
    assert main(args + ["--steps", str(done + 300), "--resume", str(first[-1])]) == 0
    assert f"writing to {tmp_path / 'TargetToken-v0' / 'reinforce' / 'seed0-2'}" in capsys.readouterr().out
    assert sorted((run_dir / "checkpoints").iterdir()) == after


def test_resume_of_a_missing_folder_says_it_does_not_exist(tmp_path, capsys):
    assert main(TRAIN + ["--resume", str(tmp_path / "nope")]) == 2
    assert f"--resume {tmp_path / 'nope'}: the folder does not exist" in one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert main(TRAIN + ["--resume", str(tmp_path / "empty")]) == 2
    assert "neither a checkpoint" in one_line_error(capsys)


def test_agent_load_of_a_missing_folder_says_it_does_not_exist(tmp_path):
    import gymnasium as gym

    from lmgym.agents import Reinforce

    agent = Reinforce(gym.make_vec("lmgym/TargetToken-v0", num_envs=4, device="cpu"))
    with pytest.raises(CheckpointError, match="does not exist"):
        agent.load(tmp_path / "runs" / "grpo" / "checkpoints" / "iter-000100")


def test_readme_agent_example_resumes_from_a_checkpoint_it_really_wrote(tmp_path, monkeypatch):
    """The README's 'Run an agent' block, on a diagnostic task with small budgets, runs as written."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("**Run an agent.**")[1].split("```python\n")[1].split("```")[0]
    assert "last_checkpoint" in block
    block = (block.replace('"lmgym/Arithmetic-v0", num_envs=64', '"lmgym/TargetToken-v0", num_envs=16, device="cpu"')
             .replace("50_000", "400").replace("80_000", "800"))
    monkeypatch.chdir(tmp_path)
    scope = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. resuming with other hyper-parameters than were saved
        exec("import gymnasium as gym\nimport lmgym\n" + block, scope)
    assert Path(scope["agent"].last_checkpoint).parent == Path("runs/grpo2/checkpoints")
    assert scope["agent"].global_step >= 800


@pytest.mark.parametrize("budget,message", [
    (["--steps", "-5"], "steps must be an int >= 1, got -5"), (["--steps", "0"], "steps must be an int >= 1"),
    (["--seconds", "-1"], "seconds must be a finite number >= 0.0, got -1.0"), (["--seconds", "0"], "seconds must be > 0"),
    (["--seconds", "nan"], "seconds must be"),
])
def test_a_budget_that_is_not_positive_is_refused_before_training(tmp_path, capsys, budget, message):
    """Issue 23 item 8: `--steps -5` and `--seconds -1` exited 0 (the latter after one iteration)."""
    from lmgym.models import tiny_model

    from conftest import WORDS

    assert main(TRAIN + ["--logdir", str(tmp_path / "runs"), *budget]) == 2
    assert message in one_line_error(capsys)
    assert main(["bench", "--tasks", "lmgym/TargetToken-v0", "--agents", "reinforce", "--seeds", "0",
                 "--device", "cpu", "--out", str(tmp_path / "bench"), *budget]) == 2
    assert message in one_line_error(capsys)
    model, tok = tiny_model(WORDS, hidden_size=16, num_layers=1, num_heads=2, max_positions=32)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("the cat\n")
    (tmp_path / "reward.py").write_text("def score(prompts, completions):\n    return [0.0] * len(completions)\n")
    assert main(["train", "--model", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.txt"),
                 "--reward", f"{tmp_path / 'reward.py'}:score", "--agent", "reinforce", "--device", "cpu",
                 "--logdir", str(tmp_path / "runs"), *budget]) == 2
    assert message in one_line_error(capsys)
    assert not list((tmp_path / "runs").rglob("checkpoints"))


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_a_port_that_is_not_a_port_is_one_line(tmp_path, capsys, port):
    """Issue 23 item 12: a traceback (OverflowError)."""
    candidates = tmp_path / "c.jsonl"
    candidates.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"]}) + "\n")
    assert main(["label", "--candidates", str(candidates), "--out", str(tmp_path / "r.jsonl"), "--port", port]) == 2
    assert f"--port must be a TCP port number from 0 to 65535 (0 picks a free one), got {port}" in \
        one_line_error(capsys)


def test_a_file_that_is_not_utf8_or_is_a_folder_is_named(tmp_path, capsys):
    """Issue 23 item 12: non-UTF-8 JSONL said "'utf-8' codec can't decode byte 0xe9 in position 15" with no file or
    line; a folder given as the data "did not exist"."""
    bad = tmp_path / "prefs.jsonl"
    bad.write_bytes(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode() + b"\n"
                    + '{"prompt": "caf\u00e9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    rm = ["reward-model", "train", "--backbone", str(tmp_path / "none"), "--out", str(tmp_path / "rm"), "--data"]
    assert main(rm + [str(bad)]) == 2
    assert f"{bad}, line 2: not UTF-8 text (byte 0xe9 at column 16)" in one_line_error(capsys)
    assert main(rm + [str(tmp_path)]) == 2
    assert f"preference data {tmp_path} is a folder" in one_line_error(capsys)
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"the cat\nna\xefve\n")
    assert main(["label", "--model", str(tmp_path / "none"), "--prompts", str(prompts), "--out",
                 str(tmp_path / "r.jsonl")]) == 2
    assert f"{prompts}, line 2: not UTF-8 text (byte 0xef at column 3)" in one_line_error(capsys)


def test_a_bad_hyper_parameter_is_refused_before_the_environment_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    """Issue 23 item 15: `--agent.learning_rate abc` was refused only after the environment had loaded (6.6 s),
    leaving an empty run folder."""
    import gymnasium

    built = []
    monkeypatch.setattr(gymnasium, "make_vec", lambda *a, **k: built.append(a) or (_ for _ in ()).throw(
        AssertionError("the environment was built before the settings were checked")))
    assert main(TRAIN + ["--logdir", str(tmp_path / "runs"), "--agent.learning_rate", "abc"]) == 2
    assert "learning_rate must be a float, got 'abc'" in one_line_error(capsys)
    assert built == [] and not (tmp_path / "runs").exists()


def test_a_run_that_fails_before_writing_leaves_no_empty_folder(tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("the model folder vanished")

    monkeypatch.setattr(lmgym.bench.grid, "run", fail)
    assert main(TRAIN + ["--logdir", str(tmp_path / "runs")]) == 2
    assert "the model folder vanished" in one_line_error(capsys)
    assert not (tmp_path / "runs" / "TargetToken-v0" / "reinforce" / "seed0").exists()


# ----------------------------------------------------------------------------- small things a newcomer hit (item 18)
def test_the_progress_bar_ends_at_the_steps_trained(capsys):
    import gymnasium as gym

    from lmgym.agents import GRPO

    agent = GRPO(gym.make_vec("lmgym/TargetToken-v0", num_envs=8, group_size=4, device="cpu"), seed=0)
    agent.learn(100, progress=True)  # the last iteration overshoots 100
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert f"{agent.global_step}/{agent.global_step}" in last and agent.global_step > 100
    agent.learn(sys.maxsize, progress=True, callbacks=[lambda a, m: False])  # a time budget: no step total
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert f"{agent.global_step}/{agent.global_step}" in last


def test_lmgym_list_fits_the_terminal_and_prints_no_rst(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(len(line) <= 100 for line in lines) and not any("``" in line for line in lines)
    assert any(line.startswith("lmgym/Arithmetic-v0") and line.endswith("[default model shipped]") for line in lines)


def test_resume_takes_the_agent_from_the_run(tmp_path, capsys):
    assert main(TRAIN + ["--logdir", str(tmp_path / "runs"), "--steps", "64"]) == 0
    run = tmp_path / "runs" / "TargetToken-v0" / "reinforce" / "seed0"
    assert main(["train", "--task", "lmgym/TargetToken-v0", "--device", "cpu", "--resume", str(run),
                 "--steps", "1000"]) == 0  # no --agent: the run's own (reinforce)
    assert "resuming from" in capsys.readouterr().out
    assert main(["train", "--task", "lmgym/TargetToken-v0", "--device", "cpu", "--steps", "64"]) == 2
    assert "train needs --agent" in one_line_error(capsys)


def test_bench_help_lists_every_agent_it_accepts(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in ("sb3-ppo", "trl-grpo", "trl-rloo", "online-dpo", "nlpo"))
