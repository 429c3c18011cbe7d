"""Training one cell of the batch-size study: (dataset, norm, batch size, seed, config) -> a result record.

The default loop is the paper's: Adam with default settings on the cross-entropy, a constant learning
rate for a fixed number of epochs, 20% of the training data held out for validation. The fair protocol
(``batchless sweep --lr-grid``) uses the same loop with a cosine learning-rate decay and a learning rate
chosen per cell (:mod:`.tuning`). Batchless layers are trained in the library's implicit mode (an unchanged
training loop) and initialized from data unless the config says otherwise. The options beyond the paper are
the ablations of EXPERIMENTS.md: a separate learning rate or optimizer for the statistics, data
initialization off, explicit NLL with a weight; and the optimizers users pick (AdamW with weight decay, SGD
with momentum 0.9).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .data import DATASETS, Splits
from .models import (
    MODELS,
    build_model,
    check_norm,
    default_model,
    is_batchless,
    standardize_weights,
    statistics_parameters,
)

T = TypeVar("T")
STATS_OPTIMIZERS = ("adam", "sgd", "ema")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
NLL_MODES = ("implicit", "explicit")
SGD_MOMENTUM = 0.9
RESULT_VERSION = 2  # bump when the training protocol changes, so old cells are not mistaken for new ones
# Options that only change batchless layers: other norms' cells run with their defaults (one shared baseline).
BATCHLESS_OPTIONS = ("data_init", "init_samples", "stats_lr_scale", "stats_optimizer", "nll_mode", "nll_weight",
                     "std_speed", "mean_speed", "decay_affine")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; received {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything except norm, batch size and seed that determines a cell's result.

    ``stats_lr_scale`` multiplies ``lr`` for the batchless statistics (mu, sigma); with
    ``stats_optimizer='ema'`` the product is the rate of the equivalent exponential moving average.
    ``nll_weight`` scales the NLL: ``loss + w * nll_loss`` in explicit mode, ``bl.nll_weight(w)`` in implicit.
    ``model`` and ``width`` None: the dataset's default model and width. ``optimizer``: ``adam``, ``adamw``
    (``weight_decay`` on every parameter, as ``AdamW(model.parameters())`` does) or ``sgd`` (momentum 0.9);
    ``schedule``: ``constant`` (the paper) or ``cosine`` (decay to 0 over the run, per step).
    """

    dataset: str = "mnist1d"
    epochs: int = 10
    lr: float = 1e-3
    num_samples: int | None = None
    model: str | None = None
    width: int | None = None
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "constant"
    data_init: bool = True
    init_samples: int = 1000
    stats_lr_scale: float = 1.0
    stats_optimizer: str = "adam"
    nll_mode: str = "implicit"
    nll_weight: float = 1.0
    std_speed: float = 1.0  # the layer's std_speed: 1 is the paper's method (the library's default is 0.1)
    mean_speed: float = 1.0  # the layer's mean_speed: 1 is the paper's method
    weight_std: bool = False  # standardize the weights feeding every norm (models.standardize_weights)
    # the layers' decay_affine: True (weight decay moves their weight and bias) is how every cell ran before
    # the option existed; the library's default is False (exempt, like the statistics)
    decay_affine: bool = True
    version: int = RESULT_VERSION

    def __post_init__(self) -> None:
        _choice("dataset", self.dataset, DATASETS)
        _choice("stats_optimizer", self.stats_optimizer, STATS_OPTIMIZERS)
        _choice("nll_mode", self.nll_mode, NLL_MODES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        if self.model is not None:
            _choice("model", self.model, MODELS)
        for name in ("epochs", "width", "init_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; received {getattr(self, name)}")
        for name in ("lr", "stats_lr_scale", "std_speed", "mean_speed"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; received {getattr(self, name)}")
        for name in ("nll_weight", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0; received {getattr(self, name)}")
        if self.weight_decay and self.optimizer != "adamw":
            raise ValueError(f"weight_decay needs optimizer 'adamw'; received optimizer {self.optimizer!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def changes(self) -> dict:
        """The fields that differ from the defaults, except the dataset."""
        default = TrainConfig()
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k != "dataset" and v != getattr(default, k)}


@dataclass(frozen=True)
class Cell:
    config: TrainConfig
    norm: str
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        check_norm(self.norm)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; received {self.batch_size}")

    @property
    def key(self) -> str:
        """Stable identity of the cell in the results store: the dataset, the config fields that differ from
        their defaults (so a field added later, at its default, leaves the keys of stored cells unchanged;
        a default is never changed: ``RESULT_VERSION`` is bumped instead), norm, batch size and seed."""
        config = json.dumps({"dataset": self.config.dataset, **self.config.changes()}, sort_keys=True)
        text = f"{config}|{self.norm}|{self.batch_size}|{self.seed}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @property
    def runnable(self) -> bool:
        """BatchNorm cannot train on a single instance."""
        return not (self.norm == "bn" and self.batch_size == 1)


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float
    val_acc: float
    nll: float | None
    seconds: float
    test_acc: float | None = None  # measured at 25, 50, 75 and 100 % of the epochs (time to accuracy)


@dataclass
class CellResult:
    test_acc: float
    test_loss: float
    val_acc_best: float
    val_acc_best_epoch: int
    val_loss_best: float
    test_acc_at_best_val: float
    wall_s: float
    act_mem_mb: float
    max_rss_mb: float
    history: list[EpochLog] = field(default_factory=list)


class EMAStatistics:
    """Natural-gradient SGD on the batchless statistics, which is an exponential moving average.

    For the NLL reduced as a mean over all elements, the Fisher information of mu_c is
    ``1 / (C sigma_c^2)`` and that of sigma_c is ``2 / (C sigma_c^2)`` (C = number of mu entries), so the
    natural-gradient step ``mu -= rate * C sigma^2 * dNLL/dmu`` is ``mu += rate * (mean_c(x) - mu)``, the
    update of BatchNorm's running mean with momentum ``rate``; likewise sigma moves toward the batch's
    root mean square deviation. The raw sigma parameter (log, abs or inv) is stepped through the chain rule
    ``dsigma/draw``, obtained with autograd, so this works for every parametrization; mu, stored as
    ``raw_mean = mu / mean_speed``, through ``dmu/draw_mean = mean_speed``.
    """

    def __init__(self, model: nn.Module, rate: float) -> None:
        stats = {id(p) for p in statistics_parameters(model)}
        self.rate = rate
        self.layers = [m for m in model.modules() if id(getattr(m, "raw_mean", None)) in stats]

    @torch.no_grad()
    def step(self) -> None:
        for m in self.layers:
            mu, raw = m.raw_mean, m.raw_std
            if mu.grad is None:
                continue
            with torch.enable_grad():
                sigma = m.std
                dsigma = torch.autograd.grad(sigma.sum(), raw)[0]
            c = mu.numel()
            var = sigma.detach() ** 2
            mu.sub_(self.rate * c * var / m.mean_speed**2 * mu.grad)
            dsigma = dsigma.sign() * dsigma.abs().clamp_min(1e-12) + (dsigma == 0)
            raw.sub_(self.rate * c * var / (2 * dsigma**2) * raw.grad)
            mu.grad = None
            raw.grad = None


def _optimizers(model: nn.Module, cfg: TrainConfig) -> list:
    stats = statistics_parameters(model)
    ids = {id(p) for p in stats}
    rest = [p for p in model.parameters() if id(p) not in ids]
    stats_lr = cfg.lr * cfg.stats_lr_scale

    def main(groups) -> torch.optim.Optimizer:
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=SGD_MOMENTUM)
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        return torch.optim.Adam(groups, lr=cfg.lr, fused=True)

    if not stats or cfg.stats_optimizer == "adam":  # "adam": the statistics in the main optimizer
        return [main([{"params": rest}] + ([{"params": stats, "lr": stats_lr}] if stats else []))]
    if cfg.stats_optimizer == "sgd":
        return [main(rest), torch.optim.SGD(stats, lr=stats_lr)]
    return [main(rest), EMAStatistics(model, stats_lr)]


def _schedulers(opts: list, cfg: TrainConfig, steps: int) -> list:
    """Per-step cosine decay to 0 over ``steps`` for the torch optimizers (the EMA rate stays constant)."""
    if cfg.schedule == "constant":
        return []
    return [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t / steps, 1.0))))
            for o in opts if isinstance(o, torch.optim.Optimizer)]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` in eval mode."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        out = model(x[i:i + batch_size])
        loss += F.cross_entropy(out, y[i:i + batch_size], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + batch_size]).sum().item()
    model.train(was_training)
    return loss / max(len(y), 1), correct / max(len(y), 1)


def activation_bytes(step: Callable[[], T]) -> tuple[int, T]:
    """``(bytes of the tensors autograd saves for backward during step(), its result)``; storages counted once.

    On CPU tracemalloc does not see tensor memory; the saved tensors are what grows with the batch.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    return sum(seen.values()), out


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A seeded shuffle of ``range(n)`` cut into batches; a trailing batch of one instance is dropped when
    ``batch_size > 1`` (BatchNorm cannot train on it; dropped for every norm alike)."""
    order = torch.randperm(n, generator=generator).split(batch_size)
    return list(order[:-1]) if batch_size > 1 and len(order[-1]) == 1 else list(order)


def _data_init(model: nn.Module, x: torch.Tensor, cfg: TrainConfig, seed: int) -> None:
    """The paper's data-dependent init of mu/sigma from ``cfg.init_samples`` seeded training instances
    (``bl.init_from_data`` measures in eval mode, i.e. without dropout, layer by layer)."""
    import batchless as bl

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[: cfg.init_samples]
    bl.init_from_data(model, list(x[idx].split(250)))


def progress_bar(iterable, total: int, desc: str, leave: bool, enabled: bool = True):
    """A tqdm bar on stderr, shown only when stderr is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave, disable=not (enabled and sys.stderr.isatty()),
                dynamic_ncols=True)


def log_line(message: str) -> None:
    """A line on stderr that does not break the progress bars there."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def describe_cell(cell: Cell) -> str:
    """The run in one line: dataset, model, norm with its variant (the batchless options that differ from the
    defaults), optimizer unless Adam, batch size, learning rate, seed; e.g. ``fashion-mnist cnn batchless
    [stats_lr_scale=0.1] bs=8 lr=0.0003 seed=1``."""
    cfg = cell.config
    changes = {k: v for k, v in cfg.changes().items() if k in BATCHLESS_OPTIONS and is_batchless(cell.norm)}
    variant = f" [{', '.join(f'{k}={v}' for k, v in sorted(changes.items()))}]" if changes else ""
    optimizer = "" if cfg.optimizer == "adam" else f" {cfg.optimizer}" + (
        f" wd={cfg.weight_decay:g}" if cfg.weight_decay else "")
    optimizer += " ws" if cfg.weight_std else ""
    return (f"{cfg.dataset} {cfg.model or default_model(cfg.dataset)} {cell.norm}{variant}{optimizer} "
            f"bs={cell.batch_size} lr={cfg.lr:g} seed={cell.seed}")


def checkpoints(epochs: int) -> set[int]:
    """The epochs after which test accuracy is measured: 25, 50, 75 and 100 % of the run (rounded up)."""
    return {math.ceil(epochs * q / 4) for q in range(1, 5)}


def train_cell(cell: Cell, splits: Splits, *, device: str = "cpu", progress: bool = True) -> CellResult:
    """Train and evaluate one cell; deterministic for a given cell on a given machine and thread count."""
    if not cell.runnable:
        raise ValueError(f"norm {cell.norm!r} cannot train at batch size {cell.batch_size}")
    cfg = cell.config
    start = time.perf_counter()
    torch.manual_seed(cell.seed)
    model = build_model(cfg.dataset, cell.norm, model=cfg.model, nll=cfg.nll_mode, width=cfg.width,
                        num_classes=splits.num_classes, std_speed=cfg.std_speed, mean_speed=cfg.mean_speed,
                        decay_affine=cfg.decay_affine)
    if cfg.weight_std:
        standardize_weights(model)
    x, y = splits.x_train.to(device), splits.y_train.to(device)
    xv, yv = splits.x_val.to(device), splits.y_val.to(device)
    xt, yt = splits.x_test.to(device), splits.y_test.to(device)
    if is_batchless(cell.norm) and cfg.data_init:
        _data_init(model, splits.x_train, cfg, cell.seed)
    model.to(device)
    opts = _optimizers(model, cfg)
    gen = torch.Generator().manual_seed(cell.seed)
    schedulers = _schedulers(opts, cfg, cfg.epochs * len(batches(len(y), cell.batch_size, torch.Generator())))
    nll_of = _nll_reader(model)
    weighting = _implicit_weighting(model, cfg)
    result = CellResult(0.0, 0.0, -1.0, 0, float("inf"), 0.0, 0.0, 0.0, 0.0)
    best_state = None
    act_bytes = 0
    test_at = checkpoints(cfg.epochs)

    epochs = progress_bar(range(1, cfg.epochs + 1), cfg.epochs, describe_cell(cell), leave=False, enabled=progress)
    for epoch in epochs:
        t0 = time.perf_counter()
        model.train()
        loss_sum, nll_sum, seen = torch.zeros(()), torch.zeros(()), 0
        for i, idx in enumerate(batches(len(y), cell.batch_size, gen)):
            idx = idx.to(device)

            def step(idx: torch.Tensor = idx) -> tuple[torch.Tensor, torch.Tensor]:
                with weighting:
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                nll = nll_of()
                total = loss + cfg.nll_weight * nll if cfg.nll_mode == "explicit" else loss
                for opt in opts:
                    if hasattr(opt, "zero_grad"):
                        opt.zero_grad(set_to_none=True)
                total.backward()
                return loss.detach(), nll.detach()

            if epoch == 1 and i == 0:
                act_bytes, (loss, nll) = activation_bytes(step)
            else:
                loss, nll = step()
            for opt in opts:
                opt.step()
            for sched in schedulers:
                sched.step()
            loss_sum += loss.cpu() * len(idx)
            nll_sum += nll.cpu() * len(idx)
            seen += len(idx)
        val_loss, val_acc = evaluate(model, xv, yv)
        log = EpochLog(epoch, loss_sum.item() / seen, val_loss, val_acc,
                       nll_sum.item() / seen if is_batchless(cell.norm) else None, time.perf_counter() - t0,
                       evaluate(model, xt, yt)[1] if epoch in test_at else None)
        result.history.append(log)
        if val_acc > result.val_acc_best:
            result.val_acc_best, result.val_acc_best_epoch, result.val_loss_best = val_acc, epoch, val_loss
            best_state = copy.deepcopy(model.state_dict())
        if hasattr(epochs, "set_postfix"):
            epochs.set_postfix(val_acc=f"{val_acc:.3f}")

    result.test_loss, result.test_acc = evaluate(model, xt, yt)
    model.load_state_dict(best_state)
    result.test_acc_at_best_val = evaluate(model, xt, yt)[1]
    result.wall_s = time.perf_counter() - start
    result.act_mem_mb = act_bytes / 2**20
    result.max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _implicit_weighting(model: nn.Module, cfg: TrainConfig):
    """``bl.nll_weight(cfg.nll_weight)`` for implicit batchless models, a no-op context otherwise."""
    if cfg.nll_mode != "implicit" or cfg.nll_weight == 1.0 or not statistics_parameters(model):
        return contextlib.nullcontext()
    import batchless as bl

    return _Reusable(lambda: bl.nll_weight(cfg.nll_weight))


class _Reusable:
    """A context manager that makes a fresh one-shot context each time it is entered."""

    def __init__(self, make) -> None:
        self.make, self.stack = make, []

    def __enter__(self):
        self.stack.append(self.make())
        return self.stack[-1].__enter__()

    def __exit__(self, *exc):
        return self.stack.pop().__exit__(*exc)


def _nll_reader(model: nn.Module) -> Callable[[], torch.Tensor]:
    """``bl.nll_loss(model)`` for batchless models, a zero otherwise."""
    if not statistics_parameters(model):
        zero = torch.zeros(())
        return lambda: zero
    import batchless as bl

    return lambda: bl.nll_loss(model)
