"""How an episode's rewards are put together (DESIGN.md's MDP): the per-token KL part, the completion the task
scores, and what ``info`` reports when an episode ends. The task score itself comes from the reward source
(:mod:`lmgym.rewards`); the core adds it to the episode's last reward.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["token_rewards", "completions_of", "episode_end_info"]


def token_rewards(kl_coef: float, ref_lp: torch.Tensor, pol_lp: torch.Tensor | None):
    """``(reward, kl)`` per token: ``-kl_coef * (log pi - log pi_ref)`` and the KL estimate ``log pi - log pi_ref``.

    Without the policy's log-probs the KL is unknown (NaN) and the reward is ``kl_coef * log pi_ref``, whose
    expectation is the KL-regularised objective once the agent adds an entropy bonus of weight ``kl_coef``.
    """
    if pol_lp is None:
        return kl_coef * ref_lp, torch.full_like(ref_lp, float("nan"))
    kl = pol_lp - ref_lp
    return -kl_coef * kl, kl


def completions_of(rows_tokens: list[list[int]], starts: list[int], lengths: list[int],
                   stop_token_ids) -> list[list[int]]:
    """The generated ids of each row (``lengths`` tokens from ``starts``), without a final stop token."""
    out = []
    for toks, s, n in zip(rows_tokens, starts, lengths):
        gen = toks[s:s + n]
        out.append(gen[:-1] if gen and gen[-1] in stop_token_ids else gen)
    return out


def episode_end_info(num_envs: int, finished: np.ndarray, scores, completions: list[str], lengths: list[int],
                     episode_kl: np.ndarray | None) -> dict:
    """The ``info`` entries of the rows ``finished`` this step, with Gymnasium's ``_<key>`` masks of the vector
    convention: ``score``, ``completion``, ``episode_length`` and, when the KL is known, ``episode_kl``."""
    mask = np.zeros(num_envs, dtype=bool)
    mask[finished] = True
    score = np.full(num_envs, np.nan)
    score[finished] = scores
    completion = np.full(num_envs, None, dtype=object)
    completion[finished] = completions
    length = np.zeros(num_envs, dtype=np.int64)
    length[finished] = lengths
    out = {"score": score, "_score": mask, "completion": completion, "_completion": mask,
           "episode_length": length, "_episode_length": mask}
    if episode_kl is not None:
        kl = np.zeros(num_envs)
        kl[finished] = episode_kl
        out.update(episode_kl=kl, _episode_kl=mask)
    return out
