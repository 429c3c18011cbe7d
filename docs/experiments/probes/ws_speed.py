"""What standardize_weights costs a training step: the Fashion-MNIST CNN with the library's layer, Adam,
one thread, with and without it, interleaved in one process; median of 50 steps after 10 warm-up steps
per batch size. Usage: ws_speed.py [BATCH_SIZES] (default 1,64,256)."""
import statistics
import sys
import time
import warnings

import torch

import batchless as bl
from batchless_experiments.models import build_model, standardize_weights

warnings.simplefilter("ignore")
torch.set_num_threads(1)
for bs in [int(b) for b in (sys.argv[1] if len(sys.argv) > 1 else "1,64,256").split(",")]:
    x, y = torch.randn(bs, 1, 28, 28), torch.randint(0, 10, (bs,))
    runs = {}
    for ws in (False, True):
        torch.manual_seed(0)
        model = build_model("fashion-mnist", "batchless", std_speed=0.1, mean_speed=0.1)
        if ws:
            standardize_weights(model)
        bl.init_from_data(model, [torch.randn(64, 1, 28, 28)])
        runs[ws] = (model, torch.optim.Adam(model.parameters(), 1e-3), [])
    for _ in range(60):
        for model, opt, times in runs.values():
            start = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - start)
    a, b = (statistics.median(runs[ws][2][10:]) for ws in (False, True))
    print(f"bs {bs}: {a * 1e3:.2f} ms a step, with standardize_weights {b * 1e3:.2f} ms: {b / a:.2f}x")
