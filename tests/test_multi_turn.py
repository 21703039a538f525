"""The multi-turn MDP (DESIGN.md, "Conversations"; lmgym.envs.multi_turn) against an independent float64 reference.

Rows play conversations of 3 or more turns that end in different turns; the reference rebuilds each episode's
token history from the interaction's rules alone, scores it with the reference model in float64 by one plain
forward over the whole history (no cache), and recomputes every reward. Per-token stepping and the submission
path must agree token for token.
"""

import numpy as np
import pytest
import torch

from lmgym import TextGenVectorEnv
from lmgym.envs.interaction import Interaction, InteractionError, Reply
from lmgym.models import word_tokenizer
from tests.test_shared_prompts import model_of

pytestmark = pytest.mark.compat

VOCAB = 23
WORDS = [f"w{i}" for i in range(1, VOCAB)]
MAX_TURN_TOKENS, MAX_TURNS, BETA = 3, 5, 0.3


def plan(prompt_ids):
    """The scripted environment's rules, a function of the prompt alone: when the episode ends, each reply."""
    key = sum(prompt_ids)
    end_turn = 1 + key % 4  # 1..4: rows with different prompts end in different turns (5 = max_turns truncates)
    replies = [[1 + (key + 5 * k + j) % (VOCAB - 1) for j in range(1 + (key + k) % 3)] for k in range(MAX_TURNS)]
    return end_turn, replies


class Scripted(Interaction):
    """Replies ``plan(prompt)``; ends the episode after turn ``end_turn`` (turn rewards 0.1 * k, score 0.5 +
    policy tokens / 100), except rows whose ``end_turn`` is 4 run on to the max_turns limit."""

    def start(self, prompt, rng):
        self.prompt_ids = None

    def respond(self, conversation):
        ids = conversation.ids
        first_policy = conversation.policy_mask.index(1)
        end_turn, replies = plan(ids[:first_policy])
        k = conversation.turn
        if k == end_turn and end_turn < 4:
            return Reply(done=True, reward=0.1 * k)
        return Reply(replies[k - 1], reward=0.1 * k)

    def score(self, conversation):
        return 0.5 + sum(conversation.policy_mask) / 100


PROMPTS = [[3, 4], [5], [6, 7, 8], [9, 2], [11, 12, 13, 14], [15]]


def sliding_model():
    """A Mistral whose layers attend to the last 4 positions only: its KV cache counts columns, so the environment
    must keep each row's cache contiguous (a turn or reply is then fed by a re-prefill)."""
    import transformers as tf

    torch.manual_seed(0)
    return tf.MistralForCausalLM(tf.MistralConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                                                  num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                                                  max_position_embeddings=64, sliding_window=4))


def make_env(kind: str, n: int = 4, **kw):
    model = sliding_model() if kind == "mistral-sliding" else model_of(kind)
    return TextGenVectorEnv(n, model=model, tokenizer=word_tokenizer(WORDS), reward_fn=None, prompts=PROMPTS,
                            interaction=Scripted, max_turns=MAX_TURNS, max_turn_tokens=MAX_TURN_TOKENS,
                            max_new_tokens=40, kl_coef=BETA, device="cpu", stop_token_ids=[0], **kw)


def actions_for(row: int, turn: int):
    """A fixed policy: turn k of row r says (r + k) % 3 + 1 tokens, the last one the stop token 0 except every
    third turn, which runs to max_turn_tokens without one."""
    g = np.random.default_rng(100 * row + turn)
    if (row + turn) % 3 == 2:
        return [int(x) for x in g.integers(1, VOCAB, MAX_TURN_TOKENS)]
    length = (row + turn) % 3 + 1
    return [int(x) for x in g.integers(1, VOCAB, length - 1)] + [0]


def logprob_for(token: int, position: int) -> float:
    return -0.5 - 0.1 * ((token + position) % 7)


