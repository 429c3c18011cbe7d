"""The layer's variants as data, in the style of PyTorch's ModuleInfo (common_modules.py).

One description of a layer and its input (:class:`Variant`: rank, std_param, nll mode, shared, affine,
std_speed, mean_speed, dtype, memory layout, route) that the property tests iterate; one way to build both, to run a
step and the reference's step (tests/reference.py, the one reference); shared tolerances; the routes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import pytest
import torch
from torch import nn

import batchless as bl
from batchless import _cpu_kernels, fused
from reference import naive_forward

CLASSES = {2: bl.BatchlessNorm1d, 3: bl.BatchlessNorm1d, 4: bl.BatchlessNorm2d, 5: bl.BatchlessNorm3d}
STD_PARAMS = ("log", "abs", "inv")
STD_SPEEDS = (1.0, 0.1)  # the paper's method, the library's default
NLL_MODES = ("implicit", "explicit")
PARAMS = ("raw_mean", "raw_std", "weight", "bias")
CAN_BUILD = _cpu_kernels.can_build()
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
# The set_fused mode, and the NLL weight block, that force each route (if the input allows it);
# "native-weighted": the native node with an NLL weight read at backward time (a tensor, a GradScaler).
ROUTES = {"native": "auto", "native-weighted": "auto", "eager": "never", "compiled": "compiled"}
TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-7}


@contextlib.contextmanager
def forced(route: str):
    """Run the block with ``route``'s fused mode (and NLL weight)."""
    if route.startswith("native") and not CAN_BUILD:
        pytest.skip("no C++ compiler or ninja: the native CPU kernels cannot be built here")
    previous = fused.set_fused(ROUTES[route])
    try:
        with bl.nll_weight(torch.tensor(1.0)) if route == "native-weighted" else contextlib.nullcontext():
            yield
    finally:
        fused.set_fused(previous)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A layer and its input: ``shape`` (N, C, *) picks the class."""

    shape: tuple = (4, 3, 5)
    std_param: str = "log"
    nll: str = "implicit"
    shared: bool = False
    affine: bool = True
    std_speed: float = 0.1
    mean_speed: float = 0.1
    dtype: torch.dtype = torch.float64  # the input's
    layout: torch.memory_format = torch.contiguous_format
    route: str = "eager"
    device: str = "cpu"
    param_dtype: torch.dtype | None = None  # default: the input's, float32 for half precision

    def __str__(self) -> str:
        fields = [self.route, "x".join(map(str, self.shape)), str(self.dtype)[6:], self.std_param,
                  self.nll, "shared" * self.shared, "no-affine" * (not self.affine),
                  f"speed{self.std_speed:g}", f"mean{self.mean_speed:g}", self.device,
                  {torch.channels_last: "cl", torch.channels_last_3d: "cl3d"}.get(self.layout, "")]
        return "-".join(f for f in fields if f)

    def layer(self, seed: int = 0) -> bl.BatchlessNorm1d:
        """The layer, its statistics and affine parameters away from their defaults."""
        torch.manual_seed(seed)
        dtype = self.param_dtype or (torch.float32 if self.dtype.itemsize == 2 else self.dtype)
        layer = CLASSES[len(self.shape)](self.shape[1], std_param=self.std_param, nll=self.nll,
                                         shared=self.shared, affine=self.affine, std_speed=self.std_speed,
                                         mean_speed=self.mean_speed, dtype=dtype, device=self.device)
        with torch.no_grad():
            layer.set_mean(torch.rand_like(layer.raw_mean) * 2 - 1)
            layer.set_std(torch.rand_like(layer.raw_mean) + 0.5)
            if self.affine:
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-1, 1)
        return layer

    def input(self, seed: int = 1, requires_grad: bool = True, scale: float = 2.0) -> torch.Tensor:
        x = torch.randn(self.shape, generator=torch.Generator().manual_seed(seed)) * scale + 1
        x = x.to(self.device, self.dtype).contiguous(memory_format=self.layout)
        return x.requires_grad_(requires_grad)

    def expected_route(self, training: bool = True, needs_grad: bool = True) -> str:
        """The route's name as :func:`batchless.fused.route` gives it (evaluation: the compiled
        route has nothing to fuse, the native one no autograd node without gradients)."""
        route = self.route.removesuffix("-weighted")
        if not training and route == "compiled":
            return "eager"
        return "native-eval" if route == "native" and not (training or needs_grad) else route


def variants(*, base: Variant = Variant(), **axes) -> list[Variant]:
    """``base`` with every combination of the values in ``axes`` (field name: values)."""
    names = list(axes)
    return [dataclasses.replace(base, **dict(zip(names, values, strict=True)))
            for values in itertools.product(*axes.values())]


# The property table: the formula in float64 over every option (the eager route: exact; the paper's
# std_speed and mean_speed 1 on one shape: the gains do not depend on it), and every route over dtypes and memory
# layouts in float32 and bfloat16.
FORMULA = variants(shape=[(5, 3), (4, 3, 7), (3, 3, 4, 5), (2, 3, 2, 3, 4), (4, 3, 1400), (4, 3, 40, 40)],
                   std_param=STD_PARAMS, nll=NLL_MODES, shared=[False, True])
FORMULA += variants(base=Variant(std_speed=1.0, mean_speed=1.0), std_param=STD_PARAMS, nll=NLL_MODES,
                    shared=[False, True])
LAYOUTS = [  # (shape, dtype, memory layout, affine, shared)
    ((4, 6, 5, 7), torch.float32, torch.contiguous_format, True, False),
    ((4, 6, 5, 7), torch.float32, torch.channels_last, True, False),
    ((1, 6, 3, 4, 5), torch.float32, torch.channels_last_3d, True, True),
    ((16, 6), torch.float32, torch.contiguous_format, False, False),
    ((3, 6, 9), torch.bfloat16, torch.contiguous_format, True, False),
    ((16, 6), torch.bfloat16, torch.contiguous_format, True, False),
]
ROUTED = [Variant(shape, dtype=dtype, layout=layout, affine=affine, shared=shared, route=route)
          for route in ("native", "native-weighted", "eager", "compiled")
          for shape, dtype, layout, affine, shared in LAYOUTS]
ROUTED += [  # std_speed 1 on the routes with kernels of their own, float16 (not native), parameters in the
    # input's dtype, float64 channels-last
    *variants(base=Variant((4, 6, 5, 7), dtype=torch.float32, std_speed=1.0), route=["native", "compiled"]),
    Variant((3, 4, 5, 5), dtype=torch.float16), Variant((16, 4), dtype=torch.float16),
    *variants(base=Variant((3, 4, 5, 5), dtype=torch.bfloat16, param_dtype=torch.bfloat16),
              route=["native", "eager"]),
    Variant((2, 5, 4, 3), layout=torch.channels_last),
    Variant((2, 5, 3, 4, 3), layout=torch.channels_last_3d)]
ROUTED_CUDA = [pytest.param(dataclasses.replace(v, device="cuda"), marks=CUDA)
               for v in ROUTED if v.route == "compiled"]


def grads(layer, x: torch.Tensor, loss: torch.Tensor) -> dict:
    """The gradients of ``loss`` by name ("x" and the layer's parameters; zeros where none)."""
    inputs = {"x": x} if x.requires_grad else {}
    inputs.update((n, p) for n, p in layer.named_parameters() if p.requires_grad)
    got = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(inputs.items(), got,
                                                                              strict=True)}


