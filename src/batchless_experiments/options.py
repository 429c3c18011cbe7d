"""Command-line options shared by ``demo`` and ``sweep``, and their translation into a TrainConfig."""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from .data import DATASETS
from .models import MODELS, NORMS, is_batchless
from .train import BATCHLESS_OPTIONS, NLL_MODES, OPTIMIZERS, SCHEDULES, SGD_MOMENTUM, STATS_OPTIMIZERS, TrainConfig


def int_list(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``, each >= 1."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8,64; received {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 like 1,8,64; received {text!r}")
    return values


def float_list(text: str) -> list[float]:
    """``"0.333,1,3"`` -> ``[0.333, 1.0, 3.0]``, each > 0."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not min(values) > 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0 like 0.333,1,3; received {text!r}")
    return values


def norm_list(text: str) -> list[str]:
    """``"none,bn,batchless"`` -> the list, each a known norm name."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in NORMS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated norms from {', '.join(NORMS)}; received {text!r}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return values


def _positive(text: str, parse, expected: str):
    try:
        value = parse(text)
    except ValueError:
        value = 0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected {expected}; received {text!r}")
    return value


def positive_int(text: str) -> int:
    return _positive(text, int, "an integer >= 1")


def positive_float(text: str) -> float:
    return _positive(text, float, "a number > 0")


def device_name(text: str) -> str:
    """A torch device of this machine, e.g. ``cpu``, ``cuda``, ``cuda:1``."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:0; received {text!r}") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} requested but CUDA is not available here; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r} requested but this machine has {torch.cuda.device_count()} "
                                         "CUDA device(s)")
    return text


def output_file(text: str) -> str:
    """A file to write: not a folder, and its folder, if missing, creatable (checked before any work, so that
    no result is lost; commands create the folder with :func:`make_parent` when they start)."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"expected a file path; {text!r} is a folder")
    existing = os.path.dirname(os.path.abspath(text))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {existing} is not a writable folder")
    return text


def make_parent(path: str | None) -> None:
    """Create the folder of an :func:`output_file` path (None: nothing to do)."""
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)


def add_training_options(p: argparse.ArgumentParser, *, epochs: int | None, num_samples: int | None,
                         threads: int | None = None) -> None:
    d = TrainConfig()
    p.add_argument("--epochs", type=positive_int, default=epochs,
                   help=f"epochs per cell (default {epochs or 'per dataset'})")
    p.add_argument("--lr", type=positive_float, default=d.lr, help=f"learning rate (default {d.lr})")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help=f"adam (the paper), adamw (with --weight-decay) or sgd (momentum {SGD_MOMENTUM}); "
                        f"default {d.optimizer}")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW's decoupled weight decay, applied to every parameter as AdamW(model.parameters()) "
                        "does (default 0)")
    p.add_argument("--weight-std", action="store_true",
                   help="standardize the weights of the conv or linear layer feeding each normalization layer "
                        "(batchless.standardize_weights; for 'none' the layer where the norm would be)")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help="learning rate over the run: constant (the paper) or cosine decay to 0 (default "
                        f"{d.schedule})")
    p.add_argument("--num-samples", type=positive_int, default=num_samples,
                   help=f"size of the generated dataset (default {num_samples})" if num_samples else
                   "size of the generated dataset (default: mnist1d 5000, synthetic 6000); caps the train and the "
                   "test set of the image datasets")
    p.add_argument("--model", choices=MODELS, default=None,
                   help="cnn (the paper's CNN, adapted to the input), resnet (ResNet-8) or mlp (dense 2x256) for the "
                        "image datasets; default: cnn (mlp for synthetic)")
    p.add_argument("--width", type=positive_int, default=None,
                   help="channels of the CNN or of the ResNet's first stage, or the MLP's hidden units (default: "
                        "mnist1d 32, cifar10 64, 28x28 images 16, resnet 16, mlp 256, synthetic's mlp 64)")
    p.add_argument("--device", type=device_name, default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=positive_int, default=threads,
                   help=f"torch.set_num_threads for the run (default: {threads or 'torch chooses'})")
    g = p.add_argument_group("batchless options (ablations; the defaults are the paper's method)")
    g.add_argument("--no-data-init", dest="data_init", action="store_false",
                   help="start from mu=0, sigma=1 instead of initializing mu/sigma from training data")
    g.add_argument("--init-samples", type=positive_int, default=d.init_samples,
                   help=f"training instances for the data init (default {d.init_samples})")
    g.add_argument("--stats-lr-scale", type=positive_float, default=d.stats_lr_scale,
                   help="learning-rate multiplier for mu/sigma (default 1: one learning rate for everything)")
    g.add_argument("--stats-optimizer", choices=STATS_OPTIMIZERS, default=d.stats_optimizer,
                   help="optimizer for mu/sigma: adam (with the weights), sgd, or ema (natural-gradient SGD, "
                        "equivalent to an exponential moving average with rate lr*stats-lr-scale)")
    g.add_argument("--nll-mode", choices=NLL_MODES, default=d.nll_mode, help="library NLL mode")
    g.add_argument("--nll-weight", type=float, default=d.nll_weight, help="weight of the NLL (default 1)")
    g.add_argument("--std-speed", type=positive_float, default=d.std_speed,
                   help="the layers' std_speed: sigma learns this many times as fast as at 1 under Adam "
                        f"(default {d.std_speed:g}, the paper's method; the library's own default is "
                        f"{library_speeds()[0]:g})")
    g.add_argument("--mean-speed", type=positive_float, default=d.mean_speed,
                   help="the layers' mean_speed: mu learns this many times as fast as at 1 under Adam "
                        f"(default {d.mean_speed:g}, the paper's method; the library's own default is "
                        f"{library_speeds()[1]:g})")
    g.add_argument("--no-decay-affine", dest="decay_affine", action="store_false",
                   help="exempt the layers' weight and bias from weight decay, as the library does by default "
                        "(decay_affine=False); without it they are decayed, as in every cell run before the option")


def config_from_args(args: argparse.Namespace, dataset: str) -> TrainConfig:
    fields = ("epochs", "lr", "num_samples", "model", "width", "optimizer", "weight_decay", "schedule", "data_init",
              "init_samples", "stats_lr_scale", "stats_optimizer", "nll_mode", "nll_weight", "std_speed", "mean_speed",
              "weight_std", "decay_affine")
    return TrainConfig(dataset=dataset, **{k: getattr(args, k) for k in fields})


def config_for_norm(config: TrainConfig, norm: str) -> TrainConfig:
    """The config a cell of ``norm`` runs under: the batchless-only options are reset to their defaults for
    the other norms, so that a baseline cell is shared by every ablation that does not change it."""
    if is_batchless(norm):
        return config
    default = TrainConfig()
    return dataclasses.replace(config, **{k: getattr(default, k) for k in BATCHLESS_OPTIONS})


def library_speeds() -> tuple[float, float]:
    """``(std_speed, mean_speed)`` of the library's layers by default (what a user gets without asking)."""
    import batchless as bl

    layer = bl.BatchlessNorm1d(1)
    return layer.std_speed, layer.mean_speed


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


__all__ = ["DATASETS", "add_training_options", "apply_threads", "config_for_norm", "config_from_args", "device_name",
           "float_list", "int_list", "make_parent", "norm_list", "output_file"]
