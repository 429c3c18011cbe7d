"""batchless's process-wide mutable state, in one object; :func:`reset` restores a fresh one."""

from __future__ import annotations

import dataclasses
import os
import weakref

from .errors import BatchlessError

FUSED_MODES = ("auto", "compiled", "never")
UNLOADED = object()  # the native kernels not looked up yet


def _mode_from_environment() -> str:
    mode = os.environ.get("BATCHLESS_FUSED") or "auto"
    if mode not in FUSED_MODES:
        raise BatchlessError(
            f"the environment variable BATCHLESS_FUSED must be one of {FUSED_MODES}, got {mode!r}")
    return mode


@dataclasses.dataclass
class State:
    mode: str = dataclasses.field(default_factory=_mode_from_environment)  # set_fused's
    compile_failed: bool = False  # a torch.compile failed: no compiled route from then on
    compiled: dict = dataclasses.field(default_factory=dict)  # key -> compiled function
    kernels: object = UNLOADED  # the native kernels' module, None where not built
    ones: dict = dataclasses.field(default_factory=dict)  # (C, dtype, device) -> ones(C)
    warned: set = dataclasses.field(default_factory=set)  # the once-per-process warnings given
    nll_weights: list = dataclasses.field(default_factory=list)  # open nll_weight blocks
    # every live batchless layer (each adds itself when built or unpickled), to recognise its
    # statistics among an optimizer's parameters; weak, so that it keeps no layer alive
    layers: weakref.WeakSet = dataclasses.field(default_factory=weakref.WeakSet)
    # optimizer -> (its number of groups, (group, statistics in it)...) (optim.py)
    optimizers: weakref.WeakKeyDictionary = dataclasses.field(
        default_factory=weakref.WeakKeyDictionary)
    # the optimizers that warned of weight decay on the statistics (optim.py)
    warned_optimizers: weakref.WeakSet = dataclasses.field(default_factory=weakref.WeakSet)


STATE = State()


def reset(*, keep_kernels: bool = True) -> None:
    """Restore a fresh process's state (the mode from ``$BATCHLESS_FUSED``), keeping loaded
    native kernels unless ``keep_kernels`` is False (for tests), and the layers still alive."""
    kernels = STATE.kernels
    vars(STATE).update(vars(State()), layers=STATE.layers)
    if keep_kernels and kernels is not None:
        STATE.kernels = kernels
