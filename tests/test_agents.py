"""Agents learn, resume exactly, stop on NaN with the last good checkpoint kept, and reject bad input."""

import os

import gymnasium as gym
import pytest
import torch

from lmgym.agents import AGENTS, GRPO, PPO, RLOO, CheckpointError, Reinforce, TrainingError

LEARNING_RATE = 3e-3


def diagnostic_env(group_size=1, task="lmgym/TargetToken-v0", num_envs=64):
    return gym.make_vec(task, num_envs=num_envs, group_size=group_size, device="cpu")


@pytest.mark.parametrize("name, group_size, steps", [("ppo", 1, 15_000), ("grpo", 8, 30_000),
                                                      ("reinforce", 1, 30_000), ("rloo", 8, 30_000)])
def test_agent_reaches_90_percent_of_the_exact_optimum(name, group_size, steps):
    torch.manual_seed(0)
    venv = diagnostic_env(group_size)
    agent = AGENTS[name](venv, learning_rate=LEARNING_RATE, seed=1)
    start = agent.evaluate()["return"]
    agent.learn(steps, progress=False)
    end = agent.evaluate(num_batches=8)["return"]
    optimum = venv.optimal_return
    assert start / optimum < 0.5
    assert end / optimum >= 0.9, f"{name} reached {end / optimum:.1%} of the optimum"


def weights(agent):
    return {f"{m}.{k}": v.detach().clone() for m, mod in agent.trainable_modules().items()
            for k, v in mod.state_dict().items()}


@pytest.mark.parametrize("cls, group_size, extra", [(PPO, 1, {"adaptive_kl": True}), (Reinforce, 1, {}),
                                                    (GRPO, 4, {})])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(cls, group_size, extra, tmp_path):
    def fresh():
        torch.manual_seed(123)  # whatever the global RNG holds, the run depends only on the seed
        return cls(diagnostic_env(group_size, num_envs=16), logdir=None, learning_rate=1e-2, **extra)

    straight = fresh()
    straight.learn(4 * 16 * 6, progress=False)  # about 4 iterations

    first = fresh()
    first.learn(2 * 16 * 6, progress=False)
    first.save(tmp_path / "ckpt")
    torch.manual_seed(999)  # a different process state before resuming
    resumed = fresh().load(tmp_path / "ckpt")
    assert resumed.global_step == first.global_step
    resumed.learn(4 * 16 * 6, progress=False)

    assert resumed.global_step == straight.global_step
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.env.kl_coef == straight.env.kl_coef


def test_nan_stops_the_update_and_keeps_the_last_good_checkpoint(tmp_path):
    agent = PPO(diagnostic_env(num_envs=16), logdir=tmp_path, checkpoint_every=1, learning_rate=1e-3)
    agent.learn(16 * 6, progress=False)
    good = agent.last_checkpoint
    assert good is not None and (good / "policy.safetensors").is_file()
    files_before = sorted(os.listdir(tmp_path / "checkpoints"))
    with torch.no_grad():
        agent.value_head.linear.bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"values is not finite.*" + good.name):
        agent.learn(10 * 16 * 6, progress=False)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == files_before
    restored = PPO(diagnostic_env(num_envs=16), learning_rate=1e-3).load(good)
    assert torch.isfinite(restored.value_head.linear.bias).all()


def test_nan_policy_weights_are_reported():
    agent = Reinforce(diagnostic_env(num_envs=8))
    with torch.no_grad():
        agent.policy.lm_head.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="log-probs are not finite"):
        agent.learn(100, progress=False)


def test_tensorboard_logs_use_the_fields_names(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    PPO(diagnostic_env(num_envs=16), logdir=tmp_path).learn(2 * 16 * 6, progress=False)
    events = EventAccumulator(str(tmp_path)).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ["objective/scores", "objective/kl", "objective/entropy", "loss/policy", "loss/value",
                "policy/clipfrac", "policy/approxkl", "val/explained_variance", "time/tokens_per_s"]:
        assert tag in tags, tag
    assert "hyperparameters/text_summary" in events.Tags()["tensors"]


def test_checkpoint_errors(tmp_path):
    agent = Reinforce(diagnostic_env(num_envs=8))
    agent.learn(8 * 6, progress=False)
    path = agent.save(tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="already exists"):
        agent.save(path)
    agent.save(path, overwrite=True)
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        Reinforce(diagnostic_env(num_envs=8)).load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not an lmgym checkpoint"):
        Reinforce(diagnostic_env(num_envs=8)).load(tmp_path)
    with pytest.raises(CheckpointError, match="holds a 'reinforce' agent"):
        PPO(diagnostic_env(num_envs=8)).load(path)
    with pytest.raises(CheckpointError, match="another task"):
        Reinforce(diagnostic_env(num_envs=8, task="lmgym/Copy-v0")).load(path)
    data = (path / "policy.safetensors").read_bytes()
    (path / "policy.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        Reinforce(diagnostic_env(num_envs=8)).load(path)


def test_bad_hyper_parameters_and_envs():
    with pytest.raises(TypeError, match="did you mean 'learning_rate'"):
        PPO(diagnostic_env(num_envs=8), learnig_rate=1e-3)
    with pytest.raises(ValueError, match="group_size >= 2"):
        GRPO(diagnostic_env(num_envs=8))
    with pytest.raises(ValueError, match="group_size >= 2"):
        RLOO(diagnostic_env(num_envs=8))
    with pytest.raises(ValueError, match="loss_type"):
        GRPO(diagnostic_env(4, num_envs=8), loss_type="mean")
    with pytest.raises(TypeError, match="TextGenVectorEnv"):
        PPO(gym.make("lmgym/Copy-v0"))


def test_custom_agent_example_learns():
    import runpy

    example = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "examples", "custom_agent.py"))
    out = example["main"](total_steps=12_000, logdir=None)
    assert out["after"]["return"] > out["before"]["return"] + 0.2


def test_checkpoint_of_a_model_with_tied_embeddings_round_trips(tmp_path):
    from conftest import ZOO_STEPS

    venv = gym.make_vec("lmgym/Arithmetic-v0", num_envs=8, zoo_steps=ZOO_STEPS, device="cpu")
    assert venv.reference_model.config.tie_word_embeddings
    agent = Reinforce(venv, learning_rate=1e-2)
    agent.learn(8 * 3, progress=False)
    agent.save(tmp_path / "ckpt")
    other = Reinforce(gym.make_vec("lmgym/Arithmetic-v0", num_envs=8, zoo_steps=ZOO_STEPS, device="cpu"))
    other.load(tmp_path / "ckpt")
    a, b = weights(agent), weights(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert other.policy.lm_head.weight.data_ptr() == other.policy.model.embed_tokens.weight.data_ptr()
