"""Building and loading the C++ CPU kernels of :mod:`batchless.fused` (``_cpu_kernels.cpp``).

Compiled on request by :func:`batchless.fused.build_cpu_kernels` and cached under
``$BATCHLESS_CACHE`` (default ``~/.cache/batchless``) in a directory named after a hash of what the
binary depends on: the source, torch's version and C++ ABI, the Python ABI, the instruction sets
and the OpenMP runtime. Not paths, so venvs with the same torch and Python share a build; nor the
compiler, whose builds are interchangeable (torch passes its ABI flag to every one) and which a
machine that only loads the build may lack.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import torch

from .errors import warn

SOURCE = Path(__file__).with_name("_cpu_kernels.cpp")
# Instruction sets by the capability ATen itself dispatches to on this CPU (never -march=native: a
# cache directory shared by different machines would then hold code that some of them cannot run).
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


def _flags() -> list[str]:
    return ["-O3", "-fopenmp", *_ARCH_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]


def _bundled_openmp() -> Path | None:
    """The OpenMP runtime that torch bundles (and has loaded), if any."""
    found = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return found[0] if found else None


def _link_flags() -> list[str]:
    """OpenMP from the runtime torch loaded (one thread pool per process), else the compiler's."""
    bundled = _bundled_openmp()
    return [f"-L{bundled.parent}", f"-l:{bundled.name}"] if bundled else ["-fopenmp"]


def _build_dir() -> Path:
    """The cache directory of this build (its name is also the module's name)."""
    bundled = _bundled_openmp()
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(" ".join([
        torch.__version__, torch.version.git_version, f"cxx11abi={torch.compiled_with_cxx11_abi()}",
        sysconfig.get_config_var("EXT_SUFFIX") or sys.implementation.cache_tag, *_flags(),
        f"openmp={bundled.name if bundled else 'compiler'}"]).encode())
    root = Path(os.environ.get("BATCHLESS_CACHE") or Path.home() / ".cache" / "batchless")
    return root / f"batchless_cpu_{key.hexdigest()[:16]}"


def can_build() -> bool:
    """Whether the C++ compiler torch would use (``$CXX``, else ``c++``) and ``ninja`` exist."""
    return all(shutil.which(tool) for tool in (os.environ.get("CXX") or "c++", "ninja"))


def build_command() -> str:
    """The shell command that builds the kernels for this interpreter."""
    code = "import batchless.fused; batchless.fused.build_cpu_kernels()"
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def load(build: bool = False, verbose: bool = False) -> ModuleType | None:
    """The compiled module (``supports``, ``train``, ``eval``) from the cache, or None when it is
    not built (warning with the command that builds it where a compiler and ninja exist: never
    compiled unasked, a minute inside a training step) or does not load (warning why). With
    ``build``, a missing or unloadable build is compiled (``verbose``: with the compiler's output);
    build errors propagate."""
    directory = _build_dir()
    library = directory / f"{directory.name}.so"
    if library.is_file():
        try:
            spec = importlib.util.spec_from_file_location(library.stem, library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except ImportError as error:  # a damaged file: training must not fail for a faster route
            if not build:
                warn(f"batchless: the cached CPU kernels in {directory} did not load ({error}); "
                     f"using the eager route ({build_command()} rebuilds them)")
                return None
    elif not build:
        if can_build():
            warn("batchless: the native CPU kernels are not built, so batchless layers run on the "
                 "eager route (the same results, slower). Build them once per machine (about a "
                 f"minute; cached in {directory.parent}): {build_command()}")
        return None
    from torch.utils import cpp_extension

    if not shutil.which("ninja"):
        raise RuntimeError("ninja is not installed (pip install ninja)")
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(directory.name, [str(SOURCE)], extra_cflags=_flags(),
                              extra_ldflags=_link_flags(), build_directory=str(directory),
                              verbose=verbose)


def first_error(message: str) -> str:
    """A failed build's message in one line: the compiler's first error (ninja prints ``FAILED:
    target``, the command, then its output), else the message's last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    failed = next((i for i, line in enumerate(lines) if line.startswith("FAILED:")), None)
    if failed is None:
        return lines[-1] if lines else ""
    output = [line for line in lines[failed + 2:] if not line.startswith("ninja: ")] or lines[-1:]
    errors = (line for line in output if "error:" in line and not line.startswith("collect2:"))
    return next(errors, output[0])
