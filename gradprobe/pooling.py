"""The ranks of a data-parallel run pooled into one row per (step, block): :func:`pool_ranks`.

Under DDP or FSDP each rank records the activation and gradient columns of its own part
of the global batch. When the ranks split one global batch into equal parts (as
``DistributedSampler`` does) and each rank's loss is the mean over its part, the pooled
row equals what one process records on the whole batch with the mean loss over it:

* ``grad_out``, ``grad_in``, ``branch_grad`` and ``skip_grad`` are norms over the batch:
  the root of the ranks' summed squares. Each rank's gradient is that of the mean over its
  own ``B / W`` samples, ``W`` times the gradient of the mean over all ``B``, so with
  ``loss="mean"`` the pooled norm is divided by ``W`` (the number of ranks in the frame);
  with ``loss="sum"`` (each rank's loss a sum, gradients summed) it is not.
* ``gain`` and ``cum_gain`` are ratios of pooled norms (the factor ``W`` cancels);
  ``branch_cos`` is the summed inner products over the pooled norms.
* ``in_rms`` and ``out_rms`` are the root of the ranks' mean square: exact for equal parts.
* ``res_ratio`` and ``cos_xy`` of a shape-preserving block (a row with ``skip_grad``
  recorded on every rank: there the reference ``r`` is the input ``x``) come from the
  ranks' ``|y - x|^2 = (res_ratio |x|)^2`` and ``<x, y> = cos_xy |x| |y|``, with ``|x|`` and
  ``|y|`` from ``in_rms`` and ``out_rms``: exact for equal parts. A block that changes shape
  compares ``y`` with its shortcut's output, whose norm a row does not keep: NaN there.
* ``param_norm``, ``param_grad_norm`` and ``update_ratio`` are the same on every rank
  (DDP keeps replicas; under FSDP2 the probe sums the shards): the first rank's value.
* The signal columns (:data:`NOT_POOLED`) are means over channels of per-channel moments
  (``mean_c (mean y_c)^2``); pooling them needs each rank's per-channel means, which a row
  does not keep (only ``chan_var + chan_mean_sq``, the mean square, would pool). The
  Jacobian columns are random estimates on each rank's own sub-batch: their pooled value
  would not be what one process estimates on the whole batch. NaN (read them per rank).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .records.schema import FRAME_COLUMNS, JACOBIAN_COLUMNS, SIGNAL_COLUMNS

if TYPE_CHECKING:
    import pandas as pd

#: Columns that the pooled frame leaves NaN: the rows of the ranks do not determine their
#: whole-batch values (see the module docstring).
NOT_POOLED: tuple[str, ...] = (*SIGNAL_COLUMNS, *JACOBIAN_COLUMNS)

_NORMS = ("grad_out", "grad_in", "branch_grad", "skip_grad")
_FIRST = ("index", "calls", "stack", "param_norm", "param_grad_norm", "update_ratio")


def pool_ranks(frame: pd.DataFrame, *, loss: Literal["mean", "sum"] = "mean") -> pd.DataFrame:
    """One row per (step, block) from the per-rank rows of a gathered frame (``rank`` column).

    ``loss``: how each rank's loss reduces over its samples (``"mean"``: divide the pooled
    gradient norms by the number of ranks, as DDP and FSDP average the gradients). The
    module docstring says what each column becomes; other key columns (``model``, ...) are
    kept as group keys.

    >>> import pandas as pd
    >>> f = pd.DataFrame({"step": [0, 0], "block": ["b", "b"], "index": 0, "rank": [0, 1],
    ...                   "grad_out": [3.0, 4.0], "in_rms": [1.0, 7.0 ** 0.5]})
    >>> row = pool_ranks(f).iloc[0]
    >>> float(row["grad_out"]), float(row["in_rms"])
    (2.5, 2.0)
    """
    import pandas as pd

    if "rank" not in frame.columns:
        raise ValueError(
            "pool_ranks needs a frame with a rank column: probe.frame(gather=True) under torch.distributed"
        )
    if loss not in ("mean", "sum"):
        raise ValueError(f"loss must be 'mean' or 'sum', not {loss!r}")
    world = int(frame["rank"].nunique())
    keys = [c for c in frame.columns if c not in FRAME_COLUMNS and c != "rank"] + ["step", "block"]
    f = frame.sort_values([*keys, "rank"], kind="stable").copy()

    def num(c: str) -> Any:
        return f[c].astype("float64") if c in f else pd.Series(np.nan, index=f.index)

    with np.errstate(all="ignore"):
        parts: dict[str, Any] = {f"sq_{c}": num(c) ** 2 for c in _NORMS}
        parts["dot"] = num("branch_cos") * num("branch_grad") * num("grad_out")
        parts["ms_in"], parts["ms_out"] = num("in_rms") ** 2, num("out_rms") ** 2
        # res_ratio and cos_xy compare y with x on shape-preserving blocks (skip_grad recorded):
        # |y - x|^2 and <x, y>, per element of x (the factor numel cancels for equal parts)
        same = num("skip_grad").notna()
        parts["ms_d"] = (num("res_ratio") ** 2 * parts["ms_in"]).where(same)
        parts["m_xy"] = (num("cos_xy") * num("in_rms") * num("out_rms")).where(same)
    grouped = f.assign(**parts).groupby(keys, sort=False, dropna=False)
    sums = grouped[[k for k in parts if k.startswith("sq_") or k == "dot"]].sum(min_count=1)
    # a NaN on any rank (a block without a gradient there) leaves the pooled value NaN
    nan_any = (
        f.assign(**{k: v.isna() for k, v in parts.items()})
        .groupby(keys, sort=False, dropna=False)[list(parts)]
        .any()
    )
    means = grouped[["ms_in", "ms_out", "ms_d", "m_xy"]].mean()
    out = grouped[[c for c in _FIRST if c in f]].first()
    scale = float(world) if loss == "mean" else 1.0
    with np.errstate(all="ignore"):
        for c in _NORMS:
            out[c] = np.sqrt(sums[f"sq_{c}"].where(~nan_any[f"sq_{c}"])) / scale
        out["gain"] = out["grad_in"] / out["grad_out"]
        dot = sums["dot"].where(~nan_any["dot"]) / (scale * scale)
        out["branch_cos"] = dot / (out["branch_grad"] * out["grad_out"])
        out["in_rms"] = np.sqrt(means["ms_in"].where(~nan_any["ms_in"]))
        out["out_rms"] = np.sqrt(means["ms_out"].where(~nan_any["ms_out"]))
        ms_in, ms_out = means["ms_in"].where(~nan_any["ms_in"]), means["ms_out"].where(~nan_any["ms_out"])
        out["res_ratio"] = np.sqrt(means["ms_d"].where(~nan_any["ms_d"]) / ms_in)
        out["cos_xy"] = means["m_xy"].where(~nan_any["m_xy"]) / np.sqrt(ms_in * ms_out)
    out = out.reset_index()
    if "stack" in out and "index" in out:
        # cum_gain: pooled grad_in over the pooled grad_out of the last block of the row's stack
        ends = out.sort_values("index", kind="stable").groupby([*keys[:-1], "stack"], dropna=False).tail(1)
        last = ends.set_index([*keys[:-1], "stack"])["grad_out"]
        idx = pd.MultiIndex.from_frame(out[[*keys[:-1], "stack"]])
        with np.errstate(all="ignore"):
            out["cum_gain"] = out["grad_in"].to_numpy() / last.reindex(idx).to_numpy()
    for c in FRAME_COLUMNS:
        if c not in out:
            out[c] = np.nan
    for c in NOT_POOLED:
        out[c] = np.nan
    extra = [c for c in keys if c not in FRAME_COLUMNS]
    order = [*extra, *FRAME_COLUMNS]
    return out[order].sort_values([*extra, "step", "index"], kind="stable").reset_index(drop=True)
