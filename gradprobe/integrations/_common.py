"""What the Lightning and Hugging Face callbacks share: one probe step per optimizer step,
the steps numbered as the trainer numbers them, live scalars, and the run and report at the end.

No framework is imported here; the framework modules only translate their hooks into
:meth:`Recorder.start`, :meth:`Recorder.close_step`, :meth:`Recorder.finish` and
:meth:`Recorder.abort`. :class:`CallbackOptions` is the constructor both callbacks share.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..export import LOG_COLUMNS, step_scalars

if TYPE_CHECKING:
    from torch import nn

    from ..probe import Probe, Schedule
    from ..records import Run


class Recorder:
    """The probe of one training run, driven by a framework callback."""

    def __init__(
        self,
        blocks: Any,
        every: int | Schedule,
        jacobian: bool | int,
        module: str | None,
        report_dir: str | os.PathLike[str] | None,
        log_columns: Sequence[str],
        log_every: int | None,
        attach_kwargs: dict[str, Any],
    ) -> None:
        if "auto_step" in attach_kwargs:
            raise ValueError(
                "auto_step cannot be set on a gradprobe callback: it steps the probe once per optimizer "
                "step itself (the micro-batches of gradient accumulation are pooled into one step)"
            )
        if isinstance(log_columns, str):
            log_columns = (log_columns,)
        from ..records import FRAME_COLUMNS

        unknown = [c for c in log_columns if c not in FRAME_COLUMNS]
        if unknown:
            raise ValueError(f"log_columns {unknown} are not frame columns; the columns: {FRAME_COLUMNS}")
        bad_every = isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1
        if log_every is not None and bad_every:
            raise ValueError(f"log_every must be a positive int or None (the trainer's), got {log_every!r}")
        self.blocks = blocks
        self.every = every
        self.jacobian = jacobian
        self.module = module
        self.report_dir = report_dir
        self.log_columns = tuple(log_columns)
        self.log_every = log_every
        self.attach_kwargs = attach_kwargs
        self.probe: Probe | None = None
        self.offset = 0  # trainer step of the probe's step 0 (non-zero when training resumes)
        self._offset_known = False
        self._last_logged: int | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, model: nn.Module) -> Probe:
        """Attach a fresh probe to ``model`` (or its submodule ``module``), explicit stepping."""
        from ..probe import attach

        self.abort()  # a probe left attached by an earlier run of this callback that failed
        target = model
        if self.module is not None:
            try:
                target = model.get_submodule(self.module)
            except AttributeError:
                names = [n for n, _ in model.named_children()]
                raise ValueError(
                    f"module={self.module!r}: {type(model).__name__} has no submodule of that name; "
                    f"its children are {names}"
                ) from None
        self.offset, self._offset_known, self._last_logged = 0, False, None
        kwargs = self.attach_kwargs
        self.probe = attach(
            target, self.blocks, every=self.every, jacobian=self.jacobian, auto_step=False, **kwargs
        )
        return self.probe

    def close_step(self, trainer_step: int, log_every: int | None) -> dict[str, float] | None:
        """Close the probe step of the optimizer step numbered ``trainer_step`` by the trainer.

        Returns the tags and values to log (``gradprobe/<column>/<block>`` and summaries),
        or None when this step is not due for logging or was not recorded.
        """
        probe = self.probe
        if probe is None or not probe.attached:
            return None
        if not self._offset_known:  # a resumed run starts at the trainer's step, not at 0
            self.offset, self._offset_known = trainer_step - probe.current_step, True
        probe.step()
        every = self.log_every or log_every
        if not every:
            return None
        rows = probe.last_rows()
        if not rows or rows[0]["step"] + self.offset != trainer_step:
            return None  # this step was not recorded (every=)
        # The trainers' own cadence: their step-N logs come after optimizer steps N-1, 2N-1, ...
        # (Lightning: (batches stepped + 1) % N == 0; Hugging Face: global_step % N == 0 after the
        # update), plus the first recorded step, the state at initialisation.
        if self._last_logged is not None and (trainer_step + 1) // every <= (self._last_logged + 1) // every:
            return None
        self._last_logged = trainer_step
        return step_scalars(rows, self.log_columns)

    def run(self, gather: bool) -> Run:
        """The recorded tables with the trainer's step numbers (every rank's rows on rank 0 with gather)."""
        from ..records import Run

        assert self.probe is not None
        frame = self.probe.frame(gather=gather)
        scalars = self.probe.scalars(gather=gather)
        if self.offset:
            frame["step"] += self.offset
            scalars["step"] += self.offset
        meta = {**self.probe.meta(), "step_offset": self.offset}
        return Run(frame, scalars, meta)

    def finish(
        self, default_dir: str | os.PathLike[str], *, write: bool, framework: str, gather: bool = True
    ) -> Path | None:
        """Detach, gather (a collective under torch.distributed) and, if ``write``, save the run and
        its HTML report into ``report_dir`` (default ``default_dir``); return the report's path."""
        if self.probe is None:
            return None
        try:
            run = self.run(gather)
        finally:
            self.probe.detach()
        self._check_jacobian(run)
        if not write:
            return None
        run.meta["framework"] = framework
        from ..reporting import report

        folder = Path(self.report_dir if self.report_dir is not None else default_dir)
        return report(run, folder, progress=False)

    def _check_jacobian(self, run: Run) -> None:
        """Say so when Jacobian columns were asked for and none came: the probe's second pass
        re-runs the module it is attached to, which the training step may never call as a whole."""
        frame = run.frame()
        if not self.jacobian or not len(frame) or "jac_fro" not in frame.columns:
            return
        if not frame["jac_fro"].notna().any():
            warnings.warn(
                "gradprobe: jacobian= was set but no step got Jacobian columns. They are taken when the "
                "module the probe is attached to runs as a whole; if the training step calls a submodule "
                "(self.net(x)) rather than the model itself, pass module='net' to the callback.",
                RuntimeWarning,
                stacklevel=3,
            )

    def abort(self, save_to: str | os.PathLike[str] | None = None) -> None:
        """Detach after an exception; with ``save_to``, keep what was recorded (tables only)."""
        probe, self.probe = self.probe, None
        if probe is None or not probe.attached:
            return
        try:
            probe.detach()
            if save_to is not None and len(probe.frame()):
                folder = Path(self.report_dir if self.report_dir is not None else save_to)
                self.probe = probe
                self.run(gather=False).save(folder)
        except Exception as exc:  # the user's exception is the one to see
            warnings.warn(
                f"gradprobe: could not save the partial run after the training error ({exc})",
                RuntimeWarning,
                stacklevel=2,
            )
        finally:
            self.probe = None


class CallbackOptions:
    """The options of both gradprobe callbacks (the one spelling of their signature), and the
    live probe. Framework classes derive from it and from the framework's callback class."""

    def __init__(
        self,
        blocks: Any = "auto",
        *,
        every: int | Schedule = 1,
        jacobian: bool | int = False,
        module: str | None = None,
        report_dir: str | os.PathLike[str] | None = None,
        log_columns: Sequence[str] = LOG_COLUMNS,
        log_every: int | None = None,
        **attach_kwargs: Any,
    ) -> None:
        super().__init__()
        self._rec = Recorder(
            blocks, every, jacobian, module, report_dir, log_columns, log_every, attach_kwargs
        )
        self.report: Path | None = None

    @property
    def probe(self) -> Probe | None:
        """The probe while training runs."""
        return self._rec.probe
