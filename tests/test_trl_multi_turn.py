"""TRL's GRPOTrainer on lmgym's multi-turn tasks (lmgym.integrations.trl_episodes): the episodes TRL trains on are the
environment's, token for token, with the environment's replies masked out of its loss.

The rollout itself needs no TRL and is checked in every run; the tests that build a trainer skip when TRL is not
installed (``pip install -e ".[trl]"``). The reference for every episode is the task's rules, replayed here from
the policy's tokens alone.
"""

import json

import gymnasium as gym
import pytest
import torch

import lmgym  # noqa: F401
from lmgym.cli import main
from lmgym.tasks.conversation import ECHO_WORDS, GUESS_WORDS

SKIP_REASON = "TRL is not installed; pip install -e '.[trl]' to run the TRL multi-turn tests"
MAX_TURNS = 3


@pytest.fixture
def trl():
    pytest.importorskip("datasets", reason=SKIP_REASON)
    return pytest.importorskip("trl", reason=SKIP_REASON)


# ----------------------------------------------------------------------------- the rules, written out again
def guess_reference(completion: list[int]) -> list[tuple[list[int], float]]:
    """The (mask, return) of every Guess-v0 episode with these tokens, one per target in 1 2 3 that would have
    answered as the episode shows (the last turn's guess is answered by no token, so two targets can fit).
    Ids: <eos> 0, then GUESS_WORDS from 1."""
    word = {i + 1: w for i, w in enumerate(GUESS_WORDS)}
    policy = completion[0::2]  # one-token turns, each followed by a one-token reply while the episode goes on
    fits = []
    for target in (1, 2, 3):
        ids, mask, ret = [], [], 0.0
        for turn, token in enumerate(policy, start=1):
            ids.append(token)
            mask.append(1)
            said = word.get(token, "")
            if said == str(target):
                ret = (MAX_TURNS - turn + 1) / MAX_TURNS
                break
            if turn == MAX_TURNS:
                break
            reply = "what" if said not in ("1", "2", "3") else "lower" if target < int(said) else "higher"
            ids.append(GUESS_WORDS.index(reply) + 1)
            mask.append(0)
        if ids == completion:
            fits.append((mask, ret))
    return fits


def echo_reference(prompt: list[int], completion: list[int]):
    """Echo-v0's episode: policy, reply, policy, reply, policy; a turn earns 1/3 when it repeats the word heard last
    (the prompt at first). Ids: <eos> 0, then ECHO_WORDS from 1."""
    assert len(completion) == 2 * MAX_TURNS - 1
    heard = [prompt[-1]] + completion[1::2]
    ret = sum(float(said == h) for said, h in zip(completion[0::2], heard)) / MAX_TURNS
    assert all(1 <= t <= len(ECHO_WORDS) for t in completion[1::2])  # the environment says a word of a b c
    return [1, 0] * (MAX_TURNS - 1) + [1], ret


def check_against_the_rules(task_id: str, batch) -> None:
    for p, c, m, ret in zip(batch.prompt_ids, batch.completion_ids, batch.env_mask, batch.returns):
        if task_id == "lmgym/Guess-v0":
            assert p == [GUESS_WORDS.index("guess") + 1]
            fits = guess_reference(c)
        else:
            assert len(p) == 1 and 1 <= p[0] <= len(ECHO_WORDS)
            fits = [echo_reference(p, c)]
        assert any(m == mask and ret == pytest.approx(expected, abs=1e-6) for mask, expected in fits), (c, m, ret)


# ----------------------------------------------------------------------------- the rollout, without TRL
@pytest.mark.parametrize("task_id", ["lmgym/Guess-v0", "lmgym/Echo-v0"])
def test_the_rollout_plays_the_tasks_rules_and_leaves_the_model_as_it_was(task_id):
    from transformers import AutoModelForCausalLM

    from lmgym.integrations.trl_episodes import EpisodeRollout

    env = gym.make_vec(task_id, num_envs=16, group_size=4)
    items = list(env.core.prompts.items)
    rollout = EpisodeRollout(env, items, seed=1)
    model = AutoModelForCausalLM.from_config(env.reference_model.config)
    model.load_state_dict(env.reference_model.state_dict())
    frozen = model.get_input_embeddings().weight
    frozen.requires_grad_(False)  # a LoRA base is frozen: the rollout must not unfreeze it
    model.eval()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    prompts = [items[i % len(items)].text for i in range(4) for _ in range(4)]  # TRL's layout: 4 copies in a row
    batch = rollout.play(model, prompts)
    assert torch.equal(torch.get_rng_state(), before)  # TRL's torch stream is not reseeded
    assert not frozen.requires_grad and not model.training
    assert [list(env.core.prompts.encode(t).ids) for t in prompts] == batch.prompt_ids
    check_against_the_rules(task_id, batch)
    assert len({tuple(c) for c in batch.completion_ids}) > 3  # sampled, not one repeated episode
    # the policy's log-probs on its tokens, 0 on the environment's
    for c, m, lp in zip(batch.completion_ids, batch.env_mask, batch.logprobs):
        assert all((v < 0) == bool(k) for v, k in zip(lp, m))
    assert rollout.policy_tokens == sum(map(sum, batch.env_mask))
    # a second batch goes on from the environment's generator (new hidden states), the prompts as given
    again = rollout.play(model, prompts)
    check_against_the_rules(task_id, again)
    assert again.prompt_ids == batch.prompt_ids


