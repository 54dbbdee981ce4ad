"""The column schema of a run's tables, their glossary, and empty or row-built frames of it.

Every table gradprobe writes or reads has these columns: the block frame
(:data:`FRAME_COLUMNS`, one row per step and block), the scalars (one row per step) and
the path-length table (:data:`PATHS_COLUMNS`). :data:`GLOSSARY` says what each column
measures; the README's glossary and the HTML report show it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas is imported lazily so that ``import gradprobe`` stays light
    import pandas as pd

#: Identifying columns of the block frame, in order.
KEY_COLUMNS: tuple[str, ...] = ("step", "block", "index")

#: Gradient and identity metrics recorded by the probe engine (see ``metrics.py``).
METRIC_COLUMNS: tuple[str, ...] = (
    "grad_out",
    "grad_in",
    "gain",
    "cum_gain",
    "skip_grad",
    "branch_grad",
    "branch_cos",
    "res_ratio",
    "cos_xy",
    "in_rms",
    "out_rms",
    "param_norm",
    "param_grad_norm",
    "update_ratio",
)

#: Signal propagation columns (Brock et al. 2021; see ``metrics.py``): per-channel moments of the output.
SIGNAL_COLUMNS: tuple[str, ...] = ("chan_mean_sq", "chan_var", "branch_var")

#: Jacobian columns (see ``jacobian/estimate.py``); NaN on steps where they were not computed.
JACOBIAN_COLUMNS: tuple[str, ...] = ("jac_fro", "jac_spec", "jac_id", "prod_fro", "prod_spec", "jac_batch")

#: Book-keeping columns: how many calls of the block were pooled into the row, and the
#: chain of blocks (``stack``) that ``cum_gain``, ``prod_fro`` and ``prod_spec`` run along.
EXTRA_COLUMNS: tuple[str, ...] = ("calls", "stack")

#: Every column of ``Probe.frame()``, in order.
FRAME_COLUMNS: tuple[str, ...] = (
    KEY_COLUMNS + EXTRA_COLUMNS + METRIC_COLUMNS + SIGNAL_COLUMNS + JACOBIAN_COLUMNS
)

#: Columns that the runner adds when several models are gathered in one :class:`Run`.
MODEL_COLUMNS: tuple[str, ...] = ("model", "depth", "residual")


class RunFormatError(ValueError):
    """A run folder (its ``meta.json``, a table or a chunk) that gradprobe cannot trust: the message
    is one line naming the file and what is wrong with it."""


# Version of a run folder's layout, stored in its meta.json. 2: meta.json holds ``run_id``,
# the path-length table is saved as paths.parquet|csv.
FORMAT_VERSION = 2


#: One line per column: what it measures. The README's glossary and the HTML report show these.
#: The formulas live in ``metrics.py`` (gradient/identity columns) and ``jacobian/estimate.py``.
GLOSSARY: dict[str, str] = {
    "step": "training step (each backward pass, or each explicit probe.step()); only recorded steps appear",
    "block": "qualified module name of the block, as in model.named_modules()",
    "index": "forward order of the block, 0 = nearest the input",
    "calls": "calls of the block pooled into the row (weight sharing, gradient accumulation)",
    "stack": "the chain of blocks this block belongs to (each block's input computed from the previous "
    "one's output; an encoder and a decoder are two stacks); products run to the stack's last block",
    "grad_out": "|dL/dy|: Euclidean norm of the loss gradient at the block output, over the whole batch",
    "grad_in": "|dL/dx|: norm of the loss gradient at the block input, through this block's output y "
    "only (not through its other outputs, such as an auxiliary loss)",
    "gain": "grad_in / grad_out: how much the block amplifies (>1) or shrinks (<1) the gradient",
    "cum_gain": "grad_in of this block / grad_out of the last block of its stack: how much the gradient "
    "grew (>1) or shrank (<1) from the stack's output back to this block's input (a ratio of two measured "
    "norms, not the product of the gain column)",
    "skip_grad": "|g_y|: gradient carried by the identity path (the gradient highway); NaN if shapes change",
    "branch_grad": "|g_x - g_y| = |(dF/dx)^T g_y|: gradient carried by the learned branch F; "
    "NaN if shapes change",
    "branch_cos": "cosine between the skip gradient g_y and the branch gradient g_x - g_y",
    "res_ratio": "|y - x| / |x| (|y - s(x)| / |s(x)| with a shortcut s): forward distance from the identity",
    "cos_xy": "cosine between block input x (or shortcut output) and output y",
    "in_rms": "root mean square of the block input x",
    "out_rms": "root mean square of the block output y (layer response, He et al. 2016, Fig. 7)",
    "param_norm": "norm of the block's own parameters",
    "param_grad_norm": "norm of the gradient of the block's own parameters",
    "update_ratio": "|parameter change since the previous recorded step| / |parameters|",
    "chan_mean_sq": "mean over channels of the squared per-channel mean of the block output y (channel: "
    "dim 1 of 4-d outputs, the last dim of 2-d/3-d ones; mean over batch and positions); Brock et al. 2021",
    "chan_var": "mean over channels of the per-channel variance of y (population, ddof=0); "
    "chan_var + chan_mean_sq is the mean squared activation",
    "branch_var": "mean per-channel variance of y - x (y - s(x) with a shortcut s): the residual branch's "
    "output; NaN when shapes change without a known shortcut",
    "jac_fro": "|J|_F / sqrt(n): RMS singular value of the block Jacobian J = dy/dx (Hutchinson estimate)",
    "jac_spec": "largest singular value of the block Jacobian",
    "jac_id": "|J - I|_F / sqrt(n): RMS of dF/dx, the block's distance from identity as a linear map",
    "prod_fro": "RMS singular value of the product of block Jacobians from this block's input to the "
    "output of the last block of its stack",
    "prod_spec": "largest singular value of that product",
    "jac_batch": "samples (leading dimension of the block input) the Jacobian columns were taken on: "
    "the sub-batch during training, the whole batch otherwise",
}


#: Columns of a paths table (``probe.paths_frame()``, ``Run.paths()``); see ``gradprobe/path_lengths.py``.
PATHS_COLUMNS: tuple[str, ...] = (
    "step",
    "stack",
    "length",
    "path_grad",
    "share",
    "n_paths",
    "per_path",
    "cum_share",
)


#: Float columns of the block frame, in stored order (everything after the keys and ``calls``).
VALUE_COLUMNS: tuple[str, ...] = METRIC_COLUMNS + SIGNAL_COLUMNS + JACOBIAN_COLUMNS


def has_parquet() -> bool:
    """Whether pyarrow is importable, so runs are stored as Parquet rather than CSV."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def empty_frame() -> pd.DataFrame:
    """An empty block frame with every column of the schema and its dtype."""
    import pandas as pd

    frame = pd.DataFrame({c: pd.Series(dtype="float64") for c in FRAME_COLUMNS})
    return frame.astype(
        {"step": "int64", "block": "object", "index": "int64", "calls": "int64", "stack": "object"}
    )


