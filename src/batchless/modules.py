"""``BatchlessNorm1d/2d/3d``: drop-in replacements for ``nn.BatchNorm1d/2d/3d``.

The modules own the parameters, check arguments and inputs, and pick the mode; the maths lives in
:mod:`batchless.functional`. They deliberately do not subclass
``torch.nn.modules.batchnorm._BatchNorm``: third-party code matches that class with ``isinstance``
and would rewrite or refuse these layers.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from . import _compat
from . import functional as BF
from ._state import STATE
from .errors import BatchlessError, warn
from .weighting import current_nll_weight

NLL_MODES = ("implicit", "explicit")


_CONTRACT = r"""Normalises each channel by a learned Gaussian, ``(x - mean) / std * weight + bias``.

    ``mean`` and ``std`` (:math:`\mu, \sigma`) are trainable parameters, trained only by the
    negative log likelihood (NLL) of the layer's input under :math:`\mathcal{N}(\mu, \sigma^2)`; the
    task loss never reaches them and the NLL never reaches the input. The same formula holds in
    training and evaluation, so a batch's output equals the concatenation of its instances' outputs
    and the layer works at batch size 1. See Berger & Uc Cetina, "Batchless Normalization",
    arXiv:2212.14729.

    Statistics cover every dimension but the channel dimension (dim 1): the batch and all spatial
    positions; with ``shared=True`` one Gaussian covers all channels too (the paper's cross-channel
    sharing; ``weight`` and ``bias`` stay per channel, as in ``nn.BatchNorm``).

    In training every forward computes the gauged NLL from two per-channel moments of the input
    (keeping no copy of the activations). With ``nll="implicit"`` (default) the backward of any loss
    computed from the output also gives ``mean`` and ``std`` the NLL gradient (weight 1, or
    :func:`batchless.nll_weight`'s), so an unchanged training loop trains them; two backward passes
    over one forward (``retain_graph=True``) give it twice, as ``(loss1 + loss2)`` would not. With
    ``nll="explicit"`` add it yourself, ``loss = task_loss + batchless.nll_loss(model)``, from a
    forward that records a graph (not the first one of ``torch.utils.checkpoint(...,
    use_reentrant=True)``). In evaluation nothing is trained. Double backward (gradient penalties:
    WGAN-GP, R1) differentiates the output's gradients exactly, mean/std constants as in the
    output; the implicit NLL gradient is a constant there (explicit mode differentiates the NLL
    twice). NaN/Inf inputs are counted and warned about (``nonfinite_batches``) outside
    ``torch.compile``. Which implementation runs a step: :func:`batchless.fused.route`.

    ``std`` is stored as ``raw_std`` behind a gain, :math:`\sigma = f(\text{std\_speed} \cdot
    \text{raw\_std})` with ``f`` the ``std_param`` parametrization, so a step on ``raw_std`` moves
    ``f``'s argument ``std_speed`` times as far as at 1 under Adam or AdamW, ``std_speed ** 2``
    times under SGD; ``mean`` likewise as ``raw_mean``, :math:`\mu = \text{mean\_speed} \cdot
    \text{raw\_mean}` (by default at ``std_speed``). The default, 0.1 for both, trains more
    accurate networks (EXPERIMENTS.md); ``std_speed=1`` (both at 1) is the paper's method.
    ``mean`` and ``std`` are computed from the raw parameters (as with
    ``torch.nn.utils.parametrize``: set them with :meth:`set_mean` and :meth:`set_std`, not in
    place). Slow statistics stay near their start for long: call
    :func:`batchless.init_from_data` before training (or convert a trained BatchNorm model with
    :func:`batchless.convert_batchnorm`); a first eager training forward with ``mean`` and ``std``
    still at ``init_mean`` and ``init_std`` warns, once per process.

    Weight decay would pull ``mean`` and ``raw_std`` away from the input's statistics: torch's own
    optimizers step them as without it (:mod:`batchless.optim`), others warn once with the fix,
    :func:`batchless.param_groups`. ``weight`` and ``bias`` are exempted alike unless
    ``decay_affine=True``: AdamW's decay on them cost the default 0.9-2.0 points on MNIST-1D at
    batch 2, GroupNorm's 0.1 (EXPERIMENTS.md).

    Args:
        num_features: number of channels ``C``.
        eps: bounds ``std`` in the ``"abs"`` (std >= eps) and ``"inv"`` (std <= 1/eps)
            parametrizations. Default: 1e-5. Unlike in BatchNorm it is not added to a variance.
        affine: learn ``weight`` and ``bias`` (gamma, beta). Default: True.
        std_param: parametrization of ``std`` by ``raw_std``: ``"log"`` (exp(s), default),
            ``"abs"`` (abs(s) + eps) or ``"inv"`` (s stores 1/std).
        init_mean, init_std: starting values of ``mean`` and ``std``. Default: 0 and 1.
        nll: ``"implicit"`` or ``"explicit"``, see above. Default: ``"implicit"``.
        shared: one Gaussian for all channels instead of one per channel. Default: False.
        std_speed: the gain on ``std``'s parametrization, see above. Default: 0.1.
        mean_speed: the gain on ``mean``, see above. Default: None, ``std_speed``'s value.
        decay_affine: let weight decay move ``weight`` and ``bias``, as it moves BatchNorm's.
            Default: False (exempt, like the statistics). Read when an optimizer first steps.
"""


def _doc(name: str, inputs: str, example: str) -> str:
    """The docstring of ``name``, whose inputs are ``inputs``; ``example``: an input shape."""
    return _CONTRACT + f"""
    Shape: input {inputs}, output the same shape, dtype and memory format.

    Example::

        >>> import torch, batchless as bl
        >>> layer = bl.{name}(16)
        >>> layer(torch.randn({example})).shape  # works at batch size 1
        torch.Size([{example}])
    """


class _BatchlessNorm(nn.Module):
    """The layer, whatever its input rank: the 1d/2d/3d classes differ only in ``_input_dims``."""

    # 2: raw_std is stored behind the gain std_speed (1: without one, i.e. gain 1); 3: the mean too,
    # as raw_mean behind mean_speed (2: a parameter `mean`, i.e. gain 1)
    _version = 3
    _input_dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True,
                 std_param: str = "log", init_mean: float = 0.0, init_std: float = 1.0,
                 nll: str = "implicit", shared: bool = False, std_speed: float = 0.1,
                 mean_speed: float | None = None, decay_affine: bool = False, device=None,
                 dtype=None) -> None:
        mean_speed = std_speed if mean_speed is None else mean_speed
        _check_arguments(num_features, eps, std_param, init_mean, init_std, nll, std_speed,
                         mean_speed, decay_affine)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.affine = num_features, eps, affine
        self.std_param, self.init_mean, self.init_std = std_param, init_mean, init_std
        self.nll, self.shared = nll, shared
        self.std_speed = float(std_speed)  # (a Python number: a constant of the native node)
        self.mean_speed = float(mean_speed)
        self.decay_affine = decay_affine  # read by optim.py at an optimizer's first step
        stat_shape = (1,) if shared else (num_features,)
        self.raw_mean = nn.Parameter(torch.empty(stat_shape, **factory))
        self.raw_std = nn.Parameter(torch.empty(stat_shape, **factory))
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self._last = _LastForward()
        self._nonfinite: Tensor | None = None  # the count (and its host copy, off the CPU)
        self._nonfinite_host: Tensor | None = None
        self._warned_nonfinite = False
        self.reset_parameters()
        STATE.layers.add(self)  # so that an optimizer decaying its statistics warns (optim.py)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.set_mean(torch.full_like(self.raw_mean, self.init_mean))
            self.set_std(torch.full_like(self.raw_std, self.init_std))
            if self.affine:
                nn.init.ones_(self.weight)
                nn.init.zeros_(self.bias)
        # whether the first eager training forward checks that the statistics left their initial
        # values (set_mean, set_std, init_from_data, convert_batchnorm and load_state_dict set them)
        self._check_statistics = True

    @property
    def mean(self) -> Tensor:
        """mu: ``mean_speed * raw_mean``, differentiable in ``raw_mean`` (``raw_mean`` itself at
        ``mean_speed=1``). A new tensor otherwise: writing into it changes nothing, so the next
        forward raises if the last one given out was written to (use :meth:`set_mean`)."""
        mean = BF.mean_from_param(self.raw_mean, self.mean_speed)
        if mean is not self.raw_mean:
            self._last.given_mean = (mean, mean._version)
        return mean

    @torch.no_grad()
    def set_mean(self, mean: Tensor) -> None:
        """Set ``raw_mean`` so that ``mean`` is ``mean`` (up to float rounding)."""
        self.raw_mean.copy_(BF.param_from_mean(mean.to(self.raw_mean), self.mean_speed))
        self._check_statistics = False

    @property
    def std(self) -> Tensor:
        """sigma: a differentiable function of ``raw_std`` (always > 0)."""
        return BF.std_from_param(self.raw_std, self.std_param, self.eps, self.std_speed)

    @torch.no_grad()
    def set_std(self, std: Tensor) -> None:
        """Set ``raw_std`` so that ``std`` is ``std`` (as closely as the parametrization allows)."""
        raw = BF.param_from_std(std.to(self.raw_std), self.std_param, self.eps, self.std_speed)
        self.raw_std.copy_(raw)
        self._check_statistics = False

    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        if x.dim() not in self._input_dims:
            dims = " or ".join(f"{d}D" for d in self._input_dims)
            raise BatchlessError(f"{name} expects a {dims} input (N, C, ...), got a {x.dim()}D "
                                 f"input of shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise BatchlessError(f"{name}({self.num_features}) expects {self.num_features} "
                                 f"channels in dim 1, got {x.shape[1]} (input shape "
                                 f"{tuple(x.shape)})")
        if not x.is_floating_point():
            raise BatchlessError(f"{name} expects a floating-point input, got {x.dtype}")
        # torch's ExpandedWeights (which replace all of a module's parameters) run only functions
        # they know: ours would get no gradient on the native route, fail on the others
        if isinstance(self.raw_mean, _compat.ExpandedWeight):
            raise BatchlessError(
                f"{name} got torch's ExpandedWeights as parameters (Opacus's "
                "grad_sample_mode=\"ew\"), which cannot compute its per-sample gradients. "
                "Use Opacus's default grad_sample_mode=\"hooks\" or "
                "grad_sample_mode=\"functorch\", or torch.func.vmap over torch.func.grad: "
                "they give exact per-sample gradients")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        last = self._last
        given = last.given_mean  # (set by the `mean` property only, never under torch.compile)
        if given is not None and given[0]._version != given[1]:
            last.given_mean = None
            raise BatchlessError(
                f"{type(self).__name__}({self.num_features}).mean was written to in place, which "
                f"does not change the layer: mean is computed from raw_mean (mean_speed="
                f"{self.mean_speed}). Set it with layer.set_mean(values)")
        if not self.training:
            if self.nll == "explicit":  # no NLL from this forward: nll_loss must not give the last
                last.nll, last.used = None, True
            return BF.eval_forward_param(x, self.raw_mean, self.raw_std, self.std_param, self.eps,
                                         self.std_speed, self.weight, self.bias,
                                         mean_gain=self.mean_speed)
        implicit = self.nll == "implicit"
        eager = not torch.compiler.is_compiling()
        if eager and self._check_statistics:
            self._warn_if_initial_statistics()
        if eager and not implicit and not last.used:
            _warn_once("unused nll", "a BatchlessNorm layer with nll='explicit' ran a second "
                       "training forward without its NLL being collected, so its mean/std are "
                       "not learning: add batchless.nll_loss(model) to the loss, e.g. `loss = "
                       "task_loss + batchless.nll_loss(model)`, or build the layers with "
                       "nll='implicit'")
        weight_nll = None
        if implicit:  # activation checkpointing re-runs the forward in the backward: its weight
            weight_nll = last.weight = (last.weight if eager and _compat.in_backward()
                                        else current_nll_weight())
        out = BF.train_forward_param(x, self.raw_mean, self.raw_std, self.std_param, self.eps,
                                     self.std_speed, self.weight, self.bias, weight_nll,
                                     mean_gain=self.mean_speed)
        # implicit: the NLL is only reported, so it is computed when asked for (see _last_nll)
        last.b, last.used = (out.b if implicit else None), implicit
        last.nll = None if implicit else BF.nll_from_moments(
            BF.mean_from_param(self.raw_mean, self.mean_speed), self.std, out.a, out.b)
        if out.finite is not None and eager and not _compat.is_wrapped(out.finite):
            self._count_nonfinite(out.finite)
        return out.y

    def _warn_if_initial_statistics(self) -> None:
        """Warn (once per process) if ``mean`` and ``std`` still hold ``init_mean``, ``init_std``;
        not under torch.func or a trace, whose tensors hold no values (a later forward checks)."""
        if (_compat.transforms_active() or _compat.jit_tracing()
                or _compat.is_wrapped(self.raw_mean) or self.raw_mean.is_meta):
            return
        self._check_statistics = False
        with torch.no_grad():
            initial_raw = BF.param_from_std(torch.full_like(self.raw_std, self.init_std),
                                            self.std_param, self.eps, self.std_speed)
            initial_mean = BF.param_from_mean(torch.full_like(self.raw_mean, self.init_mean),
                                              self.mean_speed)
            initial = (torch.equal(self.raw_std, initial_raw)
                       and torch.equal(self.raw_mean, initial_mean))
        if initial:
            _warn_once("initial statistics", f"{type(self).__name__}({self.num_features}) started "
                       f"training with its mean and std still at init_mean={self.init_mean} and "
                       f"init_std={self.init_std}, not at its input's statistics, which its std "
                       f"(std_speed={self.std_speed}) takes many steps to reach: call "
                       "batchless.init_from_data(model, batches) with a few training batches "
                       "before training (or, for a model trained with BatchNorm, "
                       "batchless.convert_batchnorm(model), which carries its statistics over)")

    @property
    def _last_nll(self) -> Tensor | None:
        """The gauged NLL of the last training forward (None before the first one)."""
        last = self._last
        if last.nll is None and last.b is not None:
            last.nll = BF.gauged_nll(last.b).detach()
        return last.nll

    @property
    def nonfinite_batches(self) -> int:
        """How many training forwards had NaN/Inf input (their NLL dropped, the statistics kept)."""
        return 0 if self._nonfinite is None else int(self._nonfinite)

    def _count_nonfinite(self, finite: Tensor) -> None:
        # A plain attribute, not a buffer: buffers would add a broadcast per step under DDP. No
        # host-device sync: on accelerators the count is read one step late from an asynchronous
        # copy.
        bad = (~finite).any()
        self._nonfinite = bad.long() if self._nonfinite is None else self._nonfinite + bad
        if self._nonfinite.device.type == "cpu":
            seen = self._nonfinite
        else:
            seen = self._nonfinite_host
            self._nonfinite_host = self._nonfinite.to("cpu", non_blocking=True)
        if seen is not None and not self._warned_nonfinite and bool(seen):
            self._warned_nonfinite = True
            warn(f"{type(self).__name__}({self.num_features}) received NaN/Inf input in "
                 "training; the NLL of the affected channels was dropped so the learned mean/std "
                 "stay finite (count so far: layer.nonfinite_batches). Check the data and the "
                 "layers before this one.")

    def extra_repr(self) -> str:
        s = (f"{self.num_features}, eps={self.eps}, affine={self.affine}, "
             f"std_param={self.std_param!r}, nll={self.nll!r}")
        return (s + (", shared=True" if self.shared else "")
                + f", std_speed={self.std_speed}, mean_speed={self.mean_speed}"
                + (", decay_affine=True" if self.decay_affine else ""))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if prefix + "running_mean" in state_dict:
            raise BatchlessError(
                f"the checkpoint holds a BatchNorm at {prefix[:-1] or 'the root'!r} (running_mean/"
                f"running_var), but this is a {type(self).__name__}: load it into the original "
                "BatchNorm model and convert it with batchless.convert_batchnorm(model)")
        raw_std, raw_mean = prefix + "raw_std", prefix + "raw_mean"
        version = local_metadata.get("version")
        # (load_state_dict passes a copy of the user's dict: replacing entries is safe)
        if (version is None or version < 2) and raw_std in state_dict:
            # saved before std_speed existed, with gain 1: the same std takes raw_std / std_speed
            state_dict[raw_std] = state_dict[raw_std] / self.std_speed
        if (version is None or version < 3) and prefix + "mean" in state_dict:
            # saved before mean_speed existed, as `mean`: the same mean takes mean / mean_speed
            state_dict[raw_mean] = BF.param_from_mean(state_dict.pop(prefix + "mean"),
                                                      self.mean_speed)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if raw_std in state_dict or raw_mean in state_dict:
            self._check_statistics = False  # loaded statistics are the user's

    def __getstate__(self):
        state = super().__getstate__()
        state["_last"] = _LastForward()  # an autograd graph is neither picklable nor worth keeping
        state["_nonfinite_host"] = None
        return state

    def __setstate__(self, state):
        state.setdefault("std_speed", 1.0)  # pickled before std_speed existed: it had gain 1
        state.setdefault("_check_statistics", False)
        state.setdefault("decay_affine", False)  # pickled before decay_affine existed
        if "mean" in state["_parameters"]:  # pickled before mean_speed existed: gain 1
            state["_parameters"] = {("raw_mean" if k == "mean" else k): v
                                    for k, v in state["_parameters"].items()}
            state["mean_speed"] = 1.0
        super().__setstate__(state)
        STATE.layers.add(self)  # unpickled or deep-copied: a new layer, see __init__


class _LastForward:
    """What the last training forward left (a plain object: nn.Module's __setattr__ is slow)."""

    def __init__(self) -> None:
        self.nll: Tensor | None = None  # the gauged NLL (explicit mode: differentiable in mean/std)
        self.b: Tensor | None = None  # implicit mode: the moments the NLL is computed from if asked
        self.used = True  # whether nll_loss collected the NLL since (explicit mode)
        self.weight = 1.0  # the NLL weight of the last forward outside a backward (implicit mode)
        self.given_mean: tuple[Tensor, int] | None = None  # the last `mean` given out, its version


class BatchlessNorm1d(_BatchlessNorm):
    __doc__ = _doc("BatchlessNorm1d", "(N, C) or (N, C, L)", "1, 16, 8")
    _input_dims = (2, 3)


class BatchlessNorm2d(_BatchlessNorm):
    __doc__ = _doc("BatchlessNorm2d", "(N, C, H, W)", "1, 16, 8, 8")
    _input_dims = (4,)


class BatchlessNorm3d(_BatchlessNorm):
    __doc__ = _doc("BatchlessNorm3d", "(N, C, D, H, W)", "1, 16, 4, 8, 8")
    _input_dims = (5,)


def _real(value) -> bool:
    """A real number: a Python/numpy real (not a bool) or a 0-dim real tensor."""
    if isinstance(value, Tensor):
        return value.dim() == 0 and value.dtype != torch.bool and not value.is_complex()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_arguments(num_features, eps, std_param, init_mean, init_std, nll, std_speed,
                     mean_speed, decay_affine) -> None:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
        raise BatchlessError(f"num_features must be a positive int (the channel count C), got "
                             f"{num_features!r}")
    if not _real(eps) or not eps >= 0:
        raise BatchlessError(f"eps must be a number >= 0, got {eps!r}")
    if std_param not in BF.STD_PARAMS:
        raise BatchlessError(f"std_param must be one of {BF.STD_PARAMS}, got {std_param!r}")
    if not _real(init_std) or not init_std > 0:
        raise BatchlessError(f"init_std must be a number > 0 (a standard deviation), got "
                             f"{init_std!r}")
    if not _real(init_mean):
        raise BatchlessError(f"init_mean must be a number, got {init_mean!r}")
    if nll not in NLL_MODES:
        raise BatchlessError(f"nll must be one of {NLL_MODES}, got {nll!r}")
    for name, speed in (("std_speed", std_speed), ("mean_speed", mean_speed)):
        if not _real(speed) or not (math.isfinite(speed) and speed > 0):
            raise BatchlessError(f"{name} must be a finite number > 0 (1: the paper's method), "
                                 f"got {speed!r}")
    if not isinstance(decay_affine, bool):
        raise BatchlessError(f"decay_affine must be True or False, got {decay_affine!r}")


def _warn_once(key: str, message: str) -> None:
    """:func:`~batchless.errors.warn` ``message`` unless the warning ``key`` was given in this
    process (since the last ``_state.reset()``)."""
    if key not in STATE.warned:
        STATE.warned.add(key)
        warn(message)
