"""Converting models between BatchNorm and batchless layers: ``convert_batchnorm`` and
``to_batchnorm``.

``convert_batchnorm`` migrates a model trained with BatchNorm (the paper's migration: ``mean =
running_mean``, ``std = sqrt(running_var + eps)``, ``weight``/``bias`` copied), so its eval-mode
function is unchanged and training can go on batch-free. ``to_batchnorm`` goes back, to eval-mode
``nn.BatchNorm*d`` layers, for tools that only know BatchNorm (ONNX runtimes, quantization,
pruning). Both clone the model first unless ``inplace=True``, replace layers by dotted name, keep
device, dtype and training flags, and keep a layer shared between two places shared.
:func:`replace_modules` is the walker they (and :func:`batchless.fold`) use.

BatchNorm subclasses that add behaviour (an activation, a dropout) are converted by a function
taught with :func:`register_conversion`; timm's norm-act layers (``BatchNormAct2d``,
``SyncBatchNormAct``) are taught here, by name, so that this module never imports timm.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from ._compat import BatchNormBase as _BatchNorm
from .errors import BatchlessError, check_module
from .modules import BatchlessNorm1d, BatchlessNorm2d, BatchlessNorm3d, _BatchlessNorm

logger = logging.getLogger(__name__)


class _BatchlessNormXd(_BatchlessNorm):
    """A batchless layer for inputs ``(N, C, *)`` of any rank: what an ``nn.SyncBatchNorm`` becomes.

    ``SyncBatchNorm`` does not know its input rank, so neither does its conversion (as
    ``_BatchNormXd`` in mmcv's ``revert_sync_batchnorm``). Converted back by :func:`to_batchnorm`
    into an ``nn.SyncBatchNorm``.
    """

    _input_dims = tuple(range(2, 9))


# BatchNorm base class -> batchless class; a subclass is matched by the first of these in its MRO.
_TO_BATCHLESS: dict[type, type[_BatchlessNorm]] = {
    nn.BatchNorm1d: BatchlessNorm1d,
    nn.BatchNorm2d: BatchlessNorm2d,
    nn.BatchNorm3d: BatchlessNorm3d,
    nn.SyncBatchNorm: _BatchlessNormXd,
    _BatchNorm: _BatchlessNormXd,
}
_TO_BATCHNORM = {new: old for old, new in _TO_BATCHLESS.items() if old is not _BatchNorm}
_CONVERT_KWARGS = ("eps", "std_param", "nll", "std_speed", "decay_affine")

Conversion = Callable[[nn.Module, _BatchlessNorm], nn.Module]
# BatchNorm subclass -> its conversion: what users taught with register_conversion ...
_CONVERSIONS: dict[type, Conversion] = {}


def _norm_act(module: nn.Module, layer: _BatchlessNorm) -> nn.Module:
    """timm's norm-act layers: ``act(drop(batchnorm(x)))``, with ``drop``/``act`` optional on
    ``SyncBatchNormAct``."""
    parts = [(name, getattr(module, name)) for name in ("drop", "act") if hasattr(module, name)]
    return nn.Sequential(OrderedDict([("norm", layer), *parts]))


# ... and the third-party subclasses taught here, by "module.qualname" (timm >= 0.9, and 0.6-0.8's
# path).
_BUILTIN_CONVERSIONS: dict[str, Conversion] = {
    f"{path}.{name}": _norm_act
    for path in ("timm.layers.norm_act", "timm.models.layers.norm_act")
    for name in ("BatchNormAct2d", "SyncBatchNormAct")
}


def register_conversion(cls: type, fn: Conversion | None) -> None:
    """Teach :func:`convert_batchnorm` a BatchNorm subclass that adds behaviour to BatchNorm's.

    ``convert_batchnorm`` converts a plain BatchNorm by itself; a subclass with its own ``forward``
    or child modules (a fused activation, a dropout) it refuses, since dropping that behaviour would
    change the model, unless such a function was registered for its class. For each layer of class
    ``cls`` (or of a subclass that keeps ``cls.forward``), ``convert_batchnorm`` first converts its
    BatchNorm part as it would a plain BatchNorm (checks and ``layer_kwargs`` included), then calls
    ``fn(module, layer)``: what it returns replaces ``module``, put in ``module``'s training mode
    (``.train(module.training)``, so that e.g. a new ``nn.Dropout`` is off in evaluation). Build it
    from ``layer`` and ``module``'s own children (the model was deep-copied unless
    ``inplace=True``), e.g. ``nn.Sequential(layer, module.act)``: :func:`batchless.fold` and
    :func:`batchless.to_batchnorm` then handle it like any model. timm's ``BatchNormAct2d`` and
    ``SyncBatchNormAct`` are taught already (into
    ``nn.Sequential(norm=layer, drop=module.drop, act=module.act)``); registering one of them
    replaces that.

    Args:
        cls: a subclass of ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` or their base
            ``_BatchNorm``.
        fn: ``fn(module, layer) -> nn.Module``; None removes what was registered for ``cls``.

    Example::

        >>> import torch, batchless as bl
        >>> from torch import nn
        >>> class BatchNormReLU2d(nn.BatchNorm2d):
        ...     def forward(self, x):
        ...         return super().forward(x).relu()
        >>> def conversion(module, layer):
        ...     return nn.Sequential(layer, nn.ReLU())
        >>> bl.register_conversion(BatchNormReLU2d, conversion)
        >>> model = bl.convert_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormReLU2d(8)))
        >>> model  # doctest: +NORMALIZE_WHITESPACE
        Sequential(
          (0): Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
          (1): Sequential(
            (0): BatchlessNorm2d(8, eps=1e-05, affine=True, std_param='log', nll='implicit',
                                 std_speed=0.1, mean_speed=0.1)
            (1): ReLU()
          )
        )
        >>> bl.register_conversion(BatchNormReLU2d, None)  # forget it again
    """
    if not (isinstance(cls, type) and issubclass(cls, _BatchNorm)) or cls in _TO_BATCHLESS:
        raise BatchlessError(
            f"register_conversion expects a subclass of a torch.nn BatchNorm class (cls), got "
            f"{cls!r}: convert_batchnorm converts the BatchNorm classes themselves, and only "
            "BatchNorm layers")
    if fn is not None and not callable(fn):
        raise BatchlessError(
            f"register_conversion expects fn(module, layer) -> nn.Module or None, got {fn!r}")
    if fn is None:
        _CONVERSIONS.pop(cls, None)
    else:
        _CONVERSIONS[cls] = fn


def _taught(module: _BatchNorm) -> tuple[type, Conversion] | None:
    """The nearest class of ``module``'s MRO with a conversion and that conversion, or None (none
    before its BatchNorm base)."""
    for cls in type(module).__mro__:
        if cls in _TO_BATCHLESS:
            return None
        name = f"{cls.__module__}.{cls.__qualname__}"
        if fn := _CONVERSIONS.get(cls) or _BUILTIN_CONVERSIONS.get(name):
            return cls, fn
    return None


def replace_modules(model: nn.Module, replace: Callable[[str, nn.Module], nn.Module | None], *,
                    inplace: bool = False) -> nn.Module:
    """Return ``model`` (a deep copy unless ``inplace``) with every module for which
    ``replace(dotted_name, module)`` returns a module swapped for it; modules for which it returns
    None are recursed into.

    A module reachable under several names is visited once and its replacement shared the same way.
    The root itself may be replaced: always use the returned module.
    """
    if not inplace:
        model = copy.deepcopy(model)
    memo: dict[int, nn.Module] = {}

    def visit(name: str, module: nn.Module) -> nn.Module:
        if id(module) not in memo:
            new = replace(name, module)
            if new is None:
                new = module
                # (named_children() would skip a child registered twice)
                for child_name, child in list(module._modules.items()):
                    if child is None:
                        continue
                    new_child = visit(f"{name}.{child_name}" if name else child_name, child)
                    if new_child is not child:
                        setattr(module, child_name, new_child)
            elif new is not module:
                logger.debug("batchless: replaced %s (%s) by %s", name or "<root>",
                             type(module).__name__, type(new).__name__)
            memo[id(module)] = new
        return memo[id(module)]

    return visit("", model)


def _batchnorm_base(module: _BatchNorm) -> type:
    return next(cls for cls in type(module).__mro__ if cls in _TO_BATCHLESS)


def _conversion_problem(module: _BatchNorm, layer_kwargs: dict) -> str | None:
    """Why ``module`` cannot be converted faithfully (with the new layers' ``layer_kwargs``), or
    None."""
    base = _batchnorm_base(module)
    taught = _taught(module)
    if taught is not None and type(module).forward is not taught[0].forward:
        return (f"{type(module).__name__} subclasses {taught[0].__name__}, whose conversion is "
                "registered, but overrides its forward: teach its own with "
                "batchless.register_conversion")
    adds = type(module).forward is not base.forward or any(True for _ in module.children())
    if taught is None and adds:
        return (f"{type(module).__name__} subclasses {base.__name__} and adds behaviour (its own "
                "forward or child modules, e.g. a fused activation) that a conversion would drop: "
                "teach it with batchless.register_conversion")
    if isinstance(module, LazyModuleMixin):
        return f"{type(module).__name__} is not initialized yet: run one forward pass first"
    if module.running_mean is None or module.running_var is None:
        return ("it has no running statistics (track_running_stats=False): convert it by hand to a "
                "BatchlessNorm layer and call batchless.init_from_data(model, batches) to set its "
                "mean/std")
    return _unrepresentable_std(module, layer_kwargs.get("std_param", "log"),
                                layer_kwargs.get("eps", module.eps))


def _unrepresentable_std(bn: _BatchNorm, std_param: str, eps: float) -> str | None:
    """Why the ``std_param``/``eps`` parametrization cannot hold ``bn``'s std
    ``sqrt(running_var + eps)``, or None: ``"abs"`` keeps std >= eps, ``"inv"`` std <= 1 / eps,
    whatever ``std_speed`` (a gain on the raw parameter moves no bound)."""
    if bn.running_var.is_meta or std_param not in ("abs", "inv") or not eps > 0:
        return None
    std = (bn.running_var.double() + bn.eps).sqrt()
    low, high = std.min().item(), std.max().item()
    if std_param == "abs" and low < eps:
        return (f"its std sqrt(running_var + eps) goes down to {low:.4g}, below eps={eps:g}, the "
                "smallest std that std_param='abs' represents: pass a smaller eps or "
                "std_param='log'")
    if std_param == "inv" and high > 1 / eps:
        return (f"its std sqrt(running_var + eps) goes up to {high:.4g}, above 1/eps={1 / eps:g}, "
                "the largest std that std_param='inv' represents: pass a smaller eps or "
                "std_param='log'")
    return None


def convert_batchnorm(model: nn.Module, *, inplace: bool = False, **layer_kwargs) -> nn.Module:
    """Replace every BatchNorm layer with the batchless layer that computes the same eval-mode
    function.

    ``nn.BatchNorm1d/2d/3d`` become ``BatchlessNorm1d/2d/3d``; ``nn.SyncBatchNorm`` (and other
    direct ``_BatchNorm`` subclasses) a batchless layer that accepts any input rank ``(N, C, *)``.
    Each gets ``mean = running_mean``, ``std = sqrt(running_var + eps)``, ``weight``/``bias`` copied
    (with their ``requires_grad``), the BatchNorm's ``eps`` (now a guard, not added to a variance),
    device, dtype and training flag. ``momentum`` and ``num_batches_tracked`` have no counterpart
    and are dropped.

    Subclasses of a BatchNorm class that keep its ``forward`` and have no child modules are
    converted like their base. Subclasses that add behaviour are converted by the function
    registered for them with :func:`batchless.register_conversion`: timm's ``BatchNormAct2d`` (and
    ``SyncBatchNormAct``) becomes ``nn.Sequential(norm=<batchless layer>, drop=<its dropout>,
    act=<its activation>)``, the same function. Subclasses that add behaviour nobody taught are
    refused, as are BatchNorms without running statistics and those whose std the chosen
    ``std_param``/``eps`` cannot hold (``"abs"``: std >= eps, ``"inv"``: std <= 1/eps): one
    :class:`~batchless.BatchlessError` lists every such layer by dotted name, before anything is
    changed.

    Args:
        model: the model; may itself be a BatchNorm layer.
        inplace: convert ``model`` itself instead of a deep copy. Default: False. The returned
            module is the converted model either way (a BatchNorm at the root cannot be replaced in
            place).
        **layer_kwargs: ``std_param``, ``nll``, ``eps``, ``std_speed`` or ``decay_affine`` for
            the new layers (the function stays the same whatever their values, within the checks
            above).

    Example::

        >>> import torch, batchless as bl
        >>> bn_model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
        >>> model = bl.convert_batchnorm(bn_model)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(model(x), bn_model(x), atol=1e-5)
        True
    """
    check_module(model, "convert_batchnorm")
    unknown = sorted(set(layer_kwargs) - set(_CONVERT_KWARGS))
    if unknown:
        raise BatchlessError(
            f"convert_batchnorm accepts the layer arguments {', '.join(_CONVERT_KWARGS)}; got "
            f"{', '.join(unknown)} (channel count, affine, device and dtype are taken from each "
            "BatchNorm)")
    problems = [f"  {name or '<root>'}: {problem}" for name, module in model.named_modules()
                if isinstance(module, _BatchNorm)
                and (problem := _conversion_problem(module, layer_kwargs))]
    if problems:
        raise BatchlessError("convert_batchnorm cannot convert these layers faithfully:\n"
                             + "\n".join(problems) + "\nreplace these layers by hand (e.g. by "
                             "nn.Sequential(BatchlessNorm2d(C), activation)) or teach "
                             "convert_batchnorm their class with "
                             "batchless.register_conversion(cls, fn), then call convert_batchnorm "
                             "again")

    def replace(_name: str, module: nn.Module) -> nn.Module | None:
        return _from_batchnorm(module, layer_kwargs) if isinstance(module, _BatchNorm) else None

    return replace_modules(model, replace, inplace=inplace)


@torch.no_grad()
def _from_batchnorm(bn: _BatchNorm, layer_kwargs: dict) -> nn.Module:
    kwargs = {"eps": bn.eps, **layer_kwargs}
    layer = _TO_BATCHLESS[_batchnorm_base(bn)](bn.num_features, affine=bn.affine,
                                               device=bn.running_mean.device,
                                               dtype=bn.running_mean.dtype, **kwargs)
    layer.set_mean(bn.running_mean)
    layer.set_std((bn.running_var.double() + bn.eps).sqrt())
    _copy_affine(bn, layer)
    layer.train(bn.training)
    taught = _taught(bn)
    if taught is None:
        return layer
    new = taught[1](bn, layer)
    if not isinstance(new, nn.Module):
        raise BatchlessError(f"the conversion registered for {taught[0].__name__} ({taught[1]!r}) "
                             f"returned {type(new).__name__}, not an nn.Module")
    return new.train(bn.training)


def to_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every batchless layer with an eval-mode ``nn.BatchNorm*d`` computing the same
    function.

    For tools that expect BatchNorm (ONNX runtimes, quantization, pruning).
    ``BatchlessNorm1d/2d/3d`` become ``nn.BatchNorm1d/2d/3d`` and a converted ``nn.SyncBatchNorm``
    becomes one again, with ``running_mean = mean`` and ``running_var = std**2 - eps`` (``eps`` 0
    where ``std**2 <= eps``), so that ``sqrt(running_var + eps) = std``; ``weight``/``bias`` copied,
    device and dtype kept. The layers are returned in eval mode (training them as BatchNorm would
    replace the learned statistics).

    Args:
        model: the model; may itself be a batchless layer.
        inplace: convert ``model`` itself instead of a deep copy. Default: False. Use the
            returned module.
    """
    check_module(model, "to_batchnorm")

    def replace(_name: str, module: nn.Module) -> nn.Module | None:
        return _to_batchnorm_layer(module) if isinstance(module, _BatchlessNorm) else None

    return replace_modules(model, replace, inplace=inplace)


@torch.no_grad()
def _to_batchnorm_layer(layer: _BatchlessNorm) -> nn.Module:
    var = layer.std.double().square().expand(layer.num_features)
    eps = layer.eps if var.is_meta or bool((var > layer.eps).all()) else 0.0
    cls = next(_TO_BATCHNORM[c] for c in type(layer).__mro__ if c in _TO_BATCHNORM)
    bn = cls(layer.num_features, eps=eps, affine=layer.affine, device=layer.mean.device,
             dtype=layer.mean.dtype)
    bn.running_mean.copy_(layer.mean.expand(layer.num_features))
    bn.running_var.copy_(var - eps)
    _copy_affine(layer, bn)
    return bn.eval()


def _copy_affine(source: nn.Module, target: nn.Module) -> None:
    """``weight`` and ``bias``, with their ``requires_grad``, from an affine ``source``."""
    if source.affine:
        for name in ("weight", "bias"):
            getattr(target, name).copy_(getattr(source, name))
            getattr(target, name).requires_grad_(getattr(source, name).requires_grad)
