"""Data-dependent initialization: ``init_from_data``.

The paper's initialization: before training, set every batchless layer's ``mean``/``std`` to the
mean and standard deviation of its actual input on some training data. A layer's input depends on
the layers upstream of it, so layers are measured in dependency order, one stratum at a time:
stratum 0 holds the layers whose input depends on no batchless layer, stratum k those whose upstream
layers all lie in strata < k. Each stratum needs one pass over the data (a chain of L layers, the
usual case, has L strata); a pass stops each forward as soon as the stratum's layers have seen their
inputs, so later strata cost a full forward and early ones only a prefix. Batches are streamed: only
per-channel count, mean and sum of squared deviations are kept (float64, combined with Chan et al.'s
parallel update), so memory does not grow with the number of batches and micro-batches of size 1
work.

The dependencies are read once, from the autograd graph of one forward of the first batch: each
layer's output gets a zero-valued marker, and a layer depends on the layers whose markers its
input's graph reaches. Dependencies hidden from autograd (``.detach()``, ``torch.no_grad()`` or
integer ops inside ``forward``) are not seen.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .errors import BatchlessError, check_module
from .loss import batchless_layers
from .modules import _BatchlessNorm


class _StopForward(Exception):
    """Raised by a hook to end a forward once the layers being measured have seen their inputs."""


class _Moments:
    """Streaming per-channel count, mean and sum of squared deviations (float64, Chan et al.'s
    update)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor, shared: bool) -> None:
        rows = x.detach().transpose(0, 1).flatten(1).double()
        rows = rows.flatten()[None] if shared else rows
        n = rows.shape[1]
        if n == 0:
            return
        mean = rows.mean(1)
        m2 = (rows - mean[:, None]).square().sum(1)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def std(self) -> Tensor:
        """Population standard deviation; 1 for a channel that is constant on the data (it is only
        centred)."""
        std = (self.m2 / self.count).sqrt()
        return std.where(std > 0, 1.0)


