"""Export: a trained policy as a standard Hugging Face folder that from_pretrained and pipeline load."""

import json

import gymnasium as gym
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

from lmgym.agents import GRPO, PPO
from lmgym.cli import main

from conftest import PROMPTS
from test_chat import CONVERSATIONS, IM_END, chat_model


def count_words(prompts, completions):
    return [float(len(c.split())) for c in completions]


INPUT = torch.tensor([[1, 3, 8, 9, 10, 2, 1, 4, 8, 8], [1, 5, 6, 2, 1, 3, 6, 7, 2, 1]])


def trained_chat_agent(agent_cls=GRPO, **overrides):
    model, tok = chat_model(eos_token_id=IM_END)
    venv = gym.make_vec("lmgym/TextGen-v0", num_envs=4, group_size=2, model=model, tokenizer=tok,
                        reward_fn=count_words, prompts=CONVERSATIONS, max_new_tokens=5)
    agent = agent_cls(venv, learning_rate=1e-2, seed=0, **overrides)
    agent.learn(40, progress=False)
    return agent


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    return model(input_ids=INPUT).logits


def test_save_pretrained_round_trip(tmp_path):
    agent = trained_chat_agent(temperature=0.8, top_k=4)
    start = chat_model(eos_token_id=IM_END)[0]
    assert not torch.allclose(logits_of(start), logits_of(agent.policy))  # training moved the policy
    out = agent.save_pretrained(tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert next(loaded.parameters()).dtype == torch.float32
    torch.testing.assert_close(logits_of(loaded), logits_of(agent.policy), atol=0, rtol=0)
    gen = GenerationConfig.from_pretrained(out)
    assert sorted(gen.eos_token_id) == [0, IM_END] == agent.env.stop_token_ids
    assert (gen.temperature, gen.top_k, gen.top_p, gen.do_sample) == (0.8, 4, 1.0, True)
    tok = AutoTokenizer.from_pretrained(out)
    rendered = tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)["input_ids"]
    assert rendered == agent.env.core.prompts.items[0].ids
    generator = pipeline("text-generation", model=str(out))
    text = generator("<|im_start|>user two plus three<|im_end|> <|im_start|>assistant", max_new_tokens=3)
    assert isinstance(text[0]["generated_text"], str)
    with pytest.raises(FileExistsError, match="not empty"):
        agent.save_pretrained(tmp_path / "export")


def test_save_pretrained_can_cast(tmp_path):
    agent = trained_chat_agent(PPO)
    out = agent.save_pretrained(tmp_path / "bf16", dtype="bfloat16")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert next(agent.policy.parameters()).dtype == torch.float32  # the live policy is untouched


def test_cli_export_of_a_run_folder(tmp_path, tiny):
    venv = gym.make_vec("lmgym/TargetToken-v0", num_envs=8, group_size=4)
    agent = GRPO(venv, learning_rate=3e-3, seed=0, logdir=tmp_path / "run")
    agent.learn(100, progress=False)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, agent.policy(input_ids=ids).logits, atol=0, rtol=0)
    meta = json.loads((tmp_path / "out" / "lmgym_export.json").read_text())
    assert meta["agent"] == "grpo" and meta["task"] == "lmgym/TargetToken-v0"
    assert meta["iteration"] == agent.iteration


def test_cli_export_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "neither an lmgym checkpoint" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_an_unreadable_run_file_is_named(tmp_path, capsys):
    venv = gym.make_vec("lmgym/TargetToken-v0", num_envs=8, group_size=4)
    agent = GRPO(venv, learning_rate=3e-3, seed=0)
    agent.save(tmp_path / "run" / "checkpoints" / "iter-000001")
    (tmp_path / "run" / "lmgym_run.json").write_text('{"model": "some/path"')  # cut short
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "lmgym_run.json" in err and "Traceback" not in err


def test_a_policy_sharded_by_fsdp_is_not_exported_live(tmp_path):
    """No process holds an FSDP-sharded policy whole: save_pretrained says to export the checkpoint instead."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from lmgym.agents.export import ExportError

    agent = trained_chat_agent()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        fully_shard(agent.policy)
        with pytest.raises(ExportError, match="lmgym export CHECKPOINT_OR_RUN DIR"):
            agent.save_pretrained(tmp_path / "export")
        assert not (tmp_path / "export").exists()
    finally:
        dist.destroy_process_group()


def test_a_dpo_run_exports_after_its_preference_file_moved(tmp_path):
    """Issue 23 item 9: an export rebuilt the agent, and DPO read its training data to be built."""
    from lmgym.agents import DPO

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps({"prompt": p, "chosen": "a a", "rejected": "b"}) for p in "abc") + "\n")
    venv = gym.make_vec("lmgym/TargetToken-v0", num_envs=4, device="cpu")
    agent = DPO(venv, preferences=str(prefs), learning_rate=1e-2, seed=0, logdir=tmp_path / "run")
    agent.learn(30, progress=False)
    prefs.rename(tmp_path / "moved.jsonl")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, agent.policy(input_ids=ids).logits, atol=0, rtol=0)


def test_adapters_alone_of_a_full_fine_tuning_run_are_refused(tmp_path, capsys):
    """Issue 23 item 9: `--adapter-only` on a run that trained the whole model exited 0 and wrote the full model."""
    venv = gym.make_vec("lmgym/TargetToken-v0", num_envs=8, group_size=4, device="cpu")
    GRPO(venv, learning_rate=3e-3, seed=0, logdir=tmp_path / "run").learn(50, progress=False)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--adapter-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lmgym: ") and "need a LoRA run; this run trained the whole model" in err
    assert not (tmp_path / "out").exists()


def test_an_agent_built_for_its_weights_cannot_train():
    from lmgym.agents import TrainingError

    agent = GRPO(gym.make_vec("lmgym/TargetToken-v0", num_envs=8, group_size=4, device="cpu"), weights_only=True)
    with pytest.raises(TrainingError, match="weights_only=True"):
        agent.learn(10, progress=False)
