"""Jacobian columns, the side-effect-free sub-batch pass, and ``spectrum``.

* :mod:`.estimate`: Hutchinson and Lanczos estimates of ``jac_fro``, ``jac_spec``,
  ``jac_id``, ``prod_fro`` and ``prod_spec`` on the live forward graph
  (:func:`jacobian_columns`);
* :mod:`.rerun`: the training call re-run on a slice of its batch without touching the
  model, the RNG or ``.grad`` (:func:`sub_batch_captures`, :func:`sub_batch_forward`);
* :mod:`.spectrum`: the singular values between two blocks (:func:`spectrum`);
* :mod:`.schedule`: during training, which steps get the Jacobian columns and the path
  decomposition, on the sub-batch or the whole batch (used by the probe).

Blocks are captured by :mod:`gradprobe.capture` (:class:`BlockCapture`,
:func:`capture_blocks`), the one rule the probe uses too. Definitions, knobs, accuracy
and cost are in the README ("One-shot analysis, Jacobians and spectra").
"""

from __future__ import annotations

from ..capture import BlockCapture, capture_blocks
from .estimate import ACCURATE_SPECTRA, jacobian_columns
from .rerun import batch_size, differentiable_twice, sub_batch_captures, sub_batch_forward
from .spectrum import MAX_DENSE_ENTRIES, dense_jacobian, spectrum

__all__ = [
    "ACCURATE_SPECTRA",
    "MAX_DENSE_ENTRIES",
    "BlockCapture",
    "batch_size",
    "capture_blocks",
    "dense_jacobian",
    "differentiable_twice",
    "jacobian_columns",
    "spectrum",
    "sub_batch_captures",
    "sub_batch_forward",
]
