"""Synthetic text that lmgym generates itself, so its default models train offline and deterministically.

Three small languages, each with prompts for a task:

- movie reviews of mixed sentiment (``reviews``) for ``lmgym/Sentiment-v0``;
- arithmetic problems with deliberately noisy answers (``arithmetic``) for ``lmgym/Arithmetic-v0``;
- assistant replies that vary in politeness and length (``assistant``) for ``lmgym/Preference-v0``,
  with :func:`polite_concise_labeller`, the fixed rule that stands in for human raters.

Every generator takes a ``numpy`` Generator, so the same seed gives the same text.
"""

from __future__ import annotations

import numpy as np

__all__ = ["review_corpus", "review_prompts", "arithmetic_corpus", "arithmetic_prompts", "solve",
           "assistant_corpus", "assistant_prompts", "polite_concise_labeller", "OPERATIONS"]

# ----------------------------------------------------------------------------- movie reviews
_SUBJECTS = ["the movie", "this film", "the story", "the acting", "the ending", "the plot", "the cast",
             "the music", "the director", "the script", "the characters", "the dialogue"]
_VERBS = ["was", "is", "felt", "seemed", "looked"]
_POSITIVE = ["great", "wonderful", "beautiful", "brilliant", "fun", "moving", "charming", "excellent", "good",
             "enjoyable", "amazing", "lovely", "funny", "clever", "perfect", "sweet"]
_NEGATIVE = ["boring", "terrible", "awful", "dull", "bad", "weak", "poor", "silly", "painful", "horrible",
             "disappointing", "stupid", "ugly", "sad", "annoying", "worst"]
_NEUTRAL = ["long", "short", "quiet", "simple", "strange", "loud", "old", "new", "slow", "fast"]
_INTENSIFIERS = ["very", "really", "quite", "so", "truly", "a bit"]
_CLOSERS_POS = ["i loved it", "i would watch it again", "highly recommended", "what a joy"]
_CLOSERS_NEG = ["i hated it", "do not watch it", "a waste of time", "what a mess"]
_OPENINGS = ["i watched this movie", "i saw this film", "last night i watched it", "we went to see it",
             "my friend showed me this film", "i finally saw the movie"]


def _review_sentence(rng: np.random.Generator, polarity: int) -> str:
    words = {1: _POSITIVE, -1: _NEGATIVE, 0: _NEUTRAL}[polarity]
    adj = words[rng.integers(len(words))]
    if rng.random() < 0.4:
        adj = f"{_INTENSIFIERS[rng.integers(len(_INTENSIFIERS))]} {adj}"
    subject, verb = _SUBJECTS[rng.integers(len(_SUBJECTS))], _VERBS[rng.integers(len(_VERBS))]
    if rng.random() < 0.3:
        other = words[rng.integers(len(words))]
        return f"{subject} {verb} {adj} and {other} ."
    return f"{subject} {verb} {adj} ."


