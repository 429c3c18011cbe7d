"""Probe (research code, not the library): a prototype batchless layer in the Fashion-MNIST study's CNN.

The layer is the paper's (log-sigma, implicit NLL gradient of weight 1, data init from 1,000 training
images) with the options the probes of EXPERIMENTS.md ("The statistics' speed") vary:
  proj  "none" (the paper) or "ema" (MABN-style backward: remove estimates, from past steps, of the
        channel gradient's mean and of its component along the centred x_hat: batch-independent)
  gain  sigma = exp(gain * raw): the raw parameter moves at the optimizer's rate, sigma `gain` times as
        fast under Adam (the library's std_speed)
and the run's: bs, epochs (8), lr (3e-3, cosine), seed, opt (adam, adamw + wd, sgd), stats_scale (a
learning-rate multiplier for the statistics' parameter group; slow = which of them: both, std, mean),
stats_opt (adam, or ema: the EMA-equivalent natural-gradient step), ws (batchless.standardize_weights on
the layer feeding each norm; before 2026-12-07 a copy of the formula on the convs only), norm (batchless,
or the library's bn / none), dataset (fashion-mnist, or mnist1d at its default size). It trains through
batchless_experiments.train (cosine schedule, 12,000 images: 9,600 to train on) and prints one JSON line. Example:
    .venv/bin/python docs/experiments/probes/probe.py '{"proj":"none","gain":0.1}' '{"bs":4,"lr":0.00075}'
"""
import json
import sys

import torch
from torch import nn


class Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mu, logs, gamma, beta, layer):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        s = logs.exp()
        xh = (x - mu.view(shape)) / s.view(shape)
        ctx.save_for_backward(xh, s, gamma)
        ctx.layer = layer
        return xh * gamma.view(shape) + beta.view(shape)

    @staticmethod
    def backward(ctx, gy):
        xh, s, gamma = ctx.saved_tensors
        L = ctx.layer
        shape = (1, -1) + (1,) * (xh.dim() - 2)
        dims = [0] + list(range(2, xh.dim()))
        C = xh.shape[1]
        a, b = xh.mean(dims), (xh * xh).mean(dims)
        g_mu = -a / (C * s) * L.w
        g_logs = (1 - b) / C * L.w
        g_gamma, g_beta = (gy * xh).sum(dims), gy.sum(dims)
        g = gy * gamma.view(shape)
        if L.proj == "none":
            gx = g / s.view(shape)
        else:
            st = L.state
            if st is None:  # first step: estimates from this batch (plain, no projection yet)
                gx = g / s.view(shape)
            else:
                m_g, m_x, c_y = st
                xc = xh - m_x.view(shape)
                gx = (g - L.k1 * m_g.view(shape) - L.ky * xc * c_y.view(shape)) / s.view(shape)
            # update the estimates from this batch (used from the next step on)
            xc_b = xh - a.view(shape)
            mg, mgx, vx = g.mean(dims), (g * xc_b).mean(dims), (xc_b * xc_b).mean(dims)
            r = L.rate
            if L.raw is None:
                L.raw = [mg, a, mgx, vx]
            else:
                L.raw = [(1 - r) * o + r * n for o, n in zip(L.raw, [mg, a, mgx, vx], strict=True)]
            L.state = (L.raw[0], L.raw[1], L.raw[2] / L.raw[3].clamp_min(1e-6))
        return gx, g_mu, g_logs, g_gamma, g_beta, None

class Proto(nn.Module):
    def __init__(self, c, proj="none", rate=0.1, k1=1.0, ky=1.0, w=1.0, gain=1.0):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(c))
        self.raw_std = nn.Parameter(torch.zeros(c))
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.proj, self.rate, self.k1, self.ky, self.w = proj, rate, k1, ky, w
        self.state, self.raw, self.gain = None, None, gain
    @property
    def std(self): return (self.gain * self.raw_std).exp()
    def forward(self, x):
        if not self.training:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return (x - self.mean.view(shape)) / self.std.view(shape) * self.weight.view(shape) + self.bias.view(shape)
        return Fn.apply(x, self.mean, self.gain * self.raw_std, self.weight, self.bias, self)

def init_from_data(model, x):
    """mean/std of each Proto layer from its input, layer by layer in eval mode (dependency order by hooks)."""
    layers = [m for m in model.modules() if isinstance(m, Proto)]
    model.eval()
    with torch.no_grad():
        for layer in layers:
            got = {}
            h = layer.register_forward_pre_hook(lambda m, inp, got=got: got.setdefault("x", inp[0]))
            model(x)
            h.remove()
            t = got["x"]
            dims = [0] + list(range(2, t.dim()))
            layer.mean.copy_(t.mean(dims))
            layer.raw_std.copy_(t.std(dims).clamp_min(1e-3).log() / layer.gain)
    model.train()

def run(norm_kwargs, bs=64, epochs=8, lr=3e-3, seed=0, stats_scale=1.0, wd=0.0, opt="adam", num_samples=12000,
        stats_opt="adam", ws=False, norm="batchless", slow="both", dataset="fashion-mnist"):
    import batchless_experiments.models as M
    import batchless_experiments.train as T
    from batchless_experiments import data
    from batchless_experiments.train import Cell, TrainConfig, train_cell
    torch.set_num_threads(1)
    def make_norm(norm, c, dims, nll="implicit", *args, **kwargs):
        return Proto(c, **norm_kwargs)
    if norm == "batchless":
        M.make_norm = make_norm
    if ws:  # the library's weight standardization of the layer feeding each norm (any norm)
        import batchless as bl
        T.standardize_weights = lambda m: bl.standardize_weights(
            m, before=(Proto, nn.BatchNorm1d, nn.BatchNorm2d, nn.Identity))
    pick = {"both": ("mean", "raw_std"), "std": ("raw_std",), "mean": ("mean",)}[slow]
    M.statistics_parameters = lambda model: [
        getattr(m, n) for m in model.modules() if isinstance(m, Proto) for n in pick]
    T.statistics_parameters = M.statistics_parameters
    T._data_init = lambda model, x, cfg, seed: init_from_data(
        model, x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:1000]])
    T._nll_reader = lambda model: (lambda: torch.zeros(()))
    T.is_batchless = lambda n: n == "batchless"
    num_samples = num_samples if dataset == "fashion-mnist" else None  # (MNIST-1D: its default size)
    splits = data.load(dataset, num_samples=num_samples)
    extra = {"weight_decay": wd} if wd else {}
    cfg = TrainConfig(dataset=dataset, num_samples=num_samples, schedule="cosine", epochs=epochs, lr=lr,
                      stats_lr_scale=stats_scale, optimizer=opt, stats_optimizer=stats_opt, weight_std=ws, **extra)
    r = train_cell(Cell(cfg, norm, bs, seed), splits, progress=False)
    return r

if __name__ == "__main__":
    kw = json.loads(sys.argv[1])
    run_kw = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    r = run(kw, **run_kw)
    print(json.dumps({"norm": kw, "run": run_kw, "test": r.test_acc,
                      "curve": {h.epoch: h.test_acc for h in r.history if h.test_acc},
                      "val": [round(h.val_acc, 4) for h in r.history]}), flush=True)
