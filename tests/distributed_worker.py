"""One process of the data-parallel tests (tests/test_distributed.py launches it with torchrun, or imports it).

For each algorithm: train 3 iterations with a checkpoint after each, save the final parameters, then
resume from the iteration-2 checkpoint in a fresh agent (as after a kill) and train the third iteration
again. Process 0 writes the parameters of both as safetensors under OUT/<algo>/; every process
checks that its random generators equal process 0's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gymnasium as gym
import torch

import lmgym  # noqa: F401  (registers the environments)
from lmgym.agents import GRPO, NLPO, PPO

GLOBAL_ENVS = 8
ITERATIONS = 3
SETTINGS = {
    # dapo divides by the minibatch's token count and accumulates two micro-batches per step
    "grpo": (GRPO, 4, dict(loss_type="dapo", gradient_accumulation_steps=2, learning_rate=3e-2)),
    # several epochs of shuffled minibatches, token-mean losses, whitened advantages, adaptive KL
    "ppo": (PPO, 1, dict(num_minibatches=2, update_epochs=2, gradient_accumulation_steps=2, adaptive_kl=True,
                         kl_horizon=20, learning_rate=3e-2)),
    # PPO restricted to a masking policy's nucleus, refreshed from the policy (gathered under FSDP) every iteration
    "nlpo": (NLPO, 1, dict(mask_update_every=1, mask_top_p=0.9, learning_rate=1e-2)),
}
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj", "lm_head"]}
LORA_SETTINGS = {
    # adapters inside the environment's reference model, one of them in the root FSDP unit (lm_head); with
    # FSDP that reference is what is sharded, so the environment's pi_ref forwards all-gather too
    "grpo-lora": (GRPO, 4, dict(SETTINGS["grpo"][2], peft_config=LORA)),
}


def make_agent(algo: str, world_size: int, logdir=None):
    cls, group_size, overrides = {**SETTINGS, **LORA_SETTINGS}[algo]
    env = gym.make_vec("lmgym/TargetToken-v0", num_envs=GLOBAL_ENVS // world_size, group_size=group_size,
                       device="cpu")
    return cls(env, logdir=logdir, seed=5, checkpoint_every=1, **overrides)


def stop_after(iterations: int):
    return lambda agent, metrics: agent.iteration < iterations


def flat_parameters(agent) -> dict[str, torch.Tensor]:
    """The parameters that train (a LoRA policy's adapters, not its frozen base), gathered in full when FSDP
    shards them (a collective then)."""
    from lmgym.agents.scale.sharding import is_sharded

    return {k: (v.full_tensor() if is_sharded(v) else v).detach().clone()
            for k, v in agent.named_trainable_parameters().items() if v.requires_grad}


def run(algo: str, out: Path, world_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """Train, then resume from the iteration-2 checkpoint; returns both runs' final parameters."""
    logdir = out / algo
    agent = make_agent(algo, world_size, logdir)
    agent.learn(10**9, callbacks=[stop_after(ITERATIONS)], progress=False)
    if agent.sharded:  # FSDP: each process holds half of every layer weight
        from lmgym.agents.scale.sharding import is_sharded

        lora = algo in LORA_SETTINGS
        # with LoRA the sharded model is the environment's reference, the adapters' base
        model = agent.env.reference_model if lora else agent.policy
        assert not lora or model is agent.policy.base
        weight = model.model.layers[0].mlp.up_proj.weight
        assert is_sharded(weight) and weight.to_local().shape[0] * world_size == weight.shape[0]
        if lora:  # the adapters stay whole on every process
            assert not any(is_sharded(p) for p in agent.policy.adapter_parameters())
    trained = flat_parameters(agent)
    check_same_generators(agent)
    resumed = make_agent(algo, world_size, out / f"{algo}-resumed")
    resumed.load(sorted((logdir / "checkpoints").glob("iter-000002*"))[0])
    resumed.learn(10**9, callbacks=[stop_after(ITERATIONS)], progress=False)
    return {"trained": trained, "resumed": flat_parameters(resumed)}


def check_same_generators(agent) -> None:
    """Every process's sampling generator and prompt RNG must equal process 0's (what one checkpoint restores)."""
    dp = agent.distributed
    mine = torch.cat([agent.generator.get_state(),
                      torch.tensor(bytearray(str(agent.env.core.rng.bit_generator.state).encode()))])
    everyone = dp.gather_objects([mine.tolist()])
    assert all(s == everyone[0] for s in everyone), "the processes' random generators differ"


CLI_TRAIN = ["train", "--task", "lmgym/TargetToken-v0", "--agent", "grpo", "--steps", "100", "--device", "cpu",
             "--agent.num_envs", "8", "--agent.group_size", "4"]
CLI_BENCH = ["bench", "--tasks", "lmgym/TargetToken-v0", "--agents", "grpo", "--seeds", "0", "--steps", "60",
             "--device", "cpu", "--agent.num_envs", "8", "--agent.group_size", "4"]


def main(out: str, algos: list[str], cli_too: bool) -> None:
    from safetensors.torch import save_file

    from lmgym import cli
    from lmgym.agents.scale.distributed import launcher_world

    out = Path(out)
    rank, world_size = launcher_world()
    for algo in algos:
        result = run(algo, out, world_size)
        if rank == 0:
            for name, params in result.items():
                save_file(params, str(out / algo / f"{name}.safetensors"))
    if not cli_too:
        return
    # `lmgym train` and `lmgym bench`, unchanged, under the launcher (num_envs is the whole batch)
    assert cli.main(CLI_TRAIN + ["--logdir", str(out / "cli-train")]) == 0
    assert cli.main(CLI_BENCH + ["--out", str(out / "cli-bench")]) == 0
    # `lmgym train --model` with your own model, prompts and reward: process 0 writes them, all train
    if rank == 0:
        from lmgym.models import tiny_model

        model, tok = tiny_model(["the", "cat", "good", "day"], hidden_size=32, num_layers=1, num_heads=4,
                                max_positions=64, seed=1, init_std=0.3)
        model.save_pretrained(out / "own-model")
        tok.save_pretrained(out / "own-model")
        (out / "own_rewards.py").write_text("def count_good(prompts, completions):\n"
                                            "    return [c.split().count('good') for c in completions]\n")
        (out / "own.txt").write_text("the cat\ngood day\nthe day\n")
    torch.distributed.barrier()
    assert cli.main(["train", "--model", str(out / "own-model"), "--prompts", str(out / "own.txt"), "--reward",
                     str(out / "own_rewards.py") + ":count_good", "--agent", "grpo", "--steps", "40",
                     "--num-envs", "8", "--group-size", "4", "--max-new-tokens", "4", "--device", "cpu",
                     "--logdir", str(out / "cli-own")]) == 0


if __name__ == "__main__":
    # distributed_worker.py OUT [ALGO ...] [--no-cli]
    names = [a for a in sys.argv[2:] if not a.startswith("--")] or list(SETTINGS)
    main(sys.argv[1], names, cli_too="--no-cli" not in sys.argv)