@torch.no_grad()
def reference_episode(model, prompt: list[int], row: int):
    """The episode of row ``row`` from the rules alone, in float64: (ids, policy_mask, per-policy-token rewards,
    ref log-probs, terminated, truncated, turns)."""
    end_turn, replies = plan(prompt)
    ids, mask, turns_of = list(prompt), [0] * len(prompt), []
    turn_rewards_at = {}
    k = 0
    terminated = truncated = False
    while True:
        k += 1
        for j, tok in enumerate(actions_for(row, k - 1)):
            ids.append(tok)
            mask.append(1)
            turns_of.append(k)
            if tok == 0:
                break
        turn_rewards_at[len(ids) - 1] = 0.1 * k
        if k == end_turn and end_turn < 4:
            terminated = True
            break
        if k == MAX_TURNS:
            truncated = True
            break
        ids.extend(replies[k - 1])
        mask.extend([0] * len(replies[k - 1]))
    model64 = model.double()
    logits = model64(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits, dim=-1).numpy()
    model.float()
    score = 0.5 + sum(mask) / 100
    rewards, refs = [], []
    positions = [t for t, m in enumerate(mask) if m]
    for i, t in enumerate(positions):
        ref = float(logp[t - 1, ids[t]])
        pol = logprob_for(ids[t], i)
        r = -BETA * (pol - ref) + turn_rewards_at.get(t, 0.0) + (score if t == positions[-1] else 0.0)
        rewards.append(r)
        refs.append(ref)
    return dict(ids=ids, mask=mask, rewards=rewards, refs=refs, terminated=terminated, truncated=truncated,
                turns=k, score=score, turn_rewards=sum(turn_rewards_at.values()))


def step_first_episodes(env, prompts):
    """Step every row token by token with the fixed policy until each row's first episode ended; returns each
    row's per-step record and its final observation."""
    n = env.num_envs
    obs, _ = env.reset(seed=0, options={"prompts": prompts})
    turn = [0] * n
    pos_in_turn = [0] * n
    taken = [0] * n
    record = [dict(rewards=[], refs=[], terminated=None, truncated=None, info=None) for _ in range(n)]
    done = [False] * n
    for _ in range(200):
        acts, lps = [], []
        for r in range(n):
            plan_r = actions_for(r, turn[r])
            tok = plan_r[min(pos_in_turn[r], len(plan_r) - 1)]
            acts.append(tok)
            lps.append(logprob_for(tok, taken[r]))
        obs, rewards, term, trunc, info = env.step(torch.tensor(acts), torch.tensor(lps))
        for r in range(n):
            if done[r]:
                continue
            record[r]["rewards"].append(float(rewards[r]))
            record[r]["refs"].append(float(info["ref_logprob"][r]))
            taken[r] += 1
            pos_in_turn[r] += 1
            if "_turn_reward" in info and info["_turn_reward"][r]:
                turn[r] += 1
                pos_in_turn[r] = 0
            if bool(term[r]) or bool(trunc[r]):
                done[r] = True
                record[r].update(terminated=bool(term[r]), truncated=bool(trunc[r]),
                                 info={k: v[r] for k, v in info.items() if not k.startswith("_")},
                                 ids=obs["input_ids"][r].tolist(), policy_mask=obs["policy_mask"][r].tolist(),
                                 attention=obs["attention_mask"][r].tolist())
        if all(done):
            return record
    raise AssertionError("episodes did not end")


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "mistral-sliding"])
def test_per_token_stepping_matches_a_float64_reference(kind):
    env = make_env(kind)
    prompts = [PROMPTS[i] for i in (0, 2, 3, 4)]
    records = step_first_episodes(env, prompts)
    ends = set()
    for r, (prompt, rec) in enumerate(zip(prompts, records)):
        ref = reference_episode(env.core.model, prompt, r)
        length = len(ref["ids"])
        assert rec["ids"][:length] == ref["ids"]  # prompt + turns + replies, never re-tokenised
        assert rec["policy_mask"][:length] == ref["mask"] and sum(rec["policy_mask"]) == sum(ref["mask"])
        assert sum(rec["attention"]) == length
        np.testing.assert_allclose(rec["refs"], ref["refs"], atol=2e-5)
        np.testing.assert_allclose(rec["rewards"], ref["rewards"], atol=2e-5)
        assert (rec["terminated"], rec["truncated"]) == (ref["terminated"], ref["truncated"])
        info = rec["info"]
        assert info["turns"] == ref["turns"] and info["score"] == pytest.approx(ref["score"])
        assert info["truncation"] == ("max_turns" if ref["truncated"] else "")
        # the episode's rewards sum to the turn rewards + the score - beta * the KL over policy tokens
        assert sum(rec["rewards"]) == pytest.approx(info["turn_rewards"] + info["score"] - BETA * info["episode_kl"],
                                                    abs=1e-5)
        assert info["turn_rewards"] == pytest.approx(ref["turn_rewards"])
        ends.add(ref["turns"])
    assert len(ends) >= 3 and max(ends) >= 3  # rows ended in different turns, some after 3 or more


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "mistral-sliding"])
def test_submitting_whole_turns_gives_what_stepping_gives(kind):
    prompts = [PROMPTS[i] for i in (0, 2, 3, 4)]
    records = step_first_episodes(make_env(kind), prompts)
    env = make_env(kind)
    env.reset(seed=0, options={"prompts": prompts})
    n = env.num_envs
    got = [dict(rewards=[], refs=[], mask=[]) for _ in range(n)]
    taken = [0] * n
    for turn in range(MAX_TURNS):
        toks = torch.zeros((n, MAX_TURN_TOKENS), dtype=torch.long)
        lps = torch.zeros((n, MAX_TURN_TOKENS))
        for r in range(n):
            a = actions_for(r, turn)
            toks[r, :len(a)] = torch.tensor(a)
            lps[r, :len(a)] = torch.tensor([logprob_for(t, taken[r] + j) for j, t in enumerate(a)])
        result = env.submit_turns(toks, lps)
        for r in range(n):
            k = int(result.lengths[r])
            taken[r] += k
            got[r]["rewards"] += result.rewards[r, :k].tolist()
            got[r]["refs"] += result.ref_logprobs[r, :k].tolist()
            assert result.mask[r].tolist() == [1.0] * k + [0.0] * (MAX_TURN_TOKENS - k)
            # a done only at the turn's last token, and only where the episode ended
            assert not (result.terminated[r, :max(k - 1, 0)].any() or result.truncated[r, :max(k - 1, 0)].any())
            if result.done[r]:
                got[r].update(terminated=bool(result.terminated[r, k - 1]), truncated=bool(result.truncated[r, k - 1]),
                              score=result.scores[r])
        if result.all_done:
            break
    assert result.all_done
    for r in range(n):
        assert len(got[r]["rewards"]) == len(records[r]["rewards"])  # the same policy tokens, the same turn ends
        np.testing.assert_allclose(got[r]["rewards"], records[r]["rewards"], atol=2e-5)
        np.testing.assert_allclose(got[r]["refs"], records[r]["refs"], atol=2e-5)
        assert (got[r]["terminated"], got[r]["truncated"]) == (records[r]["terminated"], records[r]["truncated"])
        assert got[r]["score"] == pytest.approx(records[r]["info"]["score"])


