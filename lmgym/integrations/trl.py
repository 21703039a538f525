"""Hugging Face TRL's online trainers (``GRPOTrainer``, ``RLOOTrainer``) on any lmgym task.

:class:`TRLTask` turns a registered task (or ``lmgym/TextGen-v0`` with your model, prompts and
reward) into what TRL's online trainers take, and scores what they trained with lmgym's own
evaluation::

    from trl import GRPOConfig, GRPOTrainer
    from lmgym.integrations.trl import TRLTask

    task = TRLTask("lmgym/TargetToken-v0", "trl-target", num_envs=16, group_size=4)
    args = GRPOConfig("trl-target/out", **task.config_kwargs(), loss_type="grpo", learning_rate=3e-3,
                      lr_scheduler_type="constant", max_steps=30, report_to="none", save_strategy="no")
    trainer = GRPOTrainer(args=args, **task.trainer_kwargs())
    trainer.train()
    print(task.evaluate(trainer.model))  # score, KL, return = score - kl_coef * KL, fraction of the exact optimum

- **Prompts** (:meth:`TRLTask.dataset`): a ``datasets.Dataset`` whose ``prompt`` column is what TRL
  tokenizes into exactly the token ids the environment's episodes start from: the text of a text
  prompt, the messages of a chat prompt (TRL renders them with the same chat template and
  ``add_generation_prompt=True`` as lmgym). Building it checks this prompt by prompt with the
  tokenizer TRL will use. ``prompt_text`` holds the text the episodes see (a chat prompt rendered),
  ``prompt_index`` the prompt's place in the task's list.
- **Reward** (:attr:`TRLTask.reward`): a reward function with TRL's signature
  ``fn(prompts, completions, completion_ids, **columns) -> list[float]`` that calls the task's
  own scorer on what the environment would score for the same tokens: the completion's token
  ids up to its first stop token, decoded as the environment decodes them, with the prompt as
  the task gave it (text, or chat messages).
- **Model** (:attr:`TRLTask.model_path`): the task's reference model, tokenizer and a generation
  config whose ``eos_token_id`` lists the environment's stop tokens, saved as a Hugging Face folder
  that TRL loads offline. TRL starts the policy from it and, for ``beta > 0``, loads its reference
  from the same folder, so TRL's reference is the environment's reference, weight for weight.
- **KL coefficient**: the task's ``kl_coef`` becomes TRL's ``beta`` (:meth:`TRLTask.config_kwargs`).
  The two do not put the KL in the same place:

  * lmgym's environment puts it in the **reward**, per token, as the k1 estimate
    ``-kl_coef * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))``; an episode's return is
    ``score - kl_coef * sum_t k1_t``, an unbiased estimate of the KL-regularised objective.
  * TRL's ``GRPOTrainer`` puts ``beta * k3_t`` (``k3 = exp(d) - d - 1``, ``d = log pi_ref - log pi``)
    in the **loss** of each token, next to the clipped surrogate of the group-normalised score. Its
    gradient is not that of the objective above (:mod:`lmgym.agents.common.kl` derives the bias); lmgym's
    ``GRPO`` does the same by default (``kl_placement="loss"``, ``kl_estimator="k3"``).
  * TRL's ``RLOOTrainer`` subtracts ``beta * sum_t k1_t`` from each completion's score before the
    leave-one-out baseline: the environment's return, as lmgym's ``RLOO``.

  Whatever TRL optimises, :meth:`TRLTask.evaluate` scores the trained model with the environment's
  KL accounting (per-token k1 against the environment's reference, weight ``kl_coef``), exactly as
  lmgym's agents are scored, so the returns compare like with like.
- **Multi-turn tasks** (the environment answers between turns: ``lmgym/Guess-v0``, ``lmgym/Echo-v0``, an
  interaction of your own or a :class:`lmgym.envs.tools.ToolInteraction`): :attr:`TRLTask.rollout` is a
  ``GRPOTrainer`` ``rollout_func`` that plays the environment's episodes with TRL's model and hands TRL their
  token ids with ``env_mask`` = the environment's ``policy_mask``, so TRL's loss and KL skip the replies; the
  reward is each episode's return (:mod:`lmgym.integrations.trl_episodes`). ``RLOOTrainer`` takes no rollout
  function in TRL 1.16.

TRL is an optional extra (``pip install 'lmgym[trl]'``); nothing else in lmgym imports it.
Tested with TRL 1.16.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from lmgym.integrations.trl_episodes import EpisodeReturn, EpisodeRollout, prompt_key
from lmgym.utils.folders import written_atomically

from lmgym.zoo.smollm import MissingExtraError

__all__ = ["INSTALL_HINT", "MissingTRLError", "TRLModelError", "require_trl", "TaskReward", "TRLTask"]

INSTALL_HINT = "pip install 'lmgym[trl]'"


class MissingTRLError(MissingExtraError):
    """The optional ``trl`` extra (``trl`` and ``datasets``) is not installed."""


class TRLModelError(ValueError):
    """The task's model or tokenizer cannot be written as a folder that TRL loads back unchanged."""


