"""Stable-Baselines3 PPO with lmgym's transformer policy, over the batched environment, logging to TensorBoard.

    python examples/sb3_ppo.py            # then: tensorboard --logdir runs/sb3_ppo
"""

import copy

import gymnasium as gym
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecMonitor

import lmgym  # noqa: F401  registers the environments
from lmgym.agents.sb3 import LMGymVecEnv, LMPolicy, bind_sb3_model, evaluate_return, lm_policy_kwargs


def main(total_steps: int = 8000, logdir: str | None = "runs/sb3_ppo", task: str = "lmgym/TargetToken-v0"):
    venv = gym.make_vec(task, num_envs=16, device="cpu")
    env = VecMonitor(LMGymVecEnv(venv, seed=0))  # rollout/ep_rew_mean in SB3's logs
    # The actor is a copy of the reference LM; binding to the env makes the KL term exact.
    # lm_policy_kwargs lets SB3 save the model (the LM as its architecture; weights in SB3's policy.pth).
    model = PPO(LMPolicy, env, policy_kwargs=lm_policy_kwargs(copy.deepcopy(venv.reference_model), env=env),
                n_steps=32, batch_size=128, learning_rate=1e-3, seed=0, tensorboard_log=logdir)
    before = evaluate_return(model, gym.make(task), 100)
    model.learn(total_steps)
    if logdir is not None:
        model.save(f"{logdir}/model.zip")
        model = PPO.load(f"{logdir}/model.zip", env=env)
        bind_sb3_model(env, model)  # the environment binding is not saved: bind the loaded model again
    after = evaluate_return(model, gym.make(task), 100)
    print(f"score {before['score']:.3f} -> {after['score']:.3f}; return {before['return']:.3f} -> "
          f"{after['return']:.3f} ({after['return'] / venv.optimal_return:.0%} of the exact optimum)")
    return before, after


if __name__ == "__main__":
    main()
