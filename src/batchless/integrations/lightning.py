"""Lightning: the implicit NLL weighted like the Trainer weights the loss, with no change to your
code.

In ``nll="implicit"`` mode each training forward contributes its NLL gradient to ``mean``/``std``
with weight 1, whatever the loop does to the loss (:mod:`batchless.weighting`). Lightning's
automatic optimization divides every training step's loss by ``accumulate_grad_batches``, and under
``precision="16-mixed"`` scales it by its ``GradScaler`` before backward (and the gradients back in
``unscale_``): without a matching weight the statistics would get ``accumulate_grad_batches`` times
the gradient of the same batch in a plain loop, and under a GradScaler ``1 / scale`` times it.
:class:`NLLWeight` runs each training batch inside :func:`batchless.nll_weight` with the same
factors.

batchless registers it through Lightning's entry point for external callbacks
(``lightning.pytorch.callbacks_factory``), so every ``lightning.pytorch.Trainer`` has it in
``trainer.callbacks`` (Lightning logs "Adding 1 callbacks from entry point 'batchless'"); passing it
in ``callbacks=`` too changes nothing (one instance acts). Do not also wrap ``training_step`` in
``batchless.nll_weight``: the weights would multiply.
"""

from __future__ import annotations

import contextlib

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info

from ..loss import batchless_layers
from ..weighting import nll_weight


class NLLWeight(Callback):
    """Weight the implicit NLL of each training batch as Lightning weights that batch's loss.

    The weight is ``1 / trainer.accumulate_grad_batches`` under automatic optimization (Lightning
    divides the loss by it; manual optimization leaves the loss to you) times the precision plugin's
    ``GradScaler``, if it has one (``precision="16-mixed"`` on CUDA: ``manual_backward`` and
    automatic optimization both scale the loss by it; the scale is read at backward time). Layers
    with ``nll="explicit"`` need nothing: their NLL is part of the loss that Lightning scales. In
    manual optimization, if you divide the loss yourself, wrap the forward in
    ``batchless.nll_weight`` with the same factor.

    Example::

        trainer = lightning.pytorch.Trainer(accumulate_grad_batches=4)  # has NLLWeight already
        trainer = lightning.pytorch.Trainer(callbacks=[NLLWeight()])  # the same, explicitly
    """

    def __init__(self) -> None:
        self._blocks = contextlib.ExitStack()

    def _in_charge(self, trainer) -> bool:
        """Whether this is the first NLLWeight of the trainer (the entry point's and the user's
        would multiply)."""
        return next((cb for cb in trainer.callbacks if isinstance(cb, NLLWeight)), self) is self

    @staticmethod
    def _factors(trainer) -> list[tuple[object, str]]:
        """What Lightning multiplies each training batch's loss by (a number, a GradScaler), with a
        description."""
        automatic = trainer.lightning_module.automatic_optimization
        k = trainer.accumulate_grad_batches if automatic else 1
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return (([(1 / k, f"1/{k} (accumulate_grad_batches)")] if k != 1 else [])
                + ([(scaler, "the GradScaler's scale")] if scaler is not None else []))

    def on_fit_start(self, trainer, pl_module) -> None:
        factors = self._factors(trainer)
        if factors and self._in_charge(trainer) and any(True for _ in batchless_layers(pl_module)):
            rank_zero_info(f"batchless: the implicit NLL of each training batch is weighted "
                           f"{' x '.join(words for _, words in factors)}, like the loss "
                           "(batchless.integrations.lightning.NLLWeight)")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # (a batch that the module's on_train_batch_start cut short had no on_train_batch_end)
        self._blocks.close()
        if self._in_charge(trainer):
            for factor, _ in self._factors(trainer):
                self._blocks.enter_context(nll_weight(factor))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._blocks.close()

    def on_train_end(self, trainer, pl_module) -> None:
        self._blocks.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._blocks.close()


def callbacks() -> list[Callback]:
    """The callbacks every Trainer gets (Lightning's ``lightning.pytorch.callbacks_factory`` entry
    point)."""
    return [NLLWeight()]
