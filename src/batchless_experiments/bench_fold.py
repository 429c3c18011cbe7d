"""Benchmark of ``batchless.fold``: inference of a folded batchless model vs the same model without normalization.

The model is the small ResNet of :mod:`.bench_speed` (every batchless layer follows a convolution, so all
fold away). Candidates are timed interleaved (order alternating per round); the reported ratio is the
median over rounds of the paired ratio folded / no-normalization, so 1.0 means "costs nothing". Folding
gives every convolution a bias, which the no-normalization ResNet (bias-free convolutions, as in the
normalized ones) lacks; ``ratio_biased`` compares with that ResNet given zero conv biases, i.e. what the
folded network costs beyond a network without normalization that has them.
"""

from __future__ import annotations

import copy
import statistics

import torch

import batchless as bl

from .bench_speed import inference_step, resnet, summarize, time_interleaved


def benchmark_fold(batch: int = 32, image: int = 32, *, rounds: int = 30, warmup: int = 3, device="cpu",
                   quick: bool = False) -> dict:
    """Time eval-mode inference of the ResNet: batchless (unfolded), folded, and without normalization.

    Returns a dict with per-candidate median/quartile ms (``results``), ``ratio`` (folded / none, median
    of paired per-round ratios), ``ratio_unfolded`` (batchless / none), ``max_rel_diff`` between the
    folded and unfolded outputs and ``batchless_layers_left`` in the folded model (0 expected).
    """
    device = torch.device(device)
    widths = (4, 8, 8) if quick else (16, 32, 64)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, image, image, device=device)
    model = resnet("batchless", widths).to(device)
    bl.init_from_data(model, [x])  # non-trivial statistics, so that the equality check means something
    model.eval()
    folded = bl.fold(model)
    plain = resnet("none", widths).to(device).eval()
    with torch.no_grad():
        want = model(x)
        max_rel_diff = ((folded(x) - want).abs().max() / want.abs().max()).item()
    biased = copy.deepcopy(plain)
    for conv in biased.modules():
        if isinstance(conv, torch.nn.Conv2d) and conv.bias is None:
            conv.bias = torch.nn.Parameter(torch.zeros(conv.out_channels, device=device))
    fns = {"none": inference_step(plain, x), "none+bias": inference_step(biased, x),
           "folded": inference_step(folded, x), "batchless": inference_step(model, x)}
    faults = {}
    samples = time_interleaved(fns, rounds=rounds, inner=1 if quick else None, warmup=warmup, device=device,
                               faults=faults)
    results = {name: {k: v for k, v in rec.items() if k != "ratio_to_bn"}
               for name, rec in summarize(samples, reference="none", faults=faults).items()}

    def paired(name: str, reference: str = "none") -> float:
        return statistics.median(t / r for t, r in zip(samples[name], samples[reference], strict=True))

    return {
        "model": f"resnet{2 + 2 * len(widths)}-{'-'.join(map(str, widths))}",
        "input": [batch, 3, image, image],
        "device": str(device),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "results": results,
        "ratio": paired("folded"),
        "ratio_biased": paired("folded", "none+bias"),
        "ratio_unfolded": paired("batchless"),
        "max_rel_diff": max_rel_diff,
        "batchless_layers_left": sum(1 for _ in bl.loss.batchless_layers(folded)),
    }


if __name__ == "__main__":  # python -m batchless_experiments.bench_fold
    import json

    print(json.dumps(benchmark_fold(), indent=2))
