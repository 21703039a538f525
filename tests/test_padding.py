"""lmgym.models.left_pad / right_pad: the one way lmgym stacks ragged token (or log-prob) lists, against a slow loop."""

import random

import pytest
import torch

from lmgym.models import left_pad, right_pad


def slow(sequences, pad, width, dtype, left):
    values = torch.full((len(sequences), width), pad, dtype=dtype)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        for j, v in enumerate(seq):
            col = width - len(seq) + j if left else j
            values[i, col] = v
            mask[i, col] = 1
    return values, mask


def test_padding_matches_a_slow_loop_with_empty_and_ragged_rows():
    rng = random.Random(0)
    sequences = [[rng.randrange(50) for _ in range(rng.choice([0, 1, 3, 7]))] for _ in range(40)] + [[5] * 9]
    for got, want in ((left_pad(sequences, 49, "cpu"), slow(sequences, 49, 9, torch.long, True)),
                      (right_pad(sequences, 49, "cpu"), slow(sequences, 49, 9, torch.long, False)),
                      (right_pad(sequences, 49, "cpu", width=12), slow(sequences, 49, 12, torch.long, False))):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert got[0].dtype == torch.long and got[1].dtype == torch.long
    logprobs = [[-0.5, -1.25], [], [-3.0]]
    values, mask = right_pad(logprobs, 0.0, "cpu", width=3, dtype=torch.float32)
    assert values.tolist() == [[-0.5, -1.25, 0.0], [0.0, 0.0, 0.0], [-3.0, 0.0, 0.0]]
    assert mask.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]
    with pytest.raises(ValueError, match="does not fit in width 2"):
        right_pad([[1, 2, 3]], 0, "cpu", width=2)