def step(layer, x: torch.Tensor, g: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The layer's output and the gradients of ``sum(y * g)`` (plus the NLL in explicit mode)."""
    y = layer(x)
    g = torch.ones_like(y) if g is None else g
    loss = (y * g).sum() + (bl.nll_loss(layer) if layer.nll == "explicit" and layer.training else 0)
    return y, grads(layer, x, loss)


def reference_step(layer, x: torch.Tensor, g: torch.Tensor | None = None, training: bool = True):
    """The same in float64 by the reference, with the NLL at weight 1 in training (both modes):
    ``(y, nll, gradients)``."""
    leaves = {"x": x.detach().double().requires_grad_(x.requires_grad)}
    leaves.update((n, p.detach().double().requires_grad_(p.requires_grad))
                  for n, p in layer.named_parameters())
    y, nll = naive_forward(leaves["x"], leaves["raw_mean"], leaves["raw_std"], leaves.get("weight"),
                           leaves.get("bias"), layer.std_param, layer.eps, layer.std_speed, layer.mean_speed)
    g = torch.ones_like(y) if g is None else g.double()
    loss = (y * g).sum() + (nll if training and x.shape[0] else 0)
    wanted = {n: t for n, t in leaves.items() if t.requires_grad}
    got = torch.autograd.grad(loss, list(wanted.values()), allow_unused=True)
    return y, nll, {n: torch.zeros_like(t) if d is None else d for (n, t), d in zip(
        wanted.items(), got, strict=True)}


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    """``got`` equals ``want`` up to ``dtype``'s tolerance, relative to want's largest value."""
    tol = TOLERANCE[dtype]
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.to(want.dtype), want, rtol=tol, atol=tol * scale, msg=msg or None)


def assert_all_close(got: dict, want: dict, dtype: torch.dtype) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert_close(got[name], want[name], dtype, msg=name)


def randomize_running_stats(model: nn.Module, mean=(-2.0, 2.0), var=(0.1, 3.0), weight=(0.5, 2.0),
                            bias=(-1.0, 1.0)) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, as after training; ``model`` in eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(*mean)
                m.running_var.uniform_(*var)
                m.weight.uniform_(*weight)
                m.bias.uniform_(*bias)
    return model.eval()