def test_the_reference_encodes_each_token_once_across_turns():
    """KV reuse: over a whole multi-turn batch the reference model is fed each token of the history once (plus
    the masked placeholder columns of rows that wait), never the history again."""
    env = make_env("llama")
    fed = []
    model = env.core.model
    original = model.forward

    def counting(*args, **kwargs):
        ids = kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        fed.append(int(mask[:, -ids.shape[1]:].sum()))
        return original(*args, **kwargs)

    model.forward = counting
    prompts = [PROMPTS[i] for i in (0, 2, 3, 4)]
    env.reset(seed=0, options={"prompts": prompts})
    fed.clear()
    n, lengths = env.num_envs, [0] * env.num_envs
    for turn in range(MAX_TURNS):
        toks = torch.zeros((n, MAX_TURN_TOKENS), dtype=torch.long)
        for r in range(n):
            a = actions_for(r, turn)
            toks[r, :len(a)] = torch.tensor(a)
        result = env.submit_turns(toks)
        for r in range(n):
            lengths[r] += int(result.lengths[r]) + len(result.replies[r])
        if result.all_done:
            break
    after_prompts = sum(lengths)
    restart = sum(fed[-1:])  # the last forward prefilled the next batch's prompts
    assert sum(fed) - restart == after_prompts


class Raising(Interaction):
    def respond(self, conversation):
        if conversation.row == 2:
            raise KeyError("no such word")
        return Reply([5])

    def score(self, conversation):
        return 0.0


class NotAReply(Interaction):
    def __init__(self, value):
        self.value = value

    def respond(self, conversation):
        return self.value

    def score(self, conversation):
        return 0.0


class Hanging(Interaction):
    def respond(self, conversation):
        import time

        time.sleep(5)
        return Reply([5])

    def score(self, conversation):
        return 0.0


def small_env(interaction, **kw):
    return TextGenVectorEnv(3, model=model_of("llama"), tokenizer=word_tokenizer(WORDS), reward_fn=None,
                            prompts=PROMPTS, interaction=interaction, max_turns=3, max_turn_tokens=1,
                            max_new_tokens=kw.pop("max_new_tokens", 12), device="cpu", stop_token_ids=[0], **kw)


