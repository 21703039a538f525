"""Stacking ragged token lists into padded batches: left-padded (what KV-cached generation wants, every row's
newest token in the last column) or right-padded (observations, rewards). Vectorised: no per-row copy."""

from __future__ import annotations

import torch

__all__ = ["left_pad", "right_pad", "to_left_padded"]


def _padded(sequences, pad, device, width: int | None, dtype: torch.dtype, left: bool):
    """``(values, mask)`` ``(len(sequences), width)``: each sequence at the right (``left``) or left end of its row.

    Built on the host in a few vectorised calls (no per-row copy) and moved to ``device`` once.
    """
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    longest = int(lengths.max()) if len(sequences) else 0
    width = longest if width is None else width
    if longest > width:
        raise ValueError(f"a sequence of {longest} entries does not fit in width {width}")
    values = torch.full((len(sequences), width), pad, dtype=dtype)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    flat = torch.tensor([v for s in sequences for v in s], dtype=dtype)
    rows = torch.repeat_interleave(torch.arange(len(sequences)), lengths)
    starts = torch.cumsum(lengths, 0) - lengths  # where each sequence begins in ``flat``
    columns = torch.arange(len(flat)) - torch.repeat_interleave(starts, lengths)
    if left:
        columns += torch.repeat_interleave(width - lengths, lengths)
    values[rows, columns] = flat
    mask[rows, columns] = 1
    return values.to(device), mask.to(device)


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists left-padded: ``(ids, mask)``, both ``(len(sequences), longest)``."""
    return _padded(sequences, pad_id, device, None, torch.long, left=True)


def right_pad(sequences, pad, device, *, width: int | None = None,
              dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack lists (token ids, or log-probs with ``dtype=torch.float32``) right-padded with ``pad``: ``(values,
    mask)``, both ``(len(sequences), width)`` (default: the longest), ``mask`` 1 where a value was given."""
    return _padded(sequences, pad, device, width, dtype, left=False)


def to_left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int | None = None):
    """Turn lmgym's left-aligned observations into the left-padded layout ``generate`` expects (no host sync).

    ``width`` keeps only the last ``width`` columns (an upper bound on the tokens per row,
    e.g. the environment's ``max_prompt_tokens`` right after a reset), so no model runs
    over columns that are padding in every row.
    """
    # A stable sort on the mask moves padding (0) to the front and keeps token order.
    order = torch.sort(attention_mask.to(torch.int8), dim=1, stable=True).indices
    if width is not None:
        order = order[:, -width:]
    return input_ids.gather(1, order), attention_mask.gather(1, order).long()