def test_a_batch_of_another_size_or_unknown_prompts_is_one_clear_error():
    from transformers import AutoModelForCausalLM

    from lmgym.integrations.trl_episodes import EpisodeRollout

    env = gym.make_vec("lmgym/Echo-v0", num_envs=8, group_size=4)
    rollout = EpisodeRollout(env, list(env.core.prompts.items), seed=0)
    model = AutoModelForCausalLM.from_config(env.reference_model.config)
    with pytest.raises(ValueError, match="generation batch has 4 prompts but the environment plays 8"):
        rollout.play(model, ["a"] * 4)
    with pytest.raises(ValueError, match="not one of the task's"):
        rollout.play(model, ["a"] * 7 + ["zebra"])
    with pytest.raises(ValueError, match="float32"):
        rollout.play(model.to(torch.bfloat16), ["a"] * 8)
    with pytest.raises(TypeError, match="multi-turn"):
        EpisodeRollout(gym.make_vec("lmgym/TargetToken-v0", num_envs=8), [])


# ----------------------------------------------------------------------------- TRL trains on them
def test_trl_trains_on_the_environments_episodes_with_its_replies_masked(trl, tmp_path):
    """What GRPOTrainer computes its loss on (its _compute_loss inputs) is the batch the environment played, token for
    token, with tool_mask 0 on the replies; the episodes follow the task's rules; training runs end to end and lmgym
    scores the result against the exact optimum."""
    from lmgym.integrations.trl import TRLTask

    task = TRLTask("lmgym/Guess-v0", tmp_path, num_envs=32, group_size=8)
    assert task.multi_turn and task.config_kwargs()["mask_truncated_completions"] is False
    args = trl.GRPOConfig(str(tmp_path / "out"), **task.config_kwargs(), loss_type="grpo", learning_rate=3e-3,
                          lr_scheduler_type="constant", max_steps=25, seed=0, report_to="none", save_strategy="no",
                          logging_strategy="no", disable_tqdm=True)
    trainer = trl.GRPOTrainer(args=args, **task.trainer_kwargs())
    seen = []
    original = trainer._compute_loss

    def compute_loss(model, inputs):
        played = task.rollout.last
        rows = []
        for p, pm, c, cm, tm in zip(*(inputs[k].tolist() for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                                   "completion_mask", "tool_mask"))):
            n = sum(cm)
            assert all(tm[n:]) and not any(cm[n:])  # padding: tool_mask pads with 1, the completion mask with 0
            rows.append((tuple(x for x, k in zip(p, pm) if k), tuple(c[:n]), tuple(tm[:n])))
        reference = sorted(zip(map(tuple, played.prompt_ids), map(tuple, played.completion_ids),
                               map(tuple, played.env_mask)))
        assert sorted(rows) == reference  # TRL shuffles the batch; as a multiset it is the episodes played
        seen.append(played)
        return original(model, inputs)

    trainer._compute_loss = compute_loss
    start = task.evaluate()
    trainer.train()
    assert len(seen) == 25
    for batch in (seen[0], seen[-1]):
        check_against_the_rules("lmgym/Guess-v0", batch)
        assert any(0 in m for m in batch.env_mask)  # the batch holds replies
    end = task.evaluate(trainer.model)
    assert end["fraction_of_optimum"] == pytest.approx(end["return"] / task.optimal_return)
    assert end["return"] > start["return"] + 0.15, (start, end)


def test_the_bench_runs_trl_grpo_on_a_multi_turn_task_and_refuses_trl_rloo(trl, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--tasks", "lmgym/Echo-v0", "--agents", "trl-grpo", "--seeds", "0", "--steps", "1000",
                 "--out", str(out), "--agent.num_envs", "16"]) == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    # a step is a policy token: three per Echo episode, 16 episodes per TRL step; TRL stops after the step reaching 1000
    assert run["env_steps"] == 48 * -(-1000 // 48)
    assert run["optimum"] > 0 and run["fraction_of_optimum"] == pytest.approx(run["end"]["return"] / run["optimum"])
    assert [c[0] for c in run["curve"]] == [48 * (i + 1) for i in range(len(run["curve"]))]
    capsys.readouterr()
    assert main(["bench", "--tasks", "lmgym/Guess-v0", "--agents", "trl-rloo", "--seeds", "0", "--steps", "100",
                 "--out", str(tmp_path / "rloo")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trl-rloo cannot train on the multi-turn task lmgym/Guess-v0" in err
    assert not (tmp_path / "rloo" / "results.json").exists()
