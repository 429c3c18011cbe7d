"""batchless: Batchless Normalization (Berger & Uc Cetina, arXiv:2212.14729) for PyTorch.

A drop-in replacement for ``nn.BatchNorm*d`` whose statistics are learned parameters, trained by the
negative log likelihood of the layer's inputs, so that instances can be processed one at a time.
"""

from .errors import BatchlessError
from .loss import nll_loss, statistics_parameters
from .modules import BatchlessNorm1d, BatchlessNorm2d, BatchlessNorm3d
from .weighting import nll_weight

__version__ = "0.1.0"

__all__ = [
    "BatchlessError",
    "BatchlessNorm1d",
    "BatchlessNorm2d",
    "BatchlessNorm3d",
    "nll_loss",
    "nll_weight",
    "statistics_parameters",
]