def _model_input(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def init_from_data(model: nn.Module, batches: Iterable, *,
                   max_batches: int | None = None) -> nn.Module:
    """Set every batchless layer's ``mean``/``std`` to the mean/std of its input over ``batches``.

    Layers are measured in dependency order: a layer is measured only after every batchless layer
    feeding it has been set, so that afterwards, on the same data, every layer's normalized output
    has per-channel mean 0 and standard deviation 1. Runs in eval mode (no dropout) under
    ``no_grad`` (apart from one probe forward that reads the dependencies) and restores every
    module's training flag; ``weight`` and ``bias`` are left as they are. A channel that is constant
    on the data keeps ``std = 1``. Under ``torch.distributed`` it measures the local ``batches``
    only: call it before wrapping the model in DDP (which broadcasts rank 0's parameters) or with
    the same batches on every rank.

    Cost: one forward of the first batch, then one pass over ``batches`` per stratum of mutually
    independent layers (a chain of L layers takes L passes), each forward stopping after the last
    layer being measured. Memory: a few per-channel vectors per layer, whatever the number of
    batches.

    Args:
        model: the model; its batchless layers are set in place.
        batches: a re-iterable (list, ``DataLoader``) of input tensors or ``(input, target, ...)``
            tuples, called as ``model(input)``; iterated once per stratum.
        max_batches: use at most this many batches per pass. Default: all.

    Returns:
        ``model``.

    Example::

        >>> import torch, batchless as bl
        >>> model = torch.nn.Sequential(bl.BatchlessNorm1d(3), torch.nn.Linear(3, 4),
        ...                             bl.BatchlessNorm1d(4))
        >>> data = [torch.randn(8, 3) * 100 + 1000 for _ in range(4)]
        >>> model = bl.init_from_data(model, data)
        >>> model[0].mean.shape
        torch.Size([3])
    """
    check_module(model, "init_from_data")
    if isinstance(batches, torch.Tensor):  # iterable by rows: each "batch" would lack its batch dim
        raise BatchlessError(f"init_from_data expects an iterable of batches (a list or a "
                             f"DataLoader); got one tensor of shape {tuple(batches.shape)}: pass "
                             "[x] for a single batch")
    if iter(batches) is batches:
        raise BatchlessError(
            "init_from_data iterates over the batches once per stratum of layers, so it needs a "
            f"re-iterable such as a list or a DataLoader; got a one-shot iterator "
            f"({type(batches).__name__}). Pass list(batches) or the DataLoader itself")
    if torch.is_inference_mode_enabled():
        raise BatchlessError("init_from_data reads layer dependencies from autograd, which "
                             "inference mode disables: call it outside torch.inference_mode() (it "
                             "runs under no_grad itself)")
    if max_batches is not None and (isinstance(max_batches, bool)
                                    or not isinstance(max_batches, int) or max_batches < 1):
        raise BatchlessError(f"max_batches must be a positive int or None, got {max_batches!r}")
    names = {layer: name or "<root>" for name, layer in batchless_layers(model)}
    if not names:
        return model
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        first = next(iter(batches), None)
        if first is None:
            raise BatchlessError("init_from_data got no batches: pass at least one batch of inputs")
        strata, calls = _strata(model, _model_input(first), list(names))
        unused = [name for layer, name in names.items() if layer not in calls]
        if unused:
            warnings.warn(f"init_from_data: these batchless layers were not called and keep their "
                          f"statistics: {', '.join(unused)}", stacklevel=2)
        with torch.no_grad():
            for stratum in strata:
                _measure_and_set(model, batches, stratum, calls, max_batches, names)
    finally:
        for module, flag in flags.items():
            module.training = flag
    return model


def _strata(model: nn.Module, x,
            layers: list[_BatchlessNorm]) -> tuple[list[list[_BatchlessNorm]], dict]:
    """Dependency strata of the layers called by ``model(x)``, and how many times each is called."""
    markers: dict[int, _BatchlessNorm] = {}  # id(marker leaf) -> layer whose output it marks
    keep: list[Tensor] = []
    reach: dict = {}  # autograd node -> set of layers whose markers it depends on
    deps: dict[_BatchlessNorm, set] = {}
    calls: dict[_BatchlessNorm, int] = {}  # (in first-call order)

    def upstream(node) -> set:
        stack = [node]
        while stack:  # iterative post-order walk of the autograd graph, memoized in `reach`
            n = stack[-1]
            parents = [p for p, _ in n.next_functions if p is not None and p not in reach]
            if parents:
                stack.extend(parents)
                continue
            stack.pop()
            if n in reach:
                continue
            var = getattr(n, "variable", None)
            own = {markers[id(var)]} if var is not None and id(var) in markers else set()
            reach[n] = own.union(*(reach[p] for p, _ in n.next_functions if p is not None))
        return reach[node]

    def pre_hook(layer, args):
        calls[layer] = calls.get(layer, 0) + 1
        deps.setdefault(layer, set())
        x = args[0]
        if isinstance(x, Tensor) and x.grad_fn is not None:
            deps[layer] |= {d for d in upstream(x.grad_fn) if d is not layer}

    def hook(layer, args, out):
        marker = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
        markers[id(marker)] = layer
        keep.append(marker)
        return out + marker

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(pre_hook),
                                               layer.register_forward_hook(hook))]
    try:
        with torch.enable_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    level: dict[_BatchlessNorm, int] = {}
    for layer in calls:  # a dependency on a layer first called later: a cycle, ignored
        level[layer] = 1 + max((level[d] for d in deps[layer] if d in level), default=-1)
    depth = max(level.values(), default=-1) + 1
    return [[layer for layer in calls if level[layer] == k] for k in range(depth)], calls


def _measure_and_set(model, batches, stratum, calls, max_batches, names) -> None:
    """One pass over the data measuring the inputs of ``stratum``'s layers, then set their
    mean/std."""
    moments = {layer: _Moments() for layer in stratum}
    seen = dict.fromkeys(stratum, 0)

    def pre_hook(layer, args):
        moments[layer].add(args[0], layer.shared)
        seen[layer] += 1
        if all(seen[m] >= calls[m] for m in stratum):
            raise _StopForward

    handles = [layer.register_forward_pre_hook(pre_hook) for layer in stratum]
    try:
        for batch in itertools.islice(batches, max_batches):
            for layer in stratum:
                seen[layer] = 0
            try:
                model(_model_input(batch))
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    for layer in stratum:
        m = moments[layer]
        if m.count == 0:
            raise BatchlessError(f"init_from_data: layer {names[layer]} saw no input "
                                 "elements (all batches empty?); pass batches with at least one "
                                 "instance")
        layer.set_mean(m.mean)
        layer.set_std(m.std())
