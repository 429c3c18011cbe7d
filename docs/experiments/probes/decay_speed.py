"""What the weight-decay exemption costs a step: the Fashion-MNIST CNN with the library's layer under
AdamW (weight decay 0.05, one thread), three ways, stepped in turn in one process: AdamW(model.parameters())
with decay_affine=True (the hook divides the decay out of the statistics), with the default
decay_affine=False (out of the statistics, weight and bias) and AdamW(bl.param_groups(model, 0.05)) (no
decay to cancel: the hook finds nothing to do). Medians of 200 steps after 20 warm-up steps, of
optimizer.step() alone and of the whole step (zero_grad, forward, backward, step); then the hook's own
work (batchless.optim._exempt_now) timed alone, 500 calls.
Usage: decay_speed.py [BATCH_SIZES] (default 1,64)."""
import statistics
import sys
import time
import warnings

import torch

import batchless as bl
from batchless.optim import _exempt_in_groups, _exempt_now
from batchless_experiments.models import build_model

warnings.simplefilter("ignore")
torch.set_num_threads(1)
WAYS = ("decay_affine=True", "decay_affine=False", "param_groups")
for bs in [int(b) for b in (sys.argv[1] if len(sys.argv) > 1 else "1,64").split(",")]:
    x, y = torch.randn(bs, 1, 28, 28), torch.randint(0, 10, (bs,))
    runs = {}
    for way in WAYS:
        torch.manual_seed(0)
        model = build_model("fashion-mnist", "batchless", std_speed=0.1, mean_speed=0.1,
                            decay_affine=way == "decay_affine=True")
        bl.init_from_data(model, [torch.randn(64, 1, 28, 28)])
        params = bl.param_groups(model, 0.05) if way == "param_groups" else model.parameters()
        runs[way] = (model, torch.optim.AdamW(params, 1e-3, weight_decay=0.05), [], [])
    for _ in range(220):
        for model, opt, steps, totals in runs.values():
            start = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            middle = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            steps.append(end - middle)
            totals.append(end - start)
    base_step, base_total = (statistics.median(runs["param_groups"][i][20:]) for i in (2, 3))
    for way, (_, _, steps, totals) in runs.items():
        step, total = statistics.median(steps[20:]), statistics.median(totals[20:])
        print(f"bs {bs} {way:20s} optimizer.step {step * 1e6:8.1f} us ({step / base_step:.3f}x)  "
              f"whole step {total * 1e3:7.2f} ms ({total / base_total:.3f}x)")
    for way in WAYS[:2]:
        opt = runs[way][1]
        times = []
        for _ in range(500):
            start = time.perf_counter()
            _exempt_now(opt, True)
            times.append(time.perf_counter() - start)
        count = sum(len(exempt) for group, exempt in _exempt_in_groups(opt))
        print(f"bs {bs} {way:20s} the hook alone: {statistics.median(times) * 1e6:.1f} us on {count} tensors")