def test_an_interaction_that_raises_names_itself_and_the_row_and_changes_nothing():
    env = small_env(Raising)
    env.reset(seed=0)
    before = {k: v.clone() for k, v in env.observation().items()}
    ref_before, next_before = env.core.ref.lengths.clone(), env.core.ref.next_logprobs.clone()
    with pytest.raises(InteractionError, match=r"Raising\.respond raised on row 2: KeyError"):
        env.step(torch.tensor([4, 4, 4]), torch.full((3,), -1.0))
    for k, v in env.observation().items():
        assert torch.equal(v, before[k])
    assert torch.equal(env.core.ref.lengths, ref_before)
    with pytest.raises(InteractionError, match="Raising"):
        env.submit_turns(torch.tensor([[4], [4], [4]]))
    for k, v in env.observation().items():
        assert torch.equal(v, before[k])
    assert torch.equal(env.core.ref.lengths, ref_before)  # the reference's cache was put back too
    assert torch.equal(env.core.ref.next_logprobs, next_before)


@pytest.mark.parametrize("value, message", [
    (None, "returned None"),
    ("just text", "not a Reply"),
    (Reply(3.5), "replied with float"),
    (Reply([]), "non-empty list of token ids"),
    (Reply([VOCAB + 4]), "outside the vocabulary"),
    (Reply([5], reward=float("nan")), "turn reward nan must be a finite number"),
])
def test_a_reply_that_is_not_text_or_ids_is_one_clear_error(value, message):
    env = small_env(lambda: NotAReply(value))
    env.reset(seed=0)
    with pytest.raises(InteractionError, match=message) as err:
        env.submit_turns(torch.tensor([[4], [4], [4]]))
    assert "NotAReply.respond" in str(err.value) and "row 0" in str(err.value)


def test_a_hanging_interaction_times_out_with_its_name():
    env = small_env(Hanging, interaction_timeout=0.2)
    env.reset(seed=0)
    with pytest.raises(InteractionError, match=r"Hanging\.respond did not return within interaction_timeout=0.2 s"):
        env.submit_turns(torch.tensor([[4], [4], [4]]))


def test_a_reply_that_would_overflow_truncates_the_episode_with_the_reason():
    class Long(Interaction):
        def respond(self, conversation):
            return Reply([5] * 6)

        def score(self, conversation):
            return 1.0

    env = small_env(Long, max_new_tokens=8)
    env.reset(seed=0)
    first = env.submit_turns(torch.tensor([[4], [4], [4]]))  # 1 + 6 tokens: room for one more
    assert not first.done.any() and [len(r) for r in first.replies] == [6, 6, 6]
    second = env.submit_turns(torch.tensor([[4], [4], [4]]))
    assert second.done.all() and list(second.truncation) == ["context"] * 3
    assert second.replies == [[], [], []] and second.all_done


def test_the_interaction_must_be_a_factory_and_scoring_must_be_said_once():
    with pytest.raises(TypeError, match="factory"):
        small_env(Raising())
    with pytest.raises(ValueError, match="pass reward_fn=None"):
        TextGenVectorEnv(3, model=model_of("llama"), tokenizer=word_tokenizer(WORDS),
                         reward_fn=lambda p, c: [0] * len(c), prompts=PROMPTS, interaction=Raising, device="cpu")
    with pytest.raises(TypeError, match=r"factory called with no arguments.*raised TypeError"):
        small_env(lambda conversation: Reply([5]))  # a respond function instead of a factory


def test_per_row_state_is_replayed_from_the_episode_seeds():
    import gymnasium as gym

    env = gym.make_vec("lmgym/Guess-v0", num_envs=16)
    env.reset(seed=3)
    targets = [i.target for i in env.core.interaction.rows]
    assert len(set(targets)) > 1  # rows draw their own targets
    seeds = env.core.episode_seeds.copy()
    env.reset(seed=99)
    env.core.replay_starts(seeds)
    assert [i.target for i in env.core.interaction.rows] == targets


def test_a_batched_interaction_is_called_once_per_step_for_every_row_whose_turn_ended():
    from lmgym.envs.interaction import BatchInteraction

    calls = []

    class Batched(BatchInteraction):
        def start(self, rows, prompts, rngs):
            self.ends = {r: 2 + r % 2 for r in rows}

        def respond(self, conversations):
            calls.append([c.row for c in conversations])
            return [Reply(done=True) if c.turn >= self.ends[c.row] else Reply([5, 6]) for c in conversations]

        def score(self, conversations):
            return [float(c.turn) for c in conversations]

    env = TextGenVectorEnv(4, model=model_of("llama"), tokenizer=word_tokenizer(WORDS), reward_fn=None,
                           prompts=PROMPTS, interaction=Batched(), max_turns=4, max_turn_tokens=2,
                           max_new_tokens=20, device="cpu", stop_token_ids=[0])
    env.reset(seed=0)
    # rows 0 and 2 stop after one token, rows 1 and 3 run to max_turn_tokens: their turns end a step apart
    _, _, _, _, info = env.step(torch.tensor([0, 4, 0, 4]))
    assert calls == [[0, 2]] and list(info["_turn_reward"]) == [True, False, True, False]
    env.step(torch.tensor([4, 4, 4, 4]))
    assert calls == [[0, 2], [1, 3]]  # one call per step, with every row whose turn just ended


