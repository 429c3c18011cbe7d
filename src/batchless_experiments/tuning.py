"""The fair protocol's learning rate: a small grid per (norm, batch size) cell, chosen on validation accuracy.

Every norm and batch size trains at its own best learning rate, so that no method is judged at a step size
tuned for another. A cell's grid is ``factors`` (e.g. 1/3, 1, 3) times a centre that follows the batch size
by the usual scaling rules from ``lr`` at batch size 64: the square root for Adam and AdamW (Malladi et al.
2022, "On the SDEs and scaling rules for adaptive gradient algorithms"), linear for SGD. The first seed (or
the first few: ``sweep --choose-seeds``) trains at every grid value; the value with the best final-epoch
validation accuracy, averaged over those seeds, is then trained with the other seeds, and only that value's
runs are reported (on the test set, which the choice never sees). A
choice at either end of the grid may not bracket the optimum: the sweep then tries a value one grid step
beyond it (:func:`beyond`, ``--extend-grid`` times at most), and a choice still at an end is flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

REFERENCE_BATCH = 64


def centre(lr: float, batch_size: int, optimizer: str) -> float:
    """``lr`` scaled from batch size 64 to ``batch_size`` (square root; linear for SGD)."""
    return lr * (batch_size / REFERENCE_BATCH) ** (1.0 if optimizer == "sgd" else 0.5)


def grid(lr: float, batch_size: int, optimizer: str, factors: list[float]) -> list[float]:
    """The learning rates of a cell, rounded to 3 significant digits (they become part of the cell's key)."""
    c = centre(lr, batch_size, optimizer)
    return sorted({float(f"{c * f:.3g}") for f in factors})


def beyond(rates: list[float], end: float) -> float:
    """The learning rate one grid step past ``end``, the smallest or largest of ``rates`` (sorted, >= 2 of
    them, equally spaced in log scale), rounded like :func:`grid`."""
    step = rates[1] / rates[0]
    return float(f"{end * step if end == rates[-1] else end / step:.3g}")


@dataclass(frozen=True)
class Choice:
    lr: float
    edge: bool  # the smallest or largest of several values: the grid may not bracket the optimum
    tried: int  # how many learning rates were compared


def choose(val_acc: dict[float, dict[int, float]]) -> Choice:
    """The learning rate with the best mean validation accuracy over the seeds that every learning rate has
    (``val_acc[lr][seed]``); a NaN (diverged run) counts as the worst. Ties go to the smaller rate."""
    if not val_acc:
        raise ValueError("no runs to choose a learning rate from")
    common = set.intersection(*(set(runs) for runs in val_acc.values()))
    if not common:
        raise ValueError(f"the learning rates {sorted(val_acc)} share no seed; cannot compare them")

    def score(lr: float) -> float:
        values = [val_acc[lr][s] for s in common]
        return -math.inf if any(math.isnan(v) for v in values) else sum(values) / len(values)

    rates = sorted(val_acc)
    best = max(rates, key=lambda lr: (score(lr), -lr))
    return Choice(best, len(rates) > 1 and best in (rates[0], rates[-1]), len(rates))
