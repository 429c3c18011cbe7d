"""batchless: Batchless Normalization (Berger & Uc Cetina, arXiv:2212.14729) for PyTorch.

A drop-in replacement for ``nn.BatchNorm*d`` whose statistics are learned parameters, trained by the
negative log likelihood of the layer's inputs, so that instances can be processed one at a time.

Example::

    >>> import torch, batchless as bl
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bl.BatchlessNorm2d(8))
    >>> model(torch.randn(1, 3, 8, 8)).sum().backward()  # mean/std get their NLL gradient too
    >>> model[1].raw_mean.grad.shape
    torch.Size([8])
"""

from .accumulate import accumulate
from .convert import convert_batchnorm, register_conversion, to_batchnorm
from .errors import BatchlessError
from .fold import fold
from .init import init_from_data
from .loss import nll_loss, statistics_parameters
from .modules import BatchlessNorm1d, BatchlessNorm2d, BatchlessNorm3d
from .optim import param_groups
from .standardize import standardize_weights
from .weighting import nll_weight

__version__ = "0.1.0"

__all__ = [
    "BatchlessError",
    "BatchlessNorm1d",
    "BatchlessNorm2d",
    "BatchlessNorm3d",
    "accumulate",
    "convert_batchnorm",
    "fold",
    "init_from_data",
    "nll_loss",
    "nll_weight",
    "param_groups",
    "register_conversion",
    "standardize_weights",
    "statistics_parameters",
    "to_batchnorm",
]
