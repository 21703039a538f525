"""lmgym tasks trained by Hugging Face TRL (lmgym.integrations.trl) and TRL's trainers as bench cells.

TRL is an optional extra: the tests that need it skip when it is not installed. Run them with

    pip install -e ".[trl]" && python -m pytest -q tests/test_trl.py

The tests of the missing-TRL messages fake the import failing and run either way.
"""

import copy
import json
import math
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import lmgym  # noqa: F401
from exact import exact_return
from lmgym.cli import main
from lmgym.tasks.diagnostic import reference_model

SKIP_REASON = "TRL is not installed; pip install -e '.[trl]' to run the TRL adapter tests"


@pytest.fixture
def trl():
    pytest.importorskip("datasets", reason=SKIP_REASON)
    return pytest.importorskip("trl", reason=SKIP_REASON)


def trl_completion_ids(tokens: torch.Tensor, stops) -> list[list[int]]:
    """Completion ids as TRL hands them to a reward function: each row up to and including its first stop token."""
    out = []
    for row in tokens.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:end])
    return out


# ----------------------------------------------------------------------------- the reward
def test_reward_is_the_environments_score_for_the_same_tokens(trl, tmp_path):
    from lmgym.integrations.trl import TRLTask

    task = TRLTask("lmgym/TargetToken-v0", tmp_path, num_envs=32, group_size=4, max_new_tokens=6)
    env = task.env
    env.reset(seed=3)
    prompts = [p.text for p in env.core.row_prompts]
    g = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(torch.tensor([0.15, 0.4, 0.25, 0.2]), 32 * 6, replacement=True, generator=g).view(32, 6)
    result = env.score_sequences(tokens)
    ids = trl_completion_ids(tokens, env.stop_token_ids)
    texts = task.tokenizer.batch_decode(ids, skip_special_tokens=True)  # what TRL passes as completions
    got = task.reward(prompts=prompts, completions=texts, completion_ids=ids, trainer_state=None)
    # by hand: the number of `a` (id 1) before the first stop, over the horizon
    by_hand = [(row[:-1] if row[-1] == 0 else row).count(1) / 6 for row in ids]
    assert got == pytest.approx(by_hand, abs=1e-12)
    assert np.array_equal(np.float32(got), result.scores.numpy())
    assert len(set(got)) > 3  # the batch is not trivially scored
    # through the dataset's prompt_index column as well as by prompt text
    index = [task.reward.items.index(p) for p in [env.core.prompts.encode(t) for t in prompts]]
    assert task.reward(prompts=prompts, completions=texts, completion_ids=ids, prompt_index=index) == got


def test_textgen_with_your_own_model_prompts_and_reward(trl, tmp_path, tiny):
    from conftest import PROMPTS, count_good

    from lmgym.integrations.trl import TRLTask

    model, tok = tiny
    task = TRLTask("lmgym/TextGen-v0", tmp_path, num_envs=8, group_size=2, model=model, tokenizer=tok,
                   prompts=PROMPTS, reward_fn=count_good, max_new_tokens=5)
    assert sorted(set(task.dataset()["prompt"])) == sorted(PROMPTS)
    env = task.env
    env.reset(seed=1)
    prompts = [p.text for p in env.core.row_prompts]
    tokens = torch.randint(0, len(tok), (8, 5), generator=torch.Generator().manual_seed(2))
    result = env.score_sequences(tokens)
    ids = trl_completion_ids(tokens, env.stop_token_ids)
    texts = task.tokenizer.batch_decode(ids, skip_special_tokens=True)
    got = task.reward(prompts=prompts, completions=texts, completion_ids=ids)
    assert np.array_equal(np.float32(got), result.scores.numpy())
    words = [" ".join(tok.convert_ids_to_tokens([t for t in row if t != 0])) for row in ids]  # EOS (0) ends a row
    assert got == pytest.approx(count_good(prompts, words))


