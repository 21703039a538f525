"""Turn-level credit in multi-turn rollouts: the return from each turn on, instead of one return per episode.

With ``turn_level=True`` (PPO, REINFORCE / RLOO, GRPO), a token's credit is the return of its own turn:
``G_k = sum of the rewards from turn k's first token to the episode's end``, so an early turn is not credited
with rewards that came before it. :func:`turn_returns` gives ``G`` per (episode, turn); the agents turn it
into advantages (a baseline per turn, a group normalisation per turn, or GAE over turns) and
:func:`per_token` hands each token its turn's value. A single-turn rollout is one turn.
"""

from __future__ import annotations

import torch

__all__ = ["turn_starts", "turn_returns", "at_turn_starts", "per_token", "group_normalised", "leave_one_out",
           "turn_gae"]


def _turn_index(rollout) -> torch.Tensor:
    if rollout.turn_index is not None:
        return rollout.turn_index
    return torch.where(rollout.mask > 0, 0, -1)  # a single-turn episode is its first turn


def turn_starts(rollout):
    """``(first, present)``, both ``(N, K)``: the position of each turn's first token, and which turns exist (a
    turn a row does not have points at its last column: read it only where ``present``)."""
    index = _turn_index(rollout)
    n, steps = index.shape
    turns = max(int(index.max()) + 1, 1)
    positions = torch.arange(steps, device=index.device).expand(n, steps)
    first = torch.full((n, turns), steps, dtype=torch.long, device=index.device)
    valid = index >= 0
    first = first.scatter_reduce(1, index.clamp(min=0), torch.where(valid, positions, steps), reduce="amin")
    return first.clamp(max=steps - 1), first < steps


def turn_returns(rollout, rewards: torch.Tensor):
    """``(G, present)``: ``G[i, k]`` the sum of ``rewards`` (per token) from turn k's first token on, ``(N, K)``."""
    first, present = turn_starts(rollout)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    return torch.where(present, to_go.gather(1, first), 0.0), present


def at_turn_starts(values: torch.Tensor, first: torch.Tensor, present: torch.Tensor, steps: int) -> torch.Tensor:
    """``values`` ``(N, K)`` written at each present turn's first token of an ``(N, steps)`` tensor, 0 elsewhere
    (absent turns go to a spare column that is then cut off, so they never collide with a real turn)."""
    where = torch.where(present, first, steps)
    out = torch.zeros((values.shape[0], steps + 1), dtype=values.dtype, device=values.device)
    return out.scatter(1, where, torch.where(present, values, 0.0))[:, :steps]


def per_token(values: torch.Tensor, rollout) -> torch.Tensor:
    """Each policy token's turn's entry of ``values`` ``(N, K)``, as ``(N, T)`` (0 on other tokens)."""
    index = _turn_index(rollout)
    return torch.where(index >= 0, values.gather(1, index.clamp(min=0)), 0.0)


def group_normalised(returns: torch.Tensor, present: torch.Tensor, group_size: int, scale: bool, eps: float):
    """GRPO's advantage per turn: ``(G - mean) / (std + eps)`` over the group's episodes that have the turn."""
    n, turns = returns.shape
    g = returns.view(-1, group_size, turns)
    p = present.view(-1, group_size, turns).float()
    count = p.sum(1, keepdim=True)
    mean = (g * p).sum(1, keepdim=True) / count.clamp(min=1)
    centred = (g - mean) * p
    if scale:
        var = (centred ** 2).sum(1, keepdim=True) / (count - 1).clamp(min=1)  # unbiased, as the episode level
        centred = centred / (var.sqrt() + eps)
    return centred.reshape(n, turns)


def leave_one_out(returns: torch.Tensor, present: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's baseline per turn: the mean of the turn's return over the group's *other* episodes that have it
    (0 where no other has)."""
    n, turns = returns.shape
    g = returns.view(-1, group_size, turns)
    p = present.view(-1, group_size, turns).float()
    others = (p.sum(1, keepdim=True) - p).clamp(min=1)
    return (((g * p).sum(1, keepdim=True) - g * p) / others * p).reshape(n, turns)


def turn_gae(rollout, rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float):
    """GAE over turns: ``delta_k = R_k + gamma * V_{k+1} - V_k`` with ``R_k`` the turn's summed rewards and ``V_k``
    the value at its first token; gamma and lambda apply per turn. Returns ``(advantages, first, present)``,
    advantages ``(N, K)``."""
    first, present = turn_starts(rollout)
    from_turn, _ = turn_returns(rollout, rewards)
    # R_k = G_k - G_{k+1}: what turn k itself earned (G of a turn that does not exist is 0)
    next_from = torch.cat([from_turn[:, 1:], torch.zeros_like(from_turn[:, :1])], dim=1)
    turn_reward = torch.where(present, from_turn - next_from, 0.0)
    v = torch.where(present, values.gather(1, first), 0.0)
    advantages = torch.zeros_like(v)
    next_value = torch.zeros_like(v[:, 0])
    next_adv = torch.zeros_like(v[:, 0])
    for k in range(v.shape[1] - 1, -1, -1):
        alive = present[:, k].float()
        delta = turn_reward[:, k] + gamma * next_value - v[:, k]
        next_adv = (delta + gamma * lam * next_adv) * alive
        advantages[:, k] = next_adv
        next_value = v[:, k] * alive
    return advantages, first, present
