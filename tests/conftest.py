import warnings

import pytest
import torch

from batchless import _state, fused
from variants import CAN_BUILD, forced

# CI has 2 cores; tiny tensors gain nothing from intra-op threads, and OpenMP regions on a loaded
# machine cost milliseconds each.
torch.set_num_threads(1)

# torch's own modules call the deprecated torch.jit.script/script_method when first imported: forward-mode
# AD's decompositions (on the first make_dual) and torch.utils.mkldnn (on the first torch.compile). Imported
# here, once, with those warnings off (a DeprecationWarning in torch 2.13, a FutureWarning in 2.14), so that
# the suite shows only warnings about our own calls.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", r"`torch\.jit\.script(_method)?` is deprecated")
    import torch._decomp.decompositions_for_jvp  # noqa: F401
    import torch.utils.mkldnn  # noqa: F401


def pytest_configure(config):
    # Tests build layers from their defaults on purpose, and so would each get the warning that a layer starts
    # training from its initial statistics; its own tests (test_layer.py) turn it back on.
    config.addinivalue_line("filterwarnings", "ignore:.* started training with its mean and std still at:UserWarning")


@pytest.fixture(scope="session")
def cpu_kernels():
    """The native CPU kernels, built here where a C++ compiler and ninja exist (a failed build
    fails the tests that need them)."""
    if not CAN_BUILD:
        pytest.skip("no C++ compiler or ninja: the native CPU kernels cannot be built here")
    assert fused.build_cpu_kernels(), "the native CPU kernels failed to build"
    return fused.native_kernels()


@pytest.fixture(autouse=True)
def fresh_state():
    """Every test starts from a fresh process's batchless state (built kernels stay loaded)."""
    _state.reset()
    yield
    _state.reset()


@pytest.fixture(params=["native", "eager"])
def route(request):
    """Run the test on each route a user gets on CPU: the native kernels (once built) and, without
    a C++ compiler, the eager route."""
    if request.param == "native":
        request.getfixturevalue("cpu_kernels")
    with forced(request.param):
        yield request.param
