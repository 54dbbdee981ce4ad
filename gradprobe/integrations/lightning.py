"""A PyTorch Lightning callback that probes the blocks of a LightningModule while it trains.

>>> from gradprobe.integrations.lightning import GradprobeCallback
>>> cb = GradprobeCallback(module="net", log_every=10)   # trainer = Trainer(callbacks=[cb])

Works with the ``lightning`` package (``lightning.pytorch``) and with ``pytorch_lightning``;
install one with ``pip install 'gradprobe[lightning]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import CallbackOptions


def _callback_bases() -> tuple[type, ...]:
    """Lightning's Callback class of every Lightning package that imports.

    The callback derives from both when both are installed, so a ``lightning.pytorch``
    Trainer and a ``pytorch_lightning`` Trainer each accept it.
    """
    bases: list[type] = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            module = __import__(name, fromlist=["Callback"])
        except ImportError:
            continue
        if module.Callback not in bases:  # one package may re-export the other's class
            bases.append(module.Callback)
    if not bases:
        raise ImportError(
            "gradprobe.integrations.lightning needs PyTorch Lightning: pip install 'gradprobe[lightning]' "
            "(either the lightning or the pytorch-lightning package)"
        )
    return tuple(bases)


class _GradprobeLightning(CallbackOptions):
    """Probe the blocks of a LightningModule while ``Trainer.fit`` trains it.

    * At fit start a probe is attached to the LightningModule, or to its submodule named
      ``module`` (``blocks``, ``every``, ``jacobian`` and ``attach_kwargs`` go to
      :func:`gradprobe.attach`). Jacobian columns need the module that ``training_step``
      calls as a whole: with ``return self.net(x)``-style steps pass ``module="net"`` (a
      warning at fit end says so when none were recorded). ``every`` counts from the first
      step of this fit.
    * One probe step per optimizer step: it is closed in ``on_before_optimizer_step``, after
      the last backward pass of the step, so the micro-batches of gradient accumulation are
      pooled into it (``calls`` = ``accumulate_grad_batches``), and its ``step`` column is
      ``trainer.global_step`` at that moment (the optimizer steps taken before it: 0, 1, ...;
      a resumed run goes on from its checkpoint's step).
    * At the first step and every ``log_every`` steps (default: the trainer's
      ``log_every_n_steps``, at its cadence: after steps N-1, 2N-1, ...) the latest recorded
      step goes to every logger of the trainer: ``gradprobe/<column>/<block>`` for
      each of ``log_columns`` and the summaries ``gradprobe/summary/min_gain``, ``max_gain``,
      ``first_cum_gain`` and ``max_res_ratio``.
    * At fit end the run and its HTML report are written into ``report_dir`` (default
      ``<trainer.log_dir>/gradprobe``). Under DDP every rank's rows are gathered (each keeps its
      ``rank``) and rank 0 writes.
    * Validation, test and sanity-check loops run without gradients and are not recorded. On
      an exception or a keyboard interrupt the probe detaches; outside DDP the rows recorded so
      far are saved (tables only) into the report folder.

    ``callback.probe`` is the live probe during training (None before and after); ``report``
    is the path of the written report.
    """

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.report = None
        self._rec.start(pl_module)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not trainer.training:
            return
        tags = self._rec.close_step(int(trainer.global_step), int(trainer.log_every_n_steps or 0))
        if tags:
            for logger in trainer.loggers:
                logger.log_metrics(tags, step=int(trainer.global_step))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._rec.probe is None:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        default = Path(log_dir if log_dir is not None else trainer.default_root_dir) / "gradprobe"
        self.report = self._rec.finish(default, write=bool(trainer.is_global_zero), framework="lightning")
        self._rec.probe = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Under DDP the other ranks may be gone: no gather, nothing saved, only detach.
        save_to = None
        if int(getattr(trainer, "world_size", 1) or 1) == 1:
            logger = trainer.loggers[0] if trainer.loggers else None
            save_to = Path(getattr(logger, "log_dir", None) or trainer.default_root_dir) / "gradprobe"
        self._rec.abort(save_to=save_to)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._rec.probe is not None and self._rec.probe.attached:
            self._rec.probe.detach()
        self._rec.probe = None


GradprobeCallback = type(
    "GradprobeCallback",
    (_GradprobeLightning, *_callback_bases()),
    {"__module__": __name__, "__doc__": _GradprobeLightning.__doc__},
)

__all__ = ["GradprobeCallback"]
