"""Integrations with training frameworks: each module imports its framework, so import only the one
you use.

* :mod:`batchless.integrations.lightning`: the implicit NLL weighted like Lightning weights the loss
  (``accumulate_grad_batches``, mixed precision's GradScaler); every ``lightning.pytorch.Trainer``
  gets it.
"""
