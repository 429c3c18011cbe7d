"""Probe: what the mean's gain costs a training step. Layers with mean_speed 1 (no gain) and 0.1, stepped in
turn (forward + backward, one thread, the native route when built), medians of 350 steps after 50 of warm-up."""
import statistics
import time

import torch

import batchless as bl

torch.set_num_threads(1)
bl.fused.build_cpu_kernels()
for shape in [(32, 16, 16, 16), (8, 64, 8, 8), (64, 32)]:
    x = torch.randn(*shape, requires_grad=True)
    cls = bl.BatchlessNorm2d if len(shape) == 4 else bl.BatchlessNorm1d
    layers = {s: cls(shape[1], mean_speed=s) for s in (1.0, 0.1)}
    for layer in layers.values():
        layer.set_std(torch.ones(shape[1]))
    times = {s: [] for s in layers}
    for _ in range(400):
        for s, layer in layers.items():
            t = time.perf_counter()
            layer(x).sum().backward()
            times[s].append(time.perf_counter() - t)
    med = {s: statistics.median(v[50:]) * 1e6 for s, v in times.items()}
    print(f"{shape} route={bl.fused.route(x, layers[0.1]).value} median us: mean_speed 1 {med[1.0]:.1f}, "
          f"0.1 {med[0.1]:.1f}; ratio {med[0.1] / med[1.0]:.3f}")
