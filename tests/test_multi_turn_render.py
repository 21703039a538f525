"""Replies are appended as tokens after the history, never re-tokenised (lmgym.envs.reply_tokens).

Each conversation is played through the environment, then rendered afresh from its messages with the chat
template; the test reports where the fresh rendering's tokens differ from the token history the policy
conditioned on (``pytest -s`` prints the report). lmgym always uses the history. Tokenizers: byte-level BPE
tokenizers trained here with the chat templates of GPT-2 (none: a plain "role: content" one), Llama 3 and Qwen2
(ChatML), and SmolLM2-135M-Instruct's own (marked smollm).
"""

import pytest
import torch

from lmgym import TextGenVectorEnv
from lmgym.envs.interaction import Interaction, Reply
from lmgym.models import tiny_model

pytestmark = pytest.mark.compat

CORPUS = ["the cat sat on the mat", "tell me more about the weather today", "ok go on then", "a dog ran far away",
          "what is two plus two", "four is the answer", "hello there how are you"] * 20

TEMPLATES = {
    "gpt2": ("<|endoftext|>", ["<|endoftext|>"],
             "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant:{% endif %}"),
    "llama": ("<|eot_id|>", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
              "{{ '<|begin_of_text|>' }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
              "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "qwen2": ("<|im_end|>", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}


def bpe_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    end, special, template = TEMPLATES[kind]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=end, pad_token=special[0])
    tok.chat_template = template
    return tok


class Talk(Interaction):
    def respond(self, conversation):
        if conversation.turn == 3:
            return Reply(done=True)
        return Reply(["ok go on then", "tell me more about the weather today"][conversation.turn - 1])

    def score(self, conversation):
        return 0.0


def play(tok, turns: list[list[int]]):
    """Play the turns (token ids, each ending with the end-of-turn token) through the environment; returns the
    history ids and the conversation's messages."""
    model, _ = tiny_model(len(tok), hidden_size=16, num_layers=1, num_heads=2, max_positions=512, tokenizer=tok)
    prompt = [{"role": "user", "content": "hello there how are you"}]
    env = TextGenVectorEnv(1, model=model, tokenizer=tok, reward_fn=None, prompts=[prompt], interaction=Talk,
                           max_turns=3, max_turn_tokens=64, max_new_tokens=400, device="cpu",
                           stop_token_ids=[tok.eos_token_id])
    env.reset(seed=0)
    replies = []
    for turn in turns:
        result = env.submit_turns(torch.tensor([turn]))
        replies.append(result.replies[0])
        if result.all_done:
            break
    history = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(history, add_special_tokens=False)
    for turn, reply in zip(turns, replies):
        ids += turn + reply
    messages = prompt + [m for turn, reply in zip(turns, ["ok go on then", "tell me more about the weather today",
                                                          None])
                         for m in ([{"role": "assistant", "content": tok.decode(turn, skip_special_tokens=True)}]
                                   + ([{"role": "user", "content": reply}] if reply else []))]
    return ids, messages, env


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def drift(tok, turns):
    ids, messages, _ = play(tok, turns)
    fresh = tok.encode(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    return ids, fresh, first_difference(ids, fresh)


def canonical_turns(tok):
    end = tok.eos_token_id
    return [tok.encode(t, add_special_tokens=False) + [end] for t in ("the cat sat on the mat", "four is the answer",
                                                                     "a dog ran far away")]


def split_turns(tok):
    """The same texts, each character its own token: the policy may emit those, the tokenizer never would."""
    end = tok.eos_token_id
    return [[tok.convert_tokens_to_ids(c if c != " " else "\u0120") for c in t] + [end]
            for t in ("the cat sat on the mat", "four is the answer", "a dog ran far away")]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_templates_that_close_with_the_stop_token_agree_with_a_fresh_rendering(kind, capsys):
    """Llama 3's and ChatML's turns close with the policy's own end-of-turn token: with turns the tokenizer would
    produce, the history is exactly the fresh rendering (whose trailing closing text the policy never wrote)."""
    tok = bpe_tokenizer(kind)
    ids, fresh, at = drift(tok, canonical_turns(tok))
    assert fresh[:len(ids)] == ids  # identical up to the closing text after the last turn
    tail = tok.decode(fresh[len(ids):], skip_special_tokens=False)
    assert tail in ("", "\n")
    print(f"{kind}: canonical turns: the fresh rendering equals the history ({len(ids)} tokens), plus {tail!r}")


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_turns_the_tokenizer_would_not_produce_drift_and_the_history_is_kept(kind, capsys):
    tok = bpe_tokenizer(kind)
    ids, fresh, at = drift(tok, split_turns(tok))
    prompt_len = len(tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello there how are you"}],
                                                         add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False))
    assert at == prompt_len  # the first policy token: a re-encoding would have changed what the policy saw
    _, _, env = play(tok, split_turns(tok))
    print(f"{kind}: character-split turns: the fresh rendering differs from the history at token {at} (the first "
          f"policy token: {tok.convert_ids_to_tokens(ids[at])!r} in the history, "
          f"{tok.convert_ids_to_tokens(fresh[at])!r} afresh); lmgym keeps the history")


def test_gpt2s_plain_template_drifts_at_the_first_policy_token(capsys):
    """GPT-2 has no chat template; with a plain "role: content" one, a fresh rendering puts a space between the
    generation prompt "assistant:" and the turn's text, which the policy, continuing "assistant:", never wrote
    (and it drops the policy's EOS, a special token): the re-encoded conversation differs from the first policy
    token on."""
    tok = bpe_tokenizer("gpt2")
    turns = canonical_turns(tok)
    ids, fresh, at = drift(tok, turns)
    prompt_len = len(tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello there how are you"}],
                                                         add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False))
    assert at == prompt_len
    assert tok.eos_token_id in ids and tok.eos_token_id not in fresh
    print(f"gpt2: canonical turns: the fresh rendering differs at token {at} ({tok.convert_ids_to_tokens(ids[at])!r} "
          f"in the history, {tok.convert_ids_to_tokens(fresh[at])!r} afresh) and lacks the policy's EOS")


@pytest.mark.smollm
def test_smollm2_template_agrees_with_a_fresh_rendering_and_drifts_on_split_turns(capsys):
    from transformers import AutoTokenizer

    from lmgym.zoo import entries as zoo

    tok = AutoTokenizer.from_pretrained(zoo.load_path("smollm2-135m-instruct", progress=False))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    tok.eos_token = "<|im_end|>"
    turns = [tok.encode(t, add_special_tokens=False) + [end] for t in ("The cat sat.", "Four.", "A dog ran.")]
    ids, fresh, at = drift(tok, turns)
    assert fresh[:len(ids)] == ids
    split = [[tok.convert_tokens_to_ids(c) for c in "Four."] + [end]] * 3
    ids, fresh, at = drift(tok, split)
    assert at is not None
    print(f"smollm2: canonical turns agree; split turns differ at token {at}")
