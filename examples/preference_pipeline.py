"""The RLHF pipeline end to end on the CPU: SFT model -> samples -> preferences -> reward model -> environment.

1. the SFT policy is lmgym's zoo model "assistant" (built offline on first use, about a minute);
2. sample 8 replies per prompt and label them with a fixed rule standing in for human raters;
3. train a Bradley-Terry reward model on all pairs of each prompt's ranked replies;
4. make an environment whose score is that reward model, ready for any agent.

    python examples/preference_pipeline.py
"""

import copy

import gymnasium as gym
import numpy as np

from lmgym import zoo
from lmgym.zoo import corpora
from lmgym.agents import RLOO
from lmgym.rewards import (LearnedReward, RewardModel, read_preferences, sample_preferences,
                           train_reward_model)


def main(steps: int | None = None, rm_steps: int = 200, agent_steps: int = 20_000):
    # 1. The SFT model.
    policy, tokenizer = zoo.load("assistant", steps=steps)

    # 2. Preferences: 8 samples per prompt, ranked by the synthetic labeller.
    prompts = corpora.assistant_prompts()
    records = []
    for round_ in range(3):
        records += sample_preferences(policy, tokenizer, prompts, 8, corpora.polite_concise_labeller, seed=round_)
    split = int(0.8 * len(records))
    train, held_out = read_preferences(records[:split]), read_preferences(records[split:])
    print(f"{sum(len(g.pairs) for g in train)} training pairs, {sum(len(g.pairs) for g in held_out)} held out")

    # 3. The reward model: the SFT trunk plus a scalar head, Bradley-Terry loss, then centred.
    reward_model = RewardModel(copy.deepcopy(policy.base_model), tokenizer)
    metrics = train_reward_model(reward_model, train, eval_groups=held_out, epochs=10, max_steps=rm_steps,
                                 learning_rate=1e-3, batch_pairs=128)
    print(f"reward model: held-out pairwise accuracy {metrics['eval_accuracy']:.1%}")

    # 4. An environment scored by the reward model, and an agent trained against it.
    venv = gym.make_vec("lmgym/TextGen-v0", num_envs=64, group_size=4, model=policy, tokenizer=tokenizer,
                        reward_fn=LearnedReward(reward_model), prompts=prompts, max_new_tokens=20, kl_coef=0.05,
                        device="cpu")
    agent = RLOO(venv, learning_rate=1e-3)

    def labeller_score():  # the rule the reward model stands for: did the policy improve on it too?
        batch = agent.collect()
        return float(np.mean(corpora.polite_concise_labeller(batch.prompts, batch.completions)))

    before, true_before = agent.evaluate(), labeller_score()
    agent.learn(agent_steps)
    after, true_after = agent.evaluate(), labeller_score()
    print(f"RLOO against the learned reward: reward-model score {before['score']:.2f} -> {after['score']:.2f} "
          f"(KL {after['kl']:.2f}); the labeller's own score {true_before:.2f} -> {true_after:.2f}")
    return {"reward_model": metrics, "before": before, "after": after, "labeller": (true_before, true_after)}


if __name__ == "__main__":
    main()
