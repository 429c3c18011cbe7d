"""Differentially private training (DP-SGD with Opacus) on Fashion-MNIST: GroupNorm, batchless or none.

    .venv/bin/python examples/train_dp.py --norm batchless            # after `make install`
    .venv/bin/python examples/train_dp.py --norm gn --epsilon 3 --epochs 5 --num-samples 60000

DP-SGD clips each sample's gradient and adds Gaussian noise to their sum, so it needs per-sample gradients,
and Opacus refuses BatchNorm: a batch's statistics mix its samples. DP users fall back to GroupNorm, whose
statistics are per sample (and cost at inference). Batchless statistics are parameters, like a weight:
Opacus's default ``grad_sample_mode="hooks"`` computes their exact per-sample gradients (through
``torch.func`` for layers it does not know), clips them with the rest of each sample's gradient and noises
them; at inference the layer folds into the conv before it. (``grad_sample_mode="ew"`` does not work with
batchless layers.)

The model is the study's CNN (``batchless_experiments.models``, 16 channels, a normalization layer on the
input and after every hidden layer); the noise is chosen by Opacus for ``--epsilon``/``--delta`` over
``--epochs`` with Poisson sampling of expected batch ``--batch-size``. Data-dependent initialization would
read the private data outside the privacy accounting, so the statistics start at mean 0, std 1 unless
``--public-init N`` initializes them from N validation images, which stand in for public data (they are
not trained on). Fashion-MNIST comes from Debian's dataset-fashion-mnist (``make install`` installs it) or
``--data-dir``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

import batchless as bl
from batchless_experiments.data import load
from batchless_experiments.models import build_model

NORMS = {"gn": "GroupNorm", "batchless": "batchless", "none": "no normalization"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--norm", choices=NORMS, default="batchless")
    p.add_argument("--epsilon", type=float, default=3.0, help="privacy budget of the whole run")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="per-sample clipping bound C")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256, help="expected batch (Poisson sampling)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--num-samples", type=int, default=12800, help="the first N training and test images")
    p.add_argument("--public-init", type=int, default=0, metavar="N",
                   help="batchless: initialize the statistics from N validation images (public stand-ins)")
    p.add_argument("--data-dir", default=None, help="folder of Fashion-MNIST's four IDX files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std-speed", type=float, default=1.0,
                   help="the batchless layers' std_speed (default 1, the paper's, as in README's table)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data = load("fashion-mnist", num_samples=args.num_samples, data_dir=args.data_dir)
    torch.manual_seed(args.seed)
    model = build_model("fashion-mnist", args.norm, std_speed=args.std_speed)
    if args.norm == "batchless" and args.public_init:
        bl.init_from_data(model, [data.x_val[:args.public_init]])
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=args.batch_size, shuffle=True)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=args.epsilon,
        target_delta=args.delta, epochs=args.epochs, max_grad_norm=args.max_grad_norm)
    print(f"fashion-mnist DP-SGD, {NORMS[args.norm]}: {len(data.y_train)} training images, noise multiplier "
          f"{optimizer.noise_multiplier:.3f}, C={args.max_grad_norm}, expected batch {args.batch_size}, "
          f"seed {args.seed}", flush=True)

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        losses = []
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        accuracy = evaluate(model, data.x_test, data.y_test)
        print(f"epoch {epoch + 1}: train loss {sum(losses) / max(len(losses), 1):.4f}, test accuracy "
              f"{accuracy:.4f}, epsilon {engine.get_epsilon(args.delta):.2f} (delta {args.delta:g}), "
              f"{time.perf_counter() - start:.0f} s", flush=True)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    hits = [(model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(1000), y.split(1000), strict=True)]
    return sum(hits) / len(y)


if __name__ == "__main__":
    main()
