"""Chat models: chat-message prompts through the tokenizer's template, and end-of-turn stop tokens."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from lmgym.envs.chat import default_stop_token_ids
from lmgym.models import tiny_model

WORDS = ["<eos>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "hi", "there", "two", "plus",
         "three", "is", "five"]
IM_START, IM_END = 1, 2
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def chat_tokenizer(template: str | None = TEMPLATE):
    """A word-level tokenizer whose <|im_start|> / <|im_end|> are special tokens, with a ChatML-like template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>", unk_token="<eos>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = template
    return tok


def chat_model(eos_token_id=(0, IM_END), template: str | None = TEMPLATE):
    model, tok = tiny_model(tokenizer=chat_tokenizer(template), hidden_size=32, num_layers=1, num_heads=4,
                            max_positions=64, seed=3, init_std=0.3)
    model.generation_config.eos_token_id = list(eos_token_id) if isinstance(eos_token_id, tuple) else eos_token_id
    return model, tok


CONVERSATIONS = [[{"role": "user", "content": "two plus three"}],
                 [{"role": "system", "content": "hi"}, {"role": "user", "content": "hi there"}]]
# The same conversations rendered by hand: <|im_start|> role words <|im_end|> ... <|im_start|> assistant
RENDERED = [[1, 3, 8, 9, 10, 2, 1, 4], [1, 5, 6, 2, 1, 3, 6, 7, 2, 1, 4]]


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions):
        self.calls.append((prompts, completions))
        return [float(len(c.split())) for c in completions]


def test_chat_prompts_render_through_the_template():
    model, tok = chat_model()
    env = gym.make("lmgym/TextGen-v0", model=model, tokenizer=tok, reward_fn=Recorder(), prompts=CONVERSATIONS,
                   max_new_tokens=4)
    for k, conversation in enumerate(CONVERSATIONS):
        obs, info = env.reset(options={"prompt": conversation})
        n = int(obs["attention_mask"].sum())
        assert obs["input_ids"][:n].tolist() == RENDERED[k]


def test_default_stop_tokens_are_eos_and_generation_config_eos():
    model, tok = chat_model(eos_token_id=IM_END)  # an int in the generation config
    assert default_stop_token_ids(model, tok) == [0, IM_END]
    model, tok = chat_model(eos_token_id=(IM_END, 0))  # a list
    assert default_stop_token_ids(model, tok) == [0, IM_END]
    model, tok = chat_model(eos_token_id=None)
    assert default_stop_token_ids(model, tok) == [0]


def test_episode_ends_at_the_end_of_turn_token_and_reward_sees_the_messages(tmp_path):
    model, tok = chat_model(eos_token_id=IM_END)
    model.save_pretrained(tmp_path / "m")  # by path: the generation config comes from the folder
    tok.save_pretrained(tmp_path / "m")
    reward = Recorder()
    venv = gym.make_vec("lmgym/TextGen-v0", num_envs=2, model=str(tmp_path / "m"), reward_fn=reward,
                        prompts=CONVERSATIONS, max_new_tokens=6)
    assert venv.stop_token_ids == [0, IM_END]
    venv.reset(seed=0, options={"prompts": CONVERSATIONS})
    words = {w: i for i, w in enumerate(WORDS)}
    plan = [[words["five"], words["is"], IM_END], [words["hi"], words["there"], words["is"]]]
    for t in range(3):
        _, _, terminated, truncated, info = venv.step(torch.tensor([plan[0][t], plan[1][t]]))
    assert terminated.tolist() == [True, False] and not truncated.any()
    prompts, completions = reward.calls[-1]
    assert prompts == [CONVERSATIONS[0]]  # as given: the messages, not the rendered text
    assert completions == ["five is"]  # without the end-of-turn token
    assert info["completion"][0] == "five is"


