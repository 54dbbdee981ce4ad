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
    "res_ratio",
    "cos_xy",
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


def test_res_ratio_and_cos_xy_pool_on_shape_preserving_blocks_and_are_nan_where_a_shortcut_changes_shape():
    from nets import make, make_input

    net = make("res_cnn").eval()  # BatchNorm on running statistics: each sample on its own
    x = make_input("res_cnn", batch=8)

    def frame(batch: torch.Tensor) -> pd.DataFrame:
        with gradprobe.attach(net, record_eval=True) as probe:
            net(batch).pow(2).mean().backward()
        net.zero_grad()
        return probe.frame()

    whole = frame(x)
    pooled = gradprobe.pool_ranks(pd.concat([frame(p).assign(rank=r) for r, p in enumerate(x.chunk(2))]))
    changes = whole["skip_grad"].isna()  # layer2.0: a projection shortcut, y compared with its output
    assert whole.loc[changes, "block"].tolist() == ["layer2.0"] and whole["res_ratio"].notna().all()
    cols = ["res_ratio", "cos_xy"]
    np.testing.assert_allclose(pooled.loc[~changes, cols], whole.loc[~changes, cols], rtol=1e-12)
    assert pooled.loc[changes, cols].isna().all().all()


class _Elementwise(nn.Module):
    """y = x + tanh(x): every channel alike, so swapping channels changes no statistic of a row."""

    def forward(self, x):
        return x + torch.tanh(x)


def test_the_ranks_rows_do_not_determine_the_pooled_signal_columns():
    # Rank 1's part of the batch with its two channels swapped: every column of every rank's
    # rows stays the same, but the whole batch's per-channel means, and so its signal
    # columns, change. No function of the rows can pool them (NOT_POOLED).
    net = nn.Sequential(_Elementwise(), _Elementwise())
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(4, 2, generator=g, dtype=torch.float64) + torch.tensor([1.0, -1.0], dtype=torch.float64)
    x1 = torch.randn(4, 2, generator=g, dtype=torch.float64)

    def frame(batch: torch.Tensor) -> pd.DataFrame:
        with gradprobe.attach(net, blocks=["0", "1"]) as probe:
            net(batch.clone().requires_grad_()).pow(2).mean().backward()  # no parameters: x needs grad
        return probe.frame()

    pd.testing.assert_frame_equal(frame(x1), frame(x1.flip(-1)), rtol=1e-12)
    signal = ["chan_mean_sq", "chan_var", "branch_var"]
    assert set(signal) <= set(NOT_POOLED)
    a = frame(torch.cat([x0, x1]))[signal].to_numpy()
    b = frame(torch.cat([x0, x1.flip(-1)]))[signal].to_numpy()
    assert (np.abs(a - b) > 1e-3 * np.abs(a)).all()