def rows_to_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Build a block frame from row dicts, filling absent metrics with NaN.

    >>> float(rows_to_frame([{"step": 0, "block": "b", "index": 0, "calls": 1, "gain": 0.5}])["gain"].iloc[0])
    0.5
    """
    import pandas as pd

    rows = list(rows)
    if not rows:
        return empty_frame()
    frame = pd.DataFrame.from_records(rows)
    extra = [c for c in frame.columns if c not in FRAME_COLUMNS]
    for c in FRAME_COLUMNS:
        if c not in frame.columns:
            # rows without a stack (older runs, hand-made frames) are one chain
            frame[c] = "" if c == "stack" else math.nan
    frame = frame[list(FRAME_COLUMNS) + extra]
    return frame.astype({"step": "int64", "index": "int64", "calls": "int64"})


def paths_table(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate path-length frames; an empty table with the columns when there are none.

    >>> list(paths_table([]).columns)[:3]
    ['step', 'stack', 'length']
    """
    import pandas as pd

    parts = [p for p in parts if len(p)]
    if not parts:
        frame = pd.DataFrame({c: pd.Series(dtype="float64") for c in PATHS_COLUMNS})
        return frame.astype({"step": "int64", "stack": "object", "length": "int64"})
    return pd.concat(parts, ignore_index=True)


def _empty_scalars() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({"step": pd.Series(dtype="int64")})


def _dtypes(frame: pd.DataFrame) -> dict[str, str]:
    return {str(c): str(t) for c, t in frame.dtypes.items()}
