"""Multi-turn episodes with the KV caches kept across turns, against a loop that re-encodes the history each turn.

`OMP_NUM_THREADS=2 python benchmarks/multi_turn_kv.py [--device cuda] [--json out.json] [--readme docs/multi_turn.md]`

Writes ``docs/bench/multi_turn_kv.json`` (or ``--json``); ``--readme docs/multi_turn.md`` renders the table
between its markers there from that file (``tests/test_bench_state.py`` keeps the two equal).

The same batch of episodes, about the same length after the prompt (384 tokens), split into 1, 2, 4 and 8 policy
turns with an environment reply between each two (every segment, turn or reply, ``384 // (2 * turns - 1)``
tokens). Both paths feed the same forced policy tokens (sampling
costs both the same and is left out) and compute the same numbers: the policy's log-probs of its tokens and
the environment's reference log-probs and rewards.

- lmgym: the policy's :class:`~lmgym.models.CachedLM` decodes its turn token by token and takes the reply in
  one forward over its cache; the environment (``submit_turns``) scores the turn and feeds the reply through the
  reference's cache. Nothing is encoded twice.
- re-encoding loop (what a turn-by-turn ``generate`` does): at every turn the policy prefills the whole
  history afresh, then decodes the turn with a cache that lives for that turn only; the reference scores the
  turn with a forward over the whole history.

Printed: seconds per batch of episodes for each path and ``lmgym / re-encoding``, which falls as the turns grow.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lmgym import TextGenVectorEnv
from lmgym.envs.interaction import Interaction, Reply
from lmgym.models import CachedLM, left_pad, tiny_model, token_logprobs

VOCAB, PROMPT, TOTAL, ROWS = 512, 32, 384, 8
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "bench" / "multi_turn_kv.json"
README_BEGIN = ("<!-- multi_turn_kv: generated from docs/bench/multi_turn_kv.json by `python "
                "benchmarks/multi_turn_kv.py --readme docs/multi_turn.md`; do not edit by hand -->")
README_END = "<!-- end of multi_turn_kv -->"


class FixedReply(Interaction):
    """Replies ``reply_len`` fixed tokens after every turn; the episode ends after ``turns`` turns."""

    def __init__(self, turns: int, reply_len: int):
        self.turns, self.reply_len = turns, reply_len

    def respond(self, conversation):
        if conversation.turn == self.turns:
            return Reply(done=True)
        return Reply([7 + (conversation.turn + j) % 50 for j in range(self.reply_len)])

    def score(self, conversation):
        return 1.0


def build(turns: int, device):
    model, tok = tiny_model(VOCAB, hidden_size=256, num_layers=4, num_heads=4, max_positions=PROMPT + TOTAL + 8)
    half = TOTAL // (2 * turns - 1)  # one segment: a policy turn, or a reply
    prompts = [[1 + (r * 7 + i) % (VOCAB - 2) for i in range(PROMPT)] for r in range(ROWS)]
    env = TextGenVectorEnv(ROWS, model=model, tokenizer=tok, reward_fn=None, prompts=prompts, device=device,
                           interaction=lambda: FixedReply(turns, half), max_turns=turns, max_turn_tokens=half,
                           max_new_tokens=TOTAL, stop_token_ids=[VOCAB - 1], kl_coef=0.05)
    policy = tiny_model(VOCAB, hidden_size=256, num_layers=4, num_heads=4, max_positions=PROMPT + TOTAL + 8,
                        seed=1)[0].to(device)
    g = torch.Generator().manual_seed(0)
    actions = torch.randint(1, VOCAB - 2, (turns, ROWS, half), generator=g).to(device)
    return env, policy, prompts, actions, half


@torch.no_grad()
def lmgym_episodes(env, policy, prompts, actions, half):
    env.reset(seed=0, options={"prompts": prompts})
    lm = CachedLM(policy, max_sequence_length=PROMPT + TOTAL)
    lm.start(prompts)
    total = torch.zeros((), device=actions.device)
    for turn in range(actions.shape[0]):
        lps = []
        for t in range(half):
            tok = actions[turn, :, t]
            lps.append(lm.next_logprobs.gather(1, tok[:, None])[:, 0])
            lm.append(tok)
        result = env.submit_turns(actions[turn], torch.stack(lps, dim=1))
        total = total + result.rewards.sum()
        if not result.all_done:
            replies = torch.tensor(result.replies, device=actions.device)
            lm.extend(replies, torch.full((ROWS,), replies.shape[1], device=actions.device))
    return float(total)


@torch.no_grad()
def reencoding_episodes(env, policy, prompts, actions, half):
    """The same numbers, the history encoded again at every turn by the policy and by the reference."""
    ref = env.core.model
    beta = env.kl_coef
    histories = [list(p) for p in prompts]
    total = 0.0
    for turn in range(actions.shape[0]):
        ids, mask = left_pad(histories, 0, actions.device)
        lm = CachedLM(policy, max_sequence_length=PROMPT + TOTAL)  # a cache for this turn only
        lm.start(histories)
        lps = []
        for t in range(half):
            tok = actions[turn, :, t]
            lps.append(lm.next_logprobs.gather(1, tok[:, None])[:, 0])
            lm.append(tok)
        pol = torch.stack(lps, dim=1)
        full = torch.cat([ids, actions[turn]], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(actions[turn])], dim=1)
        positions = (full_mask.cumsum(1) - 1).clamp(min=0)
        logits = ref(input_ids=full, attention_mask=full_mask, position_ids=positions).logits
        ref_lp = token_logprobs(logits[:, ids.shape[1] - 1:-1], actions[turn])
        total += float((-beta * (pol - ref_lp)).sum()) + (ROWS if turn == actions.shape[0] - 1 else 0.0)
        reply = [7 + (turn + 1 + j) % 50 for j in range(half)]
        for r in range(ROWS):
            histories[r] += actions[turn, r].tolist() + (reply if turn < actions.shape[0] - 1 else [])
    return total


def timed(fn, *args, repeat: int = 3):
    fn(*args)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn(*args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, value


def render(results: dict) -> str:
    """The markdown table of a results file (what ``--readme`` writes between the markers)."""
    m = results["machine"]
    lines = [f"{m['rows']} episodes, prompt {m['prompt']} tokens, {m['model']}, {m['device']} ({m['cpu']}), torch "
             f"{m['torch_threads']} threads; best of 3 after a warm-up.", "",
             "| turns | tokens after the prompt | lmgym s | re-encoding s | lmgym / re-encoding |",
             "|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['turns']} | {r['tokens']} | {r['lmgym_s']:.3f} | {r['reencoding_s']:.3f} | "
                     f"{r['ratio']:.3f} |")
    return "\n".join(lines)


def write_readme(page: Path, results: dict) -> None:
    text = page.read_text()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise SystemExit(f"{page} needs one block between {README_BEGIN!r} and {README_END!r}")
    before, rest = text.split(README_BEGIN)
    page.write_text(before + README_BEGIN + "\n\n" + render(results) + "\n\n" + README_END + rest.split(README_END, 1)[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=str(RESULTS), help="where to write the results (default: %(default)s)")
    parser.add_argument("--readme", default=None, help="render the table from --json into this page, measuring "
                                                       "nothing")
    args = parser.parse_args()
    if args.readme:
        write_readme(Path(args.readme), json.loads(Path(args.json).read_text()))
        return
    rows = []
    print(f"{ROWS} episodes, prompt {PROMPT} tokens, about {TOTAL} tokens after it (turns and replies alike), "
          f"4-layer 256-wide Llama, {args.device}, torch threads {torch.get_num_threads()}")
    print("turns | tokens after prompt | lmgym s | re-encoding s | lmgym / re-encoding")
    for turns in (1, 2, 4, 8):
        env, policy, prompts, actions, half = build(turns, args.device)
        t_cached, v_cached = timed(lmgym_episodes, env, policy, prompts, actions, half)
        t_loop, v_loop = timed(reencoding_episodes, env, policy, prompts, actions, half)
        assert abs(v_cached - v_loop) < 1e-2 * max(1.0, abs(v_loop)), (v_cached, v_loop)  # the same numbers
        length = (2 * turns - 1) * half
        rows.append({"turns": turns, "tokens": length, "lmgym_s": t_cached, "reencoding_s": t_loop,
                     "ratio": t_cached / t_loop})
        print(f"{turns:5d} | {length:19d} | {t_cached:7.3f} | {t_loop:13.3f} | {t_cached / t_loop:.3f}")
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    results = {"machine": {"rows": ROWS, "prompt": PROMPT, "model": "a 4-layer 256-wide Llama", "device": args.device,
                           "cpu": cpu, "torch_threads": torch.get_num_threads()}, "rows": rows}
    Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
