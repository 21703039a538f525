"""``lmgym train --model PATH --prompts FILE --reward MODULE:FUNCTION``: your own model, prompts and reward."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lmgym.cli import main
from lmgym.models import tiny_model

from conftest import WORDS
from test_chat import CONVERSATIONS, IM_END, chat_model

REWARD_MODULE = '''
SEEN = []

def count_good(prompts, completions):
    SEEN.extend(prompts)
    with open(__file__ + ".seen", "a") as f:
        for p in prompts:
            f.write(repr(p) + "\\n")
    return [c.split().count("good") - 0.1 * len(c.split()) for c in completions]

LIMIT = 3
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    model, tok = tiny_model(WORDS, hidden_size=32, num_layers=1, num_heads=4, max_positions=64, seed=1, init_std=0.3)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    (tmp_path / "train.txt").write_text("the cat\nthe dog ran\n\nvery good day\non the mat\n")
    (tmp_path / "heldout.txt").write_text("the mat\nbad dog\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(workdir, *extra):
    return main(["train", "--model", str(workdir / "model"), "--prompts", str(workdir / "train.txt"),
                 "--agent", "grpo", "--steps", "150", "--num-envs", "8", "--max-new-tokens", "4",
                 "--logdir", str(workdir / "runs"), "--agent.learning_rate", "3e-2", *extra])


def seen_prompts(workdir):
    return [eval(line) for line in (workdir / "my_rewards.py.seen").read_text().splitlines()]


def test_train_your_own_model_then_export(workdir, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    assert run(workdir, "--reward", "my_rewards:count_good", "--eval-prompts", str(workdir / "heldout.txt"),
               "--sample-every", "2") == 0
    out = capsys.readouterr().out
    assert "held-out score" in out
    logdir = workdir / "runs" / "model" / "grpo" / "seed0"
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["iterations"] >= 4 and summary["eval_start"]["episodes"] == 2 * 4  # 2 prompts x group of 4
    assert {p for p, _, _ in summary["eval_samples"]} == {"the mat", "bad dog"}
    seen = set(seen_prompts(workdir))
    assert {"the mat", "bad dog"} <= seen and {"the cat", "very good day"} <= seen

    events = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    events.Reload()
    assert "samples/text_summary" in events.Tags()["tensors"]
    assert len(events.Tensors("samples/text_summary")) >= 2
    table = events.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.startswith("|prompt|completion|score|") and "the mat" in table
    assert "eval/score" in events.Tags()["scalars"]

    assert main(["export", str(logdir), str(workdir / "exported")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(workdir / "exported")
    checkpoint = sorted((logdir / "checkpoints").glob("iter-*"))[-1]
    weights = load_file(checkpoint / "policy.safetensors")
    for name, value in exported.state_dict().items():
        assert torch.equal(value, weights[name])
    start = tiny_model(WORDS, hidden_size=32, num_layers=1, num_heads=4, max_positions=64, seed=1, init_std=0.3)[0]
    assert not torch.equal(start.lm_head.weight, exported.lm_head.weight)


def test_reward_given_as_a_file_path_and_chat_prompts(tmp_path, monkeypatch):
    model, tok = chat_model(eos_token_id=IM_END)
    model.save_pretrained(tmp_path / "chat")
    tok.save_pretrained(tmp_path / "chat")
    (tmp_path / "rewards.py").write_text(REWARD_MODULE)
    (tmp_path / "chat.jsonl").write_text("\n".join([json.dumps(CONVERSATIONS[0]),
                                                    json.dumps({"messages": CONVERSATIONS[1]})]) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", str(tmp_path / "chat"), "--prompts", str(tmp_path / "chat.jsonl"),
                 "--reward", str(tmp_path / "rewards.py") + ":count_good", "--agent", "rloo", "--steps", "30",
                 "--num-envs", "4", "--max-new-tokens", "3", "--logdir", str(tmp_path / "runs")]) == 0
    seen = [eval(line) for line in (tmp_path / "rewards.py.seen").read_text().splitlines()]
    assert seen and all(p in CONVERSATIONS for p in seen)  # the reward saw the messages as given
    run_file = json.loads((tmp_path / "runs" / "chat" / "rloo" / "seed0" / "lmgym_run.json").read_text())
    assert run_file["stop_token_ids"] == [0, IM_END]


def test_a_chat_prompt_file_with_a_message_without_text_is_refused(tmp_path, monkeypatch, capsys):
    """Issue 23 item 10: a chat prompt file with "content": null trained."""
    model, tok = chat_model(eos_token_id=IM_END)
    model.save_pretrained(tmp_path / "chat")
    tok.save_pretrained(tmp_path / "chat")
    (tmp_path / "rewards.py").write_text(REWARD_MODULE)
    (tmp_path / "chat.jsonl").write_text(json.dumps(CONVERSATIONS[0]) + "\n"
                                         + json.dumps([{"role": "user", "content": None}]) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", str(tmp_path / "chat"), "--prompts", str(tmp_path / "chat.jsonl"),
                 "--reward", str(tmp_path / "rewards.py") + ":count_good", "--agent", "rloo", "--steps", "30",
                 "--num-envs", "4", "--logdir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lmgym: ") and "prompt #1: message #0 (user) has content None" in err
    assert not list((tmp_path / "runs").rglob("checkpoints"))


@pytest.mark.parametrize("reward,message", [
    ("nosuchmodule_xyz:score", "no module named 'nosuchmodule_xyz'"),
    ("my_rewards:nosuchfunction", "has no function 'nosuchfunction'"),
    ("my_rewards:LIMIT", "not a function"),
    ("my_rewards", "must be MODULE:FUNCTION"),
    ("missing/file.py:score", "does not exist"),
])
def test_bad_reward_is_a_clear_error(workdir, capsys, reward, message):
    assert run(workdir, "--reward", reward) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmgym: ") and message in err and "Traceback" not in err


def test_bad_prompt_files_and_options_are_clear_errors(workdir, capsys):
    (workdir / "bad.jsonl").write_text('[{"role": "user", "content": "hi"}]\n{"text": 3}\n')
    (workdir / "prompts.csv").write_text("a\n")
    cases = [
        (["--prompts", str(workdir / "bad.jsonl"), "--reward", "my_rewards:count_good"], "line 2"),
        (["--prompts", str(workdir / "prompts.csv"), "--reward", "my_rewards:count_good"], ".txt"),
        (["--prompts", str(workdir / "none.txt"), "--reward", "my_rewards:count_good"], "does not exist"),
        (["--reward", "my_rewards:count_good", "--reward-model", str(workdir)], "exactly one"),
        ([], "exactly one"),
    ]
    for extra, message in cases:
        assert run(workdir, *extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("lmgym: ") and message in err, (extra, err)
    assert main(["train", "--agent", "grpo"]) == 2
    assert "--task" in capsys.readouterr().err


def test_reward_model_as_the_reward(workdir):
    from lmgym.rewards.reward_model import RewardModel

    model, tok = tiny_model(WORDS, hidden_size=32, num_layers=1, num_heads=4, max_positions=64, seed=2)
    RewardModel.from_pretrained_lm(model, tok).save(workdir / "rm")
    assert run(workdir, "--reward-model", str(workdir / "rm"), "--steps", "40") == 0
    assert (workdir / "runs" / "model" / "grpo" / "seed0" / "summary.json").is_file()


def test_lora_run_exports_merged_or_as_adapters(workdir):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert run(workdir, "--reward", "my_rewards:count_good", "--lora-r", "4", "--steps", "60") == 0
    logdir = workdir / "runs" / "model" / "grpo" / "seed0"
    assert json.loads((logdir / "lmgym_run.json").read_text())["peft_config"]["r"] == 4
    assert main(["export", str(logdir), str(workdir / "merged")]) == 0
    assert main(["export", str(logdir), str(workdir / "adapters"), "--adapter-only"]) == 0
    assert (workdir / "adapters" / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(workdir / "model")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(workdir / "merged")(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, workdir / "adapters")(input_ids=ids).logits
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=1e-5)
    assert (merged - base_logits).abs().max() > 1e-4  # the adapters trained


# ----------------------------------------------------------------------------- run folders (issue 23, items 1-4)
def run_dir(workdir, suffix="", root="runs"):
    return workdir / root / "model" / "grpo" / f"seed0{suffix}"


def files_of(folder):
    """Every file of a run folder and its bytes (the lock file aside: it says who holds the folder now)."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lmgym.lock"}