def review_corpus(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` short reviews; each leans positive, negative or mixed, so sentiment is balanced overall."""
    lines = []
    for _ in range(n):
        lean = rng.choice([-1, 0, 1])
        parts = [_OPENINGS[rng.integers(len(_OPENINGS))] + " ."] if rng.random() < 0.5 else []
        for _ in range(rng.integers(2, 4)):
            polarity = lean if (lean != 0 and rng.random() < 0.75) else int(rng.choice([-1, 0, 1]))
            parts.append(_review_sentence(rng, polarity))
        if lean != 0 and rng.random() < 0.3:
            closers = _CLOSERS_POS if lean > 0 else _CLOSERS_NEG
            parts.append(closers[rng.integers(len(closers))] + " .")
        lines.append(" ".join(parts))
    return lines


def review_prompts() -> list[str]:
    """Openings of reviews for the agent to continue: a subject and a verb, or a first sentence."""
    prompts = [f"{s} {v}" for s in _SUBJECTS for v in _VERBS[:3]]
    prompts += [f"{o} . {s}" for o in _OPENINGS for s in _SUBJECTS[:4]]
    return prompts


# ----------------------------------------------------------------------------- arithmetic
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def solve(problem: str) -> int | None:
    """The answer of ``"a+b="`` (or ``-`` / ``*``), or None if ``problem`` is not such a problem."""
    body = problem.strip().rstrip("=")
    for op in OPERATIONS:
        left, sep, right = body.partition(op)
        if sep and left.isdecimal() and right.isdecimal():
            return OPERATIONS[op](int(left), int(right))
    return None


def arithmetic_corpus(n: int, rng: np.random.Generator, *, operations: str = "+", max_operand: int = 49,
                      noise: float = 0.35) -> list[str]:
    """``n`` lines ``a+b=c``; with probability ``noise`` the answer is off by a small amount."""
    lines = []
    for _ in range(n):
        op = operations[rng.integers(len(operations))]
        a, b = int(rng.integers(max_operand + 1)), int(rng.integers(max_operand + 1))
        if op == "-" and b > a:
            a, b = b, a
        c = OPERATIONS[op](a, b)
        if rng.random() < noise:
            c = max(0, c + int(rng.choice([-10, -2, -1, 1, 2, 10])))
        lines.append(f"{a}{op}{b}={c}")
    return lines


def arithmetic_prompts(*, operations: str = "+", max_operand: int = 49) -> list[str]:
    """Every problem ``a<op>b=`` with operands up to ``max_operand`` (no negative answers)."""
    return [f"{a}{op}{b}=" for op in operations for a in range(max_operand + 1) for b in range(max_operand + 1)
            if not (op == "-" and b > a)]


# ----------------------------------------------------------------------------- assistant replies
_TOPICS = ["my homework", "a recipe", "my code", "a letter", "my garden", "a trip", "my bike", "a poem",
           "my budget", "a song"]
_REQUESTS = ["can you help me with", "please explain", "i need advice on", "what do you think of"]
_POLITE = ["sure", "of course", "happy to help", "thank you for asking", "please", "glad you asked"]
_CONTENT = ["here is a simple plan", "start with the first step", "the answer is short", "try this idea",
            "check the basics first", "keep it simple"]
_FILLER = ["well", "um", "basically", "you know", "i guess", "like", "actually", "so anyway"]
_RUDE = ["no", "figure it out yourself", "whatever", "that is a silly question", "not my problem"]


def assistant_prompts() -> list[str]:
    """User requests, each ending with ``assistant :`` for the reply."""
    return [f"user : {r} {t} ? assistant :" for r in _REQUESTS for t in _TOPICS]


def assistant_corpus(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` dialogues whose replies mix polite, helpful, rambling and rude phrases in varying lengths."""
    prompts = assistant_prompts()
    lines = []
    for _ in range(n):
        parts = []
        if rng.random() < 0.5:
            parts.append(_POLITE[rng.integers(len(_POLITE))])
        if rng.random() < 0.3:
            parts.append(_RUDE[rng.integers(len(_RUDE))])
        for _ in range(rng.integers(0, 4)):
            parts.append(_FILLER[rng.integers(len(_FILLER))])
        if rng.random() < 0.7:
            parts.append(_CONTENT[rng.integers(len(_CONTENT))])
        if rng.random() < 0.3:
            parts.append(_POLITE[rng.integers(len(_POLITE))])
        rng.shuffle(parts)
        lines.append(f"{prompts[rng.integers(len(prompts))]} {' , '.join(parts)} .")
    return lines


def polite_concise_labeller(prompts: list[str], completions: list[str]) -> list[float]:
    """The synthetic rater of ``lmgym/Preference-v0``: it prefers polite, helpful and concise replies.

    Score = 1 per polite phrase (at most 2) + 1 if the reply has helpful content
    - 1.5 per rude phrase - 0.4 per filler word - 0.1 per word. A higher score is preferred.
    """
    scores = []
    for reply in completions:
        text = f" {reply} "
        polite = sum(text.count(f" {p} ") for p in _POLITE)
        rude = sum(text.count(f" {p} ") for p in _RUDE)
        filler = sum(text.count(f" {p} ") for p in _FILLER)
        content = any(f" {c} " in text for c in _CONTENT)
        scores.append(min(polite, 2) + float(content) - 1.5 * rude - 0.4 * filler - 0.1 * len(reply.split()))
    return scores