def test_chat_task_reward_and_prompts_match_the_environment(trl, tmp_path):
    from test_chat_arithmetic import tiny_chat_model

    from lmgym.integrations.trl import TRLTask

    model, tok = tiny_chat_model()
    task = TRLTask("lmgym/ChatArithmetic-v0", tmp_path, num_envs=8, group_size=2, model=model, tokenizer=tok,
                   max_new_tokens=5)
    env = task.env
    data = task.dataset()
    assert data.column_names == ["prompt", "prompt_text", "prompt_index"]
    items = env.core.prompts.items
    first = data[0]
    assert first["prompt"] == items[0].given and first["prompt_text"] == items[0].text
    # TRL's own tokenization of the dataset's prompts gives the episodes' token ids, chat template included
    trainer = trl.GRPOTrainer(args=trl.GRPOConfig(str(tmp_path / "out"), **task.config_kwargs(), max_steps=1,
                                                  report_to="none"), **task.trainer_kwargs())
    rows = data.select(range(len(items)))
    prompt_ids, _, _ = trainer._tokenize_prompts(list(rows["prompt"]))
    assert [list(map(int, ids)) for ids in prompt_ids] == [list(p.ids) for p in items]
    # the scores of the environment for the same tokens; an answer that ends with <|im_end|> scores 1
    env.reset(seed=0)
    rowp = list(env.core.row_prompts)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    answers = [str(eval(p.given[0]["content"].split("What is ")[1].split("?")[0])) for p in rowp]
    tokens = torch.full((8, 5), end_of_turn)
    for r, a in enumerate(answers[:4]):  # four right answers, four empty ones
        tokens[r, :len(a)] = torch.as_tensor(tok.convert_tokens_to_ids(list(a)))
    result = env.score_sequences(tokens)
    ids = trl_completion_ids(tokens, env.stop_token_ids)
    completions = [[{"role": "assistant", "content": c}]
                   for c in task.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    got = task.reward(prompts=[p.given for p in rowp], completions=completions, completion_ids=ids)
    assert np.array_equal(np.float32(got), result.scores.numpy())
    assert got == [1.0] * 4 + [0.0] * 4


# ----------------------------------------------------------------------------- training and lmgym's evaluation
def test_readme_trl_example_raises_the_score_and_lmgym_scores_it_with_the_environments_kl(trl, tmp_path,
                                                                                          monkeypatch):
    """docs/trl.md's TRL block runs as written; what it trained is scored with the environment's reference and KL."""
    page = (Path(__file__).parents[1] / "docs" / "trl.md").read_text()
    block = page.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(block, scope)
    task, trainer, args = scope["task"], scope["trainer"], scope["args"]
    env = task.env
    assert args.beta == env.kl_coef == 0.05
    # TRL's reference is the environment's reference, weight for weight
    ref_state = env.reference_model.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in trainer.ref_model.state_dict().items())
    before, after = task.evaluate(), task.evaluate(trainer.model)
    assert after["score"] > before["score"] + 0.3
    # the exact expected returns (every episode enumerated, float64) agree: TRL's training raised the objective
    start, end = exact_return(env.reference_model, env), exact_return(trainer.model, env)
    assert end > start + 0.2 and end <= env.optimal_return + 1e-9
    assert after["fraction_of_optimum"] == pytest.approx(after["return"] / env.optimal_return)

    # lmgym's evaluation is the mean over its episodes; each episode's return is the environment's: the task
    # score minus kl_coef * sum_t (log pi - log pi_ref), checked here in float64 against a freshly built
    # reference and the trained model, token by token
    ev = task.evaluator(trainer.model, seed=5)
    result = ev.evaluate(num_batches=1, seed=5)
    rollout = ev.collect()  # the same episodes: a fresh evaluator's first batch uses the same seed
    assert result["return"] == pytest.approx(float(rollout.returns.mean()), abs=1e-6)
    assert result["kl"] == pytest.approx(float(rollout.kl.sum(1).mean()), abs=1e-6)
    policy64 = copy.deepcopy(trainer.model).double().eval()
    ref64 = reference_model()[0].double()
    for row in range(len(rollout)):
        prompt = rollout.query_ids[row][rollout.query_mask[row].bool()].tolist()
        n = int(rollout.lengths[row])
        completion = rollout.tokens[row, :n].tolist()
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            lp = torch.log_softmax(policy64(input_ids=ids).logits[0, len(prompt) - 1:-1], -1)
            lr = torch.log_softmax(ref64(input_ids=ids).logits[0, len(prompt) - 1:-1], -1)
        steps = torch.arange(n)
        kl = float((lp[steps, completion] - lr[steps, completion]).sum())
        body = completion[:-1] if completion[-1] == 0 else completion
        score = body.count(1) / 6
        assert float(rollout.rewards[row].sum()) == pytest.approx(score - 0.05 * kl, abs=2e-4)


