"""pool_ranks: per-rank rows of one global batch pooled into what one process records on all of it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from nets import ResMLPBlock
from torch import nn

import gradprobe
from gradprobe.pooling import NOT_POOLED

EXACT = [
    "grad_out",
    "grad_in",
    "gain",
    "cum_gain",
    "skip_grad",
    "branch_grad",
    "branch_cos",
    "in_rms",
    "out_rms",
]


def _frame(x: torch.Tensor, loss: str) -> pd.DataFrame:
    torch.manual_seed(0)
    net = nn.Sequential(*[ResMLPBlock(5) for _ in range(3)]).double()
    with gradprobe.attach(net) as probe:
        y = net(x) ** 2
        (y.mean() if loss == "mean" else y.sum()).backward()
    return probe.frame()


@pytest.mark.parametrize("loss", ["mean", "sum"])
@pytest.mark.parametrize("world", [2, 4])
def test_pooled_parts_of_a_batch_equal_the_whole_batch(loss, world):
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    whole = _frame(x, loss)
    # each "rank" the frame of its part of the batch, its loss a mean (or sum) over that part
    parts = pd.concat([_frame(p, loss).assign(rank=r) for r, p in enumerate(x.chunk(world))])
    pooled = gradprobe.pool_ranks(parts, loss=loss)
    assert pooled[["step", "block", "index"]].equals(whole[["step", "block", "index"]])
    np.testing.assert_allclose(pooled[EXACT], whole[EXACT], rtol=1e-12)
    assert pooled[list(NOT_POOLED)].isna().all().all()


def test_a_nan_on_one_rank_leaves_the_pooled_value_nan_and_other_keys_are_kept():
    f = pd.DataFrame(
        {"model": ["a", "a", "b", "b"], "step": 0, "block": "x", "index": 0, "rank": [0, 1, 0, 1]}
        | {"grad_out": [1.0, np.nan, 3.0, 4.0], "in_rms": [1.0, 1.0, 1.0, 1.0]}
    )
    pooled = gradprobe.pool_ranks(f, loss="sum")
    assert pooled["model"].tolist() == ["a", "b"]
    assert np.isnan(pooled["grad_out"].iloc[0]) and pooled["grad_out"].iloc[1] == 5.0


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="rank column"):
        gradprobe.pool_ranks(pd.DataFrame({"step": [0], "block": ["b"]}))
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        gradprobe.pool_ranks(pd.DataFrame({"step": [0], "block": ["b"], "rank": [0]}), loss="avg")
