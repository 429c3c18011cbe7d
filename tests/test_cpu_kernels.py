"""The native CPU kernels' build and cache: what a first run says, what the cache is keyed by, that a
cached build is loaded rather than compiled, what a failed or damaged build does.

Only the ``cpu_kernels`` fixture compiles the real kernels (once per session); these tests point
``$BATCHLESS_CACHE`` at a fresh directory, or replace the compiler call, to stay fast.
"""

import shutil
import sys
import warnings

import pytest
import torch
from torch.utils import cpp_extension

from batchless import _cpu_kernels, _state, fused
from batchless.fused import Route
from variants import CAN_BUILD, Variant

F32 = Variant((4, 6, 5, 7), dtype=torch.float32)
needs_compiler = pytest.mark.skipif(not CAN_BUILD, reason="no C++ compiler or ninja here")


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """An empty kernel cache, and a process that has not looked for the kernels yet."""
    monkeypatch.setenv("BATCHLESS_CACHE", str(tmp_path / "cache"))
    _state.reset(keep_kernels=False)
    return tmp_path / "cache"


@pytest.fixture
def no_compiling(monkeypatch):
    """Fail any call to the compiler; record the calls."""
    calls = []

    def refuse(name, *args, **kwargs):
        calls.append(name)
        raise AssertionError(f"compiled {name}")

    monkeypatch.setattr(cpp_extension, "load", refuse)
    return calls


def training_steps():
    """What a user's first CPU steps do: forward, backward, and asking for the route."""
    layer, x = F32.layer(), F32.input()
    for _ in range(2):
        layer(x).sum().backward()
    return fused.route(x, layer)


@needs_compiler
def test_unbuilt_kernels_warn_once_with_the_command(fresh_cache):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert training_steps() == Route.EAGER
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "not built" in message and _cpu_kernels.build_command() in message
    assert sys.executable in message and "build_cpu_kernels()" in message
    assert caught[0].filename == __file__  # the user's line (the first step)


