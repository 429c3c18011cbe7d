"""The documentation runs: every ```python block of the README, every docstring example."""

import doctest
import importlib
import pathlib
import re

import pytest
import torch
from torch import nn

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert len(BLOCKS) >= 4


def run(block: str) -> dict:
    namespace = {"__name__": "readme"}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index):
    run(BLOCKS[index])


def test_readme_migrate_init_fold_does_what_it_says():
    (block,) = [b for b in BLOCKS if "convert_batchnorm" in b]
    ns = run(block)
    x = ns["batches"][0]
    with torch.no_grad():
        want = ns["bn_model"](x)
        for name in ("model", "deployable", "exportable"):
            assert (ns[name](x) - want).abs().max() <= 1e-5 * want.abs().max(), name
        y = ns["fresh"][1](ns["fresh"][0](torch.cat(ns["batches"])))
    assert y.mean().abs() < 1e-3 and (y.std() - 1).abs() < 1e-2
    assert isinstance(ns["deployable"][1], nn.Identity) and isinstance(ns["exportable"][1], nn.BatchNorm2d)


PUBLIC_MODULES = ["batchless", "batchless.accumulate", "batchless.convert", "batchless.fold",
                  "batchless.functional", "batchless.fused", "batchless.init", "batchless.loss",
                  "batchless.modules", "batchless.optim", "batchless.standardize", "batchless.weighting"]


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0
