import pytest
import torch

from batchless import _state, fused
from variants import CAN_BUILD, forced

# CI has 2 cores; tiny tensors gain nothing from intra-op threads, and OpenMP regions on a loaded
# machine cost milliseconds each.
torch.set_num_threads(1)


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