# ----------------------------------------------------------------------------- clear errors
def test_missing_trl_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    import lmgym.bench.grid as bench
    from lmgym.integrations.trl import MissingTRLError, TRLTask

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now fails as if TRL were not installed
    with pytest.raises(MissingTRLError, match=r"TRL is not installed .*pip install 'lmgym\[trl\]'"):
        TRLTask("lmgym/TargetToken-v0", tmp_path)
    calls = []
    monkeypatch.setattr(bench, "run", lambda *a, **k: calls.append(a))
    code = main(["bench", "--tasks", "lmgym/TargetToken-v0", "--agents", "grpo", "trl-rloo", "--seeds", "0",
                 "--steps", "100", "--out", str(tmp_path / "b"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and calls == []  # refused before any cell ran, the lmgym one included
    assert err.count("\n") == 1 and err.startswith("lmgym: the agent trl-rloo is TRL's trainer: TRL is not installed")
    assert "pip install 'lmgym[trl]'" in err
    assert main(["train", "--task", "lmgym/TargetToken-v0", "--agent", "trl-grpo", "--steps", "10",
                 "--logdir", str(tmp_path / "t")]) == 2
    assert "pip install 'lmgym[trl]'" in capsys.readouterr().err


def test_a_model_trl_cannot_load_is_a_clear_error(trl, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmgym.integrations.trl import TRLModelError, TRLTask
    from lmgym.models import word_tokenizer

    class UnregisteredConfig(LlamaConfig):
        model_type = "lmgym-test-unregistered"

    class UnregisteredLM(LlamaForCausalLM):
        config_class = UnregisteredConfig

    tok = word_tokenizer(["a", "b"])
    config = UnregisteredConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                eos_token_id=0, pad_token_id=0, bos_token_id=None)
    env = gym.make_vec("lmgym/TextGen-v0", num_envs=4, group_size=2, model=UnregisteredLM(config), tokenizer=tok,
                       prompts=["a", "b"], reward_fn=lambda p, c: [len(x) for x in c], max_new_tokens=3,
                       device="cpu")
    env.reset(seed=0)
    env.score_sequences(torch.zeros((4, 1), dtype=torch.long))  # lmgym itself runs the model
    with pytest.raises(TRLModelError, match=r"AutoModelForCausalLM\.from_pretrained, which cannot load the task's "
                                            r"model \(UnregisteredLM\)"):
        TRLTask(env, tmp_path)


# ----------------------------------------------------------------------------- bench cells
def test_trl_cells_in_the_bench_share_lmgyms_evaluation_and_budget(trl, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--tasks", "lmgym/TargetToken-v0", "--agents", "grpo", "trl-grpo", "trl-rloo", "--seeds",
                 "1", "--steps", "400", "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "results.json").read_text())
    runs = {r["agent"]: r for r in report["runs"]}
    # the same evaluation (seed, prompts, samples) of the same starting policy
    assert runs["trl-grpo"]["start"] == runs["grpo"]["start"] == runs["trl-rloo"]["start"]
    for name in ("trl-grpo", "trl-rloo"):
        r = runs[name]
        # the budget in generated tokens: stopped after the batch (64 completions of <= 6 tokens) that reached it
        assert 400 <= r["env_steps"] < 400 + 64 * 6
        assert r["curve"] and all(math.isfinite(c[3]) for c in r["curve"]) and r["curve"][-1][0] == r["env_steps"]
        assert r["hyperparameters"]["beta"] == r["kl_coef"] == 0.05
        assert r["hyperparameters"]["learning_rate"] == 3e-3  # the task's recommended rate, as for lmgym's agents
        assert r["fraction_of_optimum"] == pytest.approx(r["end"]["return"] / r["optimum"])
        assert r["wall_seconds"] > 0 and r["peak_memory_mib"] > 0
        assert r["memory_kind"] == "process peak RSS during the run"
    assert runs["trl-grpo"]["hyperparameters"]["loss_type"] == "grpo"
    assert "| trl-rloo |" in (out / "results.md").read_text()
    assert (out / "tensorboard" / "TargetToken-v0" / "trl-grpo" / "seed1").is_dir()


def test_the_model_folder_is_written_whole_not_over_an_older_one(trl, tmp_path):
    """A folder reused from an earlier task kept that task's other files: here a chat template, which TRL would then
    apply to this task's prompts although the environment does not."""
    from lmgym.integrations.trl import TRLTask

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "chat_template.jinja").write_text("{{ 'system: ' }}{% for m in messages %}{{ m.content }}"
                                                           "{% endfor %}")
    task = TRLTask("lmgym/TargetToken-v0", tmp_path, num_envs=8, group_size=4, max_new_tokens=6)
    assert not (tmp_path / "model" / "chat_template.jinja").exists()
    assert task.tokenizer.chat_template is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
