"""Data parallelism (lmgym.agents.scale.distributed): two gloo processes train exactly like one process.

One ``torchrun --nproc_per_node 2`` launch (tests/distributed_worker.py) trains GRPO and PPO for 3
iterations with a checkpoint after each, resumes a fresh agent from the iteration-2 checkpoint, and
runs ``lmgym train`` / ``lmgym bench`` unchanged. Two more launches train the same with FSDP2: the
policy sharded, and GRPO's LoRA adapters on a sharded base (the environment's reference model). The
independent reference is a one-process run of the same global batch and seeds, in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distributed_worker as worker
from lmgym.agents import GRPO
from lmgym.agents.common.config import ConfigError
from lmgym.agents.scale.distributed import DataParallel

HERE = Path(__file__).parent
# Float tolerance: the processes forward parts of each micro-batch and sum gradients in another order.
ATOL = 2e-5


def _launch_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(HERE))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _torchrun(out: Path, *args: str, **env) -> Path:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "distributed_worker.py"), str(out), *args]
    done = subprocess.run(cmd, env=dict(_launch_env(), **env), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The output folder of one 2-process gloo launch of the worker (data parallelism, then the CLI)."""
    return _torchrun(tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def two_processes_fsdp(tmp_path_factory):
    """The same training with the policy sharded by FSDP2 (fully_shard) over the 2 gloo processes."""
    return _torchrun(tmp_path_factory.mktemp("fsdp"), *worker.SETTINGS, "--no-cli", LMGYM_FSDP="1")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return out, {algo: worker.run(algo, out, world_size=1) for algo in worker.SETTINGS}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("algo", list(worker.SETTINGS))
def test_two_processes_train_and_resume_like_one(two_processes, one_process, algo):
    ref_dir, ref = one_process
    initial = worker.flat_parameters(worker.make_agent(algo, 1))
    assert _max_diff(ref[algo]["trained"], initial) > 1e-2  # the runs really learned something
    for name in ("trained", "resumed"):
        two = load_file(str(two_processes / algo / f"{name}.safetensors"))
        assert _max_diff(two, ref[algo]["trained"]) < ATOL, name
    # the one-process resume continues identically too
    assert _max_diff(ref[algo]["resumed"], ref[algo]["trained"]) < 1e-6


@pytest.mark.parametrize("algo", list(worker.SETTINGS))
def test_two_processes_write_the_one_process_checkpoint(two_processes, one_process, algo):
    ref_dir, _ = one_process
    for it in ("iter-000001", "iter-000002", "iter-000003"):
        mine = json.loads((two_processes / algo / "checkpoints" / it / "state.json").read_text())
        ref = json.loads((ref_dir / algo / "checkpoints" / it / "state.json").read_text())
        for key in ("run_id", "saved_at"):
            mine.pop(key), ref.pop(key)
        assert mine == ref  # counters, kl_coef, layout of the whole batch, every prompt in flight, prompt RNG
        trainer = torch.load(two_processes / algo / "checkpoints" / it / "trainer_state.pt", weights_only=True)
        ref_trainer = torch.load(ref_dir / algo / "checkpoints" / it / "trainer_state.pt", weights_only=True)
        assert torch.equal(trainer["rng"]["generator"], ref_trainer["rng"]["generator"])
        for name in ("policy",) + (("value_head",) if algo in ("ppo", "nlpo") else ()) + (("masking_policy",) if algo == "nlpo" else ()):
            assert _max_diff(load_file(str(two_processes / algo / "checkpoints" / it / f"{name}.safetensors")),
                             load_file(str(ref_dir / algo / "checkpoints" / it / f"{name}.safetensors"))) < ATOL


@pytest.mark.parametrize("algo", list(worker.SETTINGS))
def test_fsdp_on_two_processes_trains_resumes_and_checkpoints_like_one(two_processes_fsdp, one_process, algo):
    ref_dir, ref = one_process
    for name in ("trained", "resumed"):
        two = load_file(str(two_processes_fsdp / algo / f"{name}.safetensors"))
        assert _max_diff(two, ref[algo]["trained"]) < ATOL, name
    # the gathered checkpoint has the one-process layout: same tensors (tied copies left out), same moments
    it = two_processes_fsdp / algo / "checkpoints" / "iter-000002"
    assert _max_diff(load_file(str(it / "policy.safetensors")),
                     load_file(str(ref_dir / algo / "checkpoints" / "iter-000002" / "policy.safetensors"))) < ATOL
    moments = torch.load(it / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    ref_moments = torch.load(ref_dir / algo / "checkpoints" / "iter-000002" / "trainer_state.pt",
                             weights_only=True)["optimizer"]["state"]
    assert moments.keys() == ref_moments.keys()
    for i in ref_moments:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(moments[i][key], ref_moments[i][key], atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def two_processes_fsdp_lora(tmp_path_factory):
    """GRPO training LoRA adapters, their base (the environment's reference model) sharded by FSDP2."""
    pytest.importorskip("peft")
    return _torchrun(tmp_path_factory.mktemp("fsdp-lora"), *worker.LORA_SETTINGS, "--no-cli", LMGYM_FSDP="1")


@pytest.fixture(scope="module")
def one_process_lora(tmp_path_factory):
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("single-lora")
    return out, {algo: worker.run(algo, out, world_size=1) for algo in worker.LORA_SETTINGS}


@pytest.mark.parametrize("algo", list(worker.LORA_SETTINGS))
def test_fsdp_lora_on_two_processes_trains_and_resumes_like_one(two_processes_fsdp_lora, one_process_lora, algo,
                                                                tmp_path):
    """The sharded base serves both the policy's forwards (adapters on) and the environment's pi_ref forwards
    (adapters off) on every process; the adapters end where the one-process run's do, resumed or not, and a
    one-process run resumes the sharded run's checkpoint."""
    _, ref = one_process_lora
    initial = worker.flat_parameters(worker.make_agent(algo, 1))
    assert initial and all("lora_" in k for k in initial)  # the adapters, not the frozen base
    assert _max_diff(ref[algo]["trained"], initial) > 1e-2  # the runs really learned something
    for name in ("trained", "resumed"):
        two = load_file(str(two_processes_fsdp_lora / algo / f"{name}.safetensors"))
        assert _max_diff(two, ref[algo]["trained"]) < ATOL, name
    assert _max_diff(ref[algo]["resumed"], ref[algo]["trained"]) < 1e-6
    single = worker.make_agent(algo, 1, tmp_path)
    single.load(two_processes_fsdp_lora / algo / "checkpoints" / "iter-000002")
    single.learn(10**9, callbacks=[worker.stop_after(3)], progress=False)
    assert _max_diff(worker.flat_parameters(single), ref[algo]["trained"]) < ATOL


@pytest.mark.parametrize("algo", list(worker.LORA_SETTINGS))
def test_fsdp_lora_checkpoint_holds_the_adapters_of_the_one_process_run(two_processes_fsdp_lora, one_process_lora,
                                                                         algo):
    ref_dir, _ = one_process_lora
    agent = worker.make_agent(algo, 1)
    adapters = {k for k, v in agent.policy.named_parameters() if v.requires_grad}
    base = {k for k, v in agent.policy.named_parameters() if not v.requires_grad}
    assert adapters and base
    for it in ("iter-000001", "iter-000002", "iter-000003"):
        mine, theirs = two_processes_fsdp_lora / algo / "checkpoints" / it, ref_dir / algo / "checkpoints" / it
        stored = load_file(str(mine / "policy.safetensors"))
        assert set(stored) == adapters  # the adapters only, whole: never the sharded base
        assert _max_diff(stored, load_file(str(theirs / "policy.safetensors"))) < ATOL
        state, ref_state = (json.loads((d / "state.json").read_text()) for d in (mine, theirs))
        for key in ("run_id", "saved_at"):
            state.pop(key), ref_state.pop(key)
        assert state == ref_state  # counters, the base's fingerprint, the prompts in flight, the prompt RNG
        moments = torch.load(mine / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
        ref_moments = torch.load(theirs / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
        assert moments.keys() == ref_moments.keys() and len(moments) == len(adapters)
        for i in ref_moments:
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.allclose(moments[i][key], ref_moments[i][key], atol=1e-6, rtol=1e-4)


def test_a_one_process_run_resumes_a_two_process_checkpoint(two_processes, one_process, tmp_path):
    _, ref = one_process
    agent = worker.make_agent("grpo", 1, tmp_path)
    agent.load(two_processes / "grpo" / "checkpoints" / "iter-000002")
    agent.learn(10**9, callbacks=[worker.stop_after(3)], progress=False)
    assert _max_diff(worker.flat_parameters(agent), ref["grpo"]["trained"]) < ATOL


def test_lmgym_train_and_bench_run_unchanged_under_torchrun(two_processes):
    runs = list((two_processes / "cli-train").rglob("state.json"))
    assert runs and all("seed0/" in str(p) for p in runs)  # one run folder, chosen by process 0
    state = json.loads(sorted(runs)[-1].read_text())
    assert state["layout"] == {"num_envs": 8, "group_size": 4}  # --agent.num_envs is the whole batch
    report = json.loads((two_processes / "cli-bench" / "results.json").read_text())
    assert len(report["runs"]) == 1 and report["runs"][0]["env_steps"] >= 60
    own = [p.parent for p in (two_processes / "cli-own").rglob("lmgym_run.json")]
    assert len(own) == 1 and (own[0] / "summary.json").is_file()
    assert json.loads((own[0] / "lmgym_run.json").read_text())["num_envs"] == 8
    assert json.loads(sorted(own[0].rglob("state.json"))[-1].read_text())["layout"]["num_envs"] == 8


def test_world_size_that_cannot_split_the_micro_batches_is_refused(monkeypatch):
    import gymnasium as gym

    monkeypatch.setattr(DataParallel, "from_environment", classmethod(lambda cls, device: cls(0, 2)))
    env = gym.make_vec("lmgym/TargetToken-v0", num_envs=4, group_size=4, device="cpu")
    with pytest.raises(ConfigError, match=r"2 processes cannot share the micro-batches evenly"):
        GRPO(env, num_minibatches=8)


def test_bench_refuses_a_batch_the_processes_cannot_share(monkeypatch):
    from lmgym.bench.grid import run

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"num_envs=8 \(groups of 4\) cannot be shared by 3 processes"):
        run("lmgym/TargetToken-v0", "grpo", steps=10, device="cpu", overrides={"num_envs": 8, "group_size": 4})


def test_a_process_that_never_joins_gives_one_clear_line(tmp_path):
    """Process 1 never starts (e.g. its node's python lacks lmgym): process 0 says so and what to do."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(_launch_env(), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), LMGYM_DIST_TIMEOUT="3")
    done = subprocess.run([sys.executable, "-m", "lmgym.cli", *worker.CLI_TRAIN, "--logdir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmgym: process 0 of 2 could not join"), done.stderr[-2000:]
    assert "python -c 'import lmgym'" in lines[0]