def hold_lock(folder):
    """Another process holding the run folder's lock, as a second `lmgym train` would."""
    import subprocess
    import sys

    code = ("import sys, time; from lmgym.utils.lock import FolderLock; "
            "FolderLock(sys.argv[1], 'another lmgym train').acquire(); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_resumed_model_run_continues_in_its_own_folder_and_leaves_others_alone(workdir):
    from lmgym.agents import latest_checkpoint

    assert run(workdir, "--reward", "my_rewards:count_good") == 0
    assert run(workdir, "--reward", "my_rewards:count_good") == 0  # a second run beside it
    first, second = run_dir(workdir), run_dir(workdir, "-2")
    before, resumed_from = files_of(first), latest_checkpoint(second)
    assert run(workdir, "--reward", "my_rewards:count_good", "--resume", str(second), "--steps", "300") == 0
    assert files_of(first) == before  # the other run's files, byte for byte
    latest = latest_checkpoint(second)
    assert latest != resumed_from and json.loads((latest / "state.json").read_text())["global_step"] >= 300


def test_a_refused_resume_writes_nothing(workdir, capsys):
    assert run(workdir, "--reward", "my_rewards:count_good") == 0
    first = run_dir(workdir)
    before = files_of(first)
    # a LoRA resume of a full fine-tuning run is refused (or, without peft, cannot start): either way, late
    assert run(workdir, "--reward", "my_rewards:count_good", "--resume", str(first), "--steps", "300",
               "--lora-r", "4") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("lmgym: ")
    assert files_of(first) == before  # lmgym_run.json included: the untouched run still exports


def test_a_run_folder_another_process_holds_is_never_shared(workdir, capsys):
    first, second = run_dir(workdir), run_dir(workdir, "-2")
    holder = hold_lock(first)  # a run started at the same moment: it has chosen seed0 and written nothing yet
    try:
        assert run(workdir, "--reward", "my_rewards:count_good") == 0
        assert (second / "checkpoints").is_dir() and not (first / "checkpoints").exists()  # the next folder
    finally:
        holder.kill()
        holder.wait()
    before = files_of(second)
    holder = hold_lock(second)  # that run resumed by another process: a second resume of it is refused
    try:
        capsys.readouterr()
        assert run(workdir, "--reward", "my_rewards:count_good", "--resume", str(second), "--steps", "300") == 2
        assert "is in use by process" in capsys.readouterr().err
        assert files_of(second) == before
    finally:
        holder.kill()
        holder.wait()


def test_resume_with_another_logdir_starts_a_new_run_there(workdir, capsys):
    assert run(workdir, "--reward", "my_rewards:count_good") == 0
    first = run_dir(workdir)
    before = files_of(first)
    capsys.readouterr()
    assert run(workdir, "--reward", "my_rewards:count_good", "--resume", str(first), "--steps", "300",
               "--logdir", str(workdir / "elsewhere")) == 0
    assert "a new run starts there from it" in capsys.readouterr().out
    assert files_of(first) == before
    branch = run_dir(workdir, root="elsewhere")
    state = json.loads((next((branch / "checkpoints").iterdir()) / "state.json").read_text())
    assert state["global_step"] >= 300


def test_a_killed_save_is_cleaned_up_when_the_run_starts_again(workdir):
    assert run(workdir, "--reward", "my_rewards:count_good") == 0
    first = run_dir(workdir)
    leftover = first / "checkpoints" / ".iter-000009.tmp-x1y2"  # what SIGKILL during a save leaves
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a model")
    assert run(workdir, "--reward", "my_rewards:count_good", "--resume", str(first), "--steps", "300") == 0
    assert not leftover.exists()


def test_an_agent_locks_its_run_folder_whoever_created_it(tmp_path):
    import gymnasium as gym

    from lmgym.agents import GRPO
    from lmgym.utils.lock import LockedError

    folder = tmp_path / "run"
    holder = hold_lock(folder)
    try:
        agent = GRPO(gym.make_vec("lmgym/TargetToken-v0", num_envs=8, group_size=4, device="cpu"), logdir=folder)
        with pytest.raises(LockedError, match="is in use by process .* \\(another lmgym train\\)"):
            agent.learn(16, progress=False)
        assert not (folder / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    agent.learn(16, progress=False)  # free again: it trains and checkpoints
    assert (folder / "checkpoints").is_dir()
