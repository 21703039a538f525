"""Built-in language tasks that run offline: sentiment, arithmetic, and a learned-preference task.

Their default policies come from lmgym's zoo (:mod:`lmgym.zoo`), built on first use
and cached. Each task takes ``model=`` (any hub name or local path) and ``reward_fn=``
overrides, so with internet the same task runs on e.g. ``gpt2``.
"""

from __future__ import annotations

import re

from lmgym.utils import checks
from lmgym.zoo import corpora, entries as zoo
from lmgym.envs.env import TextGenEnv
from lmgym.tasks import chat_arithmetic, chat_calculator
from lmgym.tasks.options import check_options, constructor_options
from lmgym.envs.vector import TextGenVectorEnv

__all__ = ["VaderSentiment", "ArithmeticReward", "make_env", "make_vec_env", "DOCS"]


class VaderSentiment:
    """Score = VADER's compound sentiment of the completion, in [-1, 1] (Hutto & Gilbert 2014).

    VADER is a lexicon-and-rules sentiment scorer (the ``vaderSentiment`` package) that
    runs offline; +1 is most positive, -1 most negative, 0 neutral or empty.
    """

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts, completions):
        return [self.analyzer.polarity_scores(c)["compound"] for c in completions]


class ArithmeticReward:
    """Score = 1 for the exact answer of the prompt's problem, else 0.

    With ``partial_credit=True`` a wrong answer earns the fraction of digits that match
    the right answer, aligned from the right (ones with ones, tens with tens) and
    divided by the longer of the two numbers; a completion that is not a number earns 0.
    """

    def __init__(self, partial_credit: bool = False):
        self.partial_credit = partial_credit

    def __call__(self, prompts, completions):
        scores = []
        for prompt, completion in zip(prompts, completions):
            answer, got = corpora.solve(prompt), completion.strip()
            if answer is None:
                raise ValueError(f"prompt {prompt!r} is not an arithmetic problem like '12+7='")
            if not re.fullmatch(r"-?[0-9]+", got):  # one optional sign: "---30" or "1-2" is not a number
                scores.append(0.0)
            elif int(got) == answer:
                scores.append(1.0)
            elif self.partial_credit:
                a, b = str(answer)[::-1], got[::-1]
                scores.append(sum(x == y for x, y in zip(a, b)) / max(len(a), len(b)))
            else:
                scores.append(0.0)
        return scores


# ----------------------------------------------------------------------------- the tasks
def _sentiment(kwargs: dict, zoo_steps: int | None) -> dict:
    return dict(default_model="reviews", prompts=corpora.review_prompts(), reward=VaderSentiment,
                max_new_tokens=16, kl_coef=0.05)


def _arithmetic(kwargs: dict, zoo_steps: int | None) -> dict:
    operations = kwargs.pop("operations", "+")
    if not operations or any(op not in corpora.OPERATIONS for op in operations):
        raise ValueError(f"operations must be a string of {sorted(corpora.OPERATIONS)}, got {operations!r}")
    partial = checks.flag(kwargs.pop("partial_credit", False), "partial_credit")
    return dict(default_model="arithmetic", prompts=corpora.arithmetic_prompts(operations=operations),
                reward=lambda: ArithmeticReward(partial), max_new_tokens=6, kl_coef=0.05)


def _preference(kwargs: dict, zoo_steps: int | None) -> dict:
    def reward():
        from lmgym.rewards.reward_model import LearnedReward, RewardModel

        return LearnedReward(RewardModel.load(zoo.load_path("assistant-rm", steps=zoo_steps)))

    return dict(default_model="assistant", prompts=corpora.assistant_prompts(), reward=reward, max_new_tokens=20,
                kl_coef=0.05)


TASKS = {"sentiment": (_sentiment, set()), "arithmetic": (_arithmetic, {"operations", "partial_credit"}),
         "preference": (_preference, set()),
         "chat_arithmetic": (chat_arithmetic.task_spec, {"operations", "max_operand"}),
         "chat_calculator": (chat_calculator.task_spec, {"tool_timeout"})}
FIXED = {"chat_calculator": {"reward_fn", "interaction"}}
"""arguments a task decides itself (a tool task's interaction scores the answer and runs the tool)"""


