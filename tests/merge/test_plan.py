"""Merge arithmetic (btx_megatron.merge.plan): the blocked float64 average is bit-identical to the
whole-tensor float64 running sum the merge has always computed, and float32 would not be."""

from __future__ import annotations

import pytest
import torch

from tests.merge.merge_fixtures import reference_average

WEIGHTS = {"uniform": [1.0, 1.0, 1.0], "3:1:0": [3.0, 1.0, 0.0], "0.7/0.2/0.1": [0.7, 0.2, 0.1],
           "thirds": [1 / 3, 1 / 3, 1 / 3]}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_blocked_average_is_bit_identical_to_whole_tensor_float64(dtype, weights):
    from btx_megatron.merge.plan import AVERAGE_BLOCK, average_into

    g = torch.Generator().manual_seed(len(weights) + dtype.itemsize)
    shape = (101, 1013)  # 3 blocks and a ragged tail
    assert 3 * AVERAGE_BLOCK < shape[0] * shape[1] < 4 * AVERAGE_BLOCK
    # A wide spread of magnitudes and signs: sums that cancel, values that round at every bit.
    spread = 12.0 if dtype != torch.float16 else 3.0
    scale = torch.exp(torch.randn(shape, generator=g) * spread)
    ts = [(torch.randn(shape, generator=g) * scale).to(dtype) for _ in range(3)]
    # Special values at random places: signed zeros (all -0.0 in some places), infinities, NaN,
    # subnormals.
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40])
    for t in ts:
        where = torch.randint(0, t.numel(), (500,), generator=g)
        t.view(-1)[where] = special[torch.randint(0, len(special), (500,), generator=g)].to(dtype)
    for t in ts:
        t.view(-1)[:300] = -0.0
    w = WEIGHTS[weights]
    threads = torch.get_num_threads()
    try:
        for num_threads in (1, 2):  # the reference's vector/scalar split must not matter either
            torch.set_num_threads(num_threads)
            want = reference_average(ts, w, dtype)
            got = average_into(torch.empty_like(ts[0]), ts, w)
            assert torch.equal(_bits(got), _bits(want)), (weights, num_threads, int((got != want).sum()))
    finally:
        torch.set_num_threads(threads)


def test_float32_accumulation_would_not_be_exact():
    """Why the sum stays float64: a float32 running sum of bfloat16 weights loses a small term
    between a value and its near-negation (1 + 2**-30 - 1), and the rounded mean changes."""
    from btx_megatron.merge.plan import average_into

    ts = [torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([2.0 ** -30], dtype=torch.bfloat16),
          torch.tensor([-1.0], dtype=torch.bfloat16)]
    acc32 = torch.zeros(1, dtype=torch.float32)
    for t in ts:
        acc32.add_(t)
    float32_mean = (acc32 / 3).to(torch.bfloat16)
    got = average_into(torch.empty(1, dtype=torch.bfloat16), ts, [1.0, 1.0, 1.0])
    assert float32_mean.item() == 0.0
    assert got.item() == pytest.approx(2.0 ** -30 / 3, rel=1e-2)
    assert torch.equal(got, reference_average(ts, [1.0, 1.0, 1.0], torch.bfloat16))


def test_average_refuses_mismatched_input():
    from btx_megatron.merge.plan import average_into

    with pytest.raises(ValueError, match="positive sum"):
        average_into(torch.empty(3), [torch.ones(3)], [0.0])
    with pytest.raises(ValueError, match="cannot average shape"):
        average_into(torch.empty(3), [torch.ones(4)], [1.0])
