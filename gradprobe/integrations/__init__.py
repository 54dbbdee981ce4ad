"""Callbacks for the trainers people already use; each imports its framework only when imported.

* :mod:`gradprobe.integrations.lightning`: ``GradprobeCallback`` for PyTorch Lightning
  (``pip install 'gradprobe[lightning]'``);
* :mod:`gradprobe.integrations.transformers`: ``GradprobeCallback`` for the Hugging Face
  ``Trainer`` (``pip install 'gradprobe[transformers]'``).

Both take the same options, step the probe once per optimizer step (micro-batches of
gradient accumulation pooled into it, ``step`` numbered as the trainer numbers optimizer
steps), log ``gradprobe/<column>/<block>`` scalars through the trainer's own loggers,
and write the run and its HTML report when training ends. For accelerate, see the
README: call ``probe.step()`` when ``accelerator.sync_gradients`` is true.
"""