@pytest.mark.parametrize("kind", ["llama", "mistral-sliding"])
def test_the_turn_sampler_keeps_waiting_rows_exact(kind):
    """Rows whose turn ended wait while the others go on; their next turn's log-probs are those of a plain forward
    over their whole history (with a sliding window too, whose rows must stay contiguous)."""
    from lmgym.models.sampling import Sampling
    from lmgym.models.turn_sampler import TurnSampler

    model = sliding_model() if kind == "mistral-sliding" else model_of(kind)
    prompts = [[3, 4], [5], [6, 7, 8]]
    sampler = TurnSampler(model, prompts, max_sequence_length=64, sampling=Sampling(), stop_token_ids=[0],
                          pad_token_id=0, generator=torch.Generator().manual_seed(0))
    histories = [list(p) for p in prompts]
    running = torch.ones(3, dtype=torch.bool)
    for turn in range(3):
        room = torch.tensor([1 + (turn + r) % 3 for r in range(3)])  # rows end their turns at different tokens
        tokens, logprobs, lengths = sampler.sample_turn(running, 4, room)
        with torch.no_grad():
            for r in range(3):
                k = int(lengths[r])
                seq = histories[r] + tokens[r, :k].tolist()
                logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), dim=-1)
                want = [float(logp[len(histories[r]) - 1 + j, seq[len(histories[r]) + j]]) for j in range(k)]
                np.testing.assert_allclose(logprobs[r, :k].tolist(), want, atol=2e-5)
                histories[r] = seq
        reply = torch.tensor([[9, 10], [11, 0], [12, 13]])
        counts = torch.tensor([2, 1, 0])
        sampler.feed(reply, counts)
        for r in range(3):
            histories[r] += reply[r, :int(counts[r])].tolist()


class FailingStart(Interaction):
    """Its second episode on row 1 cannot start (a broken data set row, say)."""

    starts = {}

    def start(self, prompt, rng):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2 and FailingStart.fail:
            raise RuntimeError("no such puzzle")

    def respond(self, conversation):
        return Reply(done=True) if conversation.row == 1 else Reply([5])

    def score(self, conversation):
        return 0.0


def test_an_interaction_whose_start_raises_on_a_restart_changes_nothing():
    FailingStart.fail = True
    env = small_env(FailingStart)
    env.reset(seed=0)
    env.step(torch.tensor([4, 4, 4]))  # row 1's episode ends; it restarts at the next step
    before = {k: v.clone() for k, v in env.observation().items()}
    lengths, rng = env.core.ref.lengths.clone(), env.core.rng.bit_generator.state
    with pytest.raises(InteractionError, match=r"FailingStart\.start raised on row 1: RuntimeError: no such puzzle"):
        env.step(torch.tensor([4, 4, 4]))
    for k, v in env.observation().items():
        assert torch.equal(v, before[k])
    assert torch.equal(env.core.ref.lengths, lengths) and env.core.rng.bit_generator.state == rng
    FailingStart.fail = False  # fixed: the same step now runs
    _, _, term, trunc, _ = env.step(torch.tensor([4, 4, 4]))
    assert env.observation()["attention_mask"][0].sum() == before["attention_mask"][0].sum() + 2


def test_a_reply_the_chat_template_refuses_is_one_clear_error():
    from tests.test_multi_turn_render import bpe_tokenizer

    class ToolReply(Interaction):
        def respond(self, conversation):
            return Reply("42", role="tool")

        def score(self, conversation):
            return 0.0

    tok = bpe_tokenizer("qwen2")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}"
                         "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    from lmgym.models import tiny_model

    model, _ = tiny_model(len(tok), hidden_size=16, num_layers=1, num_heads=2, max_positions=256, tokenizer=tok)
    env = TextGenVectorEnv(1, model=model, tokenizer=tok, reward_fn=None, prompts=[[{"role": "user", "content": "hi"}]],
                           interaction=ToolReply, max_turns=3, max_turn_tokens=4, max_new_tokens=64, device="cpu",
                           stop_token_ids=[tok.eos_token_id])
    env.reset(seed=0)
    with pytest.raises(InteractionError, match=r"ToolReply\.respond, row 0 \(turn 1\): its reply cannot be appended: "
                                               r"TemplateError: no tool role"):
        env.submit_turns(torch.tensor([[tok.eos_token_id]]))
