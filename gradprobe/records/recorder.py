"""Where a probe's closed steps go (memory or a sink), and the tables it reads back."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .run import Run
from .schema import paths_table
from .sink import Sink
from .store import RowStore

if TYPE_CHECKING:
    import pandas as pd


class RecordedTables:
    """The tables a probe has recorded so far, read back through its :class:`Recorder` ``_out``.

    A base of :class:`gradprobe.Probe`: each view first closes a finished step (``_flush``).
    """

    _out: Recorder

    def _flush(self) -> None:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        raise NotImplementedError

    def last_rows(self) -> list[dict[str, Any]]:
        """The rows of the latest recorded step that has closed, one dict per block (for live logging).

        Closes a finished step first, as :meth:`frame` does; empty before the first recorded step
        closes. Cheap (no DataFrame), so a training-loop callback can call it on every step.

        >>> import torch, torch.nn as nn, gradprobe
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> with gradprobe.attach(net, ["0", "1"]) as probe:
        ...     net(torch.randn(2, 4)).sum().backward()
        ...     [(r["step"], r["block"]) for r in probe.last_rows()]
        [(0, '0'), (0, '1')]
        """
        self._flush()
        return [dict(row) for row in self._out.last_rows]

    def frame(self, gather: bool = False) -> pd.DataFrame:
        """One row per (recorded step, block), columns as in :data:`gradprobe.records.FRAME_COLUMNS`.

        Under ``torch.distributed`` a ``rank`` column is added; ``gather=True`` returns
        every rank's rows on rank 0 (a collective: call it on every rank; other ranks
        get their own rows).
        """
        self._flush()
        return rank_view(self._out.frame(), gather)

    def scalars(self, gather: bool = False) -> pd.DataFrame:
        """One row per step with the logged scalars (every step, recorded or not)."""
        self._flush()
        return rank_view(self._out.scalars(), gather)

    def paths_frame(self) -> pd.DataFrame:
        """The path-length decompositions of ``attach(..., paths=N)``: one row per (step, stack,
        length), columns ``step`` and those of :func:`gradprobe.paths`; empty without ``paths=``."""
        self._flush()
        return self._out.paths()

    def run(self) -> Run:
        """The recorded tables as a :class:`gradprobe.records.Run`."""
        paths = self.paths_frame() if self._out.paths_on else None
        return Run(self.frame(), self.scalars(), self.meta(), paths=paths)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> os.PathLike[str]:
        """Save frame, scalars and metadata into the folder ``path``; read back with ``gradprobe.load``.

        Saving again updates the folder; a folder holding another run needs ``overwrite=True``.
        """
        return self.run().save(path, overwrite=overwrite)


class Recorder:
    """Where a probe's closed steps go, and how they are read back as frames.

    Rows and scalars go into memory (a :class:`RowStore`) or, given a ``sink``, stream into
    its folder; ``meta()`` is called whenever the sink's metadata must be current.
    """

    def __init__(self, sink: Sink | None, meta: Callable[[], dict[str, Any]], paths: bool = False) -> None:
        self.sink = sink
        self.paths_on = paths  # whether path-length decompositions are taken (a run has their table)
        self.store = RowStore()
        self._meta = meta
        self._scalar_rows: list[dict[str, Any]] = []
        self.last_rows: list[dict[str, Any]] = []  # of the latest recorded step
        self.paths_parts: list[pd.DataFrame] = []

    def add_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """The scalars logged in ``step`` (kept for every step, recorded or not)."""
        if self.sink is not None:
            self.sink.append_scalars({"step": step, **scalars})
        else:
            self._scalar_rows.append({"step": step, **scalars})

    def add_rows(self, rows: list[dict[str, Any]]) -> None:
        """The rows of one recorded step."""
        self.last_rows = rows
        (self.sink or self.store).append(rows)

    def end_step(self) -> None:
        """A step closed: its rows and scalars reach the sink as one unit."""
        if self.sink is not None:
            self.sink.end_step()

    def _streamed(self) -> Run | None:
        """With a sink: write what is buffered and read the run back (what is on disk plus what
        a failing disk left in memory)."""
        if self.sink is None:
            return None
        self.sink.meta = self._meta()
        if self.paths_parts:
            self.sink.write_paths(self.paths())
        return self.sink.run()

    def frame(self) -> pd.DataFrame:
        """The recorded rows (see :meth:`gradprobe.Probe.frame`)."""
        streamed = self._streamed()
        return streamed.frame() if streamed is not None else self.store.frame()

    def scalars(self) -> pd.DataFrame:
        """The logged scalars, one row per step."""
        import pandas as pd

        streamed = self._streamed()
        if streamed is not None:
            return streamed.scalars()
        frame = (
            pd.DataFrame.from_records(self._scalar_rows) if self._scalar_rows else pd.DataFrame({"step": []})
        )
        return frame.astype({"step": "int64"})

    def paths(self) -> pd.DataFrame:
        """The path-length decompositions taken so far."""
        return paths_table(self.paths_parts)

    def close(self) -> None:
        """Write what is left and close the sink (never raises: a sink that cannot write warns)."""
        if self.sink is not None and not self.sink.closed:
            if self.paths_parts:
                self.sink.write_paths(self.paths())
            self.sink.meta = self._meta()
            self.sink.close()


def rank_view(frame: pd.DataFrame, gather: bool) -> pd.DataFrame:
    """Under ``torch.distributed``: the frame with a ``rank`` column; ``gather=True`` returns
    every rank's rows on rank 0 (a collective: call it on every rank). Else the frame as is."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return frame
    frame = frame.assign(rank=dist.get_rank())
    if not gather:
        return frame
    import pandas as pd

    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(frame, parts, dst=0)
    if parts is None:
        return frame
    return pd.concat(parts, ignore_index=True)
