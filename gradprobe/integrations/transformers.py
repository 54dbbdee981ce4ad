"""A Hugging Face ``Trainer`` callback that probes the blocks of the model while it trains.

>>> from gradprobe.integrations.transformers import GradprobeCallback
>>> cb = GradprobeCallback(log_every=10)   # Trainer(model, args, ..., callbacks=[cb])

``pip install 'gradprobe[transformers]'`` installs what it needs.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

from ._common import CallbackOptions

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler
except ImportError as exc:
    raise ImportError(
        "gradprobe.integrations.transformers needs transformers: pip install 'gradprobe[transformers]'"
    ) from exc


def _find_handler(callback: Any) -> Any:
    """The ``CallbackHandler`` that is calling ``callback`` now (it dispatches every event).

    Callbacks are not given the trainer or its handler; the handler is the ``self`` of the
    frame that called us. It is needed to send the probe's scalars to the ``report_to``
    integrations as a log event of their own.
    """
    frame: FrameType | None = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, CallbackHandler) and any(c is callback for c in candidate.callbacks):
            return candidate
        frame = frame.f_back
    return None


def _integration_types() -> tuple[type, ...]:
    """The callback classes of the report_to integrations (TensorBoard, W&B, MLflow, ...)."""
    from transformers import integrations

    mapping = getattr(integrations, "INTEGRATION_TO_CALLBACK", {})
    return tuple({cls for cls in mapping.values() if isinstance(cls, type)})


class GradprobeCallback(CallbackOptions, TrainerCallback):
    """Probe the blocks of the model that a Hugging Face ``Trainer`` trains.

    * At train begin a probe is attached to the model the trainer passes in, or to its
      submodule named ``module`` (``blocks``, ``every``, ``jacobian`` and ``attach_kwargs`` go to
      :func:`gradprobe.attach`).
    * One probe step per optimizer step, closed in ``on_step_end``: the micro-batches of
      ``gradient_accumulation_steps`` are pooled into it (``calls``), and its ``step`` column is
      ``state.global_step`` while the step's micro-batches ran (0, 1, ...: the optimizer steps
      taken before it).
    * At the first step and every ``log_every`` steps (default ``args.logging_steps``, at the
      Trainer's cadence; none unless ``logging_strategy="steps"``) the latest recorded step
      is sent as a log event to the
      integrations of ``report_to`` (TensorBoard, W&B, MLflow, ...):
      ``gradprobe/<column>/<block>`` for each of ``log_columns`` and the summaries
      ``gradprobe/summary/min_gain``, ``max_gain``, ``first_cum_gain`` and ``max_res_ratio``.
      Like every training log of the Trainer it is stamped with ``state.global_step`` after the
      update, one more than the frame's ``step`` (the loss of the same batch has that stamp too);
      the TensorBoard integration prefixes ``train/``. The console progress bar does not print them.
    * At train end the run and its HTML report are written into ``report_dir`` (default
      ``<args.output_dir>/gradprobe``); in distributed training every rank's rows are
      gathered (each keeps its ``rank``) and the main process writes.
    * Evaluation runs without gradients and is not recorded. Should ``train()`` raise, the
      probe stays attached until ``callback.detach()`` or the next ``train()``.
    """

    _handler: Any = None  # the Trainer's CallbackHandler, found at train begin

    def detach(self) -> None:
        """Remove the probe's hooks (after a failed ``train()``); safe to call at any time."""
        self._rec.abort()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("GradprobeCallback: the Trainer passed no model to on_train_begin")
        self.report = None
        self._handler = _find_handler(self)
        if self._handler is None:
            warnings.warn(
                "gradprobe: could not find the Trainer's callback handler; the probe's scalars will not "
                "reach the report_to integrations (they are in the run written at train end)",
                RuntimeWarning,
                stacklevel=2,
            )
        self._rec.start(model)

    def _log_every(self, args: Any, state: Any) -> int:
        strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
        if strategy != "steps":
            return 0
        steps = args.logging_steps
        if steps < 1:  # a ratio of the total number of steps
            return max(1, int(-(-state.max_steps * steps // 1)))
        return int(steps)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # global_step has just been incremented: the step that ends is global_step - 1
        tags = self._rec.close_step(int(state.global_step) - 1, self._log_every(args, state))
        if tags and self._handler is not None:
            targets = _integration_types()
            handler = self._handler
            for callback in handler.callbacks:
                if isinstance(callback, targets):
                    callback.on_log(  # type: ignore[attr-defined]
                        args,
                        state,
                        control,
                        logs=dict(tags),
                        model=handler.model,
                        processing_class=getattr(handler, "processing_class", None),
                        optimizer=handler.optimizer,
                        lr_scheduler=handler.lr_scheduler,
                        train_dataloader=handler.train_dataloader,
                        eval_dataloader=handler.eval_dataloader,
                    )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._rec.probe is None:
            return
        default = Path(args.output_dir) / "gradprobe"
        self.report = self._rec.finish(
            default, write=bool(state.is_world_process_zero), framework="transformers"
        )
        self._rec.probe = None
        self._handler = None


__all__ = ["GradprobeCallback"]
