"""Data-parallel training of a batchless model: one script for one process and for ``torchrun``.

    python examples/train_ddp.py                                   # one process
    torchrun --nproc_per_node=2 examples/train_ddp.py              # 2 processes on this machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST:29500 --rdzv_id=job1 examples/train_ddp.py   # on each of 2 machines

The model's normalization layers are ``BatchlessNorm2d``/``BatchlessNorm1d``: their statistics (mean, std)
are ordinary parameters, so ``DistributedDataParallel`` averages their gradients with all the others and the
replicas stay identical. No ``SyncBatchNorm`` conversion, no collective per layer, no buffers to broadcast,
and evaluation needs no synchronisation at all.

``--batch-size`` is the *global* batch: each of the R processes takes ``batch_size / R`` instances per step
(through ``DistributedSampler``, in ``--micro-batch-size`` pieces with ``batchless.accumulate``), and since
every rank's loss is a mean over an equal share, DDP's average of the ranks' gradients is the gradient of the
global batch. The same command line therefore trains the same model on 1 or R processes, up to float
rounding. Data: scikit-learn's bundled 8x8 digits (no download); ``--data synthetic`` needs nothing.
Backend: NCCL with one GPU per process where CUDA is available, gloo on CPU.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import batchless as bl


def load_data(name: str, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets of 1x8x8 images in [-1, 1] and 10 classes."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
        y = torch.tensor(digits.target)
    else:  # class-dependent blobs of pixels: learnable, nothing to install
        g = torch.Generator().manual_seed(1234)
        y = torch.randint(0, 10, (2000,), generator=g)
        x = torch.randn(10, 1, 8, 8, generator=g)[y] + torch.randn(len(y), 1, 8, 8, generator=g)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(y) // 5
    return TensorDataset(x[n_test:], y[n_test:]), TensorDataset(x[:n_test], y[:n_test])


def make_model() -> nn.Module:
    """A small CNN with a batchless layer on the input and after every hidden layer."""
    return nn.Sequential(
        bl.BatchlessNorm2d(1),
        nn.Conv2d(1, 32, 3, padding=1), bl.BatchlessNorm2d(32), nn.LeakyReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), bl.BatchlessNorm2d(64), nn.LeakyReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 2 * 2, 64), bl.BatchlessNorm1d(64), nn.LeakyReLU(),
        nn.Linear(64, 10),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("digits", "synthetic"), default="digits")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split over the processes")
    p.add_argument("--micro-batch-size", type=int, default=16, help="instances per forward on each process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    # torchrun sets WORLD_SIZE, RANK, LOCAL_RANK; without it this is an ordinary single process
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} processes")

    train_set, test_set = load_data(args.data, args.seed)
    torch.manual_seed(args.seed)
    model = make_model().to(device)
    # data-dependent init of mu/sigma (the same samples on every rank; DDP also broadcasts rank 0's values)
    bl.init_from_data(model, [train_set.tensors[0][:512].to(device)])
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    stats = set(bl.statistics_parameters(model))
    opt = torch.optim.Adam([
        {"params": [q for q in model.parameters() if q not in stats]},
        {"params": list(stats), "lr": args.lr / 10},  # a slower average for the statistics
    ], lr=args.lr)

    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    loader = DataLoader(train_set, batch_size=args.batch_size // world, sampler=sampler, drop_last=True)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        total = torch.zeros(2, device=device)  # summed loss, steps
        for x, y in loader:
            opt.zero_grad()
            loss = bl.accumulate(model, F.cross_entropy, x.to(device), y.to(device),
                                 micro_batch_size=args.micro_batch_size)
            opt.step()
            total += torch.stack([loss, torch.ones_like(loss)])
        if world > 1:  # for the log line only: training itself needs no collective beyond DDP's
            dist.all_reduce(total)
        accuracy = evaluate(model, test_set, device)
        if rank == 0:
            print(f"epoch {epoch + 1}: train loss {total[0].item() / total[1].item():.4f}, "
                  f"test accuracy {accuracy:.4f} ({world} process{'es' if world > 1 else ''})", flush=True)
    if world > 1:
        dist.destroy_process_group()


@torch.no_grad()
def evaluate(model: nn.Module, test_set: TensorDataset, device: torch.device) -> float:
    """Accuracy on the whole test set, on every rank (the replicas are identical; no collective)."""
    model.eval()
    x, y = test_set.tensors
    return (model(x.to(device)).argmax(1).cpu() == y).float().mean().item()


if __name__ == "__main__":
    main()
