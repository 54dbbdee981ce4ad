"""Number formatting and plain-text tables, the same everywhere text shows a number.

The CLI's tables, the assertion messages of :mod:`gradprobe.testing`, the pytest
plugin's summary and the HTML report's summary table all format numbers with
:func:`number` and align text tables with :func:`table`, so one value reads the
same in the terminal and in the report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["frame_table", "number", "percent", "table"]

#: Columns of a frame that :func:`frame_table` shows as text, left-aligned.
TEXT_COLUMNS: frozenset[str] = frozenset({"model", "block", "class", "run", "stack"})


def number(value: Any, digits: int = 3, *, nan: str = "-") -> str:
    """``value`` to ``digits`` significant digits in [1e-3, 1e4), scientific notation (three) outside.

    Booleans read ``yes``/``no``, integers are written in full, NaN as ``nan``
    (a table's empty cell: ``-``), anything that is not a number as ``str(value)``.

    >>> [number(v) for v in (0.0, 1 / 3, 12345.0, 2e-5, float("nan"), float("inf"), 7, True, "a")]
    ['0', '0.333', '1.23e+04', '2.00e-05', '-', 'inf', '7', 'yes', 'a']
    >>> number(1 / 3, 4, nan="nan"), number(float("nan"), nan="nan")
    ('0.3333', 'nan')
    >>> number(2e-5, 4)
    '2.00e-05'
    """
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return nan
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e4:
        return f"{v:.{digits}g}"
    return f"{v:.2e}"


def percent(value: Any, *, nan: str = "-") -> str:
    """A fraction as a percentage with one decimal.

    >>> percent(0.9125), percent(float("nan"))
    ('91.2%', '-')
    """
    v = float(value)
    return nan if math.isnan(v) else f"{100 * v:.1f}%"


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: Sequence[bool],
    *,
    indent: str = "",
) -> list[str]:
    """Lines of an aligned text table: columns two spaces apart, ``right[i]`` right-aligns column ``i``.

    >>> print("\\n".join(table(["name", "n"], [["a", "1"], ["bcd", "10"]], [False, True])))
    name   n
    a      1
    bcd   10
    """
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return (indent + "  ".join(parts)).rstrip()

    return [line(headers)] + [line(r) for r in rows]


def frame_table(frame: pd.DataFrame, columns: Sequence[str], *, digits: int = 3) -> str:
    """Plain-text table of those ``columns`` that ``frame`` has: numbers by :func:`number`, NaN as '-'.

    >>> import pandas as pd
    >>> print(frame_table(pd.DataFrame({"model": ["a"], "gain": [0.5]}), ["model", "gain", "absent"]))
    model  gain
    a       0.5
    """
    cols = [c for c in columns if c in frame.columns]
    cells = [
        [str(v) if c in TEXT_COLUMNS else number(v, digits) for c, v in zip(cols, row, strict=True)]
        for row in frame[cols].itertuples(index=False, name=None)
    ]
    return "\n".join(table(cols, cells, [c not in TEXT_COLUMNS for c in cols]))