def test_submitted_continuations_stop_at_end_of_turn():
    model, tok = chat_model(eos_token_id=IM_END)
    reward = Recorder()
    venv = gym.make_vec("lmgym/TextGen-v0", num_envs=2, model=model, tokenizer=tok, reward_fn=reward,
                        prompts=CONVERSATIONS, max_new_tokens=5)
    venv.reset(seed=0, options={"prompts": CONVERSATIONS})
    tokens = torch.tensor([[8, IM_END, 8, 8, 8], [6, 7, 6, 7, 6]])
    result = venv.score_sequences(tokens)
    assert result.lengths.tolist() == [2, 5]
    assert result.terminated[0, 1] and result.truncated[1, 4]
    assert reward.calls[-1] == (CONVERSATIONS, ["two", "hi there hi there hi"])


def test_chat_prompt_without_a_chat_template_is_a_clear_error():
    model, tok = chat_model(template=None)
    with pytest.raises(ValueError, match="no chat template"):
        gym.make("lmgym/TextGen-v0", model=model, tokenizer=tok, reward_fn=Recorder(), prompts=CONVERSATIONS)


def test_a_bare_message_is_a_clear_error():
    model, tok = chat_model()
    with pytest.raises(TypeError, match="list of messages"):
        gym.make("lmgym/TextGen-v0", model=model, tokenizer=tok, reward_fn=Recorder(), prompts=CONVERSATIONS[0])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        gym.make("lmgym/TextGen-v0", model=model, tokenizer=tok, reward_fn=Recorder(),
                 prompts=[[{"role": "user", "text": "hi"}]])


@pytest.mark.parametrize("message,match", [
    ({"role": "wizard", "content": "hi"}, "message #0 has role 'wizard'; a chat role is one of system, user"),
    ({"role": None, "content": "hi"}, "message #0 has role None"),
    ({"role": "user", "content": None}, r"message #0 \(user\) has content None"),
    ({"role": "user", "content": 5}, r"message #0 \(user\) has content 5"),
], ids=["unknown-role", "no-role", "no-content", "number-content"])
def test_a_chat_message_of_an_unknown_role_or_without_text_is_refused(message, match):
    """Issue 23 item 10: these rendered silently (as '<user> <assistant>', say) and trained."""
    model, tok = chat_model()
    with pytest.raises(ValueError, match=f"prompt #1: {match}"):
        gym.make("lmgym/TextGen-v0", model=model, tokenizer=tok, reward_fn=Recorder(),
                 prompts=[CONVERSATIONS[0], [message]])


def test_a_chat_template_that_refuses_the_messages_names_the_prompt():
    """Issue 23 item 10: Llama's and Mistral's templates raise on roles that do not alternate: a raw jinja2
    TemplateError with no prompt index."""
    strict = ("{% for m in messages %}{% if m['role'] == 'assistant' and loop.first %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
              "{% endif %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    model, tok = chat_model(template=strict)
    with pytest.raises(ValueError, match="prompt #1: the tokenizer's chat template refused these messages: "
                                         "Conversation roles must alternate"):
        gym.make("lmgym/TextGen-v0", model=model, tokenizer=tok, reward_fn=Recorder(),
                 prompts=[CONVERSATIONS[0], [{"role": "assistant", "content": "hi"}]])


def test_agent_trains_on_chat_prompts_and_evaluation_keeps_the_messages():
    from lmgym.agents import GRPO

    model, tok = chat_model(eos_token_id=IM_END)
    reward = Recorder()
    venv = gym.make_vec("lmgym/TextGen-v0", num_envs=4, group_size=2, model=model, tokenizer=tok, reward_fn=reward,
                        prompts=CONVERSATIONS, max_new_tokens=5)
    agent = GRPO(venv, learning_rate=1e-3)
    agent.learn(20, progress=False)
    agent.evaluate(num_batches=1)
    reward.calls.clear()
    agent.collect()  # the first batch after the evaluation restored the training prompts by their ids
    for prompts, _ in reward.calls:
        assert all(p in CONVERSATIONS for p in prompts)
    assert np.isfinite(agent.evaluate(num_batches=1)["score"])
