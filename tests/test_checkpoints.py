"""Checkpoints and training state you can trust (issue 11): no silent skip, changed settings applied and
recorded, check-everything-then-load, checksums and reference fingerprints, NaN guards, config checks,
the adaptive KL controller's unit, and no leaked TensorBoard threads."""

import copy
import gc
import hashlib
import json
import shutil
import threading

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lmgym.agents import GRPO, PPO, CheckpointError, ConfigError, Reinforce, TrainingError, latest_checkpoint
from lmgym.agents.ppo import AdaptiveKLController


def env(num_envs=16, group_size=1, **kwargs):
    return gym.make_vec("lmgym/TargetToken-v0", num_envs=num_envs, group_size=group_size, device="cpu", **kwargs)


def weights(agent):
    return {f"{m}.{k}": v.detach().clone() for m, mod in agent.trainable_modules().items()
            for k, v in mod.state_dict().items()}


def saved_weights(path, agent):
    return {f"{m}.{k}": v for m in agent.trainable_modules() for k, v in load_file(path / f"{m}.safetensors").items()}


def rewrite_manifest(path):
    """Make manifest.json agree with the files again, as a buggy or hostile writer could: the content checks
    must then catch the problem on their own."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (path / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- item 1
def test_resuming_into_the_same_logdir_writes_the_new_checkpoint_alongside(tmp_path):
    first = Reinforce(env(), logdir=tmp_path, checkpoint_every=1, learning_rate=1e-2)
    first.learn(16 * 6 * 4, progress=False)
    ckpts = tmp_path / "checkpoints"
    before = {p.name: (p / "policy.safetensors").read_bytes() for p in ckpts.iterdir()}

    resumed = Reinforce(env(), logdir=tmp_path, checkpoint_every=1, learning_rate=3e-3)
    with pytest.warns(UserWarning, match="learning_rate 0.01 -> 0.003"):
        resumed.load(ckpts / "iter-000001")
    with pytest.warns(UserWarning, match="kept, and this run's checkpoint is written alongside"):
        resumed.learn(16 * 6 * 2, progress=False)

    final = resumed.last_checkpoint
    assert f"iter-{resumed.iteration:06d}" in before  # the first run had written this iteration too
    assert final.name == f"iter-{resumed.iteration:06d}-2"
    # The reported checkpoint holds the resumed run's weights, and the first run's checkpoints are intact.
    mine, on_disk = weights(resumed), saved_weights(final, resumed)
    assert all(torch.equal(mine[k], on_disk[k]) for k in on_disk)
    assert {p.name: (p / "policy.safetensors").read_bytes() for p in ckpts.iterdir() if p.name in before} == before
    assert latest_checkpoint(tmp_path) == final
    lineage = json.loads((final / "state.json").read_text())["resumes"]
    assert [(r["run_id"], r["iteration"]) for r in lineage] == [(first.run_id, 1)]
    # Writing the same iteration again from the same run replaces its own folder atomically.
    resumed.policy.lm_head.weight.data.mul_(0.5)
    assert resumed.checkpoint() == final
    assert torch.equal(saved_weights(final, resumed)["policy.lm_head.weight"], resumed.policy.lm_head.weight)


# ----------------------------------------------------------------------------- item 2
def test_learning_rate_changed_at_resume_is_applied_and_recorded(tmp_path):
    agent = Reinforce(env(), learning_rate=1e-2)
    agent.learn(16 * 6 * 2, progress=False)
    agent.save(tmp_path / "a")

    with pytest.warns(UserWarning, match="learning_rate"):
        resumed = Reinforce(env(), learning_rate=0.0).load(tmp_path / "a")
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [0.0]
    start = weights(resumed)
    resumed.learn(resumed.global_step + 16 * 6 * 2, progress=False)
    assert resumed.iteration > agent.iteration
    assert all(torch.equal(start[k], v) for k, v in weights(resumed).items())  # lr 0 (and no weight decay)

    resumed.save(tmp_path / "b")
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert state["config"]["learning_rate"] == 0.0
    assert state["resumes"][-1]["changed"]["learning_rate"] == [0.01, 0.0]
    trainer = torch.load(tmp_path / "b" / "trainer_state.pt", weights_only=True)
    assert trainer["optimizer"]["param_groups"][0]["lr"] == 0.0


def test_kl_coef_changed_at_resume_is_applied_to_the_env_and_the_losses(tmp_path):
    agent = GRPO(env(group_size=4), learning_rate=1e-2)
    agent.learn(16 * 6, progress=False)
    agent.save(tmp_path / "a")

    with pytest.warns(UserWarning, match=r"env.kl_coef 0.05 -> 0.5"):
        resumed = GRPO(env(group_size=4, kl_coef=0.5)).load(tmp_path / "a")
    assert resumed.env.kl_coef == 0.5 and resumed.beta == 0.5
    resumed.save(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "state.json").read_text())["kl_coef"] == {"initial": 0.5, "current": 0.5}

    # PPO's adaptive controller: the same kl_coef continues from the adapted beta; a new one starts from itself.
    ppo = PPO(env(), adaptive_kl=True, target_kl=0.01, kl_horizon=100)
    ppo.learn(16 * 6, progress=False)
    assert ppo.env.kl_coef != 0.05
    ppo.save(tmp_path / "ppo")
    assert PPO(env(), adaptive_kl=True, target_kl=0.01, kl_horizon=100).load(tmp_path / "ppo").env.kl_coef \
        == ppo.env.kl_coef
    with pytest.warns(UserWarning, match="env.kl_coef"):
        changed = PPO(env(kl_coef=0.2), adaptive_kl=True, target_kl=0.01, kl_horizon=100).load(tmp_path / "ppo")
    assert changed.env.kl_coef == 0.2


def test_seed_cannot_change_at_resume(tmp_path):
    agent = Reinforce(env())
    agent.learn(16 * 6, progress=False)
    agent.save(tmp_path / "a")
    with pytest.raises(CheckpointError, match="seed=0.*seed=1.*resume=False"):
        Reinforce(env(), seed=1).load(tmp_path / "a")
    Reinforce(env(), seed=1).load(tmp_path / "a", resume=False)  # a new run from these weights


# ----------------------------------------------------------------------------- items 3 and 4
def _state(path, edit):
    state = json.loads((path / "state.json").read_text())
    state = edit(state)
    (path / "state.json").write_text(json.dumps(state))


def _trainer(path, edit):
    trainer = torch.load(path / "trainer_state.pt", weights_only=True)
    torch.save(edit(trainer), path / "trainer_state.pt")


def _policy(path, edit):
    w = load_file(path / "policy.safetensors")
    save_file(edit(w), path / "policy.safetensors")


def _set(d, keys, value):
    target = d
    for k in keys[:-1]:
        target = target[k]
    target[keys[-1]] = value
    return d


def _drop(d, key):
    d.pop(key)
    return d


def _first_state_entry(trainer, key, value):
    entry = next(iter(trainer["optimizer"]["state"].values()))
    entry[key] = value(entry[key])
    return trainer


CORRUPTIONS = {
    "state is a list": (lambda p: _state(p, lambda s: []), r"state\.json: state\.json must be a JSON object"),
    "global_step missing": (lambda p: _state(p, lambda s: _drop(s, "global_step")),
                            r"state\.json: global_step is missing"),
    "global_step abc": (lambda p: _state(p, lambda s: _set(s, ["global_step"], "abc")), r"global_step must be an int"),
    "global_step -500": (lambda p: _state(p, lambda s: _set(s, ["global_step"], -500)), r"global_step must lie in"),
    "global_step 1e300": (lambda p: _state(p, lambda s: _set(s, ["global_step"], 1e300)),
                          r"global_step must be an int"),
    "iteration true": (lambda p: _state(p, lambda s: _set(s, ["iteration"], True)), r"iteration must be an int"),
    "iteration above episodes": (lambda p: _state(p, lambda s: _set(s, ["iteration"], 10**6)), r"exceeds episodes"),
    "kl_coef x": (lambda p: _state(p, lambda s: _set(s, ["kl_coef", "current"], "x")), r"kl_coef\.current must be"),
    "kl_coef nan": (lambda p: _state(p, lambda s: _set(s, ["kl_coef", "current"], float("nan"))),
                    r"kl_coef\.current must be"),
    "kl_coef 1e7": (lambda p: _state(p, lambda s: _set(s, ["kl_coef", "current"], 1e7)),
                    r"kl_coef\.current must be a finite number in \[0, 1e\+06\]"),
    "kl_beta x in extra": (lambda p: _state(p, lambda s: _set(s, ["extra"], {"kl_beta": "x"})), r"extra: .*kl_beta"),
    "config lr abc": (lambda p: _state(p, lambda s: _set(s, ["config", "learning_rate"], "abc")),
                      r"config\.learning_rate must be a float"),
    "config temperature -1": (lambda p: _state(p, lambda s: _set(s, ["config", "temperature"], -1)),
                              r"config\.temperature must be > 0"),
    "config unknown field": (lambda p: _state(p, lambda s: _set(s, ["config", "lr"], 1)), r"config\.lr: not a hyper"),
    "config not a dict": (lambda p: _state(p, lambda s: _set(s, ["config"], [1])), r"config must be a JSON object"),
    "another agent": (lambda p: _state(p, lambda s: _set(s, ["agent"], "grpo")), r"holds a 'grpo' agent"),
    "format": (lambda p: _state(p, lambda s: _set(s, ["format"], 7)), r"format must be 1"),
    "bad prompt rng": (lambda p: _state(p, lambda s: _set(s, ["env", "rng", "state"], {"state": "x"})),
                       r"env\.rng is not a valid PCG64 state"),
    "prompt token out of range": (lambda p: _state(p, lambda s: _set(s, ["env", "prompts", 0], [999])),
                                  r"env\.prompts must be"),
    "prompt too long": (lambda p: _state(p, lambda s: _set(s, ["env", "prompts", 0], [1] * 40)),
                        r"env\.prompts holds a prompt of 40 tokens"),
    "another reference": (lambda p: _state(p, lambda s: _set(s, ["task", "reference", "sha256"], "0" * 64)),
                          r"another task or reference model: reference model: the same architecture"),
    "optimizer without param groups": (lambda p: _trainer(p, lambda t: _set(t, ["optimizer"], {"state": {}})),
                                       r"trainer_state\.pt: optimizer\.param_groups must be a list of 1 groups"),
    "optimizer group lacks lr": (lambda p: _trainer(p, lambda t: _drop(t["optimizer"]["param_groups"][0], "lr") and t),
                                 r"param_groups\[0\] lacks \['lr'\]"),
    "optimizer state of the wrong shape": (lambda p: _trainer(p, lambda t: _first_state_entry(
        t, "exp_avg", lambda v: torch.zeros(3))), r"optimizer\.state\[0\]\.exp_avg is \(3,\)"),
    "optimizer state nan": (lambda p: _trainer(p, lambda t: _first_state_entry(
        t, "exp_avg_sq", lambda v: torch.full_like(v, float("nan")))), r"exp_avg_sq holds nan"),
    "generator state too short": (lambda p: _trainer(p, lambda t: _set(t, ["rng", "generator"], torch.zeros(
        10, dtype=torch.uint8))), r"rng\.generator is not a valid generator state"),
    "cpu rng state a float tensor": (lambda p: _trainer(p, lambda t: _set(t, ["rng", "torch_cpu"], torch.zeros(3))),
                                     r"rng\.torch_cpu must be a uint8 tensor"),
    "trainer state a list": (lambda p: _trainer(p, lambda t: [1]),
                             r"trainer_state\.pt: the trainer state must be a dict"),
    "nan weights": (lambda p: _policy(p, lambda w: {k: torch.full_like(v, float("nan")) for k, v in w.items()}),
                    r"policy\.safetensors: the weights are unusable \(.* holds nan or inf"),
    "huge weights": (lambda p: _policy(p, lambda w: {k: torch.full_like(v, 1e30) for k, v in w.items()}),
                     r"policy\.safetensors: the weights are unusable \(their norm overflows"),
    "weight of the wrong shape": (lambda p: _policy(p, lambda w: {k: v[:1] if k.endswith("lm_head.weight") else v
                                                                  for k, v in w.items()}),
                                  r"lm_head\.weight is \(1, 16\)"),
    "weight missing": (lambda p: _policy(p, lambda w: {k: v for k, v in w.items() if "lm_head" not in k}),
                       r"does not match this agent's policy: missing \['lm_head\.weight'\]"),
}


def _agent_state(agent):
    return (weights(agent), agent.global_step, agent.iteration, agent.episodes, agent.env.kl_coef,
            copy.deepcopy(agent.optimizer.state_dict()), agent.generator.get_state().clone(),
            copy.deepcopy(agent.env.core.rng.bit_generator.state), agent.last_checkpoint)


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.fixture(scope="module")
def ppo_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ppo"
    agent = PPO(env(), adaptive_kl=True, learning_rate=1e-2)
    agent.learn(16 * 6, progress=False)
    agent.save(path)
    return path


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_refused_and_the_agent_is_untouched(name, ppo_checkpoint, tmp_path):
    corrupt, message = CORRUPTIONS[name]
    path = tmp_path / "ckpt"
    shutil.copytree(ppo_checkpoint, path)
    corrupt(path)
    rewrite_manifest(path)
    agent = PPO(env(), adaptive_kl=True, learning_rate=1e-2, seed=0)
    agent.learn(16 * 6 * 2, progress=False)  # a state of its own, different from the checkpoint's
    before = _agent_state(agent)
    with pytest.raises(CheckpointError, match=message):
        agent.load(path)
    assert _same(before, _agent_state(agent))


def test_checksums_catch_a_flipped_byte_and_unlisted_files(ppo_checkpoint, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(ppo_checkpoint, path)
    PPO(env(), adaptive_kl=True, learning_rate=1e-2).load(path)  # intact: loads
    data = bytearray((path / "policy.safetensors").read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    (path / "policy.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"policy\.safetensors is corrupt: its sha256"):
        PPO(env(), adaptive_kl=True, learning_rate=1e-2).load(path)
    shutil.rmtree(path)
    shutil.copytree(ppo_checkpoint, path)
    (path / "special_tokens_map.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"files the manifest does not list \(\['special_tokens_map"):
        PPO(env(), adaptive_kl=True, learning_rate=1e-2).load(path)


def test_a_checkpoint_with_other_modules_is_refused_naming_the_setting(ppo_checkpoint):
    with pytest.raises(CheckpointError, match=r"holds the modules \['policy', 'value_head'\], this agent has "
                                              r"\['policy', 'value_head', 'value_model'\].*separate_value_model "
                                              r"False in the checkpoint, True here"):
        PPO(env(), adaptive_kl=True, learning_rate=1e-2, separate_value_model=True).load(ppo_checkpoint)


def test_another_reference_model_is_refused_saying_what_differs(ppo_checkpoint):
    from lmgym.agents.common.checkpoint import reference_fingerprint

    # The fingerprint is the same for a float32 reference and its bfloat16 copy (a GPU's default dtype).
    model = env().reference_model
    assert reference_fingerprint(model) == reference_fingerprint(copy.deepcopy(model).to(torch.bfloat16))
    with pytest.raises(CheckpointError, match=r"reference_seed: '\(default\)' in the checkpoint, 3 here.*"
                                              r"same architecture \(llama, 2736 parameters\) with different weights"):
        PPO(env(reference_seed=3), adaptive_kl=True, learning_rate=1e-2).load(ppo_checkpoint)
    other = env()
    with torch.no_grad():
        next(other.reference_model.parameters()).add_(0.1)  # another model of the same shape, same arguments
    with pytest.raises(CheckpointError, match=r"reference model: the same architecture .* different weights"):
        PPO(other, adaptive_kl=True, learning_rate=1e-2).load(ppo_checkpoint)
    with pytest.raises(CheckpointError, match=r"max_new_tokens: 6 in the checkpoint, 4 here"):
        PPO(env(max_new_tokens=4), adaptive_kl=True, learning_rate=1e-2).load(ppo_checkpoint)


def test_resuming_with_another_num_envs_continues_the_prompt_stream(ppo_checkpoint):
    state = json.loads((ppo_checkpoint / "state.json").read_text())
    with pytest.warns(UserWarning, match="layout"):
        agent = PPO(env(num_envs=8), adaptive_kl=True, learning_rate=1e-2).load(ppo_checkpoint)
    assert (agent.global_step, agent.iteration) == (state["global_step"], state["iteration"])
    # The new batch of 8 prompts is drawn from the checkpoint's prompt RNG (an independent generator here).
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = state["env"]["rng"]
    expected = [p.ids for p in agent.env.core.prompts.draw(rng, 8)]
    assert [p.ids for p in agent.env.core.row_prompts] == expected
    agent.learn(agent.global_step + 8 * 6, progress=False)


# ----------------------------------------------------------------------------- item 6
def test_an_exploding_step_stops_training_and_no_bad_checkpoint_is_called_good(tmp_path):
    agent = Reinforce(env(), logdir=tmp_path, checkpoint_every=1, learning_rate=1e-3)
    agent.learn(16 * 3, progress=False)  # one iteration
    good = agent.last_checkpoint
    assert good.name == "iter-000001"
    agent.config.learning_rate = 1e30
    for group in agent.optimizer.param_groups:
        group["lr"] = 1e30
    with pytest.raises(TrainingError, match=r"left the weights unusable \(their norm overflows.*iter-000001"):
        agent.learn(16 * 6 * 10, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter-000001"]
    with pytest.raises(CheckpointError, match="refusing to write"):
        agent.save(tmp_path / "bad")  # the huge weights are in memory, but are never written
    assert not (tmp_path / "bad").exists()
    restored = Reinforce(env(), learning_rate=1e-3).load(good, resume=False)
    assert max(float(v.abs().max()) for v in weights(restored).values()) < 100


def test_nan_weights_are_never_saved(tmp_path):
    agent = Reinforce(env())
    with torch.no_grad():
        agent.policy.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"policy weights are unusable \(lm_head\.weight holds nan"):
        agent.save(tmp_path / "c")
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- item 7
@pytest.mark.parametrize("cls, kwargs, message", [
    (PPO, {"temperature": 0}, "temperature must be > 0, got 0.0"),
    (PPO, {"temperature": -1.0}, "temperature must be > 0"),
    (PPO, {"max_grad_norm": -1.0}, "max_grad_norm must be > 0"),
    (PPO, {"max_grad_norm": float("nan")}, "max_grad_norm must be a finite number > 0, got nan"),
    (PPO, {"max_grad_norm": float("inf")}, "max_grad_norm must be a finite number"),
    (PPO, {"num_minibatches": 0}, "num_minibatches must be >= 1"),
    (PPO, {"update_epochs": 0}, "update_epochs must be >= 1"),
    (PPO, {"learning_rate": "abc"}, "learning_rate must be a float, got 'abc'"),
    (PPO, {"learning_rate": -1e-3}, "learning_rate must be >= 0"),
    (PPO, {"seed": 1.5}, "seed must be an int, got 1.5"),
    (PPO, {"anneal_lr": "yes"}, "anneal_lr must be a bool"),
    (PPO, {"gamma": 1.5}, "gamma must be >= 0 and <= 1"),
    (PPO, {"kl_horizon": 0}, "kl_horizon must be >= 1"),
    (PPO, {"num_minibatches": 3}, "num_minibatches=3 must divide the batch of 16 episodes"),
    (PPO, {"num_minibatches": 4, "gradient_accumulation_steps": 3}, "gradient_accumulation_steps=3 must divide"),
    (GRPO, {"epsilon_low": 1.0}, "epsilon_low must be >= 0 and < 1"),
    (GRPO, {"loss_type": "mean"}, "loss_type must be one of"),
    (GRPO, {"beta": -0.1}, "beta must be >= 0"),
    (Reinforce, {"baseline": "x"}, "baseline must be one of"),
    (Reinforce, {"baseline_decay": 2.0}, "baseline_decay must be >= 0 and <= 1"),
])
def test_invalid_hyper_parameters_are_refused_when_the_agent_is_built(cls, kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cls(env(group_size=4 if cls is GRPO else 1), **kwargs)


def test_config_checks_name_every_problem_convert_numbers_and_reach_subclass_configs():
    from dataclasses import dataclass

    from lmgym.agents import Agent, AgentConfig

    with pytest.raises(ConfigError, match="update_epochs must be >= 1, got 0; temperature must be > 0"):
        PPO(env(), temperature=-1.0, update_epochs=0)
    agent = PPO(env(), learning_rate=1, kl_horizon=1e4)  # an int for a float, a whole float for an int
    assert type(agent.config.learning_rate) is float and agent.config.kl_horizon == 10000

    @dataclass
    class MyConfig(AgentConfig):
        learning_rate: float = 3e-3  # a new default keeps the base class's range
        window: int = 4

    class MyAgent(Agent):
        config_class = MyConfig
        name = "mine"

    with pytest.raises(ConfigError, match="learning_rate must be >= 0.*window must be an int"):
        MyAgent(env(), learning_rate=-1.0, window="4")


# ----------------------------------------------------------------------------- item 9
def test_adaptive_kl_controller_steps_by_episodes():
    # By hand: error = clip(5.5 / 5 - 1, -0.2, 0.2) = 0.1; beta = 0.1 * (1 + 0.1 * 64 / 1000).
    assert AdaptiveKLController(target=5.0, horizon=1000).update(0.1, 5.5, 64) == pytest.approx(0.10064, rel=1e-12)
    assert AdaptiveKLController(target=1.0, horizon=10).update(0.1, 9.0, 5) == pytest.approx(0.11, rel=1e-12)

    seen = []
    agent = PPO(env(), adaptive_kl=True, target_kl=0.05, kl_horizon=100)
    agent.learn(16 * 6, progress=False, callbacks=[lambda a, m: seen.append(m) or False])
    kl = seen[0]["objective/kl"]  # the batch's mean KL per episode
    error = min(max(kl / 0.05 - 1.0, -0.2), 0.2)
    assert agent.env.kl_coef == pytest.approx(0.05 * (1 + error * 16 / 100), rel=1e-12)  # 16 episodes, not tokens


# ----------------------------------------------------------------------------- item 10
def test_agents_close_their_tensorboard_writer(tmp_path):
    baseline = threading.active_count()
    for i in range(3):
        agent = PPO(env(), logdir=tmp_path / f"run{i}")
        agent.learn(16 * 6, progress=False)
        assert agent.writer is None and threading.active_count() == baseline
    with PPO(env(), logdir=tmp_path / "ctx") as agent:
        agent.log({"x": 1.0})
        assert threading.active_count() == baseline + 1
    assert threading.active_count() == baseline
    forgotten = PPO(env(), logdir=tmp_path / "gc")
    forgotten.log({"x": 1.0})
    assert threading.active_count() == baseline + 1
    del forgotten
    gc.collect()
    assert threading.active_count() == baseline