def require_trl():
    """Import and return the ``trl`` module, or raise :class:`MissingTRLError` naming the install command."""
    try:
        import datasets  # noqa: F401  TRL's trainers take their prompts as a datasets.Dataset
        import trl
    except ImportError as err:
        missing = getattr(err, "name", None) or "trl"
        raise MissingTRLError(f"TRL is not installed ({missing} cannot be imported): {INSTALL_HINT} installs the "
                              "trl extra (trl and datasets)") from err
    return trl


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _is_chat(prompt) -> bool:
    from lmgym.envs.chat import is_chat_messages

    return is_chat_messages(prompt)


class TaskReward:
    """A TRL reward function returning the task's own score of each (prompt, completion).

    Called by TRL as ``reward(prompts=..., completions=..., completion_ids=..., prompt_index=..., ...)``;
    other keyword arguments TRL passes (``trainer_state``, dataset columns) are ignored. The score is
    what the environment computes for the same tokens: ``completion_ids`` are cut before their first
    stop token (TRL's include the EOS that ended them) and decoded as the environment decodes them,
    and the task's reward receives the prompt as the task gave it (text, or chat messages) with its
    token ids. Without ``completion_ids`` the completion texts (or a chat completion's content) are
    tokenized. Prompts are found through ``prompt_index`` (a column of :meth:`TRLTask.dataset`), else
    by their text or messages, else encoded as the environment would encode a new prompt.
    """

    def __init__(self, core):
        self.core = core
        self.items = list(core.prompts.items or [])
        self._by_key = {}
        for p in reversed(self.items):
            self._by_key[prompt_key(p.given)] = p
        self.__name__ = "lmgym_task_score"  # TRL logs rewards under their function's name

    def _prompts(self, prompts, prompt_index) -> list:
        if prompt_index is not None:
            if len(prompt_index) != len(prompts):
                raise ValueError(f"prompt_index has {len(prompt_index)} entries for {len(prompts)} prompts")
            return [self.items[int(i)] for i in prompt_index]
        out = []
        for p in prompts:
            known = self._by_key.get(prompt_key(p))
            out.append(known if known is not None else self.core.prompts.encode(p))
        return out

    def _completion_ids(self, completions, completion_ids) -> list[list[int]]:
        stops = set(self.core.stop_token_ids)
        if completion_ids is None:
            texts = [c[-1]["content"] if _is_chat(c) else c for c in completions]
            completion_ids = [self.core.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        out = []
        for ids in completion_ids:
            ids = [int(t) for t in ids]
            end = next((i for i, t in enumerate(ids) if t in stops), len(ids))  # the episode ends at its first stop
            out.append(ids[:end])
        return out

    def __call__(self, prompts, completions, completion_ids=None, prompt_index=None, **kwargs) -> list[float]:
        if len(completions) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        chosen = self._prompts(prompts, prompt_index)
        ids = self._completion_ids(completions, completion_ids)
        texts = self.core.tokenizer.batch_decode(ids, skip_special_tokens=True)
        scores = self.core.reward_fn([p.given for p in chosen], texts, [p.ids for p in chosen], ids)
        return [float(s) for s in scores]


def _trl_prompt_ids(tokenizer, prompt) -> list[int]:
    """The token ids TRL 1.16's online trainers make of a dataset prompt (``_tokenize_prompts``)."""
    if _is_chat(prompt):
        encoded = tokenizer.apply_chat_template(conversation=[list(prompt)], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)
        return [int(t) for t in encoded["input_ids"][0]]
    return [int(t) for t in tokenizer(text=[prompt])["input_ids"][0]]


class TRLTask:
    """An lmgym task as TRL's online trainers take it; see the module docstring.

    Args:
        task: a registered task id (``"lmgym/TargetToken-v0"``, ``"lmgym/TextGen-v0"``...) or an
            environment built with ``gym.make_vec`` (its ``num_envs`` and ``group_size`` are then kept).
        folder: where the model folder is written (``folder/model``).
        num_envs: completions per training batch (TRL's ``per_device_train_batch_size``).
        group_size: completions per prompt (TRL's ``num_generations``); must divide ``num_envs``.
        device: the environment's device (where :meth:`evaluate` runs).
        trust_remote_code: let transformers run a model's own code when the folder is loaded back.
        **env_kwargs: the task's arguments (``kl_coef``, ``max_new_tokens``; for ``TextGen-v0``
            ``model``, ``prompts``, ``reward_fn``...).

    Raises:
        MissingTRLError: TRL or datasets is not installed.
        TRLModelError: the task's model cannot be saved as a folder that TRL loads back unchanged.
        ValueError: the task's prompts are a stream, or a prompt would not tokenize under TRL into
            the ids the environment uses.
    """

    def __init__(self, task, folder: str | os.PathLike, *, num_envs: int = 64, group_size: int = 8, device="cpu",
                 trust_remote_code: bool = False, **env_kwargs):
        require_trl()
        if isinstance(task, str):
            import gymnasium as gym

            import lmgym  # noqa: F401  registers the environments

            task = gym.make_vec(task, num_envs=num_envs, group_size=group_size, device=device, **env_kwargs)
        elif env_kwargs:
            raise TypeError(f"the environment is already built; {sorted(env_kwargs)} cannot change it")
        if not hasattr(task, "score_sequences"):
            raise TypeError(f"task must be an lmgym task id or a gym.make_vec('lmgym/...') environment, "
                            f"got {type(task).__name__}")
        self.env = task
        self.core = task.core
        if not self.core.prompts.finite:
            raise ValueError("TRL's trainers read their prompts from a dataset: give the task a list of prompts, "
                             "not a stream")
        self.folder = Path(folder)
        self.trust_remote_code = trust_remote_code
        self.model_path = str(self._save_model(self.folder / "model"))
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, padding_side="left", truncation_side="left",
                                                       trust_remote_code=trust_remote_code)
        """the tokenizer TRL uses (``processing_class``), loaded back from :attr:`model_path`"""
        self._evaluator = None
        self.rollout: EpisodeRollout | None = None
        """multi-turn tasks: TRL's ``rollout_func``, which plays the environment's episodes (:mod:`.trl_episodes`)"""
        if self.multi_turn:
            # TRL never tokenizes the prompts here: the rollout hands it the episodes' own prompt ids
            self.rollout = EpisodeRollout(self.env, list(self.core.prompts.items))
            self.reward = EpisodeReturn()
        else:
            self._check_prompt_ids()
            self.reward = TaskReward(self.core)

    @property
    def multi_turn(self) -> bool:
        """Whether the environment answers between policy turns (then only ``GRPOTrainer`` takes the task, through
        :attr:`rollout`)."""
        return bool(self.env.multi_turn)

    # ------------------------------------------------------------------ what TRL takes
    @property
    def beta(self) -> float:
        """TRL's ``beta``: the environment's ``kl_coef`` (the KL sits elsewhere; see the module docstring)."""
        return float(self.env.kl_coef)

    @property
    def optimal_return(self) -> float | None:
        """The exact optimum of the KL-regularised objective (diagnostic tasks), else None."""
        try:
            return float(self.env.optimal_return)
        except ValueError:
            return None

    def dataset(self, min_rows: int | None = None):
        """The task's prompts as a ``datasets.Dataset`` (columns ``prompt``, ``prompt_text``, ``prompt_index``).

        The list is repeated whole until it has at least ``min_rows`` rows (default: 16 batches' worth of
        prompts): TRL draws each batch's prompts without replacement and drops a last incomplete batch,
        so a task with fewer prompts than a batch needs would otherwise give it none. Whole repeats keep
        every prompt equally likely, as the environment's uniform draws.
        """
        from datasets import Dataset

        items = self.core.prompts.items
        chat = [_is_chat(p.given) for p in items]
        if any(chat) and not all(chat):
            raise ValueError("the task mixes text and chat-message prompts; a dataset column holds one kind")
        per_batch = self.env.num_envs // self.env.group_size
        min_rows = 16 * per_batch if min_rows is None else min_rows
        repeats = max(1, -(-min_rows // len(items)))
        rows = [(i, p) for _ in range(repeats) for i, p in enumerate(items)]
        return Dataset.from_dict({"prompt": [p.given if c else p.text for (i, p), c in zip(rows, chat * repeats)],
                                  "prompt_text": [p.text for _, p in rows],
                                  "prompt_index": [i for i, _ in rows]})

    def config_kwargs(self) -> dict:
        """The ``GRPOConfig`` / ``RLOOConfig`` settings that make TRL run this task's MDP: its KL coefficient,
        horizon and batch layout, sampling from the model's own distribution (as the environment's
        reference is scored), dropout off, float32 weights with lmgym's mixed precision (bfloat16 autocast on a
        GPU that has it, none on the CPU), on the environment's device, no activation checkpointing. The
        algorithm's own settings (learning rate, loss type, clipping...) are yours."""
        import dataclasses

        from transformers import TrainingArguments

        device = self.env.device
        # lmgym's agents keep float32 weights, autocast to bfloat16 on a GPU that has it and never on the CPU
        # (TRL's default bf16=None would mean bfloat16 autocast on the CPU too), and store all activations.
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        names = {f.name for f in dataclasses.fields(TrainingArguments)}
        checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
        return {"beta": self.beta, "num_generations": self.env.group_size,
                "max_completion_length": self.env.max_new_tokens, "per_device_train_batch_size": self.env.num_envs,
                "steps_per_generation": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "disable_dropout": True,
                "model_init_kwargs": {"dtype": "float32"}, "trust_remote_code": self.trust_remote_code,
                "use_cpu": device.type == "cpu", "bf16": bf16, "fp16": False, checkpointing: False,
                # TRL calls a completion truncated when its last token is no stop token; a multi-turn episode that the
                # environment ended (a right guess) is one, and masking it would drop it from the loss
                **({"mask_truncated_completions": False} if self.multi_turn else {})}

    def trainer_kwargs(self) -> dict:
        """``model``, ``reward_funcs``, ``train_dataset`` and ``processing_class`` for TRL's trainer, and on a
        multi-turn task the ``rollout_func`` that plays its episodes (``GRPOTrainer`` only: TRL 1.16's
        ``RLOOTrainer`` takes no rollout function)."""
        kwargs = dict(model=self.model_path, reward_funcs=[self.reward], train_dataset=self.dataset(),
                      processing_class=self.tokenizer)
        if self.rollout is not None:
            kwargs["rollout_func"] = self.rollout
        return kwargs

    # ------------------------------------------------------------------ lmgym's evaluation
    def evaluator(self, model=None, seed: int = 0):
        """An lmgym agent on the task's environment whose policy holds ``model``'s weights (default: the
        reference's): its ``evaluate`` and ``collect`` are those every lmgym agent is scored with."""
        from lmgym.agents import Agent

        if self._evaluator is None or self._evaluator.config.seed != seed:
            self._evaluator = Agent(self.env, seed=seed)
        agent = self._evaluator
        source = model if model is not None else self.env.reference_model
        try:
            state = source.state_dict()
            agent.policy.load_state_dict({k: v for k, v in state.items() if k in agent.policy.state_dict()},
                                         strict=True)
        except (RuntimeError, KeyError) as err:
            raise TRLModelError(f"the trained model's weights do not fit the task's model ({_first_line(err)}); "
                                "merge LoRA adapters first (model.merge_and_unload())") from err
        return agent

    def evaluate(self, model=None, *, num_batches: int = 4, seed: int = 0) -> dict:
        """lmgym's evaluation of ``model`` (default: the reference) on the task: mean score, KL and return over
        ``num_batches`` batches of fresh episodes, the same prompts and samples that ``seed`` gives every lmgym
        agent's evaluation, plus ``fraction_of_optimum`` (return / the exact optimum) on diagnostic tasks."""
        result = self.evaluator(model, seed).evaluate(num_batches)
        optimum = self.optimal_return
        result["fraction_of_optimum"] = result["return"] / optimum if optimum else None
        return result

    # ------------------------------------------------------------------ the folder TRL loads
    def _save_model(self, folder: Path) -> Path:
        from transformers import AutoModelForCausalLM, PreTrainedModel

        model, tokenizer = self.core.model, self.core.tokenizer
        what = type(model).__name__
        if not isinstance(model, PreTrainedModel):
            raise TRLModelError(f"TRL trains Hugging Face models (PreTrainedModel); the task's model is a {what}")
        stops = self.core.stop_token_ids
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
            raise TRLModelError(f"the environment stops at {stops} but not at the tokenizer's EOS "
                                f"{tokenizer.eos_token_id}, where TRL always stops; include it in stop_token_ids")
        # written whole into a fresh folder that then replaces folder: files of an earlier task's model there
        # (a chat template, other weights) must not mix with this one's
        with written_atomically(folder, overwrite=True) as tmp:
            try:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            except Exception as err:  # any failure here means TRL cannot get the model; say which part failed
                raise TRLModelError(f"the task's model ({what}) could not be saved as a Hugging Face folder at "
                                    f"{folder}: {_first_line(err)}") from err
            # TRL stops a completion at every id of generation_config.eos_token_id (and the tokenizer's EOS).
            generation = copy.deepcopy(model.generation_config)
            generation.eos_token_id = list(stops)
            generation.pad_token_id = self.core.pad_token_id
            generation.save_pretrained(tmp)
            try:
                loaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                              trust_remote_code=self.trust_remote_code)
            except Exception as err:  # TRL would fail the same way, later and less clearly
                raise TRLModelError(
                    f"TRL loads its policy and reference with AutoModelForCausalLM.from_pretrained, which cannot load "
                    f"the task's model ({what}) from {folder}: {_first_line(err)}. Use a model transformers' Auto "
                    "classes know (or register yours with AutoConfig.register and AutoModelForCausalLM.register; a "
                    "model with its own code needs trust_remote_code=True here and in TRL's config)") from err
            mine, theirs = model.state_dict(), loaded.state_dict()
            differ = [k for k, v in mine.items() if k not in theirs or not torch.equal(v.float().cpu(), theirs[k])]
            if differ:
                raise TRLModelError(f"the task's model ({what}) does not load back from {folder} with its own weights "
                                    f"({differ[0]} differs), so TRL would train another model")
        return folder

    def _check_prompt_ids(self) -> None:
        for i, p in enumerate(self.core.prompts.items):
            given = p.given if _is_chat(p.given) else p.text
            ids = _trl_prompt_ids(self.tokenizer, given)
            if ids != list(p.ids):
                raise ValueError(f"prompt #{i} ({p.text[:40]!r}) becomes tokens {ids[:8]} under TRL but the "
                                 f"environment's episodes start from {list(p.ids)[:8]}; TRL tokenizes prompt text "
                                 "itself, so give the task text or chat prompts that tokenize to themselves")