def _task_kwargs(task: str, vector: bool, kwargs: dict) -> dict:
    build, own = TASKS[task]
    allowed = constructor_options(TextGenVectorEnv if vector else TextGenEnv) | own | {"zoo_steps"}
    fixed = FIXED.get(task, set())
    check_options(kwargs, allowed - fixed, f"the {task} task", fixed,
                  "; use lmgym/TextGen-v0 with a ToolInteraction of your own")
    kwargs = dict(kwargs)
    steps = kwargs.pop("zoo_steps", None)  # a reduced zoo build (tests)
    spec = build(kwargs, steps)
    for key, value in spec.get("multi_turn", {}).items():  # a multi-turn task's interaction and turn limits
        kwargs.setdefault(key, value)
    if "model" not in kwargs:
        kwargs["model"], kwargs["tokenizer"] = zoo.load(spec["default_model"], steps=steps)
    if "reward_fn" not in kwargs:
        kwargs["reward_fn"] = spec["reward"]()
    kwargs.setdefault("prompts", spec["prompts"])
    kwargs.setdefault("max_new_tokens", spec["max_new_tokens"])
    kwargs.setdefault("kl_coef", spec["kl_coef"])
    return kwargs


def make_env(task: str, **kwargs) -> TextGenEnv:
    """Build a language task as a single ``TextGenEnv`` (the ``gym.make`` entry point)."""
    return TextGenEnv(**_task_kwargs(task, False, kwargs))


def make_vec_env(task: str, num_envs: int = 8, **kwargs) -> TextGenVectorEnv:
    """Build a language task as a ``TextGenVectorEnv`` (the ``gym.make_vec`` entry point)."""
    return TextGenVectorEnv(num_envs, **_task_kwargs(task, True, kwargs))


_COMMON = """
    ## Action Space

    ``Discrete(vocab_size)`` of the policy's tokenizer.

    ## Observation Space

    As ``TextGenEnv``: ``input_ids`` and ``attention_mask`` of prompt + completion.

    ## Episode End

    Termination on EOS; truncation after ``max_new_tokens`` tokens (default {horizon}).

    ## Arguments

    ``model`` (default: the zoo model {model!r}, built offline on first use; any hub name or
    path works), ``reward_fn`` (replaces the score), ``kl_coef`` (0.05), ``max_new_tokens``
    ({horizon}), ``prompts``{extra}, and every other ``TextGenEnv`` / ``TextGenVectorEnv`` argument.
"""

DOCS = {
    "sentiment": """lmgym/Sentiment-v0: continue a movie review so the continuation is positive.

    ## Description

    The classic RLHF demonstration (Ziegler et al. 2019). The prompt is the opening of a
    review ("the acting was", "i saw this film . the plot"); the policy continues it. The
    default policy is lmgym's zoo model "reviews", trained on synthetic reviews of mixed
    sentiment, so it writes positive and negative continuations alike: there is room to improve.

    ## Rewards

    The score is VADER's compound sentiment of the completion in [-1, 1]
    (``lmgym.tasks.language.VaderSentiment``), plus the per-token KL penalty.
""" + _COMMON.format(horizon=16, model="reviews", extra=""),
    "arithmetic": """lmgym/Arithmetic-v0: answer ``a+b=``.

    ## Description

    The prompt is a problem ``a+b=`` with operands 0-49 (``operations="+-*"`` adds others);
    the policy writes the answer character by character and stops. The default policy is
    lmgym's zoo model "arithmetic", supervised on problems whose answers are wrong 35% of
    the time, so it is right only part of the time.

    ## Rewards

    Verifiable: 1 for the exact answer, else 0 (``partial_credit=True``: the fraction of
    digits right, aligned from the ones), plus the per-token KL penalty.
""" + _COMMON.format(horizon=6, model="arithmetic", extra=", ``operations`` ('+'), ``partial_credit`` (False)"),
    "preference": """lmgym/Preference-v0: reply to a user the way the (synthetic) raters prefer.

    ## Description

    The RLHF pipeline end to end. The prompt is a user request ending in ``assistant :``;
    the default policy is lmgym's zoo model "assistant" (the SFT model), whose replies vary
    in politeness and length. The score is a *learned* reward model: lmgym sampled 8
    replies per prompt from the SFT model, labelled them with a fixed rule standing in for
    human raters (``lmgym.zoo.corpora.polite_concise_labeller``: polite, helpful, concise replies
    win), and trained a Bradley-Terry reward model on the pairs (zoo entry "assistant-rm").

    ## Rewards

    The reward model's score of (prompt, reply), centred to mean 0 over its training
    replies, plus the per-token KL penalty.
""" + _COMMON.format(horizon=20, model="assistant", extra=""),
    "chat_arithmetic": chat_arithmetic.DOC,
    "chat_calculator": chat_calculator.DOC,
}