def test_no_word_without_a_compiler(fresh_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert training_steps() == Route.EAGER


def test_no_word_when_built(cpu_kernels, no_compiling):
    _state.reset(keep_kernels=False)  # a new process: finds the build in the cache
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert training_steps() == Route.NATIVE
    assert not no_compiling


def test_a_cached_build_is_loaded_not_compiled(cpu_kernels, no_compiling):
    _state.reset(keep_kernels=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused.build_cpu_kernels() and fused.build_cpu_kernels()
    assert not no_compiling and fused.route(F32.input()) == Route.NATIVE


@needs_compiler
def test_a_damaged_cached_build_is_rebuilt(fresh_cache, no_compiling):
    """build_cpu_kernels compiles where the cached build does not load, without a word about the
    damaged file (here the compiler call fails on purpose, and says so)."""
    directory = _cpu_kernels._build_dir()
    directory.mkdir(parents=True)
    (directory / f"{directory.name}.so").write_bytes(b"not a shared library")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not fused.build_cpu_kernels()
    assert [str(w.message) for w in caught] == [
        f"batchless: could not build the CPU kernels (AssertionError: compiled {directory.name}); training stays "
        "on the eager route. batchless.fused.build_cpu_kernels(verbose=True) shows the whole output"]
    assert no_compiling == [directory.name]


def test_damaged_cached_build_warns_and_stays_eager(fresh_cache):
    directory = _cpu_kernels._build_dir()
    directory.mkdir(parents=True)
    (directory / f"{directory.name}.so").write_bytes(b"not a shared library")
    with pytest.warns(UserWarning, match="cached CPU kernels .* did not load") as caught:
        assert fused.path(torch.ones(2, 3)) == "eager"
    assert _cpu_kernels.build_command() in str(caught[0].message)
    F32.layer()(F32.input()).sum().backward()  # trains on the eager route


def test_the_cache_is_shared_by_venvs_with_the_same_torch(monkeypatch, tmp_path):
    """Another interpreter prefix (a second venv: its own python, its own copy of the same torch) finds the
    same build; the source, torch's version and the CPU's instruction sets each change it."""
    here = _cpu_kernels._build_dir()
    site = tmp_path / "venv2" / "lib" / "python3" / "site-packages"
    (site / "torch" / "lib").mkdir(parents=True)
    bundled = _cpu_kernels._bundled_openmp()
    if bundled is not None:  # the same torch wheel: the same bundled OpenMP runtime
        (site / "torch" / "lib" / bundled.name).symlink_to(bundled)
    link_flags = _cpu_kernels._link_flags()
    for name in ("prefix", "exec_prefix", "executable"):
        monkeypatch.setattr(sys, name, str(tmp_path / "venv2" / ("bin/python" if name == "executable" else "")))
    monkeypatch.setattr(torch, "__file__", str(site / "torch" / "__init__.py"))
    assert _cpu_kernels._link_flags() != link_flags or bundled is None  # the build would link from venv2
    assert _cpu_kernels._build_dir() == here

    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".post1")
    assert _cpu_kernels._build_dir() != here
    monkeypatch.undo()
    capability = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2" if capability != "AVX2" else "DEFAULT")
    assert _cpu_kernels._build_dir() != here
    monkeypatch.undo()
    source = tmp_path / "_cpu_kernels.cpp"
    source.write_bytes(_cpu_kernels.SOURCE.read_bytes() + b"// changed\n")
    monkeypatch.setattr(_cpu_kernels, "SOURCE", source)
    assert _cpu_kernels._build_dir() != here


@needs_compiler
def test_a_failed_build_shows_the_compilers_first_error(fresh_cache, monkeypatch, tmp_path):
    source = tmp_path / "_cpu_kernels.cpp"  # fails at its first line (fast: no torch header is read)
    source.write_bytes(b'#include "batchless_no_such_header.h"\n' + _cpu_kernels.SOURCE.read_bytes())
    monkeypatch.setattr(_cpu_kernels, "SOURCE", source)
    with pytest.warns(UserWarning, match=r"fatal error: batchless_no_such_header\.h: No such file") as caught:
        assert not fused.build_cpu_kernels()
    assert "ninja: build stopped" not in str(caught[0].message)
    assert fused.path(torch.ones(2, 3)) == "eager"


def test_a_missing_compiler_says_so(fresh_cache, monkeypatch, tmp_path):
    compiler = tmp_path / "no-such-compiler"
    monkeypatch.setenv("CXX", str(compiler))
    with pytest.warns(UserWarning, match="could not build the CPU kernels") as caught:
        assert not fused.build_cpu_kernels()
    said = str(compiler) if shutil.which("ninja") else "ninja is not installed (pip install ninja)"
    assert said in str(caught[0].message)  # (the shell's "...: not found" or "No such file or directory")
    assert fused.path(torch.ones(2, 3)) == "eager"


def test_the_first_error_line_of_build_outputs():
    ninja = "Error building extension 'm': [1/2] c++ -c k.cpp -o k.o\nFAILED: [code=1] k.o\nc++ -c k.cpp -o k.o\n"
    compiler = "k.cpp: In function 'f':\nk.cpp:3:5: error: 'y' was not declared\n    3 | y;\nk.cpp:4:5: error: again\n"
    linker = "/usr/bin/ld: cannot find -lfoo\ncollect2: error: ld returned 1 exit status\n"
    stop = "ninja: build stopped: subcommand failed.\n"
    assert _cpu_kernels.first_error(ninja + compiler + stop) == "k.cpp:3:5: error: 'y' was not declared"
    assert _cpu_kernels.first_error(ninja + linker + stop) == "/usr/bin/ld: cannot find -lfoo"
    assert _cpu_kernels.first_error(ninja + "/bin/sh: 1: cc: not found\n" + stop) == "/bin/sh: 1: cc: not found"
    assert _cpu_kernels.first_error("ninja is not installed\n") == "ninja is not installed"
